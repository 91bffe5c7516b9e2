"""Format, language-consistency and length rewards against hand-computed values."""

import math

import pytest

from r1jax.rewards import cosine_scaled, language_consistency, length, overlong_penalty
from r1jax.rewards import format as format_reward
from r1jax.rewards.language import count_words

GOOD = "<think>\n2 + 2 is 4\n</think>\n<answer>\n4\n</answer>"
STRICT_CASES = [
    (GOOD, 1.0),
    ("<think>a</think><answer>4</answer>", 1.0),
    ("  <think>a</think>  <answer> 4 </answer>\n", 1.0),
    ("<think></think><answer>4</answer>", 1.0),  # empty reasoning is still the format
    ("<think>a</think><answer> </answer>", 0.0),  # empty answer
    ("Sure! <think>a</think><answer>4</answer>", 0.0),  # text before
    ("<think>a</think><answer>4</answer> done", 0.0),  # text after
    ("<think>a</think> between <answer>4</answer>", 0.0),
    ("<think>a</think><answer>4</answer><answer>5</answer>", 0.0),  # repeated tag
    ("<think>a<think>b</think></think><answer>4</answer>", 0.0),  # nested
    ("<answer>4</answer><think>a</think>", 0.0),  # wrong order
    ("<think>a</think>", 0.0),
    ("<think>a<answer>4</answer>", 0.0),
    ("", 0.0),
]
LENIENT_CASES = [
    (GOOD, 1.0),
    ("Sure! <think>a</think> so <answer>4</answer> done", 1.0),
    ("<think>a</think><answer>4</answer><answer>5</answer>", 1.0),
    ("<answer>4</answer><think>a</think>", 0.0),
    ("<think>a</think> 4", 0.0),
    ("no tags", 0.0),
]


@pytest.mark.parametrize("text,want", STRICT_CASES)
def test_format_strict(text, want):
    assert format_reward([text]) == [want]


@pytest.mark.parametrize("text,want", LENIENT_CASES)
def test_format_lenient(text, want):
    assert format_reward([text], strict=False, answer=["ignored"], prompts=["p"]) == [want]


def test_format_variants():
    # The template put <think> in the prompt: the completion starts inside the reasoning.
    assert format_reward(["a</think><answer>4</answer>"], think_in_prompt=True) == [1.0]
    assert format_reward(["a</think><answer>4</answer>"]) == [0.0]
    # R1's later format: the answer is the text after </think>.
    assert format_reward(["<think>a</think> The answer is 4."], answer_tag=False) == [1.0]
    assert format_reward(["<think>a</think>  "], answer_tag=False) == [0.0]
    assert format_reward(["x <think>a</think> 4"], answer_tag=False, strict=False) == [1.0]


def test_count_words():
    assert count_words("Hello world, 2 + 2 = 4.") == {"latin": 2}
    assert count_words("我们来算一下") == {"han": 6}
    assert count_words("café naïve") == {"latin": 2}
    assert count_words("x是3") == {"latin": 1, "han": 1}
    assert count_words("Привет мир") == {"cyrillic": 2}
    assert count_words("123 + 456") == {}


def test_language_consistency_values():
    en = "<think>First add the numbers then divide</think><answer>4</answer>"
    zh = "<think>首先把数字相加</think><answer>4</answer>"
    mixed = "<think>First 我们 add</think><answer>4</answer>"  # 2 English words, 2 Han characters
    got = language_consistency([en, zh, mixed, mixed, zh], target="en",
                               language=[None, None, None, "zh", "zh"])
    assert got[0] == 1.0
    assert got[1] == 0.0
    assert got[2] == pytest.approx(0.5)
    assert got[3] == pytest.approx(0.5)
    assert got[4] == 1.0
    # Only the chain of thought counts: the Chinese answer does not lower the score.
    assert language_consistency(["<think>All English here</think><answer>答案</answer>"]) == [1.0]
    # The template opened <think> in the prompt.
    assert language_consistency(["just english words</think>中文"]) == [1.0]
    # No words at all: cannot be scored.
    assert language_consistency(["<think>1+1=2</think>"]) == [None]
    with pytest.raises(ValueError, match="klingon"):
        language_consistency(["<think>a</think>"], target="klingon")


def test_overlong_penalty_matches_dapo():
    lmax, lcache = 100, 20
    ids = [[0] * n for n in (0, 80, 90, 100, 101, 500)]
    got = overlong_penalty(["x"] * 6, completion_ids=ids, max_length=lmax, cache_length=lcache)
    want = [0.0, 0.0, (80 - 90) / 20, (80 - 100) / 20, -1.0, -1.0]
    assert got == pytest.approx(want)
    assert length(["x"] * 6, ids, max_length=lmax, cache_length=lcache) == pytest.approx(want)
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(["x"], max_length=10, cache_length=20)


def test_cosine_scaled():
    lmax = 100
    comps = ["\\boxed{4}", "\\boxed{4}", "\\boxed{5}", "\\boxed{5}", "\\boxed{4}", "\\boxed{4}"]
    ids = [[0] * n for n in (0, 100, 0, 100, 50, 101)]
    got = cosine_scaled(comps, ids, answer=["4"] * 6, max_length=lmax)
    assert got[0] == pytest.approx(2.0)  # correct and short: r_0^c
    assert got[1] == pytest.approx(1.0)  # correct at the limit: r_L^c
    assert got[2] == pytest.approx(-10.0)  # wrong and short: r_0^w
    assert got[3] == pytest.approx(0.0)  # wrong at the limit: r_L^w
    assert got[4] == pytest.approx(1.0 + 0.5 * (2.0 - 1.0) * (1 + math.cos(math.pi * 0.5)))
    assert got[5] == -10.0  # past the limit
    assert length(comps[:1], ids[:1], mode="cosine", answer=["4"], max_length=lmax) == [2.0]
