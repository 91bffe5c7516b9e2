"""Sequence packing for the update and the reference pass (R1: "sequences sorted by length and
best-fit packed into fixed-length chunks, equal chunk counts per data-parallel rank").

A rollout's N sequences (a left-padded prompt [N, Tp] and a completion [N, Tc] each) are laid
out back to back in C chunks of L tokens: sequence i occupies tokens [offset_i, offset_i +
p_i + c_i) of chunk chunk_i, its p_i real prompt tokens then its c_i completion tokens. Segment
ids (1, 2, ... within a chunk, 0 on padding) keep sequences from attending to each other, and
positions restart at 0 for each one, so every token sees exactly the context it had in the
padded layout.

The rules:
- A sequence is never split across chunks. L must be at least the longest sequence (a longer
  one is an error naming it); the default L = Tp + Tc holds any row, so packing never needs more
  chunks than the padded layout has rows.
- Best-fit decreasing: sequences sorted by length, longest first, each into the open chunk with
  the least room that still fits it (a new chunk when none does).
- Equal chunk counts per data-parallel shard: C is a multiple of the shard count D (times the
  chunks of one micro-batch); a shard's chunks are contiguous rows of the [C, L] arrays, as
  the batch sharding splits them, and chunks are dealt round-robin over shards and micro-batches
  so their token counts stay even.
- Bucketed counts: the number of chunk groups (of D x chunks-per-micro-batch chunks) is rounded
  up by `bucket_count` (3 significant bits): group counts up to U take at most
  4 * ceil(log2(U)) distinct values (U >= 2), so a run compiles at most that many update
  programs, and the padding is less than a quarter of the groups it needs.
- Micro-batches are counted in tokens: `chunks_per_micro` chunks of every shard form one
  micro-batch (micro-batch j is chunks j, j + n, j + 2n, ... of the [C, L] arrays, like
  r1jax.grpo's strided split, so each is spread over every shard).

`Packed` is the layout object `r1jax.objectives` reduces over (per-sequence sums in a packed
layout); `PackPlan` packs and unpacks any per-token array (prompt side, completion side, with
trailing dimensions such as routing indices), from numpy or jax arrays, as gathers at index
arrays whose shapes depend only on the bucketed chunk count (one compiled packer per bucket).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from r1jax.logprobs import token_logprobs


def bucket_count(n: int) -> int:
    """n rounded up to 3 significant bits: 1..8 as they are, then 10, 12, 14, 16, 20, 24, ...

    At most 4 values per doubling, and bucket_count(n) < 1.25 n. A fixed point:
    bucket_count(bucket_count(n)) == bucket_count(n)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"bucket_count: count must be >= 1, got {n}")
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


@flax.struct.dataclass
class Packed:
    """A packed layout for r1jax.objectives: which of the N sequences each token belongs to.

    seq_index: int32 [C, L] (or [..., L]): the sequence (row of the padded batch), num_seqs on
    padding. Slicing it along the chunk axis (micro-batches) keeps a valid layout."""

    seq_index: jax.Array
    num_seqs: int = flax.struct.field(pytree_node=False)

    def seq_sum(self, x_tok: jax.Array) -> jax.Array:
        x = jnp.asarray(x_tok)
        flat = jax.ops.segment_sum(x.reshape(-1), self.seq_index.reshape(-1),
                                   num_segments=self.num_seqs + 1)
        return flat[: self.num_seqs]

    def to_tokens(self, v_N: jax.Array) -> jax.Array:
        v = jnp.asarray(v_N)
        return jnp.concatenate([v, jnp.zeros((1,), v.dtype)])[self.seq_index]


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Where each of N sequences lies in a [num_chunks, chunk_tokens] layout (host-side numpy).

    chunk_N, offset_N: the chunk and first token of sequence i; prompt_len_N, completion_len_N:
    its real prompt and completion tokens (p_i, c_i). prompt_width / completion_width: Tp and
    Tc of the padded arrays it packs. num_micro: micro-batches the chunks split into."""

    chunk_N: np.ndarray
    offset_N: np.ndarray
    prompt_len_N: np.ndarray
    completion_len_N: np.ndarray
    num_chunks: int
    chunk_tokens: int
    prompt_width: int
    completion_width: int
    num_shards: int = 1
    num_micro: int = 1

    @property
    def num_seqs(self) -> int:
        return int(self.chunk_N.shape[0])

    @property
    def num_real_chunks(self) -> int:
        return int(np.unique(self.chunk_N).size) if self.num_seqs else 0

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.num_chunks, self.chunk_tokens)

    # -- where each packed token comes from ------------------------------------------------------
    @functools.cached_property
    def _arrays(self) -> dict:
        C, L, n = self.num_chunks, self.chunk_tokens, self.num_seqs
        tp, tc = self.prompt_width, self.completion_width
        seg = np.zeros(C * L, np.int32)
        pos = np.zeros(C * L, np.int32)
        idx = np.full(C * L, n, np.int32)
        # Segment number within the chunk: rank of the sequence's offset among its chunk-mates.
        order = np.lexsort((self.offset_N, self.chunk_N))
        rank = np.zeros(n, np.int64)
        if n:
            first = np.r_[True, self.chunk_N[order][1:] != self.chunk_N[order][:-1]]
            start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
            rank[order] = np.arange(n) - start
        p_len, c_len = self.prompt_len_N, self.completion_len_N
        total = p_len + c_len
        owner = np.repeat(np.arange(n), total)
        within = np.arange(int(total.sum())) - np.repeat(np.cumsum(total) - total, total)
        flat = np.repeat(self.chunk_N * L + self.offset_N, total) + within
        seg[flat] = rank[owner] + 1
        pos[flat] = within
        idx[flat] = owner
        # Gather indices (the last index of each source is a sentinel: the fill value).
        in_prompt = within < p_len[owner]
        prompt_src = np.full(C * L, n * tp, np.int64)
        prompt_src[flat[in_prompt]] = (owner * tp + (tp - p_len[owner]) + within)[in_prompt]
        comp_src = np.full(C * L, n * tc, np.int64)
        comp_src[flat[~in_prompt]] = (owner * tc + within - p_len[owner])[~in_prompt]
        unpack_src = np.full(n * tc, C * L, np.int64)
        unpack_src[comp_src[comp_src < n * tc]] = np.flatnonzero(comp_src < n * tc)
        return {"segment_ids": seg.reshape(C, L), "positions": pos.reshape(C, L),
                "seq_index": idx.reshape(C, L),
                "prompt_src": prompt_src.reshape(C, L).astype(np.int32),
                "completion_src": comp_src.reshape(C, L).astype(np.int32),
                "unpack_src": unpack_src.reshape(n, tc).astype(np.int32)}

    def layout_arrays(self) -> dict:
        """The packed layout's arrays (int32 numpy): segment_ids, positions, seq_index [C, L]
        (1.. within a chunk / 0 on padding; restarting at 0 per sequence; the sequence of each
        token, N on padding) and the gather indices `pack_arrays` reads: prompt_src and
        completion_src [C, L] (flat source index into [N * Tp] / [N * Tc], the sentinel N * Tp /
        N * Tc elsewhere) and unpack_src [N, Tc] (flat index into [C * L], C * L past c_i)."""
        return dict(self._arrays)

    def layout(self) -> Packed:
        return Packed(seq_index=jnp.asarray(self._arrays["seq_index"]), num_seqs=self.num_seqs)

    # -- pack / unpack --------------------------------------------------------------------------
    def _check(self, x, shape, name):
        if x.ndim < 2 or tuple(x.shape[:2]) != tuple(shape):
            raise ValueError(f"packing: {name} has shape {tuple(x.shape)}, expected "
                             f"[{shape[0]}, {shape[1]}, ...]")

    def pack_completion(self, x_NxTc, fill=0):
        """A per-completion-token array [N, Tc, ...] in the packed layout [C, L, ...]: entry
        (i, t < c_i) at the position of completion token t of sequence i; `fill` elsewhere."""
        self._check(x_NxTc, (self.num_seqs, self.completion_width), "a completion-side array")
        return gather_tokens(x_NxTc, self._arrays["completion_src"], fill)

    def pack_prompt(self, x_NxTp, fill=0):
        """A per-prompt-token array [N, Tp, ...] (left padded) in the packed layout."""
        self._check(x_NxTp, (self.num_seqs, self.prompt_width), "a prompt-side array")
        return gather_tokens(x_NxTp, self._arrays["prompt_src"], fill)

    def unpack_completion(self, y_CxL, fill=0):
        """The inverse of pack_completion: [C, L, ...] -> [N, Tc, ...], `fill` past c_i."""
        self._check(y_CxL, self.shape, "a packed array")
        return gather_tokens(y_CxL, self._arrays["unpack_src"], fill)

    def pack_tokens(self, prompt_ids_NxTp, completion_ids_NxTc, pad_id: int = 0):
        """Prompt and completion tokens in one packed [C, L] token array."""
        self._check(prompt_ids_NxTp, (self.num_seqs, self.prompt_width), "prompt_ids")
        self._check(completion_ids_NxTc, (self.num_seqs, self.completion_width), "completion_ids")
        return pack_arrays({"prompt_ids": prompt_ids_NxTp, "completion_ids": completion_ids_NxTc},
                           self._arrays, pad_id=pad_id)["tokens"]

    def pack_batch(self, batch, *, pad_id: int = 0) -> dict:
        """`pack_arrays` with this plan's indices (numpy in, numpy out; jax in, jax out)."""
        for k, v in batch.items():
            if k in ("prompt_ids", "prompt_mask"):
                self._check(v, (self.num_seqs, self.prompt_width), k)
            elif k in COMPLETION_KEYS or k == "completion_ids":
                self._check(v, (self.num_seqs, self.completion_width), k)
        return pack_arrays(batch, self._arrays, pad_id=pad_id)


def gather_tokens(x, index, fill=0):
    """x flattened over its first two axes, then gathered at `index` (any shape); the index
    one past the end reads `fill`. numpy or jax (jit-safe: the index is an ordinary array)."""
    xp = jnp if isinstance(x, jax.Array) or isinstance(index, jax.Array) else np
    x = xp.asarray(x)
    flat = x.reshape((-1,) + x.shape[2:])
    ext = xp.concatenate([flat, xp.full((1,) + flat.shape[1:], fill, flat.dtype)])
    return ext[xp.asarray(index)]


# Completion-side arrays of an update batch (packed like the tokens) and per-sequence ones
# (kept [N], read through the layout).
COMPLETION_KEYS = ("completion_mask", "logp_old", "logp_ref", "logp_sampler")
SEQUENCE_KEYS = ("advantages", "truncated")
LAYOUT_KEYS = ("tokens", "segment_ids", "positions", "seq_index")
# Routing replay's recorded experts: padded [N, Tp | Tc, MoE layers, K] in, one packed
# `routes` [C, L, MoE layers, K] out (prompt and completion tokens, like `tokens`).
ROUTE_KEYS = ("prompt_routes", "completion_routes", "routes")


def pack_arrays(batch, arrays, *, pad_id: int = 0) -> dict:
    """A padded update batch (prompt_ids, prompt_mask, completion_ids, completion_mask, and any
    of logp_old / logp_ref / logp_sampler [N, Tc], advantages / truncated [N]) in a packed
    layout given by `arrays` (PackPlan.layout_arrays()): LAYOUT_KEYS and the completion-side
    arrays [C, L], per-sequence ones as they are. A pure function of arrays: jit it with the
    layout arrays as arguments and one program serves every plan of a bucket's shape."""
    unknown = set(batch) - {"prompt_ids", "prompt_mask", "completion_ids"} \
        - set(COMPLETION_KEYS) - set(SEQUENCE_KEYS) - set(ROUTE_KEYS[:2])
    if unknown:
        raise ValueError(f"packing: unknown batch keys {sorted(unknown)}")
    out = {k: arrays[k] for k in ("segment_ids", "positions", "seq_index")}
    if "prompt_ids" in batch and "completion_ids" in batch:
        xp = jnp if isinstance(batch["completion_ids"], jax.Array) else np
        prompt = gather_tokens(batch["prompt_ids"], arrays["prompt_src"], pad_id)
        comp = gather_tokens(batch["completion_ids"], arrays["completion_src"], pad_id)
        n_tc = batch["completion_ids"].shape[0] * batch["completion_ids"].shape[1]
        out["tokens"] = xp.where(xp.asarray(arrays["completion_src"]) < n_tc, comp, prompt)
    out.update({k: gather_tokens(batch[k], arrays["completion_src"]) for k in COMPLETION_KEYS
                if k in batch})
    if "completion_routes" in batch:
        from r1jax.models.moe import unrouted

        pr, cr = batch["prompt_routes"], batch["completion_routes"]
        xp = jnp if isinstance(cr, jax.Array) else np
        fill = unrouted(cr.dtype)  # padding tokens: no recorded route
        in_comp = xp.asarray(arrays["completion_src"]) < cr.shape[0] * cr.shape[1]
        out["routes"] = xp.where(in_comp[..., None, None],
                                 gather_tokens(cr, arrays["completion_src"], fill),
                                 gather_tokens(pr, arrays["prompt_src"], fill))
    out.update({k: batch[k] for k in SEQUENCE_KEYS if k in batch})
    return out


def _prefix_lengths(mask, name: str) -> np.ndarray:
    m = np.asarray(mask) > 0
    lengths = m.sum(axis=1)
    contiguous = (np.arange(m.shape[1])[None, :] < lengths[:, None]) == m
    if not contiguous.all():
        bad = int(np.nonzero(~contiguous.all(axis=1))[0][0])
        raise ValueError(f"packing: {name} row {bad} is not a prefix mask (1s then 0s)")
    return lengths


def _suffix_lengths(mask, name: str) -> np.ndarray:
    return _prefix_lengths(np.asarray(mask)[:, ::-1], name + " (left padded)")


def best_fit(lengths_N, capacity: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Best-fit decreasing bin packing: (chunk_N, offset_N, number of chunks).

    Sequences are taken longest first (ties by index, so the plan is deterministic) and each
    goes into the chunk with the least room left that still holds it."""
    lengths = np.asarray(lengths_N, np.int64)
    n = lengths.shape[0]
    if n and lengths.max() > capacity:
        bad = int(np.argmax(lengths))
        raise ValueError(f"packing: sequence {bad} has {int(lengths[bad])} tokens, more than "
                         f"the chunk's {capacity} (grpo.pack_chunk_tokens)")
    chunk = np.zeros(n, np.int64)
    offset = np.zeros(n, np.int64)
    open_chunks: list = []  # sorted (room left, chunk) of every chunk opened so far
    used: list = []  # tokens placed in each chunk
    for i in np.argsort(-lengths, kind="stable"):
        need = int(lengths[i])
        at = bisect.bisect_left(open_chunks, (need, -1))
        if at == len(open_chunks):
            j = len(used)
            used.append(0)
        else:
            _, j = open_chunks.pop(at)
        chunk[i], offset[i] = j, used[j]
        used[j] += need
        bisect.insort(open_chunks, (capacity - used[j], j))
    return chunk, offset, len(used)


def plan(prompt_mask_NxTp, completion_mask_NxTc, *, chunk_tokens: Optional[int] = None,
         num_shards: int = 1, chunks_per_micro: Optional[int] = None) -> PackPlan:
    """Pack a rollout: best-fit decreasing into chunks of `chunk_tokens` (default Tp + Tc), the
    chunk count padded to equal counts per shard and bucketed (see the module docstring).

    Args:
      prompt_mask_NxTp: 1 on real prompt tokens (left padded); every prompt needs one.
      completion_mask_NxTc: 1 on the completion's tokens (a prefix of each row).
      num_shards: D, the data-parallel shards the chunk axis is split over.
      chunks_per_micro: chunks of each shard in one micro-batch; None: a single micro-batch.
    """
    pm, cm = np.asarray(prompt_mask_NxTp), np.asarray(completion_mask_NxTc)
    if pm.ndim != 2 or cm.ndim != 2 or pm.shape[0] != cm.shape[0]:
        raise ValueError(f"packing: prompt mask {pm.shape} and completion mask {cm.shape} must "
                         "be [N, Tp] and [N, Tc]")
    n, tp = pm.shape
    tc = cm.shape[1]
    p_len = _suffix_lengths(pm, "prompt_mask")
    c_len = _prefix_lengths(cm, "completion_mask")
    if n and p_len.min() < 1:
        raise ValueError(f"packing: prompt {int(np.argmin(p_len))} has no tokens (the first "
                         "completion token is predicted from the last prompt token)")
    L = int(chunk_tokens) if chunk_tokens else tp + tc
    D = int(num_shards)
    if D < 1:
        raise ValueError(f"packing: num_shards must be >= 1, got {num_shards}")
    if chunks_per_micro is not None and int(chunks_per_micro) < 1:
        raise ValueError(f"packing: chunks_per_micro must be >= 1, got {chunks_per_micro}")
    chunk, offset, used = best_fit(p_len + c_len, L)
    total, m, num_micro = chunk_counts(used, D, chunks_per_micro)
    # Deal chunks, fullest first, over (slot, micro-batch, shard) so every shard and every
    # micro-batch gets a like share of the tokens. Position of (shard d, slot k, micro j) in the
    # [C, L] arrays: d * (C / D) + k * num_micro + j.
    fill = np.bincount(chunk, weights=p_len + c_len, minlength=used) if n else np.zeros(used)
    by_fill = np.argsort(-fill, kind="stable")
    d, k, j = np.meshgrid(np.arange(D), np.arange(m), np.arange(num_micro), indexing="ij")
    pos = (d * (total // D) + k * num_micro + j)
    order = np.lexsort((d.ravel(), j.ravel(), k.ravel()))  # k slowest, then j, then d
    slots = pos.ravel()[order]
    where = np.empty(used, np.int64)
    where[by_fill] = slots[:used]
    return PackPlan(chunk_N=where[chunk] if n else chunk, offset_N=offset,
                    prompt_len_N=p_len.astype(np.int64), completion_len_N=c_len.astype(np.int64),
                    num_chunks=total, chunk_tokens=L, prompt_width=tp, completion_width=tc,
                    num_shards=D, num_micro=num_micro)


def chunk_counts(used: int, num_shards: int, chunks_per_micro: Optional[int] = None
                 ) -> Tuple[int, int, int]:
    """(chunks, chunks of a shard per micro-batch, micro-batches) for `used` filled chunks: the
    one rule for the bucketed, shard-equal chunk count (see the module docstring)."""
    used, D = max(int(used), 1), int(num_shards)
    if chunks_per_micro is None:
        m = bucket_count(-(-used // D))
        return D * m, m, 1
    m = int(chunks_per_micro)
    num_micro = bucket_count(-(-used // (D * m)))
    return D * m * num_micro, m, num_micro


def micro_chunks(micro_batch_tokens: int, chunk_tokens: int, num_shards: int) -> Optional[int]:
    """Chunks of each shard in one micro-batch of `micro_batch_tokens` tokens (all shards
    together), at least 1; None (one micro-batch) when micro_batch_tokens <= 0."""
    if micro_batch_tokens <= 0:
        return None
    return max(1, int(micro_batch_tokens) // (int(chunk_tokens) * int(num_shards)))


class Packer:
    """One run's packing: plans each update mini-batch on the host (from its masks only),
    gathers its arrays into the packed layout on device (one compiled gather per chunk bucket),
    and runs the reference / pi_old forward packed.

        packer = Packer(geometry, cfg.grpo, mesh=mesh, rules=train_rules)
        packed_batch = packer.pack(batch)                  # for make_update_step(grpo.packing)
        logp_NxTc = packer.logprobs(fn, params, rollout)   # fn: reference_logprobs_fn(packed=True)
    """

    def __init__(self, geometry, grpo_cfg, *, mesh=None, rules=None):
        from r1jax import mesh as mesh_lib

        self.geometry = geometry
        self.chunk_tokens = int(grpo_cfg.pack_chunk_tokens) or (
            int(geometry.prompt_len) + int(geometry.completion_len))
        self.mesh, self.rules = mesh, rules
        self.shards = mesh_lib.batch_shards(mesh, rules) if mesh is not None else 1
        self.chunks_per_micro = micro_chunks(int(grpo_cfg.micro_batch_tokens), self.chunk_tokens,
                                             self.shards)
        if mesh is not None:
            self._sharding = {d: mesh_lib.batch_sharding(mesh, rules, d) for d in (1, 2, 4)}  # 4: routes
        self._gather = jax.jit(pack_arrays)

    def abstract(self, batch) -> dict:
        """The packed batch's ShapeDtypeStructs for an abstract padded batch (rollout.minibatch's
        keys), at the largest chunk count a mini-batch of its N sequences can need (each in a
        chunk of its own): what the trainer compiles and reports before the first step."""
        from r1jax import mesh as mesh_lib

        n = batch["completion_mask"].shape[0]
        c = chunk_counts(n, self.shards, self.chunks_per_micro)[0]

        def sds(shape, dtype):
            sh = (mesh_lib.batch_sharding(self.mesh, self.rules, len(shape))
                  if self.mesh is not None else None)
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

        out = {k: sds((c, self.chunk_tokens), jnp.int32) for k in LAYOUT_KEYS}
        out.update({k: sds((c, self.chunk_tokens), v.dtype) for k, v in batch.items()
                    if k in COMPLETION_KEYS})
        out.update({k: sds(v.shape, v.dtype) for k, v in batch.items() if k in SEQUENCE_KEYS})
        if "completion_routes" in batch:
            r = batch["completion_routes"]
            out["routes"] = sds((c, self.chunk_tokens) + r.shape[2:], r.dtype)
        return out

    def _put(self, tree):
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in tree.items()}
        return {k: jax.device_put(v, self._sharding[np.ndim(v)]) for k, v in tree.items()}

    def plan(self, prompt_mask_NxTp, completion_mask_NxTc,
             chunks_per_micro: Optional[int] = None) -> PackPlan:
        """The plan of a batch, from its masks (device arrays are read back row by row; in a
        multi-process run every process gets every row, so all agree on the plan)."""
        from r1jax.distributed import all_rows

        host = lambda x: all_rows(x) if isinstance(x, jax.Array) else np.asarray(x)  # noqa: E731
        return plan(host(prompt_mask_NxTp), host(completion_mask_NxTc),
                    chunk_tokens=self.chunk_tokens, num_shards=self.shards,
                    chunks_per_micro=chunks_per_micro)

    def pack(self, batch) -> dict:
        """A padded update batch (rollout.minibatch) in the packed layout, sharded over the
        batch axes: chunks per shard equal, micro-batches of `grpo.micro_batch_tokens`."""
        p = self.plan(batch["prompt_mask"], batch["completion_mask"], self.chunks_per_micro)
        arrays = p.layout_arrays()
        return self._put(self._gather(dict(batch), arrays))

    def logprobs(self, fn, params, rollout, rows_per_call: Optional[int] = None, *,
                 replay: bool = False):
        """log pi(completion | prompt) [N, Tc] (padded, zeros past each completion) for every
        row of `rollout`, computed packed: `fn` (from grpo.reference_logprobs_fn(packed=True))
        runs on groups of chunks holding about `rows_per_call` padded rows' tokens (default:
        the update's mini-batch), so every call has the same shape; a rollout whose chunks fit
        one such group runs as one call of its bucketed chunk count (bucket_count: a few
        shapes). replay: also hand `fn` the packed recorded routes (routing replay;
        fn from reference_logprobs_fn(packed=True, replay=True))."""
        geo = self.geometry
        rows = int(rows_per_call or geo.minibatch_size)
        per_shard = max(1, rows * (geo.prompt_len + geo.completion_len)
                        // (self.chunk_tokens * self.shards))
        # A rollout whose packed chunks fit one call runs as one call of its bucketed chunk
        # count, not padded up to a whole call: with short completions a single call of
        # `per_shard` chunks would compute as many positions as the padded layout does.
        from r1jax.distributed import all_rows

        masks = [all_rows(m) if isinstance(m, jax.Array) else np.asarray(m)
                 for m in (rollout["prompt_mask"], rollout["completion_mask"])]
        p = self.plan(*masks)
        if p.num_chunks > per_shard * self.shards:
            p = self.plan(*masks, per_shard)
        arrays = p.layout_arrays()
        keys = ("prompt_ids", "completion_ids") + (ROUTE_KEYS[:2] if replay else ())
        packed = self._gather({k: rollout[k] for k in keys}, arrays)
        tokens = packed["tokens"]
        n = p.num_micro
        pieces = [fn(params, *self._put({"t": tokens[j::n], "s": arrays["segment_ids"][j::n],
                                          "p": arrays["positions"][j::n],
                                          **({"r": packed["routes"][j::n]} if replay else {})}).values())
                  for j in range(n)]
        # Piece j holds chunks j, j + n, ...: interleave them back into chunk order.
        logp_CxL = jnp.stack(pieces, axis=1).reshape(p.shape)
        return gather_tokens(logp_CxL, arrays["unpack_src"])


def packed_logprobs(model, tokens_CxL, segment_ids_CxL, positions_CxL, *,
                    temperature: float = 1.0, chunk_len: Optional[int] = None
                    ) -> Tuple[jax.Array, jax.Array]:
    """Per-token log-probs and entropies [C, L] in a packed layout, aligned with the tokens:
    entry (c, t) scores tokens[c, t] given the tokens before it in its segment (0 at t = 0).

    Entries at a segment's first token score it against the previous segment and mean nothing;
    the loss mask (completion tokens only, which always follow a prompt token) excludes them."""
    h, _ = model.hidden(tokens_CxL, positions_BxT=positions_CxL, segment_ids_BxT=segment_ids_CxL)
    logp, ent = token_logprobs(h[:, :-1], model.unembed_matrix(), tokens_CxL[:, 1:],
                               temperature=temperature, chunk_len=chunk_len)
    pad = ((0, 0), (1, 0))
    return jnp.pad(logp, pad), jnp.pad(ent, pad)


__all__ = ["bucket_count", "Packed", "PackPlan", "best_fit", "plan", "micro_chunks",
           "packed_logprobs", "pack_arrays", "gather_tokens", "Packer", "chunk_counts", "COMPLETION_KEYS", "SEQUENCE_KEYS",
           "LAYOUT_KEYS", "ROUTE_KEYS"]
