"""What a mesh config does to a model, before anything runs: the device grid per node and
every parameter's sharding and per-device bytes under the training and sampling rules.
Works from abstract shapes, so a 7B model on 512 emulated devices costs no memory."""

from __future__ import annotations

import math
from typing import List

import numpy as np
from flax import traverse_util

from r1jax import mesh as mesh_lib
from r1jax.distributed import mesh_process_report
from r1jax.config import Config
from r1jax.models.build import abstract_model, num_params, resolve_model_config


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
    lines += mesh_process_report(m)
    mcfg = resolve_model_config(cfg.model)  # model.path: the checkpoint's shapes
    lines.append(f"model: {mcfg.architecture}{' from ' + mcfg.path if mcfg.path else ''}, "
                 f"{num_params(mcfg) / 1e6:.1f}M parameters ({mcfg.param_dtype})")
    for name, rules in (("train", mesh_lib.train_rules(cfg.mesh)), ("sample", mesh_lib.sample_rules(cfg.mesh))):
        _, abstract = abstract_model(mcfg, m, rules)
        total = 0
        lines.append(f"[{name} rules]")
        for path, a in traverse_util.flatten_dict(abstract, sep="/").items():
            spec = a.sharding.spec
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
