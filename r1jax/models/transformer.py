"""Dense decoder-only transformer (Qwen2 / Qwen2.5, Qwen3 and Llama 3.x) in Flax NNX.

RMSNorm, RoPE (plain or Llama-3 scaled), optional per-head q/k RMSNorm (Qwen3), grouped-query
attention through
`jax.nn.dot_product_attention` (so cuDNN can serve it on GPU), SwiGLU MLP. Every parameter
carries `logical_axes` metadata; r1jax.mesh maps those names to mesh axes.

Layers are stacked (one Param per weight kind with a leading "layers" axis) and applied with
`lax.scan` or unrolled; the same parameter layout serves both, and a pure dict of parameters
has only string keys (Orbax- and safetensors-friendly).

The attention of each layer can be replaced by a caller-supplied function operating on a
per-layer cache slice (`attn_fn(q, k, v, layer_cache) -> (out, new_layer_cache)`): that is how
the sampler threads its KV cache through the same model code that training uses.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.mesh import constrain, embed_lookup

AttnFn = Callable[[jax.Array, jax.Array, jax.Array, Any], Tuple[jax.Array, Any]]

_INIT_STD = 0.02  # Qwen2 / Llama initializer_range


def _param(rngs: Optional[nnx.Rngs], shape, axes, dtype, init="normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(cfg: ModelConfig, dim: Optional[int] = None) -> Tuple[jax.Array, float]:
    """(inverse frequencies [dim/2], attention factor on cos/sin) for rotary features of width
    `dim` (default: the head dim): plain, Llama-3 scaled, or YaRN (transformers'
    _compute_yarn_parameters: low frequencies interpolated by `factor`, high ones kept, a linear
    ramp between; cos and sin scaled by the attention factor)."""
    dim = head_dim(cfg) if dim is None else dim
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type != "yarn":
        return _plain_or_llama3(cfg, dim), 1.0
    factor = float(rs.factor)
    base, orig = cfg.rope_theta, rs.original_max_position_embeddings

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: high frequency, kept as is
    return interpolation * (1 - keep) + extrapolation * keep, rope_attention_factor(cfg)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """YaRN's factor on cos and sin (so on q.k its square); 1 for other RoPE types."""
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type != "yarn":
        return 1.0
    factor = float(rs.factor)
    if rs.attention_factor is not None:
        return float(rs.attention_factor)
    if rs.mscale and rs.mscale_all_dim:
        return yarn_mscale(factor, rs.mscale) / yarn_mscale(factor, rs.mscale_all_dim)
    return yarn_mscale(factor)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [Dh/2] of the configured RoPE (see rope_tables)."""
    return rope_tables(cfg)[0]


def _plain_or_llama3(cfg: ModelConfig, dh: int) -> jax.Array:
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type in ("default", None):
        return inv_freq
    if rs.rope_type != "llama3":
        raise ValueError(f"model.rope_scaling.rope_type '{rs.rope_type}' is not supported; "
                         "use default, llama3 or yarn")
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (transformers' _compute_llama3_parameters).
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array,
               attn_factor: float = 1.0) -> jax.Array:
    """Rotate-half RoPE (the HF convention: the two halves of each head form the pairs), cos and
    sin scaled by `attn_factor` (YaRN)."""
    freqs_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs_BxTxF, freqs_BxTxF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb) * attn_factor, jnp.sin(emb) * attn_factor
    x = x_BxTxNxH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)


def positions_from_segments(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions that skip left padding: the count of real tokens before each one."""
    valid = (segment_ids_BxT > 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)


def causal_segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """[B, 1, T, T]: causal, same segment, real keys. A padding query attends to itself only,
    so its (ignored) output stays finite."""
    t = segment_ids_BxT.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
    same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    real = (segment_ids_BxT > 0)[:, None, :]
    diag = jnp.eye(t, dtype=jnp.bool_)
    return ((causal & same & real) | diag)[:, None, :, :]


def dense(x, w, n_in: int = 1) -> jax.Array:
    """x [..., *in] contracted with w [*in, *out] -> [..., *out], as ONE 2-D matmul
    [prod(...), prod(in)] x [prod(in), prod(out)] (the reshapes are free).

    Why not einsum("btd,df->btf"): its weight gradient contracts two axes (b, t), and XLA:CPU
    lowers that by materialising a transposed copy of the activation gradient before the
    matmul; on the 2-D form it is one plain matmul. Measured on the tiny GRPO update: the
    transposing copies were a third of its time (benchmarks/grpo_step.py)."""
    lead, w_in, w_out = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    k = math.prod(w_in)
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(lead + w_out)


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS) -> jax.Array:
    """Grouped-query attention; `jax.nn.dot_product_attention` picks cuDNN on GPU when it can."""
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, *, layers: Optional[int] = None):
        shape, axes = ((layers, dim), ("layers", "norm")) if layers else ((dim,), ("norm",))
        self.scale = _param(None, shape, axes, param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale.get_value().astype(jnp.float32) * y).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layers: int):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
        pd = jnp.dtype(cfg.param_dtype)
        L = (layers,)
        self.q = _param(rngs, L + (d, n, h), ("layers", "embed", "heads", "head_dim"), pd)
        self.k = _param(rngs, L + (d, k, h), ("layers", "embed", "kv_heads", "head_dim"), pd)
        self.v = _param(rngs, L + (d, k, h), ("layers", "embed", "kv_heads", "head_dim"), pd)
        self.o = _param(rngs, L + (n, h, d), ("layers", "heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = _param(None, L + (n, h), ("layers", "heads", "head_dim"), pd, "zeros")
            self.k_bias = _param(None, L + (k, h), ("layers", "kv_heads", "head_dim"), pd, "zeros")
            self.v_bias = _param(None, L + (k, h), ("layers", "kv_heads", "head_dim"), pd, "zeros")
        if cfg.o_bias:
            self.o_bias = _param(None, L + (d,), ("layers", "embed"), pd, "zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, pd, layers=layers)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, pd, layers=layers)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layers: int):
        d, f = cfg.hidden_size, cfg.intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        L = (layers,)
        self.gate = _param(rngs, L + (d, f), ("layers", "embed", "mlp"), pd)
        self.up = _param(rngs, L + (d, f), ("layers", "embed", "mlp"), pd)
        self.down = _param(rngs, L + (f, d), ("layers", "mlp", "embed"), pd)


class Layers(nnx.Module):
    """All decoder blocks, each weight stacked along a leading layer axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, layers=cfg.num_layers)
        self.attn = Attention(cfg, rngs, cfg.num_layers)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, layers=cfg.num_layers)
        self.mlp = MLP(cfg, rngs, cfg.num_layers)


def _block(cfg: ModelConfig, p: dict, x_BxTxD, positions_BxT, inv_freq, attn_fn: AttnFn, layer_cache):
    """One pre-norm decoder block on a single layer's parameter slice `p` (a pure dict)."""
    dt = jnp.dtype(cfg.dtype)

    def norm(scale, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        return (scale.astype(jnp.float32) * y).astype(dt)

    a = p["attn"]
    h = norm(p["attn_norm"]["scale"], x_BxTxD)
    q = dense(h, a["q"].astype(dt))
    k = dense(h, a["k"].astype(dt))
    v = dense(h, a["v"].astype(dt))
    if cfg.qkv_bias:
        q, k, v = q + a["q_bias"].astype(dt), k + a["k_bias"].astype(dt), v + a["v_bias"].astype(dt)
    if cfg.qk_norm:  # Qwen3: over each head's features, before the rotation
        q, k = norm(a["q_norm"]["scale"], q), norm(a["k_norm"]["scale"], k)
    attn_factor = rope_attention_factor(cfg)
    q = constrain(apply_rope(q, positions_BxT, inv_freq, attn_factor), ("batch", "length", "act_heads", None))
    k = constrain(apply_rope(k, positions_BxT, inv_freq, attn_factor), ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    o, layer_cache = attn_fn(q, k, v, layer_cache)
    x_BxTxD = x_BxTxD + dense(o.astype(dt), a["o"].astype(dt), n_in=2)
    if cfg.o_bias:
        x_BxTxD = x_BxTxD + a["o_bias"].astype(dt)
    x_BxTxD = constrain(x_BxTxD, ("batch", "length", "act_embed"))

    m = p["mlp"]
    h = norm(p["mlp_norm"]["scale"], x_BxTxD)
    gate = dense(h, m["gate"].astype(dt))
    up = dense(h, m["up"].astype(dt))
    act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    x_BxTxD = x_BxTxD + dense(act, m["down"].astype(dt))
    return constrain(x_BxTxD, ("batch", "length", "act_embed")), layer_cache


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens)` gives logits; `model.hidden(...)` the final hidden states."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.hidden_size % cfg.num_heads and cfg.head_dim is None:
            raise ValueError(f"model.hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"model.num_heads {cfg.num_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}")
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.layers = Layers(cfg, rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    # -- the pieces the sampler and log-prob code use ------------------------------------------
    def unembed_matrix(self) -> jax.Array:
        """[D, V] output projection (the embedding transposed when tied)."""
        if self.cfg.tie_embeddings:
            return self.embed.get_value().T
        return self.lm_head.get_value()

    def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
        x = embed_lookup(self.embed.get_value(), tokens_BxT).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x, ("batch", "length", "act_embed"))

    def hidden(self, tokens_BxT: jax.Array, *, positions_BxT: Optional[jax.Array] = None,
               segment_ids_BxT: Optional[jax.Array] = None, cache: Any = None,
               attn_fn: Optional[AttnFn] = None) -> Tuple[jax.Array, Any]:
        """Final-normed hidden states [B, T, D] and the updated cache.

        segment_ids: int [B, T], 0 marks padding; tokens attend causally within their segment.
        positions default to the count of real tokens before each one (left padding safe).
        cache: a pytree whose leaves have a leading layer axis, handed slice by slice to attn_fn.
        """
        cfg = self.cfg
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
        if positions_BxT is None:
            positions_BxT = positions_from_segments(segment_ids_BxT)
        if attn_fn is None:
            mask = causal_segment_mask(segment_ids_BxT)

            def attn_fn(q, k, v, layer_cache):
                return attention(q, k, v, mask), layer_cache

        inv_freq = rope_frequencies(cfg)
        x = self.embed_tokens(tokens_BxT)
        stacked = nnx.to_pure_dict(nnx.state(self.layers, nnx.Param))

        def body(x, xs):
            p, layer_cache = xs
            return _block(cfg, p, x, positions_BxT, inv_freq, attn_fn, layer_cache)

        if cfg.remat == "full":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        elif cfg.remat != "none":
            raise ValueError(f"model.remat must be 'none' or 'full', got '{cfg.remat}'")
        if cfg.scan_layers:
            x, cache = jax.lax.scan(body, x, (stacked, cache))
        else:
            new = []
            for i in range(cfg.num_layers):
                sl = jax.tree.map(lambda a: a[i], (stacked, cache))
                x, c = body(x, sl)
                new.append(c)
            cache = None if cache is None else jax.tree.map(lambda *cs: jnp.stack(cs), *new)
        return self.final_norm(x), cache

    def __call__(self, tokens_BxT: jax.Array, *, positions_BxT: Optional[jax.Array] = None,
                 segment_ids_BxT: Optional[jax.Array] = None) -> jax.Array:
        """Logits [B, T, V] in float32. For training losses use r1jax.logprobs instead: it never
        materialises the full logits."""
        h, _ = self.hidden(tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT)
        logits = jnp.einsum("btd,dv->btv", h.astype(jnp.float32), self.unembed_matrix().astype(jnp.float32))
        return constrain(logits, ("batch", "length", "act_vocab"))
