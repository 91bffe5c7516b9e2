"""Reward functions by name, and the runner that scores a rollout on the host.

A reward function follows TRL's convention: ``fn(completions=[str, ...], **columns) ->
[float | None, ...]``, where ``columns`` are the dataset rows' fields as lists (``answer=``,
``tests=``, ``language=``...) plus ``prompts=`` and ``completion_ids=``; None means "cannot
score". Built-ins are named in BUILTINS; a user function is named by import path
(``"pkg.mod:fn"`` or ``"pkg.mod.fn"``).

The runner calls every function once per sample, from a pool of host threads (the costly
built-ins leave the GIL: maths runs in worker processes, code in the sandbox), under a
per-sample timeout. A sample whose function raises, times out, returns garbage or a score
that is NaN or infinite scores 0 (or None, per ``RewardsConfig.on_error``), a warning names
the sample and the function, a counter (``reward/<fn>/errors``, ``/timeouts``,
``/nonfinite``) goes into the metrics, and the run goes on: one NaN would otherwise turn every
advantage of its batch, the loss and then the parameters into NaN.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from r1jax.config import RewardFnConfig, RewardsConfig

log = logging.getLogger(__name__)

BUILTINS = {
    "accuracy": "r1jax.rewards.accuracy:accuracy",
    "format": "r1jax.rewards.format:format",
    "language_consistency": "r1jax.rewards.language:language_consistency",
    "language": "r1jax.rewards.language:language_consistency",
    "code": "r1jax.rewards.code:code",
    "length": "r1jax.rewards.length:length",
    "overlong_penalty": "r1jax.rewards.length:overlong_penalty",
    "cosine_scaled": "r1jax.rewards.length:cosine_scaled",
}
_RESERVED = ("completions", "prompts", "completion_ids")
_MAX_WARNINGS = 5  # per function per score() call; the rest are counted, not printed
# Per-function counters in RewardResult.metrics ("reward/<fn>/<counter>"), summed per rollout.
COUNTERS = ("errors", "timeouts", "nonfinite", "none")
_FAILED = {"error": ("errors", "raised"), "timeout": ("timeouts", "timed out"),
           "nonfinite": ("nonfinite", "returned a non-finite score")}


class NonFiniteScore(ArithmeticError):
    """A reward function returned NaN or an infinity (handled as a failed sample)."""


def resolve(name: str) -> Callable:
    """A built-in name or an import path ("pkg.mod:fn" / "pkg.mod.fn") -> the callable."""
    path = BUILTINS.get(name, name)
    if ":" in path:
        mod_name, attr = path.split(":", 1)
    elif "." in path:
        mod_name, attr = path.rsplit(".", 1)
    else:
        raise ValueError(f"unknown reward function {name!r}: not a built-in "
                         f"({', '.join(sorted(BUILTINS))}) nor an import path 'pkg.mod:fn'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"reward function {name!r}: cannot import module {mod_name!r} ({e})"
                         ) from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"reward function {name!r}: module {mod_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward function {name!r} is not callable")
    return fn


def _check_kwargs(name: str, fn: Callable, kwargs: Dict[str, Any]) -> None:
    """Unknown knobs fail at start-up, naming the function and the valid ones."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        # Built-ins take **unused for TRL's columns; check against their keyword-only knobs.
        # (A function that forwards its **kwargs elsewhere says so with `forwards_kwargs`.)
        known = {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY}
        if not known or getattr(fn, "forwards_kwargs", False):
            return
    else:
        known = set(params)
    bad = sorted(set(kwargs) - known)
    if bad:
        raise ValueError(f"reward function {name!r}: unknown kwargs {bad}; valid: "
                         f"{', '.join(sorted(known))}")


@dataclass
class RewardResult:
    """Scores of one batch: `total` [N] (weighted sum), `per_function` name -> [N] (NaN for
    None), `metrics` (per-function mean ignoring None, none/error/timeout counts, timing)."""

    total: np.ndarray
    per_function: Dict[str, np.ndarray]
    metrics: Dict[str, float] = field(default_factory=dict)


@dataclass
class _Fn:
    name: str
    fn: Callable
    weight: float
    kwargs: Dict[str, Any]
    timeout_s: float


class RewardRunner:
    """Scores completions with the configured functions, in parallel, per-sample isolated."""

    def __init__(self, cfg: RewardsConfig):
        if cfg.on_error not in ("zero", "none"):
            raise ValueError(f"rewards.on_error must be 'zero' or 'none', got {cfg.on_error!r}")
        if cfg.on_none not in ("zero", "nan"):
            raise ValueError(f"rewards.on_none must be 'zero' or 'nan', got {cfg.on_none!r}")
        if cfg.num_workers < 1:
            raise ValueError(f"rewards.num_workers must be >= 1, got {cfg.num_workers}")
        if not cfg.functions:
            raise ValueError("rewards.functions is empty: configure at least one reward")
        self.cfg = cfg
        self.fns: List[_Fn] = []
        seen: Dict[str, int] = {}
        for fc in cfg.functions:
            if isinstance(fc, dict):
                fc = RewardFnConfig(**fc)
            fn = resolve(fc.name)
            kwargs = dict(fc.kwargs or {})
            _check_kwargs(fc.name, fn, kwargs)
            base = fc.alias or fc.name.replace(":", ".").split(".")[-1]
            seen[base] = seen.get(base, 0) + 1
            name = base if seen[base] == 1 else f"{base}_{seen[base]}"
            timeout = fc.timeout_s or getattr(fn, "timeout_s", None) or cfg.timeout_s
            self.fns.append(_Fn(name, fn, float(fc.weight), kwargs, float(timeout)))
        # Totals over the runner's life (the per-call counts are in each result's metrics).
        self.counters: Dict[str, int] = {}

    @property
    def names(self) -> List[str]:
        return [f.name for f in self.fns]

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              completion_ids: Sequence[Sequence[int]], rows: Sequence[Dict[str, Any]]
              ) -> RewardResult:
        """Score N completions; `rows[i]` is the dataset row of completion i."""
        n = len(completions)
        for what, seq in (("prompts", prompts), ("completion_ids", completion_ids),
                          ("rows", rows)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"RewardRunner.score: {n} completions but {len(seq)} {what}")
        t0 = time.monotonic()
        # Every function sees every column (None where a row lacks it), as with a dataset of
        # one schema: a maths row in a maths+code mixture has tests=None, not a missing column.
        columns = sorted({k for r in rows or [] for k in r if k not in _RESERVED})
        tasks = [(f, i) for f in range(len(self.fns)) for i in range(n)]
        outcomes = _run_pool(
            [self._task(self.fns[f], i, prompts, completions, completion_ids, rows, columns)
             for f, i in tasks],
            [self.fns[f].timeout_s for f, _ in tasks], self.cfg.num_workers)
        scores = {fn.name: np.full(n, np.nan, np.float64) for fn in self.fns}
        metrics: Dict[str, float] = {}
        counts = {fn.name: dict.fromkeys(COUNTERS, 0) for fn in self.fns}
        warned = {fn.name: 0 for fn in self.fns}
        for (f, i), (status, value) in zip(tasks, outcomes):
            fn = self.fns[f]
            if status == "ok":
                if value is None:
                    counts[fn.name]["none"] += 1
                else:
                    scores[fn.name][i] = value
                continue
            counter, what = _FAILED[status]
            counts[fn.name][counter] += 1
            if warned[fn.name] < _MAX_WARNINGS:
                warned[fn.name] += 1
                msg = (f"reward function '{fn.name}' {what} on sample {i}: {value}; scored "
                       f"{'0' if self.cfg.on_error == 'zero' else 'None'}")
                log.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            if self.cfg.on_error == "zero":
                scores[fn.name][i] = 0.0
            else:
                counts[fn.name]["none"] += 1
        total = np.zeros(n, np.float64)
        for fn in self.fns:
            s = scores[fn.name]
            missing = np.isnan(s)
            contrib = np.where(missing, 0.0 if self.cfg.on_none == "zero" else np.nan, s)
            total += fn.weight * contrib
            valid = s[~missing]
            metrics[f"reward/{fn.name}"] = float(valid.mean()) if valid.size else math.nan
            for k, v in counts[fn.name].items():
                metrics[f"reward/{fn.name}/{k}"] = float(v)
                key = f"{fn.name}/{k}"
                self.counters[key] = self.counters.get(key, 0) + v
        metrics["reward/total"] = float(np.nanmean(total)) if n else math.nan
        metrics["reward/seconds"] = time.monotonic() - t0
        return RewardResult(total=total.astype(np.float32),
                            per_function={k: v.astype(np.float32) for k, v in scores.items()},
                            metrics=metrics)

    @staticmethod
    def _task(fn: _Fn, i: int, prompts, completions, completion_ids, rows, columns) -> Callable:
        def call():
            cols: Dict[str, List[Any]] = {k: [rows[i].get(k)] for k in columns}
            cols.update(fn.kwargs)
            out = fn.fn(completions=[completions[i]],
                        prompts=[prompts[i]] if prompts is not None else None,
                        completion_ids=[completion_ids[i]] if completion_ids is not None else None,
                        **cols)
            if not isinstance(out, (list, tuple)) or len(out) != 1:
                raise TypeError(f"returned {type(out).__name__} {str(out)[:60]!r}, expected a "
                                f"list with one score per completion")
            v = out[0]
            if v is None:
                return None
            if isinstance(v, (bool, int, float, np.floating, np.integer)):
                v = float(v)
                if not math.isfinite(v):
                    raise NonFiniteScore(f"{v!r}")
                return v
            raise TypeError(f"returned a {type(v).__name__} score, expected float or None")
        return call


def _run_pool(calls: List[Callable], timeouts: List[float], num_threads: int) -> List[tuple]:
    """Run `calls` on daemon threads; ("ok", value) | ("error" | "nonfinite" | "timeout", msg).

    A call that overruns its timeout is abandoned (its thread is replaced, and its result,
    should it ever come, is dropped): a hung pure-Python function cannot be killed from
    outside, which is why the costly built-ins do their work in child processes they kill.
    """
    n = len(calls)
    results: List[Optional[tuple]] = [None] * n
    started: List[Optional[float]] = [None] * n
    running: set = set()  # set.add/discard are atomic under the GIL
    todo: "queue.SimpleQueue[int]" = queue.SimpleQueue()
    done: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
    for k in range(n):
        todo.put(k)

    def worker():
        while True:
            try:
                k = todo.get_nowait()
            except queue.Empty:
                return
            started[k] = time.monotonic()
            running.add(k)
            try:
                done.put((k, ("ok", calls[k]())))
            except NonFiniteScore as e:
                done.put((k, ("nonfinite", str(e))))
            except BaseException as e:  # noqa: BLE001 - reported per sample
                done.put((k, ("error", f"{type(e).__name__}: {e}")))
            running.discard(k)

    def spawn():
        threading.Thread(target=worker, daemon=True, name="r1jax-reward").start()

    for _ in range(min(num_threads, n)):
        spawn()
    pending = n
    while pending:
        now = time.monotonic()
        live = [k for k in list(running) if results[k] is None]
        for k in live:
            if now - started[k] > timeouts[k]:
                results[k] = ("timeout", f"no result within {timeouts[k]:.1f}s")
                pending -= 1
                spawn()  # the stuck thread no longer serves the queue
        if not pending:
            break
        waits = [started[k] + timeouts[k] - now for k in live if results[k] is None]
        try:
            k, res = done.get(timeout=max(0.001, min(waits)) if waits else 0.05)
        except queue.Empty:
            continue
        if results[k] is None:
            results[k] = res
            pending -= 1
    return results  # type: ignore[return-value]
