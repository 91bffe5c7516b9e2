"""Reward throughput: completions scored per second, maths and code, through RewardRunner.

    python benchmarks/rewards.py [--maths 512] [--code 64] [--tests 5] [--workers 8]

Maths: R1's default rewards (accuracy + format, equal weight) on synthetic completions whose
final answers take the forms a policy writes (integers, fractions, decimals, LaTeX, sets,
intervals, percentages), half right and half wrong, each with a few hundred characters of
reasoning. Code: the code reward on completions solving a stdin/stdout task with `--tests`
tests each (a mix of correct, wrong and crashing programs), each test a separate sandboxed
process. The math-verify workers and the sandbox probe are warmed up first (a trainer pays
that once per run). Prints one JSON line.
"""

import argparse
import json
import os
import random
import time

from r1jax.config import RewardFnConfig, RewardsConfig
from r1jax.rewards import RewardRunner
from r1jax.rewards.code import get_sandbox


def random_answer(rng):
    """(reference, right prediction, wrong prediction) in a random form with random numbers,
    so that no cache inside math-verify flatters the figure."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    form = rng.randrange(8)
    if form == 0:
        return str(a), str(a), str(a + 1)
    if form == 1:
        return f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\frac{{{b}}}{{{a + b}}}"
    if form == 2:
        return f"{a / 4}", f"\\frac{{{a}}}{{4}}", f"{a / 4 + 0.5}"
    if form == 3:
        return f"{c}\\sqrt{{{a}}}", f"\\sqrt{{{c * c * a}}}", f"{c + 1}\\sqrt{{{a}}}"
    if form == 4:
        return f"\\{{{a},{b}\\}}", f"\\{{{b},{a}\\}}", f"\\{{{a},{b + 100}\\}}"
    if form == 5:
        return f"[{a},{a + b})", f"[{a},{a + b})", f"({a},{a + b})"
    if form == 6:
        return f"{a}\\%", f"{a / 100}", f"{a / 10}"
    return f"x^2+{a}x", f"x(x+{a})", f"x^2-{a}x"


REASONING = ("Let me think step by step. First, write down what is given and what is asked. "
             "Then simplify the expression and check the result by substituting it back. ")

SOLVE = "a, b = map(int, input().split())\nprint(a + b)"
WRONG = "a, b = map(int, input().split())\nprint(a - b)"
CRASH = "a, b = map(int, input().split())\nprint(a + b)\nraise RuntimeError('oops')"


def maths_batch(n, rng):
    comps, rows = [], []
    for i in range(n):
        gold, right, wrong = random_answer(rng)
        pred = right if i % 2 == 0 else wrong
        comps.append(f"<think>{REASONING * 3}</think> <answer>The answer is "
                     f"$\\boxed{{{pred}}}$</answer>")
        rows.append({"answer": gold})
    return comps, rows


def code_batch(n, n_tests, rng):
    comps, rows = [], []
    for i in range(n):
        prog = (SOLVE, SOLVE, WRONG, CRASH)[i % 4]
        comps.append(f"<think>{REASONING}</think>\n```python\n{prog}\n```")
        tests = []
        for _ in range(n_tests):
            a, b = rng.randint(-99, 99), rng.randint(-99, 99)
            tests.append({"input": f"{a} {b}\n", "output": f"{a + b}\n"})
        rows.append({"tests": tests})
    return comps, rows


def run(runner, comps, rows):
    n = len(comps)
    t0 = time.perf_counter()
    res = runner.score(["prompt"] * n, comps, [[0] * 100] * n, rows)
    return time.perf_counter() - t0, res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maths", type=int, default=512)
    ap.add_argument("--code", type=int, default=64)
    ap.add_argument("--tests", type=int, default=5)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    rng = random.Random(0)

    maths = RewardRunner(RewardsConfig(
        functions=[RewardFnConfig("accuracy", 1.0), RewardFnConfig("format", 1.0)],
        num_workers=args.workers))
    comps, rows = maths_batch(args.maths, rng)
    run(maths, comps[:16], rows[:16])  # warm-up: math-verify worker processes start
    maths_s, res = run(maths, comps, rows)
    acc = res.metrics["reward/accuracy"]

    coder = RewardRunner(RewardsConfig(functions=[RewardFnConfig("code")],
                                       num_workers=args.workers))
    isolation = get_sandbox().isolation  # warm-up: the isolation probe
    comps, rows = code_batch(args.code, args.tests, rng)
    code_s, res = run(coder, comps, rows)
    print(json.dumps({
        "benchmark": "rewards",
        "maths_completions": args.maths,
        "maths_completions_per_s": round(args.maths / maths_s, 1),
        "maths_seconds": round(maths_s, 2),
        "maths_accuracy_mean": round(acc, 3),  # 0.5 by construction
        "code_completions": args.code,
        "code_tests_per_completion": args.tests,
        "code_completions_per_s": round(args.code / code_s, 2),
        "code_seconds": round(code_s, 2),
        "code_reward_mean": round(res.metrics["reward/code"], 3),  # 0.5 by construction
        "sandbox_isolation": isolation,
        "workers": args.workers,
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
