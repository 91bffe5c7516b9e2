"""Maths accuracy: answer extraction and math-verify equivalence on a table of answer pairs."""

import time

import pytest

from r1jax.rewards import accuracy, extract_answer, is_equivalent
from r1jax.rewards.accuracy import MathPool, MathTimeout

# (reference, prediction): equal
EQUAL = [
    ("\\frac{1}{2}", "0.5"), ("1/2", "\\frac12"), ("0.5", "\\dfrac{1}{2}"),
    ("\\frac{3}{4}", "0.75"),
    ("\\frac{6}{8}", "\\frac{3}{4}"), ("2/4", "0.5"), ("-\\frac{1}{3}", "-1/3"),
    ("\\frac{-2}{3}", "-\\frac{2}{3}"), ("1/3", "0.3333333"), ("3", "3.0"), ("3", "3.000"),
    ("-7", "-7"), ("-7", "-7.0"), ("0", "-0"), ("1000", "1,000"), ("1000000", "10^6"),
    ("\\sqrt{2}", "2^{1/2}"), ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"), ("\\sqrt{12}", "2\\sqrt3"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"), ("50\\%", "0.5"), ("25\\%", "\\frac14"),
    ("12.5\\%", "0.125"), ("\\{1,2\\}", "\\{2,1\\}"), ("\\{1,2,3\\}", "\\{3,2,1\\}"),
    ("[1,2)", "[1,2)"), ("(-\\infty, 3]", "(-\\infty,3]"), ("(0,1)\\cup(2,3)", "(2,3)\\cup(0,1)"),
    ("\\text{Paris}", "Paris"), ("Paris", "paris"), ("x=3", "3"), ("10\\text{ cm}", "10"),
    ("2+3i", "3i+2"), ("2\\pi", "\\pi\\cdot 2"), ("x^2+2x+1", "(x+1)^2"), ("\\frac{x}{2}", "0.5x"),
    ("e^{0}", "1"), ("\\boxed{5}", "5"), ("90^\\circ", "90"), ("(1,2)", "(1, 2)"), ("\\$5", "5"),
    ("5", "\\text{5}"),
]
# (reference, prediction): not equal
DIFFERENT = [
    ("-3", "3"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("0.5", "0.05"), ("1/3", "0.33"),
    ("[1,2)", "(1,2)"), ("[1,2]", "[1,2)"), ("(1,2)", "(2,1)"), ("\\{1,2\\}", "\\{1,3\\}"),
    ("Paris", "London"), ("\\sqrt{2}", "2"), ("\\sqrt{2}", "1.41"), ("\\pi", "3.14"), ("2", "-2"),
    ("x+1", "x-1"), ("12", "21"), ("50\\%", "0.05"), ("1000", "100"),
    ("\\frac{3}{4}", "\\frac{4}{3}"), ("(-\\infty, 3]", "(-\\infty, 3)"),
    ("\\text{yes}", "\\text{no}"), ("2+3i", "2-3i"), ("x^2", "2x"), ("7", "7.1"), ("0", "1"),
]


def test_table_size():
    assert len(EQUAL) + len(DIFFERENT) >= 50


def test_equivalence_table():
    # Through the public reward on whole completions, so extraction is exercised too.
    comps = [f"<think>work</think><answer>The answer is $\\boxed{{{p}}}$.</answer>"
             for _, p in EQUAL + DIFFERENT]
    golds = [g for g, _ in EQUAL + DIFFERENT]
    got = accuracy(comps, answer=golds)
    want = [1.0] * len(EQUAL) + [0.0] * len(DIFFERENT)
    wrong = [(g, p, s) for (g, p), s, w in zip(EQUAL + DIFFERENT, got, want) if s != w]
    assert not wrong, wrong


def test_extraction_nested_boxed_last_wins():
    assert extract_answer("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
    assert extract_answer("first \\boxed{1} then \\boxed{2}") == "2"
    assert extract_answer("\\boxed{1} <answer>7</answer>") == "7"
    assert extract_answer("<answer>7</answer> wait, \\boxed{8}") == "8"
    assert extract_answer("<answer>x is \\boxed{3}</answer>") == "3"
    assert extract_answer("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_answer("unclosed \\boxed{1") is None
    assert extract_answer("no answer here") is None
    assert extract_answer("Final: 42", pattern=r"Final:\s*(\S+)") == "42"
    assert extract_answer("\\boxed{1} Final: 42", pattern=r"Final:\s*(\S+)") == "42"
    assert extract_answer("\\boxed{1}", sources=("answer_tag",)) is None


def test_accuracy_rows():
    comps = ["\\boxed{4}", "no final answer: 4", "\\boxed{5}", "\\boxed{4}", "ANSWER 4"]
    got = accuracy(comps, answer=["4", "4", "4", None, "4"], prompts=["p"] * 5,
                   completion_ids=[[1]] * 5)
    assert got == [1.0, 0.0, 0.0, None, 0.0]
    assert accuracy(["ANSWER 4"], answer=["4"], pattern=r"ANSWER (\d+)") == [1.0]
    with pytest.raises(ValueError, match="answer"):
        accuracy(["\\boxed{1}"])


def test_inline_mode_in_main_thread():
    assert is_equivalent("\\frac12", "0.5", workers=0)
    assert not is_equivalent("\\frac12", "0.6", workers=0)


def test_hang_is_killed_and_pool_recovers():
    pool = MathPool(1)
    req = {"gold": "5", "pred": "5", "timeout": 5, "float_rounding": 6}
    assert pool.ask(req, 60.0)["ok"] is True  # the worker is up (imports done)
    t0 = time.monotonic()
    slow = dict(req, gold="(x+1)^{40}", pred="(x+2)^{40}")  # ~1 s of sympy
    with pytest.raises(MathTimeout):
        pool.ask(slow, 0.05)  # overruns: the worker is killed
    assert time.monotonic() - t0 < 5
    assert pool.ask(req, 60.0)["ok"] is True  # a fresh worker took its place
    pool.close()


def test_power_tower_does_not_hang():
    t0 = time.monotonic()
    try:
        got = accuracy(["\\boxed{9^{9^{9^{9}}}}"], answer=["5"], timeout_s=1)
        assert got == [0.0]
    except MathTimeout:
        pass
    assert time.monotonic() - t0 < 15


def test_gsm8k_and_plain_text_sources():
    gsm = ["boxed", "answer_tag", "gsm8k", "last_number"]
    assert extract_answer("so 48 + 24 = 72\n#### 72", sources=["gsm8k"]) == "72"
    assert extract_answer("#### 1,234.", sources=["gsm8k"]) == "1234"
    assert extract_answer("She pays $1,250.50 in all.", sources=gsm) == "1250.50"
    assert extract_answer("3 apples, so the answer is 12.", sources=gsm) == "12"
    # last_number is only a fallback: a box or a tag wins, even before later numbers.
    assert extract_answer("\\boxed{\\frac{1}{2}} after 3 steps", sources=gsm) == "\\frac{1}{2}"
    assert extract_answer("<answer>7</answer> (checked in 2 ways)", sources=gsm) == "7"
    assert extract_answer("no numbers here", sources=gsm) is None
    assert extract_answer("answer is 5", sources=["boxed"]) is None  # not a default source
    with pytest.raises(ValueError, match="sources must be a list of boxed, answer_tag, gsm8k, last_number"):
        extract_answer("x", sources=["boxd"])
    with pytest.raises(ValueError, match="got 'boxed'"):
        accuracy([], answer=[], sources="boxed")


def test_gsm8k_reference_is_read_by_its_final_number():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    got = accuracy(["The total is 72.", "The total is 24.", "\\boxed{72}"], answer=[ref] * 3,
                   sources=["boxed", "last_number"], workers=0)
    assert got == [1.0, 0.0, 1.0]


def test_run_settings_follow_the_accuracy_reward():
    from r1jax.config import RewardFnConfig
    from r1jax.rewards.accuracy import run_settings

    fns = [RewardFnConfig("format"), RewardFnConfig("accuracy", kwargs={"sources": ["gsm8k"], "timeout_s": 3})]
    assert run_settings(fns) == {"sources": ["gsm8k"]}
    assert run_settings([RewardFnConfig("format")]) == {}
