"""Multi-head Latent Attention (DeepSeek-V2/V3) with YaRN rope scaling, in Flax NNX.

Queries go through a low-rank bottleneck (`q_lora_rank`, or a full projection when None);
keys and values are decompressed from one shared latent c_kv (`kv_lora_rank` features per
token) plus a single RoPE key shared by all heads (`qk_rope_head_dim`), as in the V3 report's
equations 1-11. Only c_kv and the rope key need caching; the decoder here expands them to
per-head keys and values, so MLA plugs into the same `attn_fn(q, k, v, layer_cache)` hook as
the dense transformer (the sampler's latent cache with absorbed projections is separate work).

DeepSeek's checkpoints store the rope features of q and k interleaved, (x0, x1), (x2, x3), ...
each pair rotated by one frequency (`rope_interleave`, transformers' default for V3). The
rotation here returns the pairs de-interleaved (evens then odds) for q and k alike, which
leaves q.k unchanged.

YaRN (rope_type "yarn") interpolates the low frequencies by `factor`, keeps the high ones, and
ramps between them; its `attention_factor` multiplies cos and sin (so the rope part of q.k
scales by its square), and with `mscale_all_dim` DeepSeek also multiplies the softmax scale by
mscale(factor, mscale_all_dim)^2 (transformers' DeepseekV3Attention).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.mesh import constrain
from r1jax.models.transformer import _param, rope_tables  # noqa: F401 - rope_tables re-exported
from r1jax.models.transformer import yarn_mscale as _yarn_mscale


def softmax_scale(cfg: ModelConfig) -> float:
    m = cfg.mla
    scale = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.rope_type == "yarn" and rs.mscale_all_dim:
        scale *= _yarn_mscale(float(rs.factor), rs.mscale_all_dim) ** 2
    return scale


def apply_rope(x_BxTxNxR: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array,
               attn_factor: float, interleave: bool) -> jax.Array:
    """Rotate the rope features; interleaved pairs come out de-interleaved (see module doc)."""
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    cos = (jnp.cos(freqs) * attn_factor)[:, :, None, :]
    sin = (jnp.sin(freqs) * attn_factor)[:, :, None, :]
    x = x_BxTxNxR.astype(jnp.float32)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxR.dtype)


def _rms(x, scale, eps, dt):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(dt)


# transformers builds q_a_layernorm / kv_a_layernorm with the default epsilon, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLA(nnx.Module):
    """MLA weights of `layers` stacked layers (leading "layers" axis)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layers: int):
        m = cfg.mla
        d, n = cfg.hidden_size, cfg.num_heads
        dqk = m.qk_nope_head_dim + m.qk_rope_head_dim
        pd = jnp.dtype(cfg.param_dtype)
        L = (layers,)
        if m.q_lora_rank is None:
            self.q = _param(rngs, L + (d, n, dqk), ("layers", "embed", "heads", "head_dim"), pd)
        else:
            r = m.q_lora_rank
            self.q_a = _param(rngs, L + (d, r), ("layers", "embed", None), pd)
            self.q_a_norm = _param(None, L + (r,), ("layers", "norm"), pd, "ones")
            # The latent ranks take the "embed" rule: ZeRO-3 shards them like the hidden size
            # (they have no activation counterpart to constrain).
            self.q_b = _param(rngs, L + (r, n, dqk), ("layers", "embed", "heads", "head_dim"), pd)
        rkv = m.kv_lora_rank
        self.kv_a = _param(rngs, L + (d, rkv + m.qk_rope_head_dim), ("layers", "embed", None), pd)
        self.kv_a_norm = _param(None, L + (rkv,), ("layers", "norm"), pd, "ones")
        self.kv_b = _param(rngs, L + (rkv, n, m.qk_nope_head_dim + m.v_head_dim),
                           ("layers", "embed", "heads", "head_dim"), pd)
        self.o = _param(rngs, L + (n, m.v_head_dim, d), ("layers", "heads", "head_dim", "embed"), pd)
        if cfg.o_bias:  # transformers' attention_bias: on q_a, kv_a and o
            if m.q_lora_rank is not None:
                self.q_a_bias = _param(None, L + (m.q_lora_rank,), ("layers", None), pd, "zeros")
            self.kv_a_bias = _param(None, L + (rkv + m.qk_rope_head_dim,), ("layers", None), pd, "zeros")
            self.o_bias = _param(None, L + (d,), ("layers", "embed"), pd, "zeros")


def latents(cfg: ModelConfig, a: dict, h_BxTxD, positions_BxT, rope) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(queries [B,T,N,dn+dr] with rope applied, c_kv [B,T,Rkv] normed, rope key [B,T,1,dr])."""
    m, dt = cfg.mla, jnp.dtype(cfg.dtype)
    inv_freq, attn_factor = rope
    if m.q_lora_rank is None:
        q = jnp.einsum("btd,dnh->btnh", h_BxTxD, a["q"].astype(dt))
    else:
        cq = jnp.einsum("btd,dr->btr", h_BxTxD, a["q_a"].astype(dt))
        if "q_a_bias" in a:
            cq = cq + a["q_a_bias"].astype(dt)
        cq = _rms(cq, a["q_a_norm"], LATENT_NORM_EPS, dt)
        q = jnp.einsum("btr,rnh->btnh", cq, a["q_b"].astype(dt))
    dn = m.qk_nope_head_dim
    q = jnp.concatenate([q[..., :dn], apply_rope(q[..., dn:], positions_BxT, inv_freq, attn_factor,
                                                 m.rope_interleave)], axis=-1)
    kv = jnp.einsum("btd,dr->btr", h_BxTxD, a["kv_a"].astype(dt))
    if "kv_a_bias" in a:
        kv = kv + a["kv_a_bias"].astype(dt)
    ckv = _rms(kv[..., :m.kv_lora_rank], a["kv_a_norm"], LATENT_NORM_EPS, dt)
    k_rope = apply_rope(kv[..., m.kv_lora_rank:][:, :, None, :], positions_BxT, inv_freq,
                        attn_factor, m.rope_interleave)
    return q, ckv, k_rope


def expand_kv(cfg: ModelConfig, a: dict, ckv_BxSxR, k_rope_BxSx1xR) -> tuple[jax.Array, jax.Array]:
    """Per-head keys [B,S,N,dn+dr] and values [B,S,N,dv] from the latent and the rope key."""
    m, dt = cfg.mla, jnp.dtype(cfg.dtype)
    kv = jnp.einsum("bsr,rnh->bsnh", ckv_BxSxR, a["kv_b"].astype(dt))
    k_nope, v = kv[..., :m.qk_nope_head_dim], kv[..., m.qk_nope_head_dim:]
    k_rope = jnp.broadcast_to(k_rope_BxSx1xR, k_nope.shape[:-1] + (m.qk_rope_head_dim,))
    return jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1), v


def mla_attention(cfg: ModelConfig, a: dict, h_BxTxD, positions_BxT, rope, attn_fn, layer_cache
                  ) -> tuple[jax.Array, Any]:
    """One layer's attention output [B,T,D] through `attn_fn(q, k, v, layer_cache)`.

    attn_fn is the dense transformer's hook (default 1/sqrt(head dim) scaling, equal q/k/v
    head dims), so q is pre-scaled to give MLA's softmax scale and q/k/v are zero-padded to one
    head width (zeros add nothing to q.k; padded value features are sliced off)."""
    dt = jnp.dtype(cfg.dtype)
    q, ckv, k_rope = latents(cfg, a, h_BxTxD, positions_BxT, rope)
    k, v = expand_kv(cfg, a, ckv, k_rope)
    dqk, dv = q.shape[-1], v.shape[-1]
    width = max(dqk, dv)
    q = q * jnp.asarray(softmax_scale(cfg) * math.sqrt(width), q.dtype)

    def pad(x):
        return x if x.shape[-1] == width else jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])

    q = constrain(pad(q), ("batch", "length", "act_heads", None))
    k = constrain(pad(k), ("batch", "length", "act_heads", None))
    v = constrain(pad(v), ("batch", "length", "act_heads", None))
    o, layer_cache = attn_fn(q, k, v, layer_cache)
    out = jnp.einsum("btnh,nhd->btd", o[..., :dv].astype(dt), a["o"].astype(dt))
    if "o_bias" in a:
        out = out + a["o_bias"].astype(dt)
    return out, layer_cache


def num_params(cfg: ModelConfig) -> int:
    """MLA parameters of one layer."""
    m, d, n = cfg.mla, cfg.hidden_size, cfg.num_heads
    dqk = m.qk_nope_head_dim + m.qk_rope_head_dim
    q = d * n * dqk if m.q_lora_rank is None else d * m.q_lora_rank + m.q_lora_rank * (1 + n * dqk)
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * (1 + n * (m.qk_nope_head_dim + m.v_head_dim))
    total = q + kv + n * m.v_head_dim * d
    if cfg.o_bias:
        total += (m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_rope_head_dim + d
    return total


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> tuple[int, int]:
    """(latent cache, expanded per-head K/V cache) bytes per token and layer."""
    m = cfg.mla
    latent = (m.kv_lora_rank + m.qk_rope_head_dim) * dtype_bytes
    full = cfg.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * dtype_bytes
    return latent, full


def latent_attention(cfg: ModelConfig, a: dict, h_BxTxD, positions_BxT, rope, attn_fn, layer_cache
                     ) -> tuple[jax.Array, Any]:
    """MLA through its latent, with the key and value up-projections absorbed (what a decoder
    caches and attends over: kv_lora_rank + qk_rope_head_dim numbers per token and layer).

    q.k_n = (q_nope W_uk_n) . c_kv + q_rope . k_rope, and o_n = (sum_s p_s c_kv_s) W_uv_n, so
    this is multi-query attention over one shared head: queries [q_nope W_uk; q_rope] per head,
    key [c_kv; k_rope], value [c_kv; 0] (zero-padded to the key width so the dense hook's
    equal-width contract holds; a cache may store the key alone and rebuild the value from its
    first kv_lora_rank features). Equal to `mla_attention` up to rounding."""
    m, dt = cfg.mla, jnp.dtype(cfg.dtype)
    q, ckv, k_rope = latents(cfg, a, h_BxTxD, positions_BxT, rope)
    dn, r = m.qk_nope_head_dim, m.kv_lora_rank
    kv_b = a["kv_b"].astype(dt)
    q_lat = jnp.einsum("btnh,rnh->btnr", q[..., :dn], kv_b[..., :dn])
    width = r + m.qk_rope_head_dim
    qq = jnp.concatenate([q_lat, q[..., dn:]], axis=-1) * jnp.asarray(softmax_scale(cfg) * math.sqrt(width), dt)
    kk = jnp.concatenate([ckv, k_rope[:, :, 0].astype(ckv.dtype)], axis=-1)[:, :, None, :]
    vv = jnp.pad(ckv, ((0, 0), (0, 0), (0, m.qk_rope_head_dim)))[:, :, None, :]
    qq = constrain(qq, ("batch", "length", "act_heads", None))
    o, layer_cache = attn_fn(qq, kk, vv, layer_cache)
    o = jnp.einsum("btnr,rnh->btnh", o[..., :r].astype(dt), kv_b[..., dn:])
    out = jnp.einsum("btnh,nhd->btd", o, a["o"].astype(dt))
    if "o_bias" in a:
        out = out + a["o_bias"].astype(dt)
    return out, layer_cache
