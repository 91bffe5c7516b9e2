"""What a mesh config does to a model, before anything runs: the device grid per node and
every parameter's sharding and per-device bytes under the training and sampling rules.
Works from abstract shapes, so a 7B model on 512 emulated devices costs no memory."""

from __future__ import annotations

import math
from typing import List

import numpy as np
from flax import nnx, traverse_util

from r1jax import mesh as mesh_lib
from r1jax.config import Config
from r1jax.models.transformer import Transformer, num_params


def describe_mesh(cfg: Config) -> str:
    m = mesh_lib.make_mesh(cfg.mesh)
    ici, dcn = mesh_lib._axis_sizes(cfg.mesh, m.devices.size)  # noqa: SLF001 - same module family
    lines: List[str] = [
        f"mesh {mesh_lib.describe(m)} on {m.devices.size} {m.devices.flat[0].platform} devices",
        f"  inside a node (ici): {ici}   across nodes (dcn): {dcn}",
    ]
    per_node = math.prod(ici.values())
    ids = np.vectorize(lambda d: d.id)(m.devices).reshape(-1)
    n_nodes = m.devices.size // per_node
    shown = min(n_nodes, 4)
    grid = np.vectorize(lambda d: d.id)(m.devices)
    for node in range(shown):
        members = sorted(int(i) for i in ids if _node_of(grid, int(i), dcn) == node)
        lines.append(f"  node {node}: devices {members}")
    if n_nodes > shown:
        lines.append(f"  ... {n_nodes - shown} more nodes")
    mcfg = cfg.model
    abstract = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract, nnx.Param)
    lines.append(f"model: {num_params(mcfg) / 1e6:.1f}M parameters ({mcfg.param_dtype})")
    for name, rules in (("train", mesh_lib.train_rules(cfg.mesh)), ("sample", mesh_lib.sample_rules(cfg.mesh))):
        specs = traverse_util.flatten_dict(mesh_lib.params_specs(state, rules, m), sep="/")
        shapes = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")
        total = 0
        lines.append(f"[{name} rules]")
        for path, spec in specs.items():
            a = shapes[path]
            split = math.prod(m.shape[ax] for part in spec if part for ax in ((part,) if isinstance(part, str) else part))
            nbytes = a.size * np.dtype(a.dtype).itemsize // split
            total += nbytes
            lines.append(f"  {path:28s} {str(tuple(a.shape)):24s} {str(tuple(spec)):34s} {nbytes / 2**20:10.2f} MiB/device")
        lines.append(f"  parameters per device: {total / 2**30:.3f} GiB")
    return "\n".join(lines)


def _node_of(grid: np.ndarray, dev_id: int, dcn) -> int:
    """The emulated node of a device: its coordinate along the dcn factors of each axis."""
    pos = np.argwhere(grid == dev_id)[0]
    node, stride = 0, 1
    for axis, coord in reversed(list(zip(mesh_lib.MESH_AXES, pos))):
        size = grid.shape[mesh_lib.MESH_AXES.index(axis)]
        d = dcn[axis]
        node += (coord // (size // d)) * stride
        stride *= d
    return int(node)
