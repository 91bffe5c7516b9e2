"""Padded lengths: the one rule that turns a prompt length into the length it is stored and
compiled at. Data batches, the sampler, the rollout buffer and the ahead-of-time compiler all
call `bucket_length`, so they agree on every shape (a disagreement was a negative pad)."""

from __future__ import annotations

from typing import Optional, Sequence


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= n."""
    return -(-int(n) // int(multiple)) * int(multiple)


def bucket_length(n: int, buckets: Optional[Sequence[int]]) -> int:
    """The smallest bucket >= n; past the largest bucket, the next multiple of the largest.

    A few distinct padded lengths mean a few compilations. Beyond the largest bucket the length
    still moves in coarse steps (a multiple of it) rather than one compilation per length. The
    rule is a fixed point: bucket_length(bucket_length(n, b), b) == bucket_length(n, b), so a
    batch already padded to a bucket is never padded again. No buckets: n itself.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"bucket_length: length must be >= 0, got {n}")
    bs = sorted(int(b) for b in (buckets or ()) if int(b) > 0)
    if not bs:
        return n
    for b in bs:
        if b >= n:
            return b
    return round_up(n, bs[-1])


__all__ = ["bucket_length", "round_up"]
