"""Rollout engine: prefill each prompt once, share its KV cache across the G samples of its
group, and decode all P x G sequences in one compiled `lax.while_loop`.

How a rollout runs (`sample`):
  1. Host: validate (one-line errors before anything compiles), left-pad the P prompts to a
     length bucket (`r1jax.padding.bucket_length` over `SamplerConfig.prompt_buckets`; a batch
     already padded to its bucket, as the rollout's are, keeps its length) and P to a multiple of
     the batch shards, so a new prompt length reuses the compiled program.
  2. Device, one jitted program per (model config, shapes, greedy or not, truncation or not);
     temperature, top-k / top-p values and stop ids are runtime inputs:
     * prefill: one forward over the [P, Tp] prompts through the model's own code, whose
       attention hook hands back each layer's post-RoPE K/V: the prompt cache [L, P, K, Tp, H],
       stored ONCE per prompt (not G times);
     * decode: each step feeds the [P*G] current tokens through the model's own decoder block
       (`r1jax.models.transformer._block`, layer by layer with weights sliced per layer once
       before the loop); queries, viewed as [P, G, ...], attend to their prompt's cache (one
       read serves the whole group) plus a per-sample completion cache [P*G, K, Tc, H] per
       layer, written in place at the step's slot; the loop exits as soon as every sequence
       has stopped. Tc = max_new_tokens, so the cache holds Tp_bucket + Tc positions.
  3. Sampling avoids both per-vocab-element random numbers and sorting (on XLA:CPU both cost
     far more than the rest of a step): one uniform per row and step, inverse CDF over the
     (truncated) probabilities in two levels, top-k / top-p thresholds found by exact bisection
     on the float bit patterns.

Prefix sharing (`prefix_mode`): keeping the prompt cache once per prompt rather than per sample;
the gain grows with prompt length (benchmarks/sampler.py measures it; figures in the README).

Key schedule: row r = p * G + g draws its step-t uniform from fold_in(fold_in(key, r), t), so a
group sampled shared-prefix, the same prompts repeated G times with G = 1, and any mesh layout
all draw the same numbers.

Stop strings: matched ON DEVICE as token-id sequences (each stop string tokenised with the
tokenizer passed in, or pre-tokenised `stop_sequences`), so the loop ends early on them. A stop
string produced through a different tokenisation is caught by a host pass over the decoded text
(`truncate_at_stop_strings`, run by `sample` when it has a tokenizer) that shortens the mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.config import SamplerConfig
from r1jax.logprobs import logprob_temperature
from r1jax.padding import bucket_length, round_up
from r1jax.mesh import SAMPLE_RULES, batch_sharding, constrain, layout, params_shardings
from r1jax.models.transformer import (_block, attention, causal_segment_mask, head_dim,
                                      positions_from_segments, rope_frequencies)

FINISH_STOP = 0  # a stop token / stop sequence ended the completion (it is inside the mask)
FINISH_LENGTH = 1  # max_new_tokens reached: the completion is truncated
FINISH_REASONS = ("stop", "length")

_NEG = -1e30  # masked attention score: finite so an all-masked row cannot make NaNs


class SamplerError(ValueError):
    """Bad sampler input, with a message naming the culprit."""


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
@flax.struct.dataclass
class SampleOutput:
    """P x G completions, row r = p * G + g (prompt-major, the G samples of a prompt adjacent).

    tokens:        int32 [P*G, Tc], Tc = max_new_tokens; `pad_id` after the end.
    mask:          int32 [P*G, Tc], 1 on the generated tokens up to and including the stop.
    logp:          float32 [P*G, Tc], log-prob of each sampled token under the distribution it was
                   actually drawn from: softmax(logits / T) restricted to the top-k / top-p set and
                   renormalised (0 for greedy, temperature 0; 0 where mask is 0).
    logp_policy:   float32 [P*G, Tc], log_softmax(logits / T)[token] WITHOUT truncation (T = 1 when
                   temperature is 0): exactly what `r1jax.logprobs.completion_logprobs(model,
                   prompt_tokens[r // G], prompt_mask[r // G], tokens, temperature=T)` recomputes
                   in training, so the trainer uses it as log pi_old (ratios start at exactly 1
                   up to float rounding). Equal to `logp` when no truncation is active.
    finish_reason: int32 [P*G], FINISH_STOP or FINISH_LENGTH.
    lengths:       int32 [P*G], mask.sum(-1).
    prompt_tokens: int32 [P, Tp], the left-padded prompts (Tp the bucket length), and
    prompt_mask:   int32 [P, Tp], 1 on real prompt tokens.
    num_steps:     int32 [], decode steps run (< Tc when every sequence stopped early).
    """

    tokens: jax.Array
    mask: jax.Array
    logp: jax.Array
    logp_policy: jax.Array
    finish_reason: jax.Array
    lengths: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    num_steps: jax.Array
    num_samples: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def truncated(self) -> jax.Array:
        """bool [P*G]: the completion hit max_new_tokens without a stop."""
        return self.finish_reason == FINISH_LENGTH

    def row_prompts(self) -> Tuple[jax.Array, jax.Array]:
        """Prompt tokens and mask repeated per row, [P*G, Tp] each (for completion_logprobs)."""
        g = self.num_samples
        return jnp.repeat(self.prompt_tokens, g, axis=0), jnp.repeat(self.prompt_mask, g, axis=0)


# ---------------------------------------------------------------------------------------------
# Static description of one compiled program
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    """What shapes the compiled program. Temperature, top-k / top-p values and the stop ids /
    sequences are runtime inputs (in `_Knobs`), so changing them does not recompile; only
    greedy or not, truncation or not, and the shapes are static."""

    num_samples: int
    max_new_tokens: int
    greedy: bool
    truncate: bool  # top-k or top-p on (their values are runtime inputs)
    kv_cache_dtype: str
    pad_id: int
    prefix_mode: str
    mesh: Any
    rules: Any


@flax.struct.dataclass
class _Knobs:
    temperature: jax.Array  # f32 []
    top_k: jax.Array  # i32 []
    top_p: jax.Array  # f32 []
    stop_ids: jax.Array  # i32 [N], -1 padding never matches a token
    stop_seqs: jax.Array  # i32 [S, M], right-aligned, -1 = any token, rows of -2 never match


# ---------------------------------------------------------------------------------------------
# Sampling one token per row without sorting or per-element noise
# ---------------------------------------------------------------------------------------------
def _sortable(x_f32: jax.Array) -> jax.Array:
    """uint32 keys ordered like the floats (IEEE bits with the sign handled), for bisection."""
    bits = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
    neg = (bits >> 31) == 1
    return jnp.where(neg, ~bits, bits | jnp.uint32(0x80000000))


def _bisect_max(pred, shape) -> jax.Array:
    """The largest uint32 m (per row) with pred(m) true, given pred monotone decreasing in m and
    true at 0. 32 halvings: exact."""
    lo = jnp.zeros(shape, jnp.uint32)
    hi = jnp.full(shape, 0xFFFFFFFF, jnp.uint32)

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # upper middle, no overflow
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def _truncation_mask(x_BxV: jax.Array, top_k, top_p) -> jax.Array:
    """bool [B, V]: the tokens top-k then top-p keep (ties at the threshold kept).

    top-k: logits >= the k-th largest logit. top-p (on the top-k-renormalised distribution):
    probabilities >= tau, tau the largest value whose set {prob >= tau} holds mass >= p; that is
    the smallest descending-sorted prefix with mass >= p. Thresholds come from bisection over
    the float bits (32 passes of a compare-and-reduce) instead of a sort. top_k <= 0 or >= V
    and top_p >= 1 keep everything; each filter is skipped at run time (lax.cond) when off, so
    one compiled program serves every top-k / top-p setting.
    """
    b, v = x_BxV.shape
    everything = jnp.ones((b, v), bool)

    def top_k_keep():
        keys = _sortable(x_BxV)
        thr = _bisect_max(lambda m: jnp.sum(keys >= m[:, None], axis=-1) >= top_k, (b,))
        return keys >= thr[:, None]

    keep = jax.lax.cond((top_k > 0) & (top_k < v), top_k_keep, lambda: everything)

    def top_p_keep():
        m = jnp.max(x_BxV, axis=-1, keepdims=True)
        e = jnp.where(keep, jnp.exp(x_BxV - m), 0.0)
        need = top_p * jnp.sum(e, axis=-1)
        ebits = jax.lax.bitcast_convert_type(e, jnp.uint32)  # e >= 0: bits are ordered
        thr = _bisect_max(
            lambda t: jnp.sum(jnp.where(ebits >= t[:, None], e, 0.0), axis=-1) >= need, (b,))
        return keep & (ebits >= thr[:, None])

    return jax.lax.cond(top_p < 1.0, top_p_keep, lambda: keep)


def _inverse_cdf(e_BxV: jax.Array, u_B: jax.Array, chunk: int) -> jax.Array:
    """Index i with cumsum(e)[i-1] <= u * sum(e) < cumsum(e)[i], in two levels (chunk sums, then
    one chunk) so no [B, V] cumulative sum is needed. Zero-weight tokens are never picked."""
    b, v = e_BxV.shape
    pad = (-v) % chunk
    e = jnp.pad(e_BxV, ((0, 0), (0, pad))) if pad else e_BxV
    n = e.shape[1] // chunk
    e_BxNxC = e.reshape(b, n, chunk)
    sums_BxN = jnp.sum(e_BxNxC, axis=-1)
    cum_BxN = jnp.cumsum(sums_BxN, axis=-1)
    target = u_B * cum_BxN[:, -1]
    # The chunk holding the target; clamped to the last chunk with mass (rounding at the top).
    last = jnp.max(jnp.where(sums_BxN > 0, jnp.arange(n), 0), axis=-1)
    c = jnp.minimum(jnp.sum(cum_BxN <= target[:, None], axis=-1), last)
    before = jnp.take_along_axis(cum_BxN - sums_BxN, c[:, None], axis=-1)[:, 0]
    inside_BxC = jnp.take_along_axis(e_BxNxC, c[:, None, None], axis=1)[:, 0]
    cum_BxC = before[:, None] + jnp.cumsum(inside_BxC, axis=-1)
    lastc = jnp.max(jnp.where(inside_BxC > 0, jnp.arange(chunk), 0), axis=-1)
    i = jnp.minimum(jnp.sum(cum_BxC <= target[:, None], axis=-1), lastc)
    return c * chunk + i


def _cdf_chunk(v: int) -> int:
    """Chunk length for the two-level inverse CDF: a divisor of V near sqrt(V) (no padding
    copy), else sqrt(V) with padding."""
    root = max(1, math.isqrt(v))
    best = min((d for d in range(1, 2 * root + 1) if v % d == 0), key=lambda d: d + v // d)
    return best if best + v // best <= 3 * root else root


def _choose(logits_BxV: jax.Array, u_B: jax.Array, plan: _Plan, knobs: _Knobs):
    """Sample one token per row. Returns (tokens, logp, logp_policy), see SampleOutput."""
    logits = logits_BxV.astype(jnp.float32)
    if plan.greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0]
        return tok, jnp.zeros_like(lse), picked - lse
    x = logits / knobs.temperature
    m = jnp.max(x, axis=-1, keepdims=True)
    e = jnp.exp(x - m)
    lse = m[:, 0] + jnp.log(jnp.sum(e, axis=-1))
    keep = _truncation_mask(x, knobs.top_k, knobs.top_p) if plan.truncate else None
    if keep is not None:
        e = jnp.where(keep, e, 0.0)
    tok = _inverse_cdf(e, u_B, chunk=_cdf_chunk(x.shape[-1]))
    picked = jnp.take_along_axis(x, tok[:, None], axis=-1)[:, 0]
    logp_policy = picked - lse
    if keep is None:
        return tok.astype(jnp.int32), logp_policy, logp_policy
    lse_kept = m[:, 0] + jnp.log(jnp.sum(e, axis=-1))
    return tok.astype(jnp.int32), picked - lse_kept, logp_policy


def _uniforms(row_keys, step) -> jax.Array:
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step)))(row_keys)


# ---------------------------------------------------------------------------------------------
# The compiled rollout
# ---------------------------------------------------------------------------------------------
def _decode_attention(q_BxNxH, pk_PxKxSxH, pv_PxKxSxH, pbias_PxS, ck_BxKxTxH, cv_BxKxTxH,
                      cbias_T, group: int):
    """One new query per row over two key sets: its prompt's cache (shared by the `group` rows
    of the prompt: one read serves G queries) and its own completion cache (the new token's
    K/V already written). Additive biases (0 or -1e30) mask prompt padding and unwritten
    completion slots. One softmax across both, in float32."""
    b, n, h = q_BxNxH.shape
    kh = ck_BxKxTxH.shape[1]
    r = n // kh
    p = b // group
    f32 = jnp.float32
    q = q_BxNxH.astype(f32).reshape(b, kh, r, h) * (1.0 / math.sqrt(h))
    qg = q.reshape(p, group, kh, r, h)
    s_p = jnp.einsum("pgkrh,pksh->pgkrs", qg, pk_PxKxSxH.astype(f32))
    s_p = (s_p + pbias_PxS[:, None, None, None, :]).reshape(b, kh, r, -1)
    s_c = jnp.einsum("bkrh,bksh->bkrs", q, ck_BxKxTxH.astype(f32)) + cbias_T
    m = jnp.maximum(jnp.max(s_p, -1), jnp.max(s_c, -1))
    e_p = jnp.exp(s_p - m[..., None])
    e_c = jnp.exp(s_c - m[..., None])
    denom = jnp.sum(e_p, -1) + jnp.sum(e_c, -1)
    o = jnp.einsum("pgkrs,pksh->pgkrh", e_p.reshape(p, group, kh, r, -1), pv_PxKxSxH.astype(f32))
    o = o.reshape(b, kh, r, h)
    o = o + jnp.einsum("bkrs,bksh->bkrh", e_c, cv_BxKxTxH.astype(f32))
    return (o / denom[..., None]).reshape(b, n, h)


_CACHE_AXES = ("layers", "batch", "act_kv_heads", "cache_length", None)
_LAYER_CACHE_AXES = _CACHE_AXES[1:]


def _rollout(graphdef, plan: _Plan, params, prompt_PxT, pmask_PxT, key, knobs: _Knobs):
    ctx = layout(plan.mesh, plan.rules) if plan.mesh is not None else contextlib.nullcontext()
    with ctx:
        return _rollout_body(graphdef, plan, params, prompt_PxT, pmask_PxT, key, knobs)


def _rollout_body(graphdef, plan: _Plan, params, prompt_PxT, pmask_PxT, key, knobs: _Knobs):
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    G, Tc = plan.num_samples, plan.max_new_tokens
    P, Tp = prompt_PxT.shape
    B = P * G
    L = cfg.num_layers
    cdt = jnp.dtype(plan.kv_cache_dtype)
    w_DxV = model.unembed_matrix().astype(jnp.float32)

    # ---- prefill: one forward per prompt; the attention hook returns the layer's K/V ---------
    seg = pmask_PxT.astype(jnp.int32)
    pos = positions_from_segments(seg)
    causal = causal_segment_mask(seg)

    def prefill_attn(q, k, v, _):
        kv = (k.swapaxes(1, 2).astype(cdt), v.swapaxes(1, 2).astype(cdt))  # [P, K, Tp, H]
        return attention(q, k, v, causal), kv

    # A dummy per-layer cache so the unrolled (scan_layers=False) path also returns the K/V.
    h, (pk, pv) = model.hidden(prompt_PxT, positions_BxT=pos, segment_ids_BxT=seg,
                               cache=jnp.zeros((L,), jnp.int32), attn_fn=prefill_attn,
                               **getattr(model, "decode_kwargs", {}))
    pk, pv = constrain(pk, _CACHE_AXES), constrain(pv, _CACHE_AXES)
    logits0_PxV = constrain(h[:, -1].astype(jnp.float32) @ w_DxV, ("batch", "act_vocab"))
    plen_P = jnp.sum(seg, axis=-1)
    pbias = jnp.where(pmask_PxT.astype(bool), 0.0, _NEG).astype(jnp.float32)
    group = G
    if plan.prefix_mode == "repeat":
        # The plain alternative: copy the prompt cache per sample (G x the prompt-cache reads).
        rep = lambda a: jnp.repeat(a, G, axis=1)  # noqa: E731
        pk, pv = constrain(rep(pk), _CACHE_AXES), constrain(rep(pv), _CACHE_AXES)
        pbias = jnp.repeat(pbias, G, axis=0)
        group = 1
    # Per-layer arrays from here on, sliced once before the loop: inside it, slicing stacked
    # weights / caches by layer would copy them every step (XLA:CPU materialises slices that
    # feed a dot), which cost as much as the matmuls themselves.
    pk = [constrain(pk[i], _LAYER_CACHE_AXES) for i in range(L)]
    pv = [constrain(pv[i], _LAYER_CACHE_AXES) for i in range(L)]
    own_block = hasattr(model, "decode_block")  # MoE decoders slice and run their own layers
    if own_block:
        layer_params, inv_freq = model.decode_layer_params(), None
    else:
        stacked = nnx.to_pure_dict(nnx.state(model.layers, nnx.Param))
        layer_params = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(L)]
        inv_freq = rope_frequencies(cfg)

    # ---- per-row state ------------------------------------------------------------------------
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(B, dtype=jnp.uint32))
    plen_B = jnp.repeat(plen_P, G)
    stop_ids = knobs.stop_ids
    seq_SxM = knobs.stop_seqs
    M = seq_SxM.shape[1]
    seqs = M > 0

    def is_stop(tok_B, window_BxM):
        stop = jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)
        if seqs:
            hit = (seq_SxM[None] == -1) | (window_BxM[:, None, :] == seq_SxM[None])
            stop = stop | jnp.any(jnp.all(hit, axis=-1), axis=-1)
        return stop

    def push(window_BxM, tok_B):
        if not seqs:
            return window_BxM
        return jnp.concatenate([window_BxM[:, 1:], tok_B[:, None]], axis=1)

    logits0 = constrain(jnp.repeat(logits0_PxV, G, axis=0), ("batch", "act_vocab"))
    tok, lp, lpp = _choose(logits0, _uniforms(row_keys, 0), plan, knobs)
    window = push(jnp.full((B, max(M, 1)), -3, jnp.int32), tok)
    stopped = is_stop(tok, window)

    def put(buf_BxT, val_B, j):
        return jax.lax.dynamic_update_slice(buf_BxT, val_B[:, None].astype(buf_BxT.dtype), (0, j))

    batch2 = ("batch", None)
    tokens = constrain(put(jnp.full((B, Tc), plan.pad_id, jnp.int32), tok, 0), batch2)
    logp = constrain(put(jnp.zeros((B, Tc), jnp.float32), lp, 0), batch2)
    logpp = constrain(put(jnp.zeros((B, Tc), jnp.float32), lpp, 0), batch2)
    kh, hd = model.kv_cache_shape() if own_block else (cfg.num_kv_heads, head_dim(cfg))
    ck = tuple(constrain(jnp.zeros((B, kh, Tc, hd), cdt), _LAYER_CACHE_AXES) for _ in range(L))
    cv = tuple(constrain(jnp.zeros((B, kh, Tc, hd), cdt), _LAYER_CACHE_AXES) for _ in range(L))
    lengths = jnp.ones((B,), jnp.int32)

    # ---- decode: feed token j, write its K/V at slot j, sample token j + 1 ----------------------
    def cond(state):
        j, _, _, _, _, _, stopped, _, _, _ = state
        return (j + 1 < Tc) & ~jnp.all(stopped)

    def body(state):
        j, tok, tokens, logp, logpp, lengths, stopped, window, ck, cv = state
        cbias_T = jnp.where(jnp.arange(Tc) <= j, 0.0, _NEG).astype(jnp.float32)
        positions = (plen_B + j)[:, None]
        # The model's own decoder block (the code training runs), one layer at a time.
        x = model.embed_tokens(tok[:, None])
        ck, cv = list(ck), list(cv)
        for i in range(L):
            def decode_attn(q, k, v, _, i=i):
                # Write first, then attend over the written cache: a read of the old buffer
                # after the write would make XLA copy the whole cache to keep it alive.
                ck_i, cv_i = (constrain(jax.lax.dynamic_update_slice(
                    c, a.swapaxes(1, 2).astype(cdt), (0, 0, j, 0)), _LAYER_CACHE_AXES)
                    for c, a in ((ck[i], k), (cv[i], v)))
                o = _decode_attention(q[:, 0], pk[i], pv[i], pbias, ck_i, cv_i, cbias_T, group)
                return o[:, None].astype(q.dtype), (ck_i, cv_i)

            if own_block:
                x, (ck[i], cv[i]), _ = model.decode_block(i, layer_params[i], x, positions, decode_attn)
            else:
                x, (ck[i], cv[i]) = _block(cfg, layer_params[i], x, positions, inv_freq, decode_attn, None)
        ck, cv = tuple(ck), tuple(cv)
        h = model.final_norm(x)
        logits = constrain(h[:, 0].astype(jnp.float32) @ w_DxV, ("batch", "act_vocab"))
        nxt, lp, lpp = _choose(logits, _uniforms(row_keys, j + 1), plan, knobs)
        alive = ~stopped
        nxt = jnp.where(alive, nxt, plan.pad_id)
        tokens = put(tokens, nxt, j + 1)
        logp = put(logp, jnp.where(alive, lp, 0.0), j + 1)
        logpp = put(logpp, jnp.where(alive, lpp, 0.0), j + 1)
        lengths = lengths + alive.astype(jnp.int32)
        window = push(window, nxt)
        stopped = stopped | (alive & is_stop(nxt, window))
        return (j + 1, nxt, tokens, logp, logpp, lengths, stopped, window, ck, cv)

    state = (jnp.int32(0), tok, tokens, logp, logpp, lengths, stopped, window, ck, cv)
    j, _, tokens, logp, logpp, lengths, stopped, _, _, _ = jax.lax.while_loop(cond, body, state)
    mask = (jnp.arange(Tc)[None, :] < lengths[:, None]).astype(jnp.int32)
    finish = jnp.where(stopped, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32)
    return SampleOutput(tokens=tokens, mask=mask, logp=logp, logp_policy=logpp,
                        finish_reason=finish, lengths=lengths,
                        prompt_tokens=prompt_PxT.astype(jnp.int32),
                        prompt_mask=pmask_PxT.astype(jnp.int32), num_steps=j + 1, num_samples=G)


class ProgramCache:
    """Compiled rollout programs, owned by the caller (a `Sampler`, a trainer, a test module):
    keyed by the model config's repr (nnx GraphDefs holding a mutable config are not hashable,
    so jit's own static-argument cache cannot key on them) and the static plan. It lives as
    long as its owner does, so nothing accumulates across unrelated runs."""

    def __init__(self):
        self._programs: Dict[Tuple[str, _Plan], Any] = {}

    def __len__(self) -> int:
        return len(self._programs)

    def get(self, graphdef, cfg, plan: _Plan):
        key = (repr(cfg), plan)
        fn = self._programs.get(key)
        if fn is None:
            fn = jax.jit(functools.partial(_rollout, graphdef, plan))
            self._programs[key] = fn
        return fn

    def programs(self) -> List[Any]:
        return list(self._programs.values())


# ---------------------------------------------------------------------------------------------
# Host side: validation, bucketing, the public entry point
# ---------------------------------------------------------------------------------------------
def _prompt_arrays(prompts, prompt_mask) -> Tuple[np.ndarray, np.ndarray]:
    """Left-padded int32 [P, T] tokens and mask on the host from lists or arrays."""
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        toks = np.asarray(jax.device_get(prompts)).astype(np.int64)
        if prompt_mask is None:
            mask = np.ones(toks.shape, np.int32)
        else:
            mask = np.asarray(jax.device_get(prompt_mask)).astype(np.int32)
            if mask.shape != toks.shape:
                raise SamplerError(f"prompt_mask shape {mask.shape} differs from prompts shape {toks.shape}")
        for i, row in enumerate(mask):
            n = int(row.sum())
            if n and not (row[-n:] == 1).all():
                raise SamplerError(f"prompt {i} is not left-padded: its mask has zeros after real tokens")
        return toks, mask
    if prompt_mask is not None:
        raise SamplerError("prompt_mask is only for a [P, Tp] prompt array, not for token lists")
    try:
        rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    except (TypeError, ValueError) as e:
        raise SamplerError(f"prompts must be lists of token ids or a [P, Tp] array: {e}") from None
    t = max((len(r) for r in rows), default=0)
    toks = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            toks[i, t - len(r):] = r
            mask[i, t - len(r):] = 1
    return toks, mask


def _batch_shards(mesh, rules) -> int:
    if mesh is None:
        return 1
    axes = dict(rules).get("batch")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def _resolve_config(config: Optional[SamplerConfig], overrides: Dict[str, Any]) -> SamplerConfig:
    config = config if config is not None else SamplerConfig()
    valid = {f.name for f in dataclasses.fields(SamplerConfig)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise SamplerError(f"unknown sampler option(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    return dataclasses.replace(config, **overrides) if overrides else config


def stop_sequences_for(stop_strings: Sequence[str], tokenizer) -> List[Tuple[int, ...]]:
    """Token-id sequences of stop strings, as the tokenizer encodes them mid-text."""
    out = []
    for s in stop_strings:
        if not s:
            raise SamplerError("stop_strings contains an empty string")
        ids = tuple(int(i) for i in tokenizer.encode(s, add_special_tokens=False))
        if ids:
            out.append(ids)
    return out


def _knobs(cfg_s: SamplerConfig, stop_ids: Sequence[int], seqs: Sequence[Tuple[int, ...]]) -> _Knobs:
    """Runtime sampling inputs. The stop arrays are padded (ids to a multiple of 16, sequences
    to multiples of 4) so that adding a stop token or sequence rarely changes a shape."""
    ids = np.full((round_up(max(len(stop_ids), 1), 16),), -1, np.int32)
    ids[:len(stop_ids)] = stop_ids
    m = round_up(max((len(s) for s in seqs), default=0), 4)
    arr = np.full((round_up(max(len(seqs), 1), 4), m), -2, np.int32)
    for i, s in enumerate(seqs):
        arr[i] = -1
        arr[i, m - len(s):] = s
    return _Knobs(temperature=jnp.float32(logprob_temperature(cfg_s.temperature)), top_k=jnp.int32(cfg_s.top_k),
                  top_p=jnp.float32(cfg_s.top_p), stop_ids=jnp.asarray(ids), stop_seqs=jnp.asarray(arr))


def sample(model, prompts, *, key: jax.Array, num_samples: int = 1,
           config: Optional[SamplerConfig] = None, prompt_mask=None, mesh=None, rules=None,
           tokenizer=None, stop_sequences: Optional[Sequence[Sequence[int]]] = None,
           stop_at_eos: bool = True, pad_id: int = 0, prefix_mode: str = "shared",
           host_stop_check: bool = True, cache: Optional[ProgramCache] = None,
           **overrides) -> SampleOutput:
    """Sample `num_samples` (G) completions for each of P prompts.

    model: an r1jax Transformer, or (graphdef, params) from `nnx.split`. With a `mesh`, the
      parameters are resharded once, device to device, to the sampling layout (`rules`, default
      r1jax.mesh.SAMPLE_RULES; a no-op when they already have it) and the batch and the KV cache
      are sharded by it (batch over the data axes, KV heads over the tensor axis).
    prompts: a list of P token-id lists (any lengths >= 1), or a left-padded [P, Tp] array with
      `prompt_mask` (1 on real tokens).
    key: PRNG key. Row r = p * G + g uses fold_in(fold_in(key, r), step): the same tokens come
      out shared-prefix or with each prompt repeated G times (G = 1), on any mesh.
    config: SamplerConfig (max_new_tokens, temperature, top_p, top_k, stop_token_ids,
      stop_strings, kv_cache_dtype, prompt_buckets); keyword `overrides` replace its fields,
      e.g. `sample(..., temperature=0.6, top_p=0.95)`. temperature 0 is greedy.
    tokenizer: needed for `config.stop_strings` (tokenised and matched on device; a host pass
      over the decoded text, `truncate_at_stop_strings`, then catches other tokenisations
      unless host_stop_check=False). `stop_sequences`: pre-tokenised stop sequences.
    stop_at_eos: also stop on the model's eos_token_id (model.cfg.eos_token_id).
    prefix_mode: "shared" (prompt cache stored once per prompt, attended from its G samples) or
      "repeat" (the prompt cache copied per sample); both give identical results.

    cache: where the compiled program is kept (default: a fresh one, compiled for this call);
      callers that sample repeatedly hold a `Sampler`, which owns its cache.

    Returns a SampleOutput (device arrays, sharded over the batch); see its docstring for
    exactly what `logp` and `logp_policy` are.
    """
    cfg_s = _resolve_config(config, overrides)
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
    else:
        graphdef, state = model
    return Sampler(graphdef, cfg_s, mesh=mesh, rules=rules, tokenizer=tokenizer, pad_id=pad_id,
                   stop_sequences=stop_sequences, stop_at_eos=stop_at_eos, prefix_mode=prefix_mode,
                   host_stop_check=host_stop_check, cache=cache).sample(
        state, prompts, key=key, num_samples=num_samples, prompt_mask=prompt_mask)


class Sampler:
    """One model's sampler: its graph, a SamplerConfig, the mesh and rules to sample under, the
    stop criteria, and the compiled programs (a `ProgramCache` it owns, so repeated rollouts
    reuse one compilation and dropping the Sampler drops them).

        s = Sampler(graphdef, cfg.sampler, mesh=mesh, rules=rules, tokenizer=tok, pad_id=tok.pad_id)
        out = s.sample(params, prompt_ids_PxTp, prompt_mask=mask_PxTp, key=key, num_samples=G)
    """

    def __init__(self, graphdef, config: Optional[SamplerConfig] = None, *, mesh=None, rules=None,
                 tokenizer=None, pad_id: int = 0,
                 stop_sequences: Optional[Sequence[Sequence[int]]] = None,
                 stop_at_eos: bool = True, prefix_mode: str = "shared",
                 host_stop_check: bool = True, cache: Optional[ProgramCache] = None):
        self.graphdef = graphdef
        self.config = config if config is not None else SamplerConfig()
        self.mesh, self.rules = mesh, rules
        self.tokenizer, self.pad_id = tokenizer, int(pad_id)
        self.stop_sequences = stop_sequences
        self.stop_at_eos, self.prefix_mode, self.host_stop_check = stop_at_eos, prefix_mode, host_stop_check
        self.cache = cache if cache is not None else ProgramCache()

    def with_config(self, config: SamplerConfig) -> "Sampler":
        """The same sampler (and compiled-program cache) with another SamplerConfig."""
        return Sampler(self.graphdef, config, mesh=self.mesh, rules=self.rules,
                       tokenizer=self.tokenizer, pad_id=self.pad_id,
                       stop_sequences=self.stop_sequences, stop_at_eos=self.stop_at_eos,
                       prefix_mode=self.prefix_mode, host_stop_check=self.host_stop_check,
                       cache=self.cache)

    def sample(self, params, prompts, *, key: jax.Array, num_samples: int = 1,
               prompt_mask=None) -> SampleOutput:
        """G = `num_samples` completions for each of P prompts (see the module function
        `sample` for the arguments and `SampleOutput` for the result)."""
        return _sample(self, params, prompts, key=key, num_samples=num_samples,
                       prompt_mask=prompt_mask)


def _sample(s: Sampler, state, prompts, *, key, num_samples, prompt_mask) -> SampleOutput:
    cfg_s, graphdef, mesh, rules, tokenizer = s.config, s.graphdef, s.mesh, s.rules, s.tokenizer
    stop_sequences, stop_at_eos, pad_id = s.stop_sequences, s.stop_at_eos, s.pad_id
    prefix_mode, host_stop_check = s.prefix_mode, s.host_stop_check
    merged = nnx.merge(graphdef, state)
    mcfg = merged.cfg
    # -- validation: every message names the culprit, nothing has compiled yet ------------------
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise SamplerError(f"num_samples (G) must be an integer >= 1, got {num_samples!r}")
    tc = cfg_s.max_new_tokens
    if not isinstance(tc, (int, np.integer)) or tc < 1:
        raise SamplerError(f"max_new_tokens must be >= 1, got {tc!r}")
    if cfg_s.temperature < 0:
        raise SamplerError(f"temperature must be >= 0, got {cfg_s.temperature}")
    if not 0.0 < cfg_s.top_p <= 1.0:
        raise SamplerError(f"top_p must be in (0, 1], got {cfg_s.top_p}")
    if cfg_s.top_k < 0:
        raise SamplerError(f"top_k must be >= 0 (0: off), got {cfg_s.top_k}")
    if cfg_s.kv_cache_dtype not in ("float32", "bfloat16", "float16"):
        raise SamplerError(f"kv_cache_dtype must be float32, bfloat16 or float16, got {cfg_s.kv_cache_dtype!r}")
    if prefix_mode not in ("shared", "repeat"):
        raise SamplerError(f"prefix_mode must be 'shared' or 'repeat', got {prefix_mode!r}")
    toks, pmask = _prompt_arrays(prompts, prompt_mask)
    if toks.shape[0] == 0:
        raise SamplerError("no prompts given")
    plens = pmask.sum(-1)
    for i, n in enumerate(plens):
        if n == 0:
            raise SamplerError(f"prompt {i} is empty")
    real = toks[pmask.astype(bool)]
    if real.size and (real.min() < 0 or real.max() >= mcfg.vocab_size):
        bad = int(np.argmax(((toks < 0) | (toks >= mcfg.vocab_size)) & pmask.astype(bool)) // toks.shape[1])
        raise SamplerError(f"prompt {bad} has a token id outside [0, {mcfg.vocab_size}) (model vocab_size)")
    maxpos = mcfg.max_position_embeddings
    longest = int(plens.max())
    if longest > maxpos:
        raise SamplerError(f"prompt {int(plens.argmax())} has {longest} tokens, more than the model's "
                           f"max_position_embeddings {maxpos}")
    if longest + tc > maxpos:
        raise SamplerError(f"prompt {int(plens.argmax())} ({longest} tokens) + max_new_tokens {tc} = "
                           f"{longest + tc} exceeds the model's max_position_embeddings {maxpos}")
    stop_ids = list(cfg_s.stop_token_ids)
    if stop_at_eos and mcfg.eos_token_id is not None:
        stop_ids.append(int(mcfg.eos_token_id))
    seqs = [tuple(int(i) for i in s) for s in (stop_sequences or [])]
    if cfg_s.stop_strings:
        if tokenizer is None:
            raise SamplerError("stop_strings need a tokenizer (or pass pre-tokenised stop_sequences)")
        seqs += stop_sequences_for(cfg_s.stop_strings, tokenizer)
    if any(len(s) == 0 for s in seqs):
        raise SamplerError("stop_sequences contains an empty sequence")
    singles = sorted({s[0] for s in seqs if len(s) == 1} | set(stop_ids))
    seqs = sorted({s for s in seqs if len(s) > 1})
    # -- bucketing: a new prompt length maps onto an already compiled shape ---------------------
    rules = rules if rules is not None else SAMPLE_RULES
    tp = bucket_length(toks.shape[1], cfg_s.prompt_buckets)
    P = toks.shape[0]
    P_pad = -(-P // _batch_shards(mesh, rules)) * _batch_shards(mesh, rules)
    toks_b = np.zeros((P_pad, tp), np.int32)
    mask_b = np.zeros((P_pad, tp), np.int32)
    toks_b[:P, tp - toks.shape[1]:] = toks * pmask
    mask_b[:P, tp - toks.shape[1]:] = pmask
    toks_b[P:], mask_b[P:] = toks_b[0], mask_b[0]  # filler rows, dropped below
    plan = _Plan(num_samples=int(num_samples), max_new_tokens=int(tc),
                 greedy=cfg_s.temperature == 0.0,
                 truncate=cfg_s.top_k > 0 or cfg_s.top_p < 1.0, kv_cache_dtype=cfg_s.kv_cache_dtype,
                 pad_id=int(pad_id), prefix_mode=prefix_mode, mesh=mesh,
                 rules=tuple(rules) if mesh is not None else None)
    knobs = _knobs(cfg_s, singles, seqs)
    # -- placement: parameters resharded device to device, prompts split over the batch ---------
    params = nnx.state(merged)
    if mesh is not None:
        params = jax.device_put(nnx.to_pure_dict(params), params_shardings(params, mesh, rules))
        sh = batch_sharding(mesh, rules, 2, toks_b.shape)
        toks_d, mask_d = jax.device_put(toks_b, sh), jax.device_put(mask_b, sh)
    else:
        params = nnx.to_pure_dict(params)
        toks_d, mask_d = jnp.asarray(toks_b), jnp.asarray(mask_b)
    out = s.cache.get(graphdef, mcfg, plan)(params, toks_d, mask_d, key, knobs)
    if P_pad != P:
        n = P * plan.num_samples
        out = out.replace(**{f: getattr(out, f)[:n] for f in
                             ("tokens", "mask", "logp", "logp_policy", "finish_reason", "lengths")},
                          prompt_tokens=out.prompt_tokens[:P], prompt_mask=out.prompt_mask[:P])
    if tokenizer is not None and cfg_s.stop_strings and host_stop_check:
        out = truncate_at_stop_strings(out, tokenizer, cfg_s.stop_strings, pad_id=pad_id)
    return out


def truncate_at_stop_strings(out: SampleOutput, tokenizer, stop_strings: Sequence[str], *,
                             pad_id: int = 0) -> SampleOutput:
    """Host pass: end each completion at the first token whose decoded prefix contains a stop
    string (catching tokenisations the device match missed); tokens after it become pad and
    leave the mask, and the row's finish reason becomes "stop"."""
    tokens = np.asarray(jax.device_get(out.tokens)).copy()
    lengths = np.asarray(jax.device_get(out.lengths)).copy()
    finish = np.asarray(jax.device_get(out.finish_reason)).copy()
    changed = False
    for r in range(tokens.shape[0]):
        n = int(lengths[r])
        ids = tokens[r, :n].tolist()
        text = tokenizer.decode(ids)
        if not any(s in text for s in stop_strings):
            continue
        lo, hi = 1, n  # smallest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in tokenizer.decode(ids[:mid]) for s in stop_strings):
                hi = mid
            else:
                lo = mid + 1
        if lo < n or finish[r] != FINISH_STOP:
            tokens[r, lo:] = pad_id
            lengths[r] = lo
            finish[r] = FINISH_STOP
            changed = True
    if not changed:
        return out
    tc = tokens.shape[1]
    mask = (np.arange(tc)[None, :] < lengths[:, None]).astype(np.int32)
    put = lambda a, like: jax.device_put(a, like.sharding)  # noqa: E731
    return out.replace(tokens=put(tokens.astype(np.int32), out.tokens), mask=put(mask, out.mask),
                       logp=out.logp * put(mask.astype(np.float32), out.logp),
                       logp_policy=out.logp_policy * put(mask.astype(np.float32), out.logp_policy),
                       lengths=put(lengths.astype(np.int32), out.lengths),
                       finish_reason=put(finish.astype(np.int32), out.finish_reason))


# ---------------------------------------------------------------------------------------------
# Text in, text out (the `r1jax sample` command is r1jax/commands/sample.py)
# ---------------------------------------------------------------------------------------------
def generate_text(model, tokenizer, prompts: Sequence[str], *, num_samples: int = 1, seed: int = 0,
                  config: Optional[SamplerConfig] = None, mesh=None, rules=None,
                  add_special_tokens: bool = True, **overrides) -> List[Dict[str, Any]]:
    """Sample G completions of each prompt string; one dict per sample, prompt-major:
    {prompt_index, sample_index, prompt, completion, finish_reason, num_tokens, logp}."""
    if not prompts:
        raise SamplerError("no prompts given")
    ids = tokenizer.encode_batch(list(prompts), add_special_tokens=add_special_tokens)
    for i, p in enumerate(ids):
        if not p:
            raise SamplerError(f"prompt {i} is empty after tokenisation")
    out = sample(model, ids, key=jax.random.key(seed), num_samples=num_samples, config=config,
                 mesh=mesh, rules=rules, tokenizer=tokenizer, pad_id=tokenizer.pad_id, **overrides)
    tokens, lengths, finish, logp = jax.device_get((out.tokens, out.lengths, out.finish_reason, out.logp))
    rows = []
    for r in range(tokens.shape[0]):
        p, g = divmod(r, num_samples)
        n = int(lengths[r])
        rows.append({"prompt_index": p, "sample_index": g, "prompt": prompts[p],
                     "completion": tokenizer.decode(tokens[r, :n]),
                     "finish_reason": FINISH_REASONS[int(finish[r])], "num_tokens": n,
                     "logp": float(np.sum(logp[r, :n]))})
    return rows


__all__ = ["SampleOutput", "SamplerError", "Sampler", "ProgramCache", "sample", "generate_text",
           "truncate_at_stop_strings", "stop_sequences_for", "FINISH_STOP",
           "FINISH_LENGTH", "FINISH_REASONS"]
