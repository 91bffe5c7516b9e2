"""Per-token log-probs and entropies from hidden states, without the full [B, T, V] logits.

At vocab 152K a GRPO mini-batch's logits do not fit (512 x 4096 x 152K x 4 B = 1.3 TB), so the
unembedding, log-softmax and gather run chunk by chunk along the sequence inside `lax.scan`,
each chunk rematerialised in the backward pass: peak memory is one [B, chunk, V] block.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from r1jax.mesh import constrain, gathered_weight_map

# Elements of one logits chunk ([B, chunk, V] float32): 2^25 = 128 MiB.
DEFAULT_CHUNK_ELEMENTS = 1 << 25


def logprob_temperature(sampler_temperature: float) -> float:
    """The temperature log-probs are taken at: the sampler's, except that temperature 0
    (greedy sampling) is scored at 1, a greedy policy having no finite log-probs of its own.
    The sampler's `logp_policy`, the update and the reference pass all use this rule."""
    return float(sampler_temperature) if sampler_temperature > 0 else 1.0


def chunk_len_for(rows: int, length: int, vocab: int,
                  chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Sequence positions per chunk so that one [rows, chunk, V] float32 block holds at most
    `chunk_elements`: a power of two, at most `length`.

    Pass the rows ONE device holds (the batch divided by its shards, `r1jax.mesh.batch_shards`),
    not the global batch: with the batch split 512 ways, a global-batch budget made 1-token
    chunks and a scan as long as the sequence."""
    c = max(1, chunk_elements // max(1, rows * vocab))
    return min(length, 1 << (c.bit_length() - 1))


@jax.custom_vjp
def _pick(logp_RxV: jax.Array, y_R: jax.Array) -> jax.Array:
    """logp[r, y[r]]: a gather forward (the reference pass reads no extra [R, V] pass), and a
    one-hot select backward: take_along_axis's own gradient is a scatter into [R, V] zeros,
    which XLA:CPU ran as a separate slow pass; the select fuses into the log-softmax gradient."""
    return jnp.take_along_axis(logp_RxV, y_R[:, None], axis=-1)[:, 0]


def _pick_fwd(logp_RxV, y_R):
    return _pick(logp_RxV, y_R), (y_R, logp_RxV.shape[-1])


def _pick_bwd(res, g_R):
    y_R, v = res
    hit_RxV = jnp.arange(v, dtype=y_R.dtype) == y_R[:, None]
    return jnp.where(hit_RxV, g_R[:, None], 0.0).astype(g_R.dtype), None


_pick.defvjp(_pick_fwd, _pick_bwd)


def token_logprobs(h_BxTxD: jax.Array, w_DxV: jax.Array, targets_BxT: jax.Array, *,
                   temperature: float = 1.0, chunk_len: Optional[int] = None,
                   chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tuple[jax.Array, jax.Array]:
    """log softmax(h @ w / temperature)[target] and the entropy of that distribution, [B, T] each.

    The temperature matches the sampler's: log pi(o_t) is taken under the distribution the
    rollout sampled from (before top-p/top-k truncation), so ratios start at exactly 1.
    `chunk_len` (see `chunk_len_for`) defaults to the budget for the whole batch on one device.
    """
    b, t, d = h_BxTxD.shape
    v = w_DxV.shape[-1]
    c = chunk_len or chunk_len_for(b, t, v, chunk_elements)
    inv_t = 1.0 / temperature

    def run(w_DxV, h_BxTxD, targets_BxT):
        b = h_BxTxD.shape[0]
        n = -(-t // c)
        pad = n * c - t
        h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
        y = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
        h_NxBxCxD = h.reshape(b, n, c, d).swapaxes(0, 1)
        y_NxBxC = y.reshape(b, n, c).swapaxes(0, 1)
        # Where the partitioner plans it (tensor-parallel vocab), gather the unembedding once,
        # before the loop: left inside, it re-gathers it at every chunk.
        w = constrain(w_DxV, (None, "act_vocab")).astype(jnp.float32)

        def chunk(h_BxCxD, y_BxC):
            # One 2-D matmul over the chunk's rows: the unembedding gradient of
            # einsum("bcd,dv->bcv") contracts two axes, which XLA:CPU lowered through a
            # transposed copy of the whole [B, C, V] logits gradient.
            h_RxD = h_BxCxD.reshape(-1, d).astype(jnp.float32)
            logp_RxV = jax.nn.log_softmax((h_RxD @ w) * inv_t, axis=-1)
            picked = _pick(logp_RxV, y_BxC.reshape(-1))
            # -sum p log p, not lse - sum p z: the latter cancels badly for peaked distributions.
            entropy = -jnp.sum(jnp.exp(logp_RxV) * logp_RxV, axis=-1)
            return picked.reshape(y_BxC.shape), entropy.reshape(y_BxC.shape)

        # With several chunks, rematerialise each in the backward pass (only one [B, C, V]
        # block alive); a single chunk is within budget already, so keep its residuals and
        # skip the second unembedding matmul.
        step = jax.checkpoint(chunk) if n > 1 else chunk

        def body(carry, xs):
            return carry, step(*xs)

        _, (logp, ent) = jax.lax.scan(body, None, (h_NxBxCxD, y_NxBxC))
        logp = logp.swapaxes(0, 1).reshape(b, n * c)[:, :t]
        ent = ent.swapaxes(0, 1).reshape(b, n * c)[:, :t]
        return logp, ent

    # Per device on its rows, the unembedding gathered whole once: its gradient is summed
    # locally over every chunk and reduced once after the loop, inside the node first and one
    # shard across nodes (the partitioner all-reduced the whole V x D over every device, at
    # every chunk).
    return gathered_weight_map(run, w_DxV, ("embed", "vocab"), h_BxTxD, targets_BxT)


def completion_logprobs(model, prompt_BxTp: jax.Array, prompt_mask_BxTp: jax.Array,
                        completion_BxTc: jax.Array, *, temperature: float = 1.0,
                        chunk_len: Optional[int] = None) -> Tuple[jax.Array, jax.Array]:
    """Log-probs [B, Tc] (and entropies) of completion tokens following left-padded prompts.

    One forward over prompt + completion; position t of the completion is predicted from the
    hidden state one step before it. Tokens after a completion's stop are scored too (the
    caller's mask drops them): they only ever attend backwards, so they change nothing before.
    """
    tp = prompt_BxTp.shape[1]
    tokens = jnp.concatenate([prompt_BxTp, completion_BxTc], axis=1)
    segments = jnp.concatenate(
        [prompt_mask_BxTp.astype(jnp.int32), jnp.ones(completion_BxTc.shape, jnp.int32)], axis=1)
    h, _ = model.hidden(tokens, segment_ids_BxT=segments)
    h_c = h[:, tp - 1: tokens.shape[1] - 1]
    return token_logprobs(h_c, model.unembed_matrix(), completion_BxTc,
                          temperature=temperature, chunk_len=chunk_len)


def sequence_logprobs(model, tokens_BxT: jax.Array, segment_ids_BxT: Optional[jax.Array] = None, *,
                      temperature: float = 1.0, chunk_len: Optional[int] = None
                      ) -> Tuple[jax.Array, jax.Array]:
    """Log-probs [B, T-1] of tokens[:, 1:] given their prefixes (SFT, evaluation)."""
    h, _ = model.hidden(tokens_BxT, segment_ids_BxT=segment_ids_BxT)
    return token_logprobs(h[:, :-1], model.unembed_matrix(), tokens_BxT[:, 1:],
                          temperature=temperature, chunk_len=chunk_len)
