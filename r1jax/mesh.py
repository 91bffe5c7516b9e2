"""The only module that knows physical mesh axes.

A mesh has two levels (R1_NOTES: "axes inside a node and axes across nodes"):
  * ici: axes inside a node (NVLink between 8 H800s, a TPU slice's ICI): fast, carries the
    parameter all-gathers and gradient reduce-scatters;
  * dcn: axes across nodes (InfiniBand, DCN): slow, carries one gradient all-reduce per update.
Each physical axis ("data", "fsdp", "tensor") has size ici[axis] * dcn[axis]; the dcn part is
the outer (slow) factor, so consecutive devices (one node) differ along the ici part.

Models and algorithms speak only logical axis names ("embed", "heads", "batch", ...); the rules
tables below map them to mesh axes, one table per layout (training, sampling).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

MESH_AXES: Tuple[str, ...] = ("data", "fsdp", "tensor")

Rules = Tuple[Tuple[str, Any], ...]

# Training: ZeRO-3 style. Parameters (and so the optimizer state) are split along "embed" over
# fsdp; the batch is split over data x fsdp; tensor parallelism splits heads / mlp / vocab.
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # Experts are split over the devices of a node (their all-to-all rides the fast links) and
    # each device holds whole experts; a mesh config can widen this across nodes.
    ("expert", "fsdp"),
    ("cache_length", None),
)

# Sampling: decode is bandwidth bound and latency sensitive, so parameters are gathered along
# fsdp once per rollout (not per token); the batch (and the KV cache with it) is split over the
# data axes, KV heads over the tensor axis.
SAMPLE_RULES: Rules = tuple(
    (name, None) if name == "embed" else (name, axes) for name, axes in TRAIN_RULES
)


# ---------------------------------------------------------------------------------------------
# Fake devices
# ---------------------------------------------------------------------------------------------
def set_host_device_count(n: int) -> None:
    """Give this process `n` CPU devices. Must run before jax creates its backends."""
    if n is None or int(n) <= 0:
        raise ValueError(f"--devices must be a positive integer, got {n!r}")
    if "jax" in sys.modules:
        import jax

        try:
            from jax._src import xla_bridge

            initialised = bool(xla_bridge._backends)  # noqa: SLF001 - no public probe exists
        except Exception:  # pragma: no cover - private API moved
            initialised = False
        if initialised and len(jax.devices("cpu")) != int(n):
            raise RuntimeError(
                f"cannot set {n} fake devices: jax already started with {len(jax.devices())} "
                "devices; set R1JAX_DEVICES or XLA_FLAGS before importing jax"
            )
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={int(n)}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


# ---------------------------------------------------------------------------------------------
# Building the mesh
# ---------------------------------------------------------------------------------------------
def _axis_sizes(cfg, num_devices: int) -> Tuple[Dict[str, int], Dict[str, int]]:
    ici = dict(cfg.ici or {})
    dcn = dict(cfg.dcn or {})
    for level, table in (("ici", ici), ("dcn", dcn)):
        for name, size in table.items():
            if name not in MESH_AXES:
                raise ValueError(
                    f"mesh.{level} names unknown axis '{name}'; valid axes: {', '.join(MESH_AXES)}")
            if not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(f"mesh.{level}.{name} must be a positive integer or -1, got {size!r}")
    fills = [(lvl, k) for lvl, t in (("ici", ici), ("dcn", dcn)) for k, v in t.items() if v == -1]
    if len(fills) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {', '.join(f'{l}.{k}' for l, k in fills)}")
    known = math.prod(v for t in (ici, dcn) for v in t.values() if v != -1)
    if fills:
        lvl, k = fills[0]
        if num_devices % known:
            raise ValueError(
                f"mesh ici={ici} dcn={dcn}: the fixed axes use {known} devices, which does not "
                f"divide the {num_devices} available devices")
        (ici if lvl == "ici" else dcn)[k] = num_devices // known
    ici = {a: ici.get(a, 1) for a in MESH_AXES}
    dcn = {a: dcn.get(a, 1) for a in MESH_AXES}
    return ici, dcn


def make_mesh(cfg, devices: Optional[Sequence[Any]] = None):
    """Build the (data, fsdp, tensor) mesh of a MeshConfig on `devices` (default: all)."""
    import jax
    import numpy as np
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    ici, dcn = _axis_sizes(cfg, n)
    shape = {a: ici[a] * dcn[a] for a in MESH_AXES}
    if math.prod(shape.values()) != n:
        raise ValueError(
            f"mesh shape {tuple(shape.values())} ({', '.join(f'{a}={s}' for a, s in shape.items())}; "
            f"ici={ici}, dcn={dcn}) needs {math.prod(shape.values())} devices but "
            f"{n} are available")
    ici_shape = [ici[a] for a in MESH_AXES]
    dcn_shape = [dcn[a] for a in MESH_AXES]
    n_nodes = math.prod(dcn_shape)
    multi_granule = jax.process_count() > 1 or len({getattr(d, "slice_index", 0) for d in devices}) > 1
    if n_nodes > 1 and multi_granule:
        # Real cluster: one granule (slice or process) per dcn position, topology-aware inside.
        is_slices = len({getattr(d, "slice_index", 0) for d in devices}) > 1
        arr = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, process_is_granule=not is_slices,
            allow_split_physical_axes=True)
    else:
        # One process: emulate nodes by grouping consecutive devices, dcn factors outermost.
        per_node = cfg.devices_per_node or math.prod(ici_shape)
        if per_node != math.prod(ici_shape):
            raise ValueError(
                f"mesh.devices_per_node={per_node} but the ici axes {ici} hold "
                f"{math.prod(ici_shape)} devices")
        if n_nodes == 1 and devices[0].platform != "cpu":
            try:
                arr = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
            except Exception:  # topology-unaware fallback (e.g. odd GPU counts)
                arr = np.asarray(devices).reshape(ici_shape)
        else:
            ordered = sorted(devices, key=lambda d: (getattr(d, "process_index", 0), d.id))
            arr = np.asarray(ordered).reshape(dcn_shape + ici_shape)
            k = len(MESH_AXES)
            # (d0, d1, d2, i0, i1, i2) -> (d0, i0, d1, i1, d2, i2) -> (d0*i0, d1*i1, d2*i2)
            arr = arr.transpose([x for a in range(k) for x in (a, a + k)])
            arr = arr.reshape([shape[a] for a in MESH_AXES])
    return jax.sharding.Mesh(arr, MESH_AXES)


# ---------------------------------------------------------------------------------------------
# Logical -> physical
# ---------------------------------------------------------------------------------------------
def resolve_rules(base: Rules, overrides: Optional[Mapping[str, Any]] = None) -> Rules:
    """Merge config overrides {logical: axes} over a rules table and validate mesh axis names."""
    table = dict(base)
    for name, axes in (overrides or {}).items():
        if axes is not None and not isinstance(axes, (str, list, tuple)):
            raise ValueError(f"rule for '{name}' must be a mesh axis, a list of them or null, got {axes!r}")
        table[name] = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for name, axes in table.items():
        for a in _as_tuple(axes):
            if a not in MESH_AXES:
                raise ValueError(
                    f"rule '{name}' -> '{a}' names an unknown mesh axis; valid axes: {', '.join(MESH_AXES)}")
    return tuple(table.items())


def train_rules(cfg=None) -> Rules:
    return resolve_rules(TRAIN_RULES, getattr(cfg, "train_rules", None))


def sample_rules(cfg=None) -> Rules:
    return resolve_rules(SAMPLE_RULES, getattr(cfg, "sample_rules", None))


def _as_tuple(axes) -> Tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical: Optional[Sequence[Optional[str]]], rules: Rules,
                    shape: Optional[Sequence[int]] = None, mesh=None):
    """PartitionSpec for logical axis names. A dimension that its mesh axes do not divide is
    replicated instead (tiny test models, odd head counts); a mesh axis is used at most once."""
    from jax.sharding import PartitionSpec as P

    if logical is None:
        return P()
    table = dict(rules)
    used: set = set()
    out = []
    for i, name in enumerate(logical):
        if name is not None and name not in table:
            raise ValueError(f"logical axis '{name}' has no rule; known: {', '.join(sorted(table))}")
        axes = tuple(a for a in _as_tuple(table.get(name)) if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                # Keep the longest prefix of axes that divides the dimension.
                while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                    axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def named_sharding(mesh, logical, rules: Rules, shape=None):
    from jax.sharding import NamedSharding

    return NamedSharding(mesh, logical_to_spec(logical, rules, shape, mesh))


def params_shardings(state, mesh, rules: Rules):
    """NamedSharding for every parameter of an (abstract) nnx State, as a pure nested dict:
    each Variable's `logical_axes` metadata through `rules`."""
    from flax import nnx, traverse_util
    from jax.sharding import NamedSharding

    def one(v):
        axes = v.get_metadata().get("logical_axes")
        return NamedSharding(mesh, logical_to_spec(axes, rules, v.get_value().shape, mesh))

    return traverse_util.unflatten_dict({path: one(v) for path, v in nnx.to_flat_state(state)})


# ---------------------------------------------------------------------------------------------
# Activation constraints: models call `constrain(x, ("batch", "length", "act_embed"))`; it is a
# no-op unless a layout is active, so models never see mesh axes.
# ---------------------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("r1jax_layout", default=None)


@contextlib.contextmanager
def layout(mesh, rules: Rules):
    """Activate a mesh + rules table for `constrain` while tracing."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_layout():
    """The (mesh, rules) that `layout` activated while tracing, or None (the MoE dispatch reads
    it to decide whether to go expert-parallel)."""
    return _ACTIVE.get()


def constrain(x, logical: Sequence[Optional[str]]):
    active = _ACTIVE.get()
    if active is None:
        return x
    import jax

    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical, rules, x.shape))


def gathered_weight_map(fn, weight, weight_logical: Sequence[Optional[str]], *batched):
    """`fn(weight, *batched)` run per device on its batch shard with the weight gathered whole,
    so that the weight's gradient rides the links the layout intends.

    Under an active layout the weight is split ZeRO-3 style (`embed` over fsdp, replicated over
    data) and the batch over data x fsdp. A weight that the partitioner gathers for the
    computation has its gradient all-reduced whole over every device (across nodes too), and
    when it is used inside a loop (the log-prob chunks) once per iteration. Written per device
    instead, each device sums its own batch's gradient locally (inside any loop), and the
    gathers' transposes reduce it once afterwards: a reduce-scatter over the weight's own axes
    (fsdp, inside a node) and an all-reduce of one shard over the remaining batch axes (data,
    across nodes), the data-parallel pattern.

    Every array in `batched` and every output of `fn` has the batch as its leading axis; `fn`
    must work on any batch size (it sees one device's rows). Outside a layout, where the batch
    is not split, or where the weight is split over an axis the batch is not (tensor
    parallelism: a gathered weight would vary over it), `fn(weight, *batched)` runs as is and
    the partitioner's own plan serves."""
    import jax
    from jax.sharding import PartitionSpec as P

    active = _ACTIVE.get()
    if active is None:
        return fn(weight, *batched)
    mesh, rules = active
    lead = batched[0].shape[0]
    wspec = logical_to_spec(tuple(weight_logical), rules, weight.shape, mesh)
    bspec = logical_to_spec(("batch",), rules, (lead,), mesh)
    w_axes = [_as_tuple(a) for a in tuple(wspec) + (None,) * (weight.ndim - len(wspec))]
    b_axes = _as_tuple(bspec[0]) if len(bspec) else ()
    if (not b_axes or any(a not in b_axes for t in w_axes for a in t)
            or any(x.shape[0] != lead for x in batched)):
        return fn(weight, *batched)
    # The batch axes the weight is not split over: its gradient is summed over them, on a shard.
    extra = tuple(a for a in b_axes if not any(a in t for t in w_axes))

    def local(w, *xs):
        if extra:
            w = jax.lax.pcast(w, extra, to="varying")
        for dim, axes in enumerate(w_axes):
            for a in reversed(axes):
                w = jax.lax.all_gather(w, a, axis=dim, tiled=True)
        # Inside, arrays are per-device: sharding constraints on the global mesh do not apply.
        token = _ACTIVE.set(None)
        try:
            return fn(w, *xs)
        finally:
            _ACTIVE.reset(token)

    batch = P(bspec[0])
    return jax.shard_map(local, mesh=mesh, in_specs=(wspec,) + (batch,) * len(batched),
                         out_specs=batch)(weight, *batched)


def embed_lookup(table_VxD, tokens_BxT):
    """`jnp.take(table, tokens, axis=0)` whose gradient rides the links the layout intends.

    Under an active layout the table is ("vocab", "embed")-sharded and the tokens
    ("batch", "length")-sharded. Left to itself the partitioner turns the lookup's scatter-add
    gradient into one all-reduce of the whole [V, D] table over every device; through
    `gathered_weight_map` it is a reduce-scatter over fsdp inside a node and an all-reduce of one
    shard over data across nodes. Outside a layout: a plain take."""
    import jax.numpy as jnp

    return gathered_weight_map(lambda table, tokens: jnp.take(table, tokens, axis=0),
                               table_VxD, ("vocab", "embed"), tokens_BxT)


def batch_shards(mesh, rules: Rules) -> int:
    """How many ways `rules` split the "batch" axis over `mesh` (1 without a mesh)."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in _as_tuple(dict(rules).get("batch")))


def check_batch_divides(mesh, rules: Rules, sizes: Mapping[str, int]) -> None:
    """One-line error when a batch size the run shards (prompts per rollout, rows, mini-batch)
    is not a multiple of the batch shards; the partitioner's own message names an array shape
    and a tiling factor, not the setting to change."""
    shards = batch_shards(mesh, rules)
    for name, size in sizes.items():
        if int(size) % shards:
            axes = " x ".join(f"{a}={mesh.shape[a]}" for a in _as_tuple(dict(rules).get("batch")))
            raise ValueError(
                f"{name} = {size} does not split over the {shards} batch shards ({axes} of mesh "
                f"{describe(mesh)}): make it a multiple of {shards}, or shard the batch over fewer "
                "axes (mesh.train_rules / mesh.sample_rules batch)")


def batch_sharding(mesh, rules: Rules, ndim: int = 2, shape=None):
    """Sharding for a [batch, ...] array under a layout."""
    logical = ("batch",) + (None,) * (ndim - 1)
    return named_sharding(mesh, logical, rules, shape)


def replicated(mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P())


def describe(mesh) -> str:
    return " x ".join(f"{a}={s}" for a, s in mesh.shape.items())
