"""Maths accuracy (R1's rule-based accuracy reward): 1 if the final answer equals the reference.

The final answer is the LAST of the chosen sources: ``\\boxed{...}`` / ``\\fbox{...}`` (nested
braces allowed), the ``<answer>...</answer>`` tag, GSM8K's ``#### N`` line, or matches of a
configurable regex (its group 1 if it has one). ``last_number`` is a fallback for models that
answer in plain text ("... so she sold 72 clips."): the last number of the completion, used
only when no other source finds an answer. A reference written as a GSM8K solution (ending
``#### N``) is compared by its N.
Equivalence is decided by ``math-verify`` (fractions, decimals, LaTeX, sets, intervals,
percentages, units, equations), after a fast path for answers that are equal as normalised
strings (text answers such as "Paris").

math-verify can hang (sympy evaluating ``9^{9^{9^{9}}}`` runs in C and ignores its own
SIGALRM-based timeouts, which also only work in the main thread). So by default parsing and
verification run in a small pool of worker processes, each answering in its main thread with
math-verify's timeouts on, and a worker that overruns ``timeout_s`` is killed and replaced.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
import unicodedata
from fractions import Fraction
from typing import Any, List, Optional, Sequence

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _boxed_spans(text: str) -> List[tuple]:
    """(start, content) of every \\boxed{...}, matching nested braces; unclosed ones dropped."""
    spans = []
    for m in _BOX_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                i += 2  # an escaped brace \{ does not open or close a group
                continue
            depth += (c == "{") - (c == "}")
            i += 1
        if depth == 0:
            spans.append((m.start(), text[m.end():i - 1]))
    return spans


SOURCES = ("boxed", "answer_tag", "gsm8k", "last_number")
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
# A number as written in prose: 1,234.5 (thousands groups), -3, 0.25, $12; not the dot of "42."
_NUMBER_RE = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _number(text: str) -> str:
    return text.replace(",", "").replace("$", "")


def extract_answer(text: str, pattern: Optional[str] = None,
                   sources: Sequence[str] = ("boxed", "answer_tag")) -> Optional[str]:
    """The last final-answer candidate in `text` (by position), or None.

    sources: any of SOURCES; `pattern` (a regex) is always a source when given. A boxed
    answer inside an <answer> tag wins over the tag (it starts later). "gsm8k" reads the
    number of the last `#### N`; "last_number" is the last number in the text, only when the
    other sources find nothing.
    """
    bad = [sources] if isinstance(sources, str) else [x for x in sources if x not in SOURCES]
    if bad:
        raise ValueError(f"accuracy: sources must be a list of {', '.join(SOURCES)}; got {bad[0]!r}")
    cands: List[tuple] = []
    if "boxed" in sources:
        cands += _boxed_spans(text)
    if "answer_tag" in sources:
        cands += [(m.start(1), m.group(1)) for m in _ANSWER_RE.finditer(text)]
    if "gsm8k" in sources:
        for m in _GSM8K_RE.finditer(text):
            num = _NUMBER_RE.search(m.group(1))
            if num:
                cands.append((m.start(1) + num.start(), _number(num.group(0))))
    if pattern:
        rx = re.compile(pattern, re.DOTALL)
        for m in rx.finditer(text):
            g = 1 if rx.groups else 0
            cands.append((m.start(g), m.group(g)))
    if not cands and "last_number" in sources:
        nums = _NUMBER_RE.findall(text)
        return _number(nums[-1]) if nums else None
    if not cands:
        return None
    return max(cands, key=lambda c: c[0])[1].strip()


def reference_answer(gold: Any) -> str:
    """A dataset's reference as a bare answer: a GSM8K solution by its `#### N`, a boxed
    reference by the box content, anything else as written."""
    gold_s = str(gold).strip()
    if "####" in gold_s:
        from r1jax.formats import FormatError, gsm8k_final_answer

        try:
            return gsm8k_final_answer(gold_s)
        except FormatError:
            pass
    return extract_answer(gold_s, sources=("boxed",)) or gold_s


_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox|textit)\s*\{([^{}]*)\}")


def normalize_text(s: str) -> str:
    """A loose string form for the fast path: no \\text{}, $, spaces, case, trailing dot."""
    s = unicodedata.normalize("NFKC", str(s))
    s = _TEXT_CMD.sub(r"\1", s)
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = re.sub(r"\s+", "", s).lower()
    return s.rstrip(".")


_INT_FRAC = re.compile(r"^(-?)(?:(\d+)|(\d+)/(\d+)|\\[dt]?frac\{(-?\d+)\}\{(\d+)\})$")


def exact_rational(s: str) -> Optional[Fraction]:
    """The value of an integer or integer fraction written plainly (7, -3, 2/4, \\frac{1}{2}),
    else None. Decimals are left to math-verify, which compares them after rounding."""
    t = str(s).replace("$", "").replace(" ", "").replace("\\!", "")
    m = _INT_FRAC.match(t)
    if not m or len(t) > 40:
        return None
    sign = -1 if m.group(1) else 1
    if m.group(2) is not None:
        return sign * Fraction(int(m.group(2)))
    num, den = (m.group(3), m.group(4)) if m.group(3) is not None else (m.group(5), m.group(6))
    if int(den) == 0:
        return None
    return sign * Fraction(int(num), int(den))


# ---------------------------------------------------------------------------------------------
# Verification (runs inside a worker process, or inline)
# ---------------------------------------------------------------------------------------------
def _parse(s: str, timeout: Optional[int]):
    from math_verify import parse

    # A bare answer parses best when presented as boxed (math-verify then reads it as LaTeX
    # with units, percentages and \text); free text falls back to math-verify's own search.
    parsed = parse("\\boxed{" + s + "}", parsing_timeout=timeout)
    if not parsed:
        parsed = parse(s, parsing_timeout=timeout)
    return parsed


def verify_answer(gold: str, pred: str, timeout: Optional[int] = 5,
                  float_rounding: int = 6) -> bool:
    """math-verify equivalence of two bare answers. `timeout` needs the main thread (or None)."""
    from math_verify import verify

    g, p = _parse(gold, timeout), _parse(pred, timeout)
    if not g or not p:
        return False
    return bool(verify(g, p, float_rounding=float_rounding, timeout_seconds=timeout))


def _worker_main() -> None:
    """Worker loop: one JSON request per stdin line, one JSON reply per stdout line."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies goes to the pipe
    for line in sys.stdin:
        req = json.loads(line)
        try:
            ok = verify_answer(req["gold"], req["pred"], timeout=req["timeout"],
                               float_rounding=req["float_rounding"])
            reply = {"ok": ok}
        except BaseException as e:  # noqa: BLE001 - a reply per request, whatever happened
            reply = {"error": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class MathTimeout(TimeoutError):
    """math-verify did not answer within the time limit (the worker was killed)."""


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from r1jax.rewards.accuracy import _worker_main; "
             "_worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1, start_new_session=True)

    def ask(self, req: dict, timeout_s: float) -> dict:
        """Send one request; kill the worker and raise MathTimeout if it does not answer."""
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply: List[Any] = []
        reader = threading.Thread(target=lambda: reply.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout_s)
        if reader.is_alive() or not reply[0]:
            timed_out = reader.is_alive()
            self.kill()
            if timed_out:
                raise MathTimeout(f"math-verify took longer than {timeout_s:.1f}s")
            raise RuntimeError("math-verify worker died")
        return json.loads(reply[0])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class MathPool:
    """At most `size` worker processes; callers from many threads check one out per request."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self._idle: List[_Worker] = []
        self._live = 0
        self._cond = threading.Condition()
        atexit.register(self.close)

    def _checkout(self) -> _Worker:
        with self._cond:
            while not self._idle and self._live >= self.size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:
            return _Worker()
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def ask(self, req: dict, timeout_s: float) -> dict:
        w = self._checkout()
        alive = False
        try:
            reply = w.ask(req, timeout_s)
            alive = True
            return reply
        finally:
            with self._cond:
                if alive:
                    self._idle.append(w)
                else:
                    self._live -= 1
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for w in idle:
            w.kill()


_POOL: Optional[MathPool] = None
_POOL_LOCK = threading.Lock()


def _pool(size: Optional[int]) -> MathPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = MathPool(size or min(8, os.cpu_count() or 1))
        elif size and size > _POOL.size:
            _POOL.size = size
        return _POOL


def is_equivalent(gold: str, pred: str, *, timeout_s: float = 5.0, workers: Optional[int] = None,
                  float_rounding: int = 6) -> bool:
    """Whether `pred` equals `gold` (both bare answers); raises MathTimeout past `timeout_s`.

    workers: 0 runs math-verify in the calling thread (its own timeouts only in the main
    thread; no protection against hangs elsewhere); otherwise the shared process pool (of
    that many workers, default min(8, CPUs)).
    """
    if normalize_text(gold) == normalize_text(pred) and normalize_text(gold):
        return True
    # Integers and integer fractions (most maths datasets' answers) need no sympy.
    g, p = exact_rational(gold), exact_rational(pred)
    if g is not None and p is not None:
        return g == p
    if workers == 0:
        main = threading.current_thread() is threading.main_thread()
        t = max(1, int(timeout_s)) if main else None
        return verify_answer(gold, pred, timeout=t, float_rounding=float_rounding)
    req = {"gold": gold, "pred": pred, "timeout": max(1, int(timeout_s)),
           "float_rounding": float_rounding}
    # The worker's own alarm fires at `timeout` per parse/verify; the kill is the backstop
    # for C-level hangs that no signal interrupts.
    reply = _pool(workers).ask(req, 3 * timeout_s + 2.0)
    if "error" in reply:
        raise RuntimeError(f"math-verify failed: {reply['error']}")
    return bool(reply["ok"])


_EXTRACTION_KEYS = ("pattern", "sources")


def run_settings(functions: Sequence[Any]) -> dict:
    """The answer extraction a run's accuracy reward uses (its `pattern` and `sources`
    kwargs, from rewards.functions), so that evaluation reads answers the way training scores
    them; {} (the defaults) when the run has no accuracy reward."""
    for fc in functions or ():
        if getattr(fc, "name", None) == "accuracy":
            return {k: v for k, v in dict(fc.kwargs or {}).items() if k in _EXTRACTION_KEYS}
    return {}


def accuracy(completions: Sequence[str], answer: Optional[Sequence[Any]] = None, *,
             pattern: Optional[str] = None, sources: Sequence[str] = ("boxed", "answer_tag"),
             timeout_s: float = 5.0, workers: Optional[int] = None, float_rounding: int = 6,
             **unused: Any) -> List[Optional[float]]:
    """R1's accuracy reward: 1.0 if the last final answer equals the row's `answer`, else 0.0.

    None where the row has no reference answer. A completion without any final answer scores
    0.0. Raises MathTimeout when math-verify overruns `timeout_s` (the runner turns that into
    its per-sample timeout policy). Unknown keyword columns are ignored (TRL convention).
    """
    if answer is None:
        raise ValueError("accuracy reward needs an 'answer' column (dataset field) per completion")
    extract_answer("", sources=sources)  # a bad source list fails even on an empty batch
    if len(answer) != len(completions):
        raise ValueError(f"accuracy reward: {len(completions)} completions but "
                         f"{len(answer)} answers")
    out: List[Optional[float]] = []
    for text, gold in zip(completions, answer):
        if gold is None or str(gold).strip() == "":
            out.append(None)
            continue
        pred = extract_answer(text or "", pattern=pattern, sources=sources)
        if not pred:
            out.append(0.0)
            continue
        gold_s = reference_answer(gold)
        ok = is_equivalent(gold_s, pred, timeout_s=timeout_s, workers=workers,
                           float_rounding=float_rounding)
        out.append(1.0 if ok else 0.0)
    return out
