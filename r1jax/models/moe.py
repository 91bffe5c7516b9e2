"""Mixture-of-experts FFN: DeepSeekMoE and Qwen3-MoE routing, capacity-based expert-parallel
dispatch, aux-loss-free bias balancing, the sequence-wise balance loss and load metrics.

Routing (`route`): sigmoid (DeepSeek-V3) or softmax (Qwen3-MoE) affinities s; selection uses
s + b (b: the per-expert correction bias, selection only), optionally group-limited (experts in
`n_group` groups, a group scored by the sum of its two best, only the best `topk_group` groups
eligible); the gate weights are the unbiased s of the chosen experts, renormalised over them
when `norm_topk_prob`, times `routed_scaling_factor` (V3 report, equations 12-16).

Dispatch (`moe_ffn`): every token group (the tokens one device holds) sends each expert at most
C = ceil(capacity_factor * tokens * K / E) assignments; all first choices queue before second
choices, each in token order, and the assignments past C are dropped (they add nothing; the
token keeps its residual and its other experts). Under an active layout whose `expert` rule
names mesh axes, experts are split over those axes and tokens travel with one fixed-size
`all_to_all` each way inside `shard_map`; each device multiplies only its own experts'
capacity-padded token blocks. `moe_dense_reference` computes every expert on every token with
the same drop rule and is for tests only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax import mesh as mesh_lib
from r1jax.config import ModelConfig, MoEConfig
from r1jax.models.transformer import _param

SCORINGS = ("softmax", "sigmoid")


def check_config(cfg: ModelConfig) -> None:
    """One-line errors for MoE settings the router cannot honour."""
    m = cfg.moe
    if m.scoring not in SCORINGS:
        raise ValueError(f"model.moe.scoring '{m.scoring}' is not one of {', '.join(SCORINGS)}")
    if not 1 <= m.num_experts_per_tok <= m.num_experts:
        raise ValueError(f"model.moe.num_experts_per_tok {m.num_experts_per_tok} must be in "
                         f"[1, num_experts={m.num_experts}]")
    if m.n_group < 1 or m.num_experts % m.n_group:
        raise ValueError(f"model.moe.n_group {m.n_group} must divide num_experts {m.num_experts}")
    if not 1 <= m.topk_group <= m.n_group:
        raise ValueError(f"model.moe.topk_group {m.topk_group} must be in [1, n_group={m.n_group}]")
    if m.topk_group * (m.num_experts // m.n_group) < m.num_experts_per_tok:
        raise ValueError(f"model.moe: topk_group {m.topk_group} groups of "
                         f"{m.num_experts // m.n_group} experts cannot hold num_experts_per_tok "
                         f"{m.num_experts_per_tok}")
    if m.capacity_factor < 0:
        raise ValueError(f"model.moe.capacity_factor must be >= 0 (0: never drop), got {m.capacity_factor}")
    bad = [i for i in m.dense_layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise ValueError(f"model.moe.dense_layers has {bad[0]}, outside [0, num_layers={cfg.num_layers})")
    if m.routing_replay not in ("none", "rollout"):
        raise ValueError(f"model.moe.routing_replay '{m.routing_replay}' is not one of none, rollout")


def moe_layer_ids(cfg: ModelConfig) -> tuple[int, ...]:
    dense = set(cfg.moe.dense_layers)
    return tuple(i for i in range(cfg.num_layers) if i not in dense)


def dense_layer_ids(cfg: ModelConfig) -> tuple[int, ...]:
    return tuple(sorted(set(cfg.moe.dense_layers)))


class MoEWeights(nnx.Module):
    """Router, routed experts (one array per weight kind: [layers, experts, ...]) and the shared
    experts of `layers` stacked MoE layers."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layers: int):
        m = cfg.moe
        d, e, f = cfg.hidden_size, m.num_experts, m.moe_intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        L = (layers,)
        # The router stays float32 (transformers keeps gate.weight and the bias in fp32 too):
        # top-K choices flip on tiny score differences.
        self.router = _param(rngs, L + (d, e), ("layers", "embed", None), jnp.float32)
        if m.router_bias:
            self.router_bias = _param(None, L + (e,), ("layers", None), jnp.float32, "zeros")
        self.gate = _param(rngs, L + (e, d, f), ("layers", "expert", "embed", "mlp"), pd)
        self.up = _param(rngs, L + (e, d, f), ("layers", "expert", "embed", "mlp"), pd)
        self.down = _param(rngs, L + (e, f, d), ("layers", "expert", "mlp", "embed"), pd)
        if m.num_shared_experts:
            fs = f * m.num_shared_experts
            self.shared_gate = _param(rngs, L + (d, fs), ("layers", "embed", "mlp"), pd)
            self.shared_up = _param(rngs, L + (d, fs), ("layers", "embed", "mlp"), pd)
            self.shared_down = _param(rngs, L + (fs, d), ("layers", "mlp", "embed"), pd)


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------
def route(m: MoEConfig, logits_NxE: jax.Array, bias_E: jax.Array | None = None,
          forced_idx_NxK: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(gate weights [N,K] f32, expert ids [N,K] int32, affinities s [N,E] f32).

    forced_idx: route to these experts instead of choosing (routing replay); the weights are
    still the current router's affinities of those experts, so the router keeps learning. A row
    with a negative entry (a token the sampler never routed) is routed by the router."""
    logits = logits_NxE.astype(jnp.float32)
    s = jax.nn.sigmoid(logits) if m.scoring == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = s if bias_E is None else s + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    choice = jax.lax.stop_gradient(choice)  # selection is not differentiable
    if m.n_group > 1:
        n, e = choice.shape
        grouped = choice.reshape(n, m.n_group, e // m.n_group)
        best2 = jax.lax.top_k(grouped, min(2, e // m.n_group))[0].sum(-1)  # [N, G]
        # The topk_group best groups, as a comparison with the k-th best score rather than a
        # scatter of top_k's indices (which the SPMD partitioner all-gathers across devices).
        gmask = best2 >= jax.lax.top_k(best2, m.topk_group)[0][:, -1:]
        choice = jnp.where(jnp.repeat(gmask, e // m.n_group, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, m.num_experts_per_tok)
    if forced_idx_NxK is not None:
        forced = forced_idx_NxK.astype(jnp.int32)
        idx = jnp.where(jnp.all(forced >= 0, axis=-1, keepdims=True), forced, idx)
    idx = idx.astype(jnp.int32)
    w = jnp.take_along_axis(s, idx, axis=-1)
    if m.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return w * m.routed_scaling_factor, idx, s


def route_tokens(m: MoEConfig, logits_NxE: jax.Array, bias_E: jax.Array | None = None,
                 forced_idx_NxK: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`route` on each device's own tokens under an active layout (inside shard_map): routing is
    per token, but XLA's SPMD partitioner all-gathers top_k's input across the batch shards."""
    active = mesh_lib.active_layout()
    if active is None:
        return route(m, logits_NxE, bias_E, forced_idx_NxK)
    mesh, rules = active
    from jax.sharding import PartitionSpec as P

    tok = mesh_lib.logical_to_spec(("batch", None), rules, logits_NxE.shape, mesh)
    t = P(tok[0], None)
    args, specs = [logits_NxE], [t]
    if bias_E is not None:
        args, specs = args + [bias_E], specs + [P()]
    if forced_idx_NxK is not None:
        args, specs = args + [forced_idx_NxK], specs + [t]

    def body(*a):
        it = iter(a)
        lg = next(it)
        b = next(it) if bias_E is not None else None
        f = next(it) if forced_idx_NxK is not None else None
        return route(m, lg, b, f)

    return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=(t, t, t), check_vma=False)(*args)


# ---------------------------------------------------------------------------------------------
# The token-drop rule
# ---------------------------------------------------------------------------------------------
def capacity(m: MoEConfig, tokens_per_group: int) -> int:
    """Assignments one expert accepts from one token group."""
    if m.capacity_factor <= 0:
        return tokens_per_group  # a token picks an expert at most once: nothing is dropped
    return max(1, math.ceil(m.capacity_factor * tokens_per_group * m.num_experts_per_tok / m.num_experts))


def queue_positions(idx_NxK: jax.Array, num_experts: int, valid_N: jax.Array | None = None) -> jax.Array:
    """Each assignment's place in its expert's queue [N,K]: all first choices in token order,
    then all second choices, ... Invalid (padding) tokens queue behind everything."""
    n, k = idx_NxK.shape
    e = idx_NxK.T.reshape(-1)  # k-major order
    if valid_N is not None:
        e = jnp.where(jnp.tile(valid_N, k), e, num_experts)
    order = jnp.argsort(e, stable=True)
    counts = jnp.zeros(num_experts + 1, jnp.int32).at[e].add(1)
    starts = jnp.cumsum(counts) - counts
    pos_sorted = jnp.arange(n * k, dtype=jnp.int32) - starts[e[order]]
    pos = jnp.zeros(n * k, jnp.int32).at[order].set(pos_sorted)
    pos = pos.reshape(k, n).T
    if valid_N is not None:
        pos = jnp.where(valid_N[:, None], pos, jnp.iinfo(jnp.int32).max)
    return pos


def kept(idx_NxK, num_experts: int, cap: int, groups: int, valid_N=None) -> jax.Array:
    """bool [N,K]: the assignments the drop rule keeps, tokens split into `groups` contiguous
    groups (one per device holding tokens)."""
    n, k = idx_NxK.shape
    vg = None if valid_N is None else valid_N.reshape(groups, n // groups)
    pos = jax.vmap(lambda i, v: queue_positions(i, num_experts, v),
                   in_axes=(0, None if vg is None else 0))(idx_NxK.reshape(groups, n // groups, k), vg)
    return pos.reshape(n, k) < cap


# ---------------------------------------------------------------------------------------------
# Expert computation
# ---------------------------------------------------------------------------------------------
def _experts(x_ExCxD, gate_ExDxF, up_ExDxF, down_ExFxD, dt):
    g = jnp.einsum("ecd,edf->ecf", x_ExCxD, gate_ExDxF.astype(dt))
    u = jnp.einsum("ecd,edf->ecf", x_ExCxD, up_ExDxF.astype(dt))
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, down_ExFxD.astype(dt))


def _dispatch_local(x_NxD, idx_NxK, w_NxK, keep_NxK, pos_NxK, num_experts, cap):
    """Scatter kept assignments into capacity-padded expert buffers [E*C, D] and return the
    slots used (out-of-range for dropped ones)."""
    n, k = idx_NxK.shape
    slot = jnp.where(keep_NxK, idx_NxK * cap + pos_NxK, num_experts * cap)
    x_rep = jnp.broadcast_to(x_NxD[:, None, :], (n, k, x_NxD.shape[-1])).reshape(n * k, -1)
    buf = jnp.zeros((num_experts * cap, x_NxD.shape[-1]), x_NxD.dtype)
    buf = buf.at[slot.reshape(-1)].set(x_rep, mode="drop")
    return buf, slot


def _combine(out_ECxD, slot_NxK, w_NxK, keep_NxK):
    y = out_ECxD.at[slot_NxK].get(mode="fill", fill_value=0)  # [N, K, D]
    wk = jnp.where(keep_NxK, w_NxK, 0.0).astype(y.dtype)
    return jnp.einsum("nkd,nk->nd", y, wk)


def _local_ffn(x, idx, w, valid, gate, up, down, *, cap, dt):
    """Tokens of one group through all of `gate`'s experts (held locally)."""
    e = gate.shape[0]
    pos = queue_positions(idx, e, valid)
    keep = pos < cap
    buf, slot = _dispatch_local(x, idx, w, keep, pos, e, cap)
    out = _experts(buf.reshape(e, cap, -1), gate, up, down, dt).reshape(e * cap, -1)
    return _combine(out, slot, w, keep), keep


def _ep_ffn(x, idx, w, valid, gate_l, up_l, down_l, *, cap, dt, ep_axes, n_ep):
    """Inside shard_map: local tokens, the local slice of experts (E/n_ep of them)."""
    e_loc = gate_l.shape[0]
    e = e_loc * n_ep
    d = x.shape[-1]
    pos = queue_positions(idx, e, valid)
    keep = pos < cap
    buf, slot = _dispatch_local(x, idx, w, keep, pos, e, cap)
    # [owner, E_loc*C, D]: row j goes to the device holding experts j*E_loc..(j+1)*E_loc-1.
    recv = jax.lax.all_to_all(buf.reshape(n_ep, e_loc * cap, d), ep_axes, 0, 0)
    recv = recv.reshape(n_ep, e_loc, cap, d).transpose(1, 0, 2, 3).reshape(e_loc, n_ep * cap, d)
    out = _experts(recv, gate_l, up_l, down_l, dt)
    out = out.reshape(e_loc, n_ep, cap, d).transpose(1, 0, 2, 3).reshape(n_ep, e_loc * cap, d)
    back = jax.lax.all_to_all(out, ep_axes, 0, 0).reshape(e * cap, d)
    return _combine(back, slot, w, keep), keep


def moe_ffn(m: MoEConfig, x_NxD, idx_NxK, w_NxK, gate, up, down, *, dt,
            valid_N: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Routed-expert output [N,D] and the kept mask [N,K]; expert-parallel under a layout
    whose `expert` rule names mesh axes, else all experts on the local tokens."""
    n = x_NxD.shape[0]
    if valid_N is None:
        valid_N = jnp.ones((n,), jnp.bool_)
    active = mesh_lib.active_layout()
    if active is None:
        cap = capacity(m, n)
        return _local_ffn(x_NxD, idx_NxK, w_NxK, valid_N, gate, up, down, cap=cap, dt=dt)
    mesh, rules = active
    from jax.sharding import PartitionSpec as P

    tok_spec = mesh_lib.logical_to_spec(("batch", None), rules, x_NxD.shape, mesh)
    tok_axes = mesh_lib._as_tuple(tok_spec[0])
    groups = math.prod(mesh.shape[a] for a in tok_axes)
    ex_spec = mesh_lib.logical_to_spec(("expert", None, None), rules, gate.shape, mesh)
    ep_axes = mesh_lib._as_tuple(ex_spec[0])
    n_ep = math.prod(mesh.shape[a] for a in ep_axes)
    cap = capacity(m, n // groups)
    t1, t2 = P(tok_spec[0], None), P(tok_spec[0])
    wspec = P(ex_spec[0], None, None)
    if n_ep == 1:
        body = lambda x, i, w, v, g, u, d: _local_ffn(x, i, w, v, g, u, d, cap=cap, dt=dt)
    else:
        body = lambda x, i, w, v, g, u, d: _ep_ffn(x, i, w, v, g, u, d, cap=cap, dt=dt,
                                                   ep_axes=ep_axes, n_ep=n_ep)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(t1, t1, t1, t2, wspec, wspec, wspec),
                       out_specs=(t1, t1), check_vma=False)
    return fn(x_NxD, idx_NxK, w_NxK, valid_N, gate, up, down)


def moe_dense_reference(m: MoEConfig, x_NxD, idx_NxK, w_NxK, gate, up, down, *, dt,
                        groups: int = 1, valid_N=None) -> tuple[jax.Array, jax.Array]:
    """Every expert on every token, then the same drop rule: a test reference only."""
    n = x_NxD.shape[0]
    e = gate.shape[0]
    y_all = _experts(jnp.broadcast_to(x_NxD[None], (e,) + x_NxD.shape), gate, up, down, dt)  # [E,N,D]
    keep = kept(idx_NxK, e, capacity(m, n // groups), groups, valid_N)
    y = y_all[idx_NxK, jnp.arange(n)[:, None]]  # [N,K,D]
    return jnp.einsum("nkd,nk->nd", y, jnp.where(keep, w_NxK, 0.0).astype(y.dtype)), keep


# ---------------------------------------------------------------------------------------------
# Balancing
# ---------------------------------------------------------------------------------------------
def expert_load(idx_NxK, num_experts: int, valid_N=None) -> jax.Array:
    """Assignments per expert [E] (float32), padding tokens excluded."""
    wts = jnp.ones(idx_NxK.shape, jnp.float32)
    if valid_N is not None:
        wts = wts * valid_N[:, None]
    return jnp.zeros(num_experts, jnp.float32).at[idx_NxK.reshape(-1)].add(wts.reshape(-1))


def update_router_bias(bias_LxE: jax.Array, load_LxE: jax.Array, gamma: float) -> jax.Array:
    """Aux-loss-free balancing (V3 report, section 2.1.2): after each step, raise the bias of
    underloaded experts and lower it for overloaded ones by gamma: b += gamma * sign(mean - load)."""
    load = load_LxE.astype(jnp.float32)
    return bias_LxE + gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def update_params_router_bias(params: dict, load_LxE: jax.Array, gamma: float) -> dict:
    """`update_router_bias` on a pure-dict model's params["moe"]["router_bias"] (a new dict)."""
    if gamma == 0 or "router_bias" not in params.get("moe", {}):
        return params
    moe = dict(params["moe"])
    moe["router_bias"] = update_router_bias(moe["router_bias"], load_LxE, gamma)
    return {**params, "moe": moe}


def sequence_balance_loss(s_BxTxE, idx_BxTxK, valid_BxT, num_experts: int, k: int) -> jax.Array:
    """V3's sequence-wise balance loss without alpha, averaged over rows (equations 17-20):
    sum_i f_i P_i, f_i = E/(K T) * #tokens choosing i, P_i = mean_t s_i,t / sum_j s_j,t."""
    v = valid_BxT.astype(jnp.float32)
    t = jnp.maximum(jnp.sum(v, axis=-1), 1.0)  # [B]
    chosen = jnp.sum(jax.nn.one_hot(idx_BxTxK, num_experts, dtype=jnp.float32), axis=-2)  # [B,T,E]
    f = num_experts / (k * t[:, None]) * jnp.sum(chosen * v[..., None], axis=1)
    s_norm = s_BxTxE / jnp.sum(s_BxTxE, axis=-1, keepdims=True)
    p = jnp.sum(s_norm * v[..., None], axis=1) / t[:, None]
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1))


def load_metrics(load_LxE: jax.Array, dropped: jax.Array, assignments: jax.Array) -> dict[str, jax.Array]:
    """moe/* metrics: the busiest expert's load over the mean (1 = perfectly balanced), the
    share of expert slots idle and the share of assignments dropped."""
    mean = jnp.maximum(jnp.mean(load_LxE, axis=-1), 1e-9)
    return {
        "moe/max_load_over_mean": jnp.mean(jnp.max(load_LxE, axis=-1) / mean),
        "moe/load_cv": jnp.mean(jnp.std(load_LxE, axis=-1) / mean),
        "moe/dropped_fraction": dropped / jnp.maximum(assignments, 1.0),
        "moe/dropped": dropped,
    }


def routing_disagreement(routes_a, routes_b, valid=None) -> jax.Array:
    """Share of (MoE layer, token) pairs whose chosen expert sets differ between two routings
    [..., K] (order within the K ignored): how much routing replay changes."""
    a, b = jnp.sort(routes_a.astype(jnp.int32), -1), jnp.sort(routes_b.astype(jnp.int32), -1)
    diff = jnp.any(a != b, axis=-1).astype(jnp.float32)
    if valid is None:
        return jnp.mean(diff)
    w = jnp.broadcast_to(valid.astype(jnp.float32), diff.shape)
    return jnp.sum(diff * w) / jnp.maximum(jnp.sum(w), 1.0)


def compact_routes(routes: jax.Array, num_experts: int) -> jax.Array:
    """Routes in the smallest integer type that holds the expert ids and the -1 of a token
    never routed: uint8 (255 marks -1) up to 255 experts, else int16 (V3's 256 experts: 58 MoE
    layers x 8 ids x 2 bytes per token)."""
    dtype = jnp.uint8 if num_experts <= 255 else jnp.int16  # as recorded_routes
    if dtype == jnp.uint8:
        return jnp.where(routes < 0, unrouted(dtype), routes).astype(jnp.uint8)
    return routes.astype(jnp.int16)


def recorded_routes(cfg: ModelConfig, rows: int, prompt_len: int, completion_len: int
                    ) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """(shape, dtype) of the routes a replaying rollout stores, by rollout key: every prompt and
    completion token's K experts in each MoE layer, in `compact_routes`' type."""
    lk = (len(moe_layer_ids(cfg)), cfg.moe.num_experts_per_tok)
    dtype = jnp.dtype(jnp.uint8 if cfg.moe.num_experts <= 255 else jnp.int16)
    return {"prompt_routes": ((rows, prompt_len) + lk, dtype),
            "completion_routes": ((rows, completion_len) + lk, dtype)}


def unrouted(dtype) -> int:
    """The value `compact_routes` stores for a token never routed, in its type."""
    return 255 if jnp.dtype(dtype) == jnp.uint8 else -1


def expand_routes(routes: jax.Array) -> jax.Array:
    """`compact_routes` back to int32 with -1 for never-routed tokens."""
    r = routes.astype(jnp.int32)
    return jnp.where(r == 255, -1, r) if routes.dtype == jnp.uint8 else r
