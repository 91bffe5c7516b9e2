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
     With `SamplerConfig.compact` or more than one window bucket, the decode runs in
     segments instead (below).
  3. Sampling avoids both per-vocab-element random numbers and sorting (on XLA:CPU both cost
     far more than the rest of a step): one uniform per row and step, inverse CDF over the
     (truncated) probabilities in two levels, top-k / top-p thresholds found by exact bisection
     on the float bit patterns.

Compaction and windows (`compact`, `min_decode_batch`, `min_decode_window`): finished rows stop
costing compute, and attention reads only the filled part of the completion cache. The decode
runs in segments, each a `lax.while_loop` compiled for one (batch bucket, window bucket) pair:
batch buckets are the rollout's B rows, then shards * 2^k, each at most half the one before,
down to min_decode_batch (`batch_buckets`); window buckets are min_decode_window * 2^k below
Tc, then Tc (`window_buckets`). A segment exits when at most the next batch bucket's rows are
live (the host then gathers the live rows, their caches, tokens, positions, stop state, and
filler copies of a stopped row, into that bucket; the prompt cache becomes one per row) or when
the step reaches the window (its cache is zero-padded to the next one). Outputs are written by
global row index into the [B, Tc] buffers throughout. Tokens equal the one-program decode's: a
row's randomness depends only on its global index and the step. Compiled programs per rollout
shape: at most `program_bound` = 2 + nB * nW + (nB - 1) * nW + nB * (nW - 1) (prefill and
output assembly, decode per pair, compaction per (bucket step, window), growth per (bucket,
window step)), nB = len(batch_buckets) <= log2(B) + 1, nW = len(window_buckets) <= log2(Tc) + 1.

KV-cache budget (`kv_cache_budget`, in cached positions, prompt caches included; a position
holds every layer's K and V, `kv_bytes_per_token`): when the P prompt caches plus
max_new_tokens per sample exceed it, the decode runs continuous batching in S slots
(`budget_slots`: (budget - P * Tp) // Tc, whole multiples of the batch shards). Each slot decodes
its row at the row's own step (position, cache slot, key step); a finished slot takes the next
pending row on device, inside the loop, continuing from the token the prefill drew for it and
attending to its prompt's shared cache (no new prefill; the prompt cache stays once per
prompt). With the queue empty, the live slots compact into smaller slot buckets as above.
Slots hold a Tc completion cache each (the budget counts it) but attend over a window of it,
the smallest window bucket above the longest live slot's step: a segment exits when a slot's
step reaches the window (the host picks the next one) or when every live slot's step fits the
window bucket below (a long row finished and the slots hold younger rows: the host picks the
smaller one). Compiled programs per rollout shape: at most `budget_program_bound` =
2 + nS * nW + (nS - 1) (prefill and output assembly, decode per (slot bucket, window bucket),
compaction per bucket step), nS = len(batch_buckets(S, shards, min_decode_batch)), nW =
len(window_buckets).

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
from r1jax.models import moe as moe_lib
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
    # Routing replay (model.moe.routing_replay=rollout, MoE models only; None otherwise): the
    # experts each token was routed to, per MoE layer, in r1jax.models.moe.compact_routes' small
    # integer type (its "never routed" value where no route was computed):
    #   routes:        [P*G, Tc, MoE layers, K], completion token t as it was fed to decode
    #                  step t (the last token, never fed, stays unrouted);
    #   prompt_routes: [P, Tp, MoE layers, K], the prefill's routes (once per prompt, like its
    #                  KV cache; unrouted on padding).
    routes: Optional[jax.Array] = None
    prompt_routes: Optional[jax.Array] = None

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
    compact: bool = False  # decode in shrinking batch buckets as rows finish
    min_batch: int = 1  # the smallest batch bucket
    min_window: int = 1 << 30  # the first completion-cache window bucket (>= Tc: one window)


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


def _stop_fns(knobs: _Knobs):
    """(is_stop, push): stop test on the new token and the window of the last M tokens, and the
    window update."""
    stop_ids, seq_SxM = knobs.stop_ids, knobs.stop_seqs
    M = seq_SxM.shape[1]

    def is_stop(tok_B, window_BxM):
        stop = jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)
        if M > 0:
            hit = (seq_SxM[None] == -1) | (window_BxM[:, None, :] == seq_SxM[None])
            stop = stop | jnp.any(jnp.all(hit, axis=-1), axis=-1)
        return stop

    def push(window_BxM, tok_B):
        if M == 0:
            return window_BxM
        return jnp.concatenate([window_BxM[:, 1:], tok_B[:, None]], axis=1)

    return is_stop, push, M


def _in_layout(plan: _Plan, fn, *args):
    ctx = layout(plan.mesh, plan.rules) if plan.mesh is not None else contextlib.nullcontext()
    with ctx:
        return fn(*args)


def _records_routes(model) -> bool:
    """Routing replay is on for this MoE model: the rollout records every token's experts
    (nothing is recorded, and nothing costs, otherwise)."""
    moe = getattr(model.cfg, "moe", None)
    return moe is not None and moe.routing_replay == "rollout" and hasattr(model, "hidden_and_aux")


def _routes_BxTxLxK(routes_LxBxTxK, num_experts: int, valid_BxT=None):
    """Routes from the model's side outputs in the stored layout (batch-major, so rows can be
    gathered, packed and sharded like tokens) and the compact type; unrouted where not valid."""
    r = jnp.moveaxis(routes_LxBxTxK, 0, 2)
    if valid_BxT is not None:
        r = jnp.where(valid_BxT[:, :, None, None], r, -1)
    return moe_lib.compact_routes(r, num_experts)


def _rollout(graphdef, plan: _Plan, params, prompt_PxT, pmask_PxT, key, knobs: _Knobs):
    """The whole rollout as ONE program (sampler.compact off, one window): prefill, decode until
    every row stops, outputs."""
    def run():
        model = nnx.merge(graphdef, params)
        carry = _prefill(model, plan, prompt_PxT, pmask_PxT, key, knobs, plan.max_new_tokens)
        carry = _decode(model, plan, carry, key, knobs, exit_live=0)
        return _finish(plan, carry, prompt_PxT, pmask_PxT)
    return _in_layout(plan, run)


def _prefill(model, plan: _Plan, prompt_PxT, pmask_PxT, key, knobs: _Knobs, window: int):
    """Prefill and the first sampled token. Returns the decode carry (a dict):
      j: step; per decode row (the current batch bucket Bb, Bb = B here): tok, window (last M
      tokens), stop, length, row (its global row index r = p * G + g), plen; the completion
      cache ck / cv (per layer [Bb, K, W, H], W the current window bucket); the prompt cache
      pk / pv (per layer [P, K, Tp, H] while the rows are uncompacted and prefix-shared, else
      one per decode row) with its padding bias pbias; and the full outputs tokens / logp /
      logpp [B, Tc], lengths / stopped [B] (written back by global row index)."""
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
    fwd = dict(positions_BxT=pos, segment_ids_BxT=seg, cache=jnp.zeros((L,), jnp.int32),
               attn_fn=prefill_attn, **getattr(model, "decode_kwargs", {}))
    record = _records_routes(model)
    if record:  # routing replay: the prompt's routes too (the update's forward covers them)
        h, (pk, pv), aux = model.hidden_and_aux(prompt_PxT, **fwd)
        prompt_routes = _routes_BxTxLxK(aux["routes"], cfg.moe.num_experts, pmask_PxT > 0)
    else:
        h, (pk, pv) = model.hidden(prompt_PxT, **fwd)
    pk, pv = constrain(pk, _CACHE_AXES), constrain(pv, _CACHE_AXES)
    logits0_PxV = constrain(h[:, -1].astype(jnp.float32) @ w_DxV, ("batch", "act_vocab"))
    plen_P = jnp.sum(seg, axis=-1)
    pbias = jnp.where(pmask_PxT.astype(bool), 0.0, _NEG).astype(jnp.float32)
    if plan.prefix_mode == "repeat":
        # The plain alternative: copy the prompt cache per sample (G x the prompt-cache reads).
        rep = lambda a: jnp.repeat(a, G, axis=1)  # noqa: E731
        pk, pv = constrain(rep(pk), _CACHE_AXES), constrain(rep(pv), _CACHE_AXES)
        pbias = jnp.repeat(pbias, G, axis=0)
    # Per-layer arrays from here on: inside the loop, slicing stacked caches by layer would
    # copy them every step (XLA:CPU materialises slices that feed a dot).
    pk = tuple(constrain(pk[i], _LAYER_CACHE_AXES) for i in range(L))
    pv = tuple(constrain(pv[i], _LAYER_CACHE_AXES) for i in range(L))

    row = jnp.arange(B, dtype=jnp.int32)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(row.astype(jnp.uint32))
    is_stop, push, M = _stop_fns(knobs)
    logits0 = constrain(jnp.repeat(logits0_PxV, G, axis=0), ("batch", "act_vocab"))
    tok, lp, lpp = _choose(logits0, _uniforms(row_keys, 0), plan, knobs)
    win = push(jnp.full((B, max(M, 1)), -3, jnp.int32), tok)
    stop = is_stop(tok, win)

    def put0(buf_BxT, val_B):
        return jax.lax.dynamic_update_slice(buf_BxT, val_B[:, None].astype(buf_BxT.dtype), (0, 0))

    batch2 = ("batch", None)
    own_block = hasattr(model, "decode_block")
    kh, hd = model.kv_cache_shape() if own_block else (cfg.num_kv_heads, head_dim(cfg))
    zeros = lambda: constrain(jnp.zeros((B, kh, window, hd), cdt), _LAYER_CACHE_AXES)  # noqa: E731
    ones = jnp.ones((B,), jnp.int32)
    extra = {}
    if record:
        nm, k = len(moe_lib.moe_layer_ids(cfg)), cfg.moe.num_experts_per_tok
        unrouted = moe_lib.compact_routes(jnp.full((B, Tc, nm, k), -1, jnp.int32), cfg.moe.num_experts)
        extra = dict(routes=constrain(unrouted, ("batch", None, None, None)),
                     prompt_routes=constrain(prompt_routes, ("batch", None, None, None)))
    return dict(
        **extra, j=jnp.int32(0), tok=tok, window=win, stop=stop, length=ones, row=row,
        plen=jnp.repeat(plen_P, G),
        ck=tuple(zeros() for _ in range(L)), cv=tuple(zeros() for _ in range(L)),
        pk=pk, pv=pv, pbias=pbias,
        tokens=constrain(put0(jnp.full((B, Tc), plan.pad_id, jnp.int32), tok), batch2),
        logp=constrain(put0(jnp.zeros((B, Tc), jnp.float32), lp), batch2),
        logpp=constrain(put0(jnp.zeros((B, Tc), jnp.float32), lpp), batch2),
        lengths=ones, stopped=stop)


def _decode(model, plan: _Plan, carry, key, knobs: _Knobs, exit_live: int):
    """Decode steps in the carry's (batch bucket, window bucket) until every row has stopped,
    max_new_tokens is reached, the window is full, or (exit_live > 0) at most exit_live rows
    are live, so that the host can compact them into a smaller bucket. Token j + 1 of row r is
    drawn from fold_in(fold_in(key, r), j + 1) whatever the bucket, so compacting and windowing
    never change a sample."""
    cfg = model.cfg
    G, Tc = plan.num_samples, plan.max_new_tokens
    L = cfg.num_layers
    cdt = jnp.dtype(plan.kv_cache_dtype)
    w_DxV = model.unembed_matrix().astype(jnp.float32)
    B = carry["tokens"].shape[0]
    Bb, W = carry["tok"].shape[0], carry["ck"][0].shape[2]
    identity = Bb == B  # uncompacted: decode row i is global row i
    group = G if identity and plan.prefix_mode == "shared" else 1
    own_block = hasattr(model, "decode_block")  # MoE decoders slice and run their own layers
    if own_block:
        layer_params, inv_freq = model.decode_layer_params(), None
    else:
        # Weights sliced per layer once, before the loop (see _prefill on slices in the loop).
        stacked = nnx.to_pure_dict(nnx.state(model.layers, nnx.Param))
        layer_params = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(L)]
        inv_freq = rope_frequencies(cfg)
    is_stop, push, _ = _stop_fns(knobs)
    row = carry["row"]
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(row.astype(jnp.uint32))
    pk, pv, pbias, plen = carry["pk"], carry["pv"], carry["pbias"], carry["plen"]

    def put(buf_BxT, val_b, j):
        val_b = val_b.astype(buf_BxT.dtype)
        if identity:
            return jax.lax.dynamic_update_slice(buf_BxT, val_b[:, None], (0, j))
        # Filler rows of a bucket copy a stopped row: they write its (pad) values again.
        return buf_BxT.at[row, j].set(val_b, unique_indices=False)

    def put_routes(buf_BxTxLxK, val_bxLxK, j):
        if identity:
            return jax.lax.dynamic_update_slice(buf_BxTxLxK, val_bxLxK[:, None], (0, j, 0, 0))
        return buf_BxTxLxK.at[row, j].set(val_bxLxK, unique_indices=False)

    def cond(s):
        live = jnp.sum(~s["stop"])
        return (s["j"] + 1 < Tc) & (s["j"] < W) & (live > exit_live) & (live > 0)

    def body(s):
        j, tok = s["j"], s["tok"]
        cbias_T = jnp.where(jnp.arange(W) <= j, 0.0, _NEG).astype(jnp.float32)
        positions = (plen + j)[:, None]
        # The model's own decoder block (the code training runs), one layer at a time.
        x = model.embed_tokens(tok[:, None])
        ck, cv = list(s["ck"]), list(s["cv"])
        step_routes = []  # routing replay: token j's experts in each MoE layer, [Bb, K] each
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
                x, (ck[i], cv[i]), aux = model.decode_block(i, layer_params[i], x, positions, decode_attn)
                if aux is not None:
                    step_routes.append(aux["routes"][:, 0])
            else:
                x, (ck[i], cv[i]) = _block(cfg, layer_params[i], x, positions, inv_freq, decode_attn, None)
        h = model.final_norm(x)
        logits = constrain(h[:, 0].astype(jnp.float32) @ w_DxV, ("batch", "act_vocab"))
        nxt, lp, lpp = _choose(logits, _uniforms(row_keys, j + 1), plan, knobs)
        alive = ~s["stop"]
        nxt = jnp.where(alive, nxt, plan.pad_id)
        win = push(s["window"], nxt)
        if "routes" in s:  # routing replay: the experts token j (this step's input) went to
            r = moe_lib.compact_routes(jnp.stack(step_routes, axis=1), cfg.moe.num_experts)
            s = dict(s, routes=put_routes(s["routes"], r, j))
        return dict(s, j=j + 1, tok=nxt, window=win, ck=tuple(ck), cv=tuple(cv),
                    stop=s["stop"] | (alive & is_stop(nxt, win)),
                    length=s["length"] + alive.astype(jnp.int32),
                    tokens=put(s["tokens"], nxt, j + 1),
                    logp=put(s["logp"], jnp.where(alive, lp, 0.0), j + 1),
                    logpp=put(s["logpp"], jnp.where(alive, lpp, 0.0), j + 1))

    out = jax.lax.while_loop(cond, body, carry)
    if identity:
        return dict(out, lengths=out["length"], stopped=out["stop"])
    return dict(out, lengths=out["lengths"].at[row].set(out["length"]),
                stopped=out["stopped"].at[row].set(out["stop"]))


def _finish(plan: _Plan, carry, prompt_PxT, pmask_PxT) -> SampleOutput:
    Tc = plan.max_new_tokens
    lengths, stopped = carry["lengths"], carry["stopped"]
    mask = (jnp.arange(Tc)[None, :] < lengths[:, None]).astype(jnp.int32)
    finish = jnp.where(stopped, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32)
    return SampleOutput(tokens=carry["tokens"], mask=mask, logp=carry["logp"],
                        logp_policy=carry["logpp"], finish_reason=finish, lengths=lengths,
                        prompt_tokens=prompt_PxT.astype(jnp.int32),
                        prompt_mask=pmask_PxT.astype(jnp.int32), num_steps=carry["j"] + 1,
                        num_samples=plan.num_samples, routes=carry.get("routes"),
                        prompt_routes=carry.get("prompt_routes"))


_ROW_FIELDS = ("tok", "window", "stop", "length", "row", "plen", "ck", "cv")


def _compact(plan: _Plan, carry, sel_b):
    """Gather the decode rows `sel_b` (positions in the current bucket: the live rows, then
    copies of a stopped row as filler) into a smaller bucket. The prompt cache becomes one per
    decode row (rows of different prompts now share a bucket)."""
    def run():
        out = dict(carry)
        for f in _ROW_FIELDS:
            out[f] = jax.tree.map(lambda a: jnp.take(a, sel_b, axis=0), carry[f])
        B, Bb = carry["tokens"].shape[0], carry["tok"].shape[0]
        # Uncompacted and prefix-shared: the prompt cache is per prompt, indexed by r // G.
        src = out["row"] // plan.num_samples if (Bb == B and plan.prefix_mode == "shared") else sel_b
        for f in ("pk", "pv", "pbias"):
            out[f] = jax.tree.map(lambda a: jnp.take(a, src, axis=0), carry[f])
        for f in ("ck", "cv", "pk", "pv"):
            out[f] = tuple(constrain(a, _LAYER_CACHE_AXES) for a in out[f])
        for f in ("tok", "stop", "length", "row", "plen"):
            out[f] = constrain(out[f], ("batch",))
        return out
    return _in_layout(plan, run)


def _grow(plan: _Plan, window: int, carry):
    """Zero-pad the completion cache to the next window bucket."""
    def run():
        pad = lambda a: constrain(jnp.pad(a, ((0, 0), (0, 0), (0, window - a.shape[2]), (0, 0))),  # noqa: E731
                                  _LAYER_CACHE_AXES)
        return dict(carry, ck=tuple(map(pad, carry["ck"])), cv=tuple(map(pad, carry["cv"])))
    return _in_layout(plan, run)


def window_buckets(max_new_tokens: int, min_window: int) -> List[int]:
    """Completion-cache window buckets: min_window * 2^k below max_new_tokens, then
    max_new_tokens itself."""
    out, w = [], int(min_window)
    while w < max_new_tokens:
        out.append(w)
        w *= 2
    return out + [int(max_new_tokens)]


def batch_buckets(rows: int, shards: int, min_batch: int) -> List[int]:
    """Decode batch buckets, largest first: the rollout's rows, then shards * 2^k buckets each
    at most half the one before, down to the smallest one >= min_batch (and >= shards)."""
    out = [int(rows)]
    floor = max(int(min_batch), int(shards))
    while True:
        half = out[-1] // 2
        if half < floor:
            return out
        b = shards * (1 << max(0, (half // shards).bit_length() - 1))
        if b < floor or b * 2 > out[-1]:
            return out
        out.append(b)


def program_bound(rows: int, shards: int, min_batch: int, max_new_tokens: int,
                  min_window: int) -> int:
    """The most programs one rollout shape compiles with compaction / windowing on: the prefill,
    one decode program per (batch bucket, window bucket), one compaction per (bucket step,
    window), one window growth per (batch bucket, window step), and the output assembly:
    2 + nB * nW + (nB - 1) * nW + nB * (nW - 1)."""
    nb = len(batch_buckets(rows, shards, min_batch))
    nw = len(window_buckets(max_new_tokens, min_window))
    return 2 + nb * nw + (nb - 1) * nw + nb * (nw - 1)


class ProgramCache:
    """Compiled rollout programs, owned by the caller (a `Sampler`, a trainer, a test module):
    keyed by the model config's repr (nnx GraphDefs holding a mutable config are not hashable,
    so jit's own static-argument cache cannot key on them), the static plan and, for the
    segmented rollout (compaction / windows), the part and its static argument. It lives as
    long as its owner does, so nothing accumulates across unrelated runs."""

    def __init__(self):
        self._programs: Dict[Tuple[Any, ...], Any] = {}

    def __len__(self) -> int:
        return len(self._programs)

    def get(self, graphdef, cfg, plan: _Plan):
        """The one-program rollout (params, prompts, mask, key, knobs) -> SampleOutput."""
        key = (repr(cfg), plan)
        fn = self._programs.get(key)
        if fn is None:
            fn = jax.jit(functools.partial(_rollout, graphdef, plan))
            self._programs[key] = fn
        return fn

    def part(self, graphdef, cfg, plan: _Plan, name: str, arg: Any = 0):
        """One part of the segmented rollout: "prefill" (arg: first window), "decode" (arg:
        exit_live; its carry is donated), "compact", "grow" (arg: new window) or "finish"; or
        of the budgeted one: "slot_prefill" (arg: slots), "slot_decode" (arg: (exit_live,
        window, lower); donated), "slot_compact" or "slot_finish"."""
        key = (repr(cfg), plan, name, arg)
        fn = self._programs.get(key)
        if fn is None:
            fn = _make_part(graphdef, plan, name, arg)
            self._programs[key] = fn
        return fn

    def programs(self) -> List[Any]:
        return list(self._programs.values())

    def num_compiled(self) -> int:
        """Compiled executables over every program (jit's per-shape caches summed)."""
        return sum(fn._cache_size() for fn in self._programs.values())


def _make_part(graphdef, plan: _Plan, name: str, arg: Any):
    if name == "prefill":
        def fn(params, prompt, pmask, key, knobs):
            return _in_layout(plan, lambda: _prefill(nnx.merge(graphdef, params), plan, prompt,
                                                     pmask, key, knobs, arg))
        return jax.jit(fn)
    if name == "decode":
        def fn(params, carry, key, knobs):
            return _in_layout(plan, lambda: _decode(nnx.merge(graphdef, params), plan, carry,
                                                    key, knobs, arg))
        return jax.jit(fn, donate_argnums=1)
    if name == "compact":
        return jax.jit(functools.partial(_compact, plan))
    if name == "grow":
        return jax.jit(functools.partial(_grow, plan, arg))
    if name == "finish":
        return jax.jit(functools.partial(_finish, plan))
    if name.startswith("slot_"):
        return _make_slot_part(graphdef, plan, name, arg)
    raise ValueError(name)


def _compact_live(compact, state, done_B, ladder, bi: int):
    """Gathers the live rows of `state` (done_B False) into the smallest bucket of `ladder`
    after `bi` that holds them all, one bucket at a time (each step is its own compiled
    `compact` program), padding with a finished row. Returns the state and its bucket index."""
    live = np.flatnonzero(~done_B)
    while bi + 1 < len(ladder) and live.size <= ladder[bi + 1]:
        b = ladder[bi + 1]
        filler = np.flatnonzero(done_B)[0]  # exists: fewer live rows than the bucket before
        sel = np.concatenate([live, np.full(b - live.size, filler)]).astype(np.int32)
        state = compact(state, jnp.asarray(sel))
        done_B = done_B[sel]
        live = np.flatnonzero(~done_B)
        bi += 1
    return state, bi


def _segmented_rollout(cache: "ProgramCache", graphdef, mcfg, plan: _Plan, params, toks_d,
                       mask_d, key, knobs, shards: int) -> SampleOutput:
    """Prefill, then decode in segments: each runs in the program of its (batch bucket, window
    bucket); between them the host compacts the live rows into the next smaller batch bucket
    (when at most that many are live) or grows the window (when the step reaches it)."""
    B = toks_d.shape[0] * plan.num_samples
    Tc = plan.max_new_tokens
    ladder = batch_buckets(B, shards, plan.min_batch) if plan.compact else [B]
    windows = window_buckets(Tc, plan.min_window)
    bi, wi = 0, 0
    carry = cache.part(graphdef, mcfg, plan, "prefill", windows[0])(params, toks_d, mask_d, key, knobs)
    while True:
        nxt = ladder[bi + 1] if bi + 1 < len(ladder) else 0
        carry = cache.part(graphdef, mcfg, plan, "decode", nxt)(params, carry, key, knobs)
        j, stop = jax.device_get((carry["j"], carry["stop"]))
        if stop.all() or int(j) + 1 >= Tc:
            break
        carry, bi = _compact_live(cache.part(graphdef, mcfg, plan, "compact"), carry, stop, ladder, bi)
        if int(j) >= windows[wi]:
            wi += 1
            carry = cache.part(graphdef, mcfg, plan, "grow", windows[wi])(carry)
    return cache.part(graphdef, mcfg, plan, "finish")(carry, toks_d, mask_d)


# ---------------------------------------------------------------------------------------------
# Continuous batching under a KV-cache budget (sampler.kv_cache_budget)
# ---------------------------------------------------------------------------------------------
def budget_slots(budget_tokens: int, prompts: int, prompt_len: int, max_new_tokens: int,
                 rows: int, shards: int) -> int:
    """Decode slots a KV-cache budget holds. The budget counts cached positions (one position
    holds every layer's K and V: `kv_bytes_per_token` bytes), the prompt caches included: the
    `prompts` x `prompt_len` resident prefix caches, then `max_new_tokens` per slot, whole
    multiples of the batch shards. Returns `rows` (no continuous batching) when every sample
    fits; a budget below one slot per shard is an error naming what it needs."""
    fixed = prompts * prompt_len
    slots = (int(budget_tokens) - fixed) // max_new_tokens // shards * shards
    if slots >= rows:
        return rows
    if slots < shards:
        raise SamplerError(
            f"sampler.kv_cache_budget {budget_tokens} tokens is too small: the {prompts} prompt "
            f"caches take {prompts} x {prompt_len} = {fixed} and each of at least {shards} decode "
            f"slot(s) (one per batch shard) max_new_tokens {max_new_tokens}: at least "
            f"{fixed + shards * max_new_tokens}")
    return slots


def kv_bytes_per_token(model, kv_cache_dtype: str) -> int:
    """Bytes one cached position takes (K and V of every layer): kv_cache_budget in tokens times
    this is the cache's memory."""
    cfg = model.cfg
    kh, hd = model.kv_cache_shape() if hasattr(model, "decode_block") else (cfg.num_kv_heads, head_dim(cfg))
    return 2 * cfg.num_layers * kh * hd * jnp.dtype(kv_cache_dtype).itemsize


def budget_program_bound(slots: int, shards: int, min_batch: int, compact: bool,
                         max_new_tokens: int, min_window: int) -> int:
    """The most programs one budgeted rollout shape compiles: the prefill, one decode program
    per (slot bucket, window bucket), one compaction per bucket step, and the output assembly:
    2 + nS * nW + (nS - 1), nS = len(batch_buckets(slots, shards, min_batch)) with compaction
    (else 1), nW = len(window_buckets(max_new_tokens, min_window))."""
    ns = len(batch_buckets(slots, shards, min_batch)) if compact else 1
    nw = len(window_buckets(max_new_tokens, min_window))
    return 2 + ns * nw + (ns - 1)


_SLOT_FIELDS = ("row", "jr", "tok", "window", "stop", "done", "length", "plen", "ck", "cv")


def _slot_prefill(model, plan: _Plan, prompt_PxT, pmask_PxT, key, knobs: _Knobs, n_real,
                  slots: int):
    """Prefill (the one-batch `_prefill`: prompt caches once per prompt and every row's first
    token, drawn with its own key at step 0) and an empty slot carry of `slots` rows. A row
    that needs decoding (first token not a stop, max_new_tokens > 1) waits in `queue` (global
    row ids in row order, `npend` of them) until a slot frees up; `_slot_start` seats them."""
    c = _prefill(model, plan, prompt_PxT, pmask_PxT, key, knobs, 1)
    B, Tc = c["tokens"].shape
    cfg = model.cfg
    cdt = jnp.dtype(plan.kv_cache_dtype)
    real = jnp.arange(B) < n_real
    needs = real & ~c["stop"] & (Tc > 1)
    queue = jnp.nonzero(needs, size=B, fill_value=B)[0].astype(jnp.int32)
    kh, hd = model.kv_cache_shape() if hasattr(model, "decode_block") else (cfg.num_kv_heads, head_dim(cfg))
    zeros = lambda: constrain(jnp.zeros((slots, kh, Tc, hd), cdt), _LAYER_CACHE_AXES)  # noqa: E731
    b1 = lambda a: constrain(a, ("batch",))  # noqa: E731
    s = dict(
        # every global row's first token and its stop state, to seat it in a slot later
        first_tok=c["tok"], first_window=c["window"], first_stop=c["stop"], row_plen=c["plen"],
        queue=queue, npend=jnp.sum(needs).astype(jnp.int32), next=jnp.int32(0),
        pk=c["pk"], pv=c["pv"], pbias=c["pbias"],
        tokens=c["tokens"], logp=c["logp"], logpp=c["logpp"], lengths=c["lengths"],
        stopped=c["stopped"],
        # per slot: its global row (B: empty), the index of its current token, ...
        row=b1(jnp.full((slots,), B, jnp.int32)), jr=b1(jnp.zeros((slots,), jnp.int32)),
        tok=b1(jnp.zeros((slots,), jnp.int32)),
        window=constrain(jnp.zeros((slots, c["window"].shape[1]), jnp.int32), ("batch", None)),
        stop=b1(jnp.zeros((slots,), bool)), done=b1(jnp.ones((slots,), bool)),
        length=b1(jnp.zeros((slots,), jnp.int32)), plen=b1(jnp.zeros((slots,), jnp.int32)),
        ck=tuple(zeros() for _ in range(cfg.num_layers)),
        cv=tuple(zeros() for _ in range(cfg.num_layers)))
    return s


def _slot_start(s):
    """Seat the next queued rows, in row order, in the slots that are done (finished or empty).
    A seated row continues from its prefill token: no prefill, its prompt's cache is shared."""
    fresh = s["done"]
    pos = s["next"] + jnp.cumsum(fresh.astype(jnp.int32)) - 1
    take = fresh & (pos < s["npend"])
    B = s["tokens"].shape[0]
    new = jnp.where(take, jnp.take(s["queue"], jnp.minimum(pos, B - 1)), s["row"])
    r = jnp.minimum(new, B - 1)
    pick = lambda f, a: jnp.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), jnp.take(a, r, axis=0), s[f])  # noqa: E731
    return dict(s, row=new, next=s["next"] + jnp.sum(take).astype(jnp.int32),
                jr=jnp.where(take, 0, s["jr"]), length=jnp.where(take, 1, s["length"]),
                done=jnp.where(take, False, s["done"]),
                tok=pick("tok", s["first_tok"]), window=pick("window", s["first_window"]),
                stop=pick("stop", s["first_stop"]), plen=pick("plen", s["row_plen"]))


def _slot_decode(model, plan: _Plan, s, key, knobs: _Knobs, exit_live: int, window: int,
                 lower: int):
    """Continuous batching: each step first seats queued rows in finished slots, then decodes
    one token for every live slot, each at its own step (position, cache slot, key step), so a
    row's tokens are the one-batch decode's: token t of row r is drawn from
    fold_in(fold_in(key, r), t) whichever slot and step it runs in. Slots attend to their own
    prompt's shared cache (gathered by prompt index) and the first `window` positions of their
    completion cache. Exits when no row is live or queued, (exit_live > 0) when the queue is
    empty and at most exit_live rows are live, for the host to compact the slots, or when the
    longest live slot's step leaves [lower, window), for the host to pick its window bucket."""
    cfg = model.cfg
    G, Tc = plan.num_samples, plan.max_new_tokens
    L = cfg.num_layers
    cdt = jnp.dtype(plan.kv_cache_dtype)
    w_DxV = model.unembed_matrix().astype(jnp.float32)
    B = s["tokens"].shape[0]
    own_block = hasattr(model, "decode_block")
    if own_block:
        layer_params, inv_freq = model.decode_layer_params(), None
    else:
        stacked = nnx.to_pure_dict(nnx.state(model.layers, nnx.Param))
        layer_params = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(L)]
        inv_freq = rope_frequencies(cfg)
    is_stop, push, _ = _stop_fns(knobs)
    shared = plan.prefix_mode == "shared"
    write_kv = jax.vmap(lambda c, u, t: jax.lax.dynamic_update_slice(c, u, (0, t, 0)))

    def cond(s):
        live = jnp.sum(~s["done"])
        queued = s["next"] < s["npend"]
        # Seating starts a row at step 0, so the longest live step before seating bounds it.
        longest = jnp.max(jnp.where(s["done"], 0, s["jr"]))
        return (((live > 0) | queued) & (queued | (live > exit_live))
                & (longest < window) & (longest >= lower))

    def body(s):
        s = _slot_start(s)
        jr, row, alive = s["jr"], s["row"], ~s["done"]
        rc = jnp.minimum(row, B - 1)
        pidx = rc // G if shared else rc
        pbias = jnp.take(s["pbias"], pidx, axis=0)
        cbias = jnp.where(jnp.arange(window)[None, :] <= jr[:, None], 0.0, _NEG).astype(jnp.float32)
        positions = (s["plen"] + jr)[:, None]
        x = model.embed_tokens(s["tok"][:, None])
        ck, cv = list(s["ck"]), list(s["cv"])
        for i in range(L):
            def decode_attn(q, k, v, _, i=i):
                ck_i, cv_i = (constrain(write_kv(c, a.swapaxes(1, 2).astype(cdt), jr), _LAYER_CACHE_AXES)
                              for c, a in ((ck[i], k), (cv[i], v)))
                pk_i = constrain(jnp.take(s["pk"][i], pidx, axis=0), _LAYER_CACHE_AXES)
                pv_i = constrain(jnp.take(s["pv"][i], pidx, axis=0), _LAYER_CACHE_AXES)
                # Every live slot's step is below the window: its first positions suffice.
                o = _decode_attention(q[:, 0], pk_i, pv_i, pbias, ck_i[:, :, :window],
                                      cv_i[:, :, :window], cbias[:, None, None, :], 1)
                return o[:, None].astype(q.dtype), (ck_i, cv_i)

            if own_block:
                x, (ck[i], cv[i]), _ = model.decode_block(i, layer_params[i], x, positions, decode_attn)
            else:
                x, (ck[i], cv[i]) = _block(cfg, layer_params[i], x, positions, inv_freq, decode_attn, None)
        h = model.final_norm(x)
        logits = constrain(h[:, 0].astype(jnp.float32) @ w_DxV, ("batch", "act_vocab"))
        row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(row.astype(jnp.uint32))
        u = jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t)))(row_keys, jr + 1)
        nxt, lp, lpp = _choose(logits, u, plan, knobs)
        nxt = jnp.where(alive, nxt, plan.pad_id)
        win = push(s["window"], nxt)
        stop = s["stop"] | (alive & is_stop(nxt, win))
        jr1 = jr + alive.astype(jnp.int32)
        length = s["length"] + alive.astype(jnp.int32)
        # Dead slots write out of bounds: dropped.
        wr, wc = jnp.where(alive, row, B), jnp.where(alive, jr1, Tc)
        put = lambda buf, v: constrain(buf.at[wr, wc].set(v.astype(buf.dtype), mode="drop"), ("batch", None))  # noqa: E731
        return dict(s, tok=nxt, window=win, stop=stop, jr=jr1, length=length,
                    done=s["done"] | (alive & (stop | (jr1 + 1 >= Tc))),
                    ck=tuple(ck), cv=tuple(cv),
                    tokens=put(s["tokens"], nxt), logp=put(s["logp"], jnp.where(alive, lp, 0.0)),
                    logpp=put(s["logpp"], jnp.where(alive, lpp, 0.0)),
                    lengths=s["lengths"].at[wr].set(length, mode="drop"),
                    stopped=s["stopped"].at[wr].set(stop, mode="drop"))

    return jax.lax.while_loop(cond, body, s)


def _slot_compact(plan: _Plan, s, sel_b):
    """Gather the slots `sel_b` (the live ones, then done ones as filler: with the queue empty
    a done slot is never seated again and writes nothing) into a smaller slot bucket. The prompt
    caches are per prompt and stay as they are."""
    def run():
        out = dict(s)
        for f in _SLOT_FIELDS:
            out[f] = jax.tree.map(lambda a: jnp.take(a, sel_b, axis=0), s[f])
        for f in ("ck", "cv"):
            out[f] = tuple(constrain(a, _LAYER_CACHE_AXES) for a in out[f])
        for f in ("row", "jr", "tok", "stop", "done", "length", "plen"):
            out[f] = constrain(out[f], ("batch",))
        return out
    return _in_layout(plan, run)


def _slot_finish(plan: _Plan, s, prompt_PxT, pmask_PxT, n_real) -> SampleOutput:
    # num_steps: the decode steps a one-batch decode of the real rows runs (its longest row).
    steps = jnp.max(jnp.where(jnp.arange(s["lengths"].shape[0]) < n_real, s["lengths"], 1))
    return _finish(plan, dict(s, j=steps - 1), prompt_PxT, pmask_PxT)


def _make_slot_part(graphdef, plan: _Plan, name: str, arg: Any):
    if name == "slot_prefill":
        def fn(params, prompt, pmask, key, knobs, n_real):
            return _in_layout(plan, lambda: _slot_prefill(nnx.merge(graphdef, params), plan, prompt,
                                                          pmask, key, knobs, n_real, arg))
        return jax.jit(fn)
    if name == "slot_decode":  # arg: (exit_live, window, lower)
        def fn(params, s, key, knobs):
            return _in_layout(plan, lambda: _slot_decode(nnx.merge(graphdef, params), plan, s,
                                                         key, knobs, *arg))
        return jax.jit(fn, donate_argnums=1)
    if name == "slot_compact":
        return jax.jit(functools.partial(_slot_compact, plan))
    if name == "slot_finish":
        return jax.jit(lambda s, prompt, pmask, n_real: _in_layout(
            plan, lambda: _slot_finish(plan, s, prompt, pmask, n_real)))
    raise ValueError(name)


def _budget_rollout(cache: "ProgramCache", graphdef, mcfg, plan: _Plan, params, toks_d, mask_d,
                    key, knobs, shards: int, slots: int, n_real: int) -> SampleOutput:
    """Continuous batching in `slots` decode slots (sampler.kv_cache_budget): the slots are
    refilled on device from the queue of pending rows; once it is empty, the host compacts the
    live slots into smaller slot buckets (sampler.compact), as `_segmented_rollout` does.
    Each segment attends over the window bucket that holds the longest live slot's step."""
    ladder = batch_buckets(slots, shards, plan.min_batch) if plan.compact else [slots]
    windows = window_buckets(plan.max_new_tokens, plan.min_window)
    nr = jnp.int32(n_real)
    s = cache.part(graphdef, mcfg, plan, "slot_prefill", slots)(params, toks_d, mask_d, key, knobs, nr)
    bi, longest = 0, 0
    while True:
        nxt = ladder[bi + 1] if bi + 1 < len(ladder) else 0
        wi = next(i for i, w in enumerate(windows) if longest < w)
        lower = windows[wi - 1] if wi else 0
        s = cache.part(graphdef, mcfg, plan, "slot_decode", (nxt, windows[wi], lower))(params, s, key, knobs)
        done, jr, nxt_row, npend = (np.asarray(a) for a in jax.device_get(
            (s["done"], s["jr"], s["next"], s["npend"])))
        queued = int(nxt_row) < int(npend)
        if done.all() and not queued:
            break
        longest = int(jr[~done].max()) if (~done).any() else 0
        if queued:  # a window exit: the queued rows still need every slot
            continue
        s, bi = _compact_live(cache.part(graphdef, mcfg, plan, "slot_compact"), s, done, ladder, bi)
    return cache.part(graphdef, mcfg, plan, "slot_finish")(s, toks_d, mask_d, nr)


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
                 rules=tuple(rules) if mesh is not None else None,
                 compact=bool(cfg_s.compact), min_batch=int(cfg_s.min_decode_batch),
                 min_window=int(cfg_s.min_decode_window))
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
    shards = _batch_shards(mesh, rules)
    nb = len(batch_buckets(P_pad * plan.num_samples, shards, plan.min_batch)) if plan.compact else 1
    slots = P_pad * plan.num_samples
    if cfg_s.kv_cache_budget:
        slots = budget_slots(cfg_s.kv_cache_budget, P_pad, tp, plan.max_new_tokens, slots, shards)
    if slots < P_pad * plan.num_samples:
        if _records_routes(merged):
            raise SamplerError("sampler.kv_cache_budget (continuous batching) does not record routes "
                               "yet: set it to 0 (or large enough for every sample) with "
                               "model.moe.routing_replay=rollout")
        out = _budget_rollout(s.cache, graphdef, mcfg, plan, params, toks_d, mask_d, key, knobs,
                              shards, slots, P * plan.num_samples)
    elif nb > 1 or len(window_buckets(plan.max_new_tokens, plan.min_window)) > 1:
        out = _segmented_rollout(s.cache, graphdef, mcfg, plan, params, toks_d, mask_d, key, knobs,
                                 shards)
    else:
        out = s.cache.get(graphdef, mcfg, plan)(params, toks_d, mask_d, key, knobs)
    if P_pad != P:
        n = P * plan.num_samples
        out = out.replace(**{f: getattr(out, f)[:n] for f in
                             ("tokens", "mask", "logp", "logp_policy", "finish_reason", "lengths")},
                          prompt_tokens=out.prompt_tokens[:P], prompt_mask=out.prompt_mask[:P])
        if out.routes is not None:
            out = out.replace(routes=out.routes[:n], prompt_routes=out.prompt_routes[:P])
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
