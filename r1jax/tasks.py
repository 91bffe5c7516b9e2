"""Built-in synthetic reasoning tasks for the CPU demo, where a tiny model trained from scratch
must learn in minutes.

Each row has a `question`, a reference `answer` (a string) and a `solution`: a worked
completion in R1's format, `<think>steps</think> <answer>answer</answer>`, used by the
cold-start SFT stage. The steps go digit by digit from the least significant digit, carrying
(or borrowing) explicitly, so every answer digit is the last digit of one step: a small
transformer can learn the procedure rather than memorise sums.

    23+45 -> <think>3+5=8,2+4=6</think> <answer>68</answer>
    47+38 -> <think>7+8=15,4+3+1=8</think> <answer>85</answer>
    52-27 -> <think>12-7=5,5-1-2=2</think> <answer>25</answer>
    23-45 -> <think>45>23,5-3=2,4-2=2</think> <answer>-22</answer>
    47*3  -> <think>7*3=21,4*3+2=14</think> <answer>141</answer>
    3x+7=22 -> <think>22-7=15,15/3=5</think> <answer>5</answer>

Train and eval rows are disjoint: a question belongs to the eval split when a hash of
(seed, question) falls in the held-out share, so the split is deterministic per seed and
independent of how many rows are drawn.
"""

from __future__ import annotations

import random
import zlib
from typing import Callable, Dict, List, Optional, Tuple


class TaskError(ValueError):
    """A synthetic-task problem, with a message naming the culprit."""


def _digits_lsb(n: int, width: int) -> List[int]:
    """Decimal digits of n, least significant first, zero-padded to `width`."""
    return [(n // 10 ** i) % 10 for i in range(width)]


def _assemble(digits_lsb: List[int], top: int = 0) -> str:
    """The answer a worked solution arrives at: its step digits, most significant first."""
    value = sum(d * 10 ** i for i, d in enumerate(digits_lsb)) + top * 10 ** len(digits_lsb)
    return str(value)


def _add_steps(a: int, b: int, slip: bool = False) -> Tuple[str, str]:
    """Column addition. `slip`: the carry is forgotten (a sloppy teacher's solution, whose
    answer then follows from its steps and is wrong whenever a carry was due)."""
    width = max(len(str(a)), len(str(b)))
    xs, ys = _digits_lsb(a, width), _digits_lsb(b, width)
    steps, carry, out = [], 0, []
    for x, y in zip(xs, ys):
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        out.append(s % 10)
        carry = 0 if slip else s // 10
    top = s // 10  # the last column's carry is written out either way
    answer = str(a + b) if not slip else _assemble(out, top)
    return ",".join(steps), answer


def _sub_steps(a: int, b: int, slip: bool = False) -> Tuple[str, str]:
    """a - b for a >= b; a borrowed digit is written as 1x (i.e. 10 + x). `slip`: the borrow
    is taken but never paid back in the next column (a sloppy teacher's solution)."""
    width = len(str(a))
    xs, ys = _digits_lsb(a, width), _digits_lsb(b, width)
    steps, borrow, out = [], 0, []
    for x, y in zip(xs, ys):
        d = x - borrow - y
        nb = d < 0
        d += 10 if nb else 0
        steps.append(f"{10 + x if nb else x}{'-1' if borrow else ''}-{y}={d}")
        out.append(d)
        borrow = 0 if slip else int(nb)
    answer = str(a - b) if not slip else str(int(_assemble(out)))
    return ",".join(steps), answer


def _mul_steps(a: int, d: int) -> Tuple[str, str]:
    """a times a single digit d."""
    steps, carry = [], 0
    for x in _digits_lsb(a, len(str(a))):
        p = x * d + carry
        steps.append(f"{x}*{d}{f'+{carry}' if carry else ''}={p}")
        carry = p // 10
    return ",".join(steps), str(a * d)


def solution(steps: str, answer: str) -> str:
    """A completion in R1-Zero's format."""
    return f"<think>{steps}</think> <answer>{answer}</answer>"


def arithmetic(rng: random.Random, digits: int = 2, ops: str = "+-", slip_rate: float = 0.0) -> Dict[str, str]:
    """One a+b, a-b or a*d question: a and b have up to `digits` digits, d is one digit (2-9).

    A negative difference swaps the operands first ("45>23,") and negates the result.
    `slip_rate`: the share of worked `solution`s (the cold-start SFT targets) written by a
    sloppy teacher who forgets carries and borrows; their final answers follow the faulty
    steps. The reference `answer` is always right, so a verifiable reward can teach a model
    more than its cold-start data did (as R1's RL improves on its cold start).
    """
    if not 0.0 <= slip_rate <= 1.0:
        raise TaskError(f"arithmetic: slip_rate must be in [0, 1], got {slip_rate}")
    op = rng.choice(ops)
    hi = 10 ** digits
    a = rng.randrange(hi)
    slip = slip_rate > 0 and rng.random() < slip_rate
    if op == "+":
        b = rng.randrange(hi)
        steps, ans = _add_steps(a, b, slip)
    elif op == "-":
        b = rng.randrange(hi)
        if a >= b:
            steps, ans = _sub_steps(a, b, slip)
        else:
            steps, ans = _sub_steps(b, a, slip)
            steps, ans = f"{b}>{a}," + steps, ("-" + ans if ans != "0" else ans)
    elif op == "*":
        b = rng.randrange(2, 10)
        steps, ans = _mul_steps(a, b)
    else:
        raise TaskError(f"arithmetic: unknown op {op!r} in ops={ops!r}; valid: + - *")
    true = str(a + b if op == "+" else a - b if op == "-" else a * b)
    return {"question": f"{a}{op}{b}", "answer": true, "solution": solution(steps, ans)}


def equation(rng: random.Random, max_x: int = 19, max_a: int = 9, max_b: int = 49) -> Dict[str, str]:
    """Solve a*x+b=c for x (a in 2..max_a, x in 0..max_x, b in 0..max_b): undo the addition,
    then the multiplication."""
    a, x, b = rng.randint(2, max_a), rng.randint(0, max_x), rng.randint(0, max_b)
    c = a * x + b
    steps = f"{c}-{b}={c - b},{c - b}/{a}={x}"
    return {"question": f"{a}x+{b}={c}", "answer": str(x), "solution": solution(steps, str(x))}


def gsm_symbolic(n: int, *, seed: int = 0, split: str = "train", language: str = "eng",
                 instruction: Optional[str] = None, max_tries: int = 400,
                 eval_ids: Optional[List[int]] = None) -> List[Dict[str, str]]:
    """GSM8K-format rows from the GSM-Symbolic templates (r1jax.gsm_symbolic): train rows are
    new instances with other numbers, eval rows the original GSM8K test questions (the first
    `n` of them, or those at `eval_ids`), so no evaluation question is ever trained on.
    `instruction`: a line put before every question (e.g. how to state the final answer)."""
    from r1jax import formats, gsm_symbolic as gs

    if split == "train":
        raw = gs.generate_rows(n, seed=seed, language=language, max_tries=max_tries)
    else:
        raw = gs.test_rows(language)
        if eval_ids is not None:
            bad = [i for i in eval_ids if not 0 <= int(i) < len(raw)]
            if bad:
                raise TaskError(f"gsm_symbolic: eval_ids {bad} out of range [0, {len(raw)})")
            raw = [raw[int(i)] for i in eval_ids]
        raw = raw[:n]
    rows, _ = formats.map_rows(raw, "gsm8k", name=f"gsm_symbolic/{language}")
    for r in rows:
        if instruction:
            r["question"] = f"{instruction}\n\n{r['question']}"
        r["task"] = "gsm_symbolic"
    return rows


# Row-at-a-time tasks (drawn with a seeded rng, split by a hash of the question) ...
TASKS: Dict[str, Callable[..., Dict[str, str]]] = {"arithmetic": arithmetic, "equation": equation}
# ... and tasks that make their own train and eval rows: fn(n, seed=, split=, **kwargs).
SPLIT_TASKS: Dict[str, Callable[..., List[Dict[str, str]]]] = {"gsm_symbolic": gsm_symbolic}


def _in_eval(question: str, seed: int, holdout: float) -> bool:
    # crc32 rather than hash(): Python's str hash is salted per process.
    return zlib.crc32(f"{seed}:{question}".encode()) % 100_000 < holdout * 100_000


def synthetic_rows(task: str, n: int, *, seed: int = 0, split: str = "train", holdout: float = 0.1,
                   **kwargs) -> List[Dict[str, str]]:
    """`n` rows of the built-in `task` for `split` ("train" or "eval").

    Train rows are drawn with replacement (a small problem space repeats); eval rows are
    distinct when the held-out space is big enough. No question appears in both splits.
    `holdout` is the share of the question space reserved for eval (SPLIT_TASKS keep their
    own evaluation questions apart and ignore it); extra keyword arguments go to the task
    (e.g. digits=2, ops="+-").
    """
    if task not in TASKS and task not in SPLIT_TASKS:
        raise TaskError(f"unknown synthetic task {task!r}; valid: {', '.join(sorted({**TASKS, **SPLIT_TASKS}))}")
    if split not in ("train", "eval"):
        raise TaskError(f"unknown split {split!r}; valid: train, eval")
    if task in SPLIT_TASKS:
        try:
            return SPLIT_TASKS[task](n, seed=seed, split=split, **kwargs)
        except TypeError as e:
            raise TaskError(f"synthetic task {task!r}: bad arguments {kwargs}: {e}") from None
    if not 0.0 < holdout < 1.0:
        raise TaskError(f"holdout must be in (0, 1), got {holdout}")
    fn = TASKS[task]
    try:
        fn(random.Random(0), **kwargs)
    except TypeError as e:
        raise TaskError(f"synthetic task {task!r}: bad arguments {kwargs}: {e}") from None
    rng = random.Random(f"{task}:{seed}:{split}")
    want_eval = split == "eval"
    rows: List[Dict[str, str]] = []
    seen = set()
    attempts, max_attempts = 0, 200 * max(n, 1) + 10_000
    while len(rows) < n and attempts < max_attempts:
        attempts += 1
        row = fn(rng, **kwargs)
        if _in_eval(row["question"], seed, holdout) != want_eval:
            continue
        if want_eval and row["question"] in seen:
            continue
        seen.add(row["question"])
        row["task"] = task
        rows.append(row)
    if not rows:
        raise TaskError(f"synthetic task {task!r} ({kwargs}) produced no {split} rows")
    return rows


__all__ = ["SPLIT_TASKS", "TASKS", "TaskError", "arithmetic", "equation", "gsm_symbolic", "solution",
           "synthetic_rows"]
