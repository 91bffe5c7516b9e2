"""Length-shaping rewards: DAPO's soft overlong penalty and cosine length scaling.

Lengths are counted in tokens (the `completion_ids` the trainer passes); without them, in
characters of the completion text.

* ``overlong_penalty`` (DAPO, Yu et al. 2025, eq. 13), with L_max = `max_length` and
  L_cache = `cache_length`::

      0                                 if |y| <= L_max - L_cache
      ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
      -1                                if |y| > L_max

  It is added to the accuracy reward (weight 1 in DAPO).
* ``cosine_scaled`` (Yeo et al. 2025, "Demystifying long chain-of-thought reasoning"): with
  t = |y| and T = `max_length`, CosFn(t) = r_T + (r_0 - r_T) (1 + cos(pi t / T)) / 2, where
  (r_0, r_T) = (`correct_short`, `correct_long`) for a correct answer and (`wrong_short`,
  `wrong_long`) for a wrong one, and `exceed` past T. Short correct answers earn most, long
  wrong answers lose least. Correctness is the maths accuracy reward on the `answer` column,
  so use it *instead of* accuracy, not next to it.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

from r1jax.rewards.accuracy import accuracy


def _lengths(completions: Sequence[str], completion_ids: Optional[Sequence[Any]]) -> List[int]:
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(c or "") for c in completions]


def overlong_penalty(completions: Sequence[str], completion_ids: Optional[Sequence[Any]] = None,
                     *, max_length: int, cache_length: int, **unused: Any) -> List[float]:
    """DAPO's soft overlong punishment per completion, in [-1, 0]."""
    if not 0 < cache_length <= max_length:
        raise ValueError(f"overlong_penalty: need 0 < cache_length <= max_length, got "
                         f"cache_length={cache_length}, max_length={max_length}")
    soft = max_length - cache_length
    out = []
    for n in _lengths(completions, completion_ids):
        if n <= soft:
            out.append(0.0)
        elif n <= max_length:
            out.append((soft - n) / cache_length)
        else:
            out.append(-1.0)
    return out


def cosine_value(length: int, max_length: int, r_0: float, r_T: float) -> float:
    """CosFn(t, T, r_0, r_T): r_0 at t = 0 falling (or rising) to r_T at t = T."""
    t = min(length, max_length)
    return r_T + 0.5 * (r_0 - r_T) * (1.0 + math.cos(math.pi * t / max_length))


def cosine_scaled(completions: Sequence[str], completion_ids: Optional[Sequence[Any]] = None,
                  answer: Optional[Sequence[Any]] = None, *, max_length: int,
                  correct_short: float = 2.0, correct_long: float = 1.0,
                  wrong_short: float = -10.0, wrong_long: float = 0.0, exceed: float = -10.0,
                  **accuracy_kwargs: Any) -> List[Optional[float]]:
    """Cosine length-scaled correctness reward (defaults: Yeo et al. 2025's values)."""
    if max_length <= 0:
        raise ValueError(f"cosine_scaled: max_length must be > 0, got {max_length}")
    correct = accuracy(completions, answer=answer, **accuracy_kwargs)
    out: List[Optional[float]] = []
    for n, ok in zip(_lengths(completions, completion_ids), correct):
        if ok is None:
            out.append(None)
        elif n > max_length:
            out.append(exceed)
        elif ok:
            out.append(cosine_value(n, max_length, correct_short, correct_long))
        else:
            out.append(cosine_value(n, max_length, wrong_short, wrong_long))
    return out


cosine_scaled.forwards_kwargs = True  # the rest goes to accuracy()


def length(completions: Sequence[str], completion_ids: Optional[Sequence[Any]] = None, *,
           mode: str = "overlong", **kwargs: Any) -> List[Optional[float]]:
    """The length reward of the config: mode "overlong" (DAPO) or "cosine" (see above)."""
    if mode == "overlong":
        return overlong_penalty(completions, completion_ids, **kwargs)
    if mode == "cosine":
        return cosine_scaled(completions, completion_ids, **kwargs)
    raise ValueError(f"length reward: mode must be 'overlong' or 'cosine', got {mode!r}")


length.forwards_kwargs = True  # to overlong_penalty / cosine_scaled
