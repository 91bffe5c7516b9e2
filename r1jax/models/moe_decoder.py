"""Mixture-of-experts decoders: DeepSeek-V3 (MLA + DeepSeekMoE + MTP) and Qwen3-MoE, in Flax NNX.

One module serves both families; `cfg.mla` picks the attention (Multi-head Latent Attention,
r1jax.models.mla; else grouped-query attention with Qwen3's per-head q/k RMSNorm), `cfg.moe`
the router (r1jax.models.moe). Layers listed in `moe.dense_layers` have a dense SwiGLU FFN
(DeepSeek-V3's first k layers, Qwen3-MoE's mlp_only_layers); the rest are MoE layers.

Parameters follow the dense transformer's conventions: one stacked array per weight kind with a
leading layer axis (attention and norms over all layers, `dense_mlp` over the dense layers,
`moe` over the MoE layers, experts stacked along an `expert` axis), logical axis names on every
parameter, a pure dict with string keys. Runs of consecutive layers of one kind are scanned
(`scan_layers`) or unrolled. The attention hook is the dense one: `attn_fn(q, k, v, layer_cache)`.

`hidden_and_aux` also returns the MoE side outputs: per-layer expert load, dropped assignments,
the sequence-wise balance loss and the chosen experts (`routes`, what routing replay records);
passing `routes` back routes the tokens to those experts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.mesh import constrain, embed_lookup
from r1jax.models import mla as mla_lib
from r1jax.models import moe as moe_lib
from r1jax.models.transformer import (
    MLP,
    Attention,
    RMSNorm,
    _param,
    attention,
    causal_segment_mask,
    head_dim,
    positions_from_segments,
)


def _norm(scale, x, eps, dt):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(dt)


def _swiglu(x, gate, up, down, dt):
    g = jnp.einsum("...d,df->...f", x, gate.astype(dt))
    u = jnp.einsum("...d,df->...f", x, up.astype(dt))
    return jnp.einsum("...f,fd->...d", jax.nn.silu(g) * u, down.astype(dt))


class AttnLayers(nnx.Module):
    """Norms and attention of `layers` stacked decoder layers."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layers: int):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, layers=layers)
        self.attn = mla_lib.MLA(cfg, rngs, layers) if cfg.mla is not None else Attention(cfg, rngs, layers)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, layers=layers)


class MTP(nnx.Module):
    """DeepSeek-V3 multi-token prediction modules (V3 report, section 2.2), stacked: module k
    combines the previous depth's hidden state with the embedding of token i+k, runs one MoE
    decoder layer and predicts token i+k+1 through the shared embedding and output head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        n, d = cfg.num_mtp_layers, cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, pd, layers=n)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, pd, layers=n)
        self.eh_proj = _param(rngs, (n, 2 * d, d), ("layers", None, "embed"), pd)
        self.block = AttnLayers(cfg, rngs, n)
        self.moe = moe_lib.MoEWeights(cfg, rngs, n)
        self.final_norm = RMSNorm(d, cfg.rms_norm_eps, pd, layers=n)


class MoEDecoder(nnx.Module):
    """Decoder-only MoE LM with the dense Transformer's interface (`hidden`, `embed_tokens`,
    `unembed_matrix`, `model(tokens)` -> logits)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.moe is None:
            raise ValueError(f"model.architecture '{cfg.architecture}' needs model.moe settings")
        moe_lib.check_config(cfg)
        if cfg.mla is None and cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"model.num_heads {cfg.num_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}")
        if cfg.num_mtp_layers and cfg.mla is None:
            raise ValueError("model.num_mtp_layers > 0 is implemented for DeepSeek-V3 (model.mla set) only")
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.layers = AttnLayers(cfg, rngs, cfg.num_layers)
        dense = moe_lib.dense_layer_ids(cfg)
        if dense:
            self.dense_mlp = MLP(cfg, rngs, len(dense))
        if moe_lib.moe_layer_ids(cfg):
            self.moe = moe_lib.MoEWeights(cfg, rngs, len(moe_lib.moe_layer_ids(cfg)))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)
        if cfg.num_mtp_layers:
            self.mtp = MTP(cfg, rngs)

    def unembed_matrix(self) -> jax.Array:
        if self.cfg.tie_embeddings:
            return self.embed.get_value().T
        return self.lm_head.get_value()

    def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
        x = embed_lookup(self.embed.get_value(), tokens_BxT).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x, ("batch", "length", "act_embed"))

    def params(self) -> dict:
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def hidden_and_aux(self, tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
                       segment_ids_BxT: jax.Array | None = None, cache: Any = None,
                       attn_fn=None, routes_LxBxTxK: jax.Array | None = None,
                       pre_norm: bool = False, mla_latent: bool = False
                       ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
        """(final-normed hidden states [B,T,D] (pre-norm ones with pre_norm=True), updated cache,
        MoE side outputs). routes: expert ids [MoE layers, B, T, K] to route to (replay).
        mla_latent: attend through MLA's latent (`mla.latent_attention`: attn_fn then sees one
        shared key/value head of kv_lora_rank + qk_rope_head_dim features, what a cache keeps)."""
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
        if positions_BxT is None:
            positions_BxT = positions_from_segments(segment_ids_BxT)
        if attn_fn is None:
            mask = causal_segment_mask(segment_ids_BxT)

            def attn_fn(q, k, v, layer_cache):
                return attention(q, k, v, mask), layer_cache

        x = self.embed_tokens(tokens_BxT)
        x, cache, aux = run_layers(self.cfg, self.params(), x, positions_BxT, segment_ids_BxT > 0,
                                   attn_fn, cache, routes_LxBxTxK, mla_latent=mla_latent)
        return (x if pre_norm else self.final_norm(x)), cache, aux

    def hidden(self, tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
               segment_ids_BxT: jax.Array | None = None, cache: Any = None,
               attn_fn=None, mla_latent: bool = False) -> tuple[jax.Array, Any]:
        h, cache, _ = self.hidden_and_aux(tokens_BxT, positions_BxT=positions_BxT,
                                          segment_ids_BxT=segment_ids_BxT, cache=cache, attn_fn=attn_fn,
                                          mla_latent=mla_latent)
        return h, cache

    def __call__(self, tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
                 segment_ids_BxT: jax.Array | None = None) -> jax.Array:
        h, _ = self.hidden(tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT)
        logits = jnp.einsum("btd,dv->btv", h.astype(jnp.float32), self.unembed_matrix().astype(jnp.float32))
        return constrain(logits, ("batch", "length", "act_vocab"))

    # -- layer-by-layer decoding (the sampler) -------------------------------------------------
    # MLA decodes through its latent: the cache holds one shared key row of kv_lora_rank +
    # qk_rope_head_dim features per token (and its zero-padded value) instead of per-head K/V.
    decode_kwargs = property(lambda self: {"mla_latent": self.cfg.mla is not None})

    def kv_cache_shape(self) -> tuple[int, int]:
        """(key/value heads, features per head) that the attention hook sees when decoding."""
        if self.cfg.mla is not None:
            return 1, self.cfg.mla.kv_lora_rank + self.cfg.mla.qk_rope_head_dim
        return self.cfg.num_kv_heads, head_dim(self.cfg)

    def decode_layer_params(self) -> list:
        """Per-layer parameter slices {attn, mlp}, to slice once before a decode loop."""
        p = self.params()
        out = []
        for kind, start, end, j in layer_runs(self.cfg):
            stack = p["dense_mlp"] if kind == "dense" else p["moe"]
            for i in range(start, end):
                out.append({"attn": jax.tree.map(lambda a, i=i: a[i], p["layers"]),
                            "mlp": jax.tree.map(lambda a, k=j + i - start: a[k], stack)})
        return out

    def decode_block(self, i: int, p: dict, x_BxTxD, positions_BxT, attn_fn, *,
                     valid_BxT=None, forced_BxTxK=None):
        """Layer `i` on its slice `p` (from `decode_layer_params`): (x, layer cache, MoE side
        outputs or None for a dense layer)."""
        cfg = self.cfg
        kind = "dense" if i in set(cfg.moe.dense_layers) else "moe"
        valid = jnp.ones(x_BxTxD.shape[:2], jnp.bool_) if valid_BxT is None else valid_BxT
        return _layer(cfg, kind, p, x_BxTxD, positions_BxT, _rope(cfg), valid, attn_fn, None,
                      forced_BxTxK, cfg.mla is not None)

    def mtp_logits(self, tokens_BxT: jax.Array, hidden_BxTxD: jax.Array, *,
                   positions_BxT: jax.Array | None = None,
                   segment_ids_BxT: jax.Array | None = None) -> jax.Array:
        """Logits [depth, B, T, V]: depth k (from 1) at position i predicts token i+k+1.

        hidden: the main model's final-normed hidden states (what the released checkpoint's
        MTP layer consumes). Positions whose look-ahead token falls past the end are garbage
        and must be masked by the caller (`mtp_loss` does)."""
        cfg = self.cfg
        if not cfg.num_mtp_layers:
            raise ValueError("model.num_mtp_layers is 0: this model has no MTP module")
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
        if positions_BxT is None:
            positions_BxT = positions_from_segments(segment_ids_BxT)
        mask = causal_segment_mask(segment_ids_BxT)

        def attn_fn(q, k, v, layer_cache):
            return attention(q, k, v, mask), layer_cache

        p = self.params()["mtp"]
        dt = jnp.dtype(cfg.dtype)
        eps = cfg.rms_norm_eps
        valid = segment_ids_BxT > 0
        rope = _rope(cfg)
        h = hidden_BxTxD.astype(dt)
        out = []
        for k in range(cfg.num_mtp_layers):
            pk = jax.tree.map(lambda a, k=k: a[k], p)
            nxt = jnp.pad(tokens_BxT[:, k + 1:], ((0, 0), (0, k + 1)))
            e = self.embed_tokens(nxt)
            # The checkpoint's eh_proj takes [embedding; hidden] (the order vLLM loads it with).
            cat = jnp.concatenate([_norm(pk["enorm"]["scale"], e, eps, dt),
                                   _norm(pk["hnorm"]["scale"], h, eps, dt)], axis=-1)
            x = jnp.einsum("btc,cd->btd", cat, pk["eh_proj"].astype(dt))
            layer = {"attn": pk["block"], "mlp": pk["moe"]}
            x, _, _ = _layer(cfg, "moe", layer, x, positions_BxT, rope, valid, attn_fn, None, None)
            h = _norm(pk["final_norm"]["scale"], x, eps, dt)
            out.append(jnp.einsum("btd,dv->btv", h.astype(jnp.float32),
                                  self.unembed_matrix().astype(jnp.float32)))
        return jnp.stack(out)


class RoutedForward:
    """A MoEDecoder whose `hidden` routes through given routes (routing replay) and keeps the MoE
    side outputs of its last call in `.aux`. The update hands it to r1jax.logprobs' and
    r1jax.packing's forwards, which call `model.hidden`, so their token alignment stays written
    once; it is used inside one trace (the aux it keeps are that trace's values).

    routes: [B, T, MoE layers, K] aligned with the tokens `hidden` is given, in
    moe.compact_routes' type (unrouted entries fall back to the router), or None."""

    def __init__(self, model: MoEDecoder, routes_BxTxLxK: jax.Array | None = None):
        self.model, self.routes = model, routes_BxTxLxK
        self.cfg = model.cfg
        self.aux: dict[str, jax.Array] = {}

    def unembed_matrix(self) -> jax.Array:
        return self.model.unembed_matrix()

    def hidden(self, tokens_BxT: jax.Array, **kw) -> tuple[jax.Array, Any]:
        routes = None
        if self.routes is not None:
            routes = jnp.moveaxis(moe_lib.expand_routes(self.routes), 2, 0)
        h, cache, self.aux = self.model.hidden_and_aux(tokens_BxT, routes_LxBxTxK=routes, **kw)
        return h, cache


def mtp_loss(logits_DxBxTxV: jax.Array, tokens_BxT: jax.Array, mask_BxT: jax.Array,
             weight: float) -> jax.Array:
    """V3's L_MTP = weight / D * sum_k CE_k (equations 24-25), each depth's cross entropy over
    the positions whose target token i+k+1 exists and is in the mask."""
    depth, _, t, _ = logits_DxBxTxV.shape
    total = 0.0
    for k in range(1, depth + 1):
        tgt = tokens_BxT[:, k + 1:]
        lp = jax.nn.log_softmax(logits_DxBxTxV[k - 1, :, : t - k - 1], axis=-1)
        nll = -jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
        m = mask_BxT[:, k + 1:].astype(jnp.float32)
        total = total + jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)
    return weight / depth * total


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
def _rope(cfg: ModelConfig):
    dim = cfg.mla.qk_rope_head_dim if cfg.mla is not None else head_dim(cfg)
    return mla_lib.rope_tables(cfg, dim)


def _gqa_attention(cfg: ModelConfig, a, h, positions_BxT, rope, attn_fn, layer_cache):
    """Qwen3(-MoE) attention: GQA with per-head q/k RMSNorm before the rotation."""
    dt = jnp.dtype(cfg.dtype)
    inv_freq, attn_factor = rope
    q = jnp.einsum("btd,dnh->btnh", h, a["q"].astype(dt))
    k = jnp.einsum("btd,dkh->btkh", h, a["k"].astype(dt))
    v = jnp.einsum("btd,dkh->btkh", h, a["v"].astype(dt))
    if cfg.qkv_bias:
        q, k, v = q + a["q_bias"].astype(dt), k + a["k_bias"].astype(dt), v + a["v_bias"].astype(dt)
    if cfg.qk_norm:
        q = _norm(a["q_norm"]["scale"], q, cfg.rms_norm_eps, dt)
        k = _norm(a["k_norm"]["scale"], k, cfg.rms_norm_eps, dt)
    q = mla_lib.apply_rope(q, positions_BxT, inv_freq, attn_factor, False)
    k = mla_lib.apply_rope(k, positions_BxT, inv_freq, attn_factor, False)
    q = constrain(q, ("batch", "length", "act_heads", None))
    k = constrain(k, ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    o, layer_cache = attn_fn(q, k, v, layer_cache)
    out = jnp.einsum("btnh,nhd->btd", o.astype(dt), a["o"].astype(dt))
    if cfg.o_bias:
        out = out + a["o_bias"].astype(dt)
    return out, layer_cache


def _moe_ffn(cfg: ModelConfig, pm, h_BxTxD, valid_BxT, forced_BxTxK, dt):
    m = cfg.moe
    b, t, d = h_BxTxD.shape
    x = h_BxTxD.reshape(b * t, d)
    valid = valid_BxT.reshape(-1)
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), pm["router"].astype(jnp.float32))
    forced = None if forced_BxTxK is None else forced_BxTxK.reshape(b * t, -1)
    w, idx, s = moe_lib.route_tokens(m, logits, pm.get("router_bias"), forced)
    y, keep = moe_lib.moe_ffn(m, x, idx, w, pm["gate"], pm["up"], pm["down"], dt=dt, valid_N=valid)
    y = y.astype(dt)
    if m.num_shared_experts:
        y = y + _swiglu(x, pm["shared_gate"], pm["shared_up"], pm["shared_down"], dt)
    k = m.num_experts_per_tok
    aux = {
        "load": moe_lib.expert_load(idx, m.num_experts, valid),
        "dropped": jnp.sum((~keep) & valid[:, None]).astype(jnp.float32),
        "assignments": jnp.sum(valid).astype(jnp.float32) * k,
        "balance_loss": moe_lib.sequence_balance_loss(s.reshape(b, t, -1), idx.reshape(b, t, k),
                                                     valid_BxT, m.num_experts, k),
        "routes": idx.reshape(b, t, k),
    }
    if forced is not None:
        # Replay's reach: the tokens whose experts the router would have chosen differently
        # here (same hidden state, its own top-K), among the valid tokens that have a route.
        _, free, _ = moe_lib.route_tokens(m, logits, pm.get("router_bias"))
        rec = valid & jnp.all(forced >= 0, axis=-1)
        differs = jnp.any(jnp.sort(free, -1) != jnp.sort(idx, -1), axis=-1)
        aux["replay_differs"] = jnp.sum(differs & rec).astype(jnp.float32)
        aux["replay_tokens"] = jnp.sum(rec).astype(jnp.float32)
    return y.reshape(b, t, d), aux


def _layer(cfg: ModelConfig, kind: str, p, x_BxTxD, positions_BxT, rope, valid_BxT, attn_fn,
           layer_cache, forced_BxTxK, mla_latent: bool = False):
    """One pre-norm decoder layer on a single layer's slice p = {attn, mlp}."""
    dt = jnp.dtype(cfg.dtype)
    a = p["attn"]
    h = _norm(a["attn_norm"]["scale"], x_BxTxD, cfg.rms_norm_eps, dt)
    if cfg.mla is not None:
        attend = mla_lib.latent_attention if mla_latent else mla_lib.mla_attention
        o, layer_cache = attend(cfg, a["attn"], h, positions_BxT, rope, attn_fn, layer_cache)
    else:
        o, layer_cache = _gqa_attention(cfg, a["attn"], h, positions_BxT, rope, attn_fn, layer_cache)
    x_BxTxD = constrain(x_BxTxD + o, ("batch", "length", "act_embed"))
    h = _norm(a["mlp_norm"]["scale"], x_BxTxD, cfg.rms_norm_eps, dt)
    if kind == "dense":
        m = p["mlp"]
        y, aux = _swiglu(h, m["gate"], m["up"], m["down"], dt), None
    else:
        y, aux = _moe_ffn(cfg, p["mlp"], h, valid_BxT, forced_BxTxK, dt)
    return constrain(x_BxTxD + y, ("batch", "length", "act_embed")), layer_cache, aux


def layer_runs(cfg: ModelConfig):
    """[(kind, first layer, end layer, first index in that kind's stack)] of consecutive layers."""
    dense = set(cfg.moe.dense_layers)
    runs = []
    counters = {"dense": 0, "moe": 0}
    for i in range(cfg.num_layers):
        kind = "dense" if i in dense else "moe"
        if runs and runs[-1][0] == kind:
            runs[-1][2] = i + 1
        else:
            runs.append([kind, i, i + 1, counters[kind]])
        counters[kind] += 1
    return [tuple(r) for r in runs]


def run_layers(cfg: ModelConfig, params: dict, x_BxTxD, positions_BxT, valid_BxT, attn_fn, cache,
               routes_LxBxTxK, *, mla_latent: bool = False):
    """All decoder layers; returns (x, cache, aux) with aux stacked over the MoE layers."""
    rope = _rope(cfg)

    def body_for(kind):
        def body(x, xs):
            p, layer_cache, forced = xs
            x, layer_cache, aux = _layer(cfg, kind, p, x, positions_BxT, rope, valid_BxT, attn_fn,
                                         layer_cache, forced, mla_latent)
            return x, (layer_cache, aux)

        if cfg.remat == "full":
            return jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        if cfg.remat != "none":
            raise ValueError(f"model.remat must be 'none' or 'full', got '{cfg.remat}'")
        return body

    new_cache, auxes = [], []
    for kind, start, end, j in layer_runs(cfg):
        n = end - start
        sl = lambda a, s=start, n=n: a[s:s + n]
        stack = params["dense_mlp"] if kind == "dense" else params["moe"]
        xs = ({"attn": jax.tree.map(sl, params["layers"]),
               "mlp": jax.tree.map(lambda a, j=j, n=n: a[j:j + n], stack)},
              None if cache is None else jax.tree.map(sl, cache),
              None if routes_LxBxTxK is None or kind == "dense" else routes_LxBxTxK[j:j + n])
        body = body_for(kind)
        if cfg.scan_layers:
            x_BxTxD, (c, aux) = jax.lax.scan(body, x_BxTxD, xs)
        else:
            outs = []
            for i in range(n):
                x_BxTxD, out = body(x_BxTxD, jax.tree.map(lambda a, i=i: a[i], xs))
                outs.append(out)
            c, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs) if n > 1 else jax.tree.map(
                lambda a: a[None], outs[0])
        new_cache.append(c)
        if kind == "moe":
            auxes.append(aux)
    if cache is not None:
        cache = jax.tree.map(lambda *cs: jnp.concatenate(cs), *new_cache)
    aux = jax.tree.map(lambda *a: jnp.concatenate(a), *auxes) if auxes else {}
    return x_BxTxD, cache, aux


def moe_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Scalar moe/* metrics from `hidden_and_aux`'s side outputs."""
    if not aux:
        return {}
    out = moe_lib.load_metrics(aux["load"], jnp.sum(aux["dropped"]), jnp.sum(aux["assignments"]))
    out["moe/balance_loss"] = jnp.sum(aux["balance_loss"])
    if "replay_differs" in aux:
        out["moe/replay_disagreement"] = jnp.sum(aux["replay_differs"]) / jnp.maximum(
            jnp.sum(aux["replay_tokens"]), 1.0)
    return out


def num_params(cfg: ModelConfig) -> int:
    """Parameter count (MTP modules included), without building the model."""
    m, d, L, V = cfg.moe, cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    if cfg.mla is not None:
        attn = mla_lib.num_params(cfg)
    else:
        n, k, h = cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
        attn = d * h * (n + 2 * k) + n * h * d + (2 * h if cfg.qk_norm else 0)
        attn += h * (n + 2 * k) if cfg.qkv_bias else 0
        attn += d if cfg.o_bias else 0
    ld = len(moe_lib.dense_layer_ids(cfg))
    per_moe = d * m.num_experts + 3 * m.num_experts * d * m.moe_intermediate_size
    per_moe += m.num_experts if m.router_bias else 0
    per_moe += 3 * d * m.moe_intermediate_size * m.num_shared_experts
    total = V * d * (1 if cfg.tie_embeddings else 2) + d + L * (attn + 2 * d)
    total += ld * 3 * d * cfg.intermediate_size + (L - ld) * per_moe
    total += cfg.num_mtp_layers * (attn + 2 * d + per_moe + 3 * d + 2 * d * d)
    return total


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses (K routed experts of each MoE layer, MTP excluded)."""
    m = cfg.moe
    lm = len(moe_lib.moe_layer_ids(cfg))
    idle = lm * 3 * (m.num_experts - m.num_experts_per_tok) * cfg.hidden_size * m.moe_intermediate_size
    mtp = num_params(cfg) - num_params(_without_mtp(cfg))
    return num_params(cfg) - idle - mtp


def _without_mtp(cfg: ModelConfig) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, num_mtp_layers=0)
