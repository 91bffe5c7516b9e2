"""RewardRunner: weights, None handling, per-sample isolation of errors and timeouts."""

import time
import warnings

import numpy as np
import pytest

from r1jax.config import RewardFnConfig, RewardsConfig, load_config
from r1jax.rewards import RewardRunner, resolve
from r1jax.rewards import format as format_reward


def raises_on_bad(completions, **kwargs):
    if completions[0] == "bad":
        raise ZeroDivisionError("boom")
    return [1.0]


def sleeps_on_slow(completions, **kwargs):
    if completions[0] == "slow":
        time.sleep(3)
    return [0.5]


def echo_column(completions, color=None, prompts=None, completion_ids=None, **kwargs):
    return [float(len(completion_ids[0])) if color[0] == "red" else None]


def returns_garbage(completions, **kwargs):
    return "not a list"


def with_knob(completions, *, scale=1.0, **kwargs):
    return [scale]


def _score(runner, comps, rows=None):
    n = len(comps)
    return runner.score(["prompt"] * n, comps, [[1, 2, 3]] * n, rows or [{}] * n)


def test_weights_total_and_metrics():
    cfg = RewardsConfig(functions=[
        RewardFnConfig("format", 1.0), RewardFnConfig("accuracy", 2.0),
        RewardFnConfig("format", 0.5, kwargs={"strict": False}, alias="format_lenient")])
    runner = RewardRunner(cfg)
    comps = ["<think>a</think><answer>\\boxed{4}</answer>", "x <think>a</think><answer>5</answer>",
             "nothing"]
    rows = [{"answer": "4"}, {"answer": "4"}, {"answer": None}]
    res = _score(runner, comps, rows)
    assert runner.names == ["format", "accuracy", "format_lenient"]
    np.testing.assert_array_equal(res.per_function["format"], [1, 0, 0])
    np.testing.assert_array_equal(res.per_function["accuracy"], [1, 0, np.nan])
    np.testing.assert_array_equal(res.per_function["format_lenient"], [1, 1, 0])
    np.testing.assert_allclose(res.total, [1 + 2 + 0.5, 0 + 0 + 0.5, 0])
    assert res.total.dtype == np.float32 and res.total.shape == (3,)
    assert res.metrics["reward/accuracy"] == 0.5  # the None sample is left out of the mean
    assert res.metrics["reward/accuracy/none"] == 1
    assert res.metrics["reward/format/errors"] == 0


def test_on_none_nan():
    cfg = RewardsConfig(functions=[RewardFnConfig("accuracy")], on_none="nan")
    res = _score(RewardRunner(cfg), ["\\boxed{1}", "\\boxed{1}"], [{"answer": "1"}, {}])
    assert res.total[0] == 1.0 and np.isnan(res.total[1])


def test_raising_function_names_the_sample():
    cfg = RewardsConfig(functions=[RewardFnConfig(f"{__name__}:raises_on_bad")])
    runner = RewardRunner(cfg)
    with pytest.warns(RuntimeWarning, match=r"'raises_on_bad' raised on sample 1: "
                                            r"ZeroDivisionError: boom"):
        res = _score(runner, ["ok", "bad", "ok"])
    np.testing.assert_array_equal(res.per_function["raises_on_bad"], [1, 0, 1])
    assert res.metrics["reward/raises_on_bad/errors"] == 1
    assert runner.counters["raises_on_bad/errors"] == 1
    runner.cfg.on_error = "none"
    with pytest.warns(RuntimeWarning):
        res = _score(runner, ["ok", "bad", "ok"])
    assert np.isnan(res.per_function["raises_on_bad"][1])
    assert res.metrics["reward/raises_on_bad/none"] == 1
    assert runner.counters["raises_on_bad/errors"] == 2


def test_timeout_is_per_sample():
    cfg = RewardsConfig(functions=[RewardFnConfig(f"{__name__}.sleeps_on_slow", timeout_s=0.5)],
                        num_workers=2)
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="timed out on sample 2"):
        res = _score(RewardRunner(cfg), ["a", "b", "slow", "c", "d", "e"])
    assert time.monotonic() - t0 < 2.5  # the stuck thread is abandoned and replaced
    np.testing.assert_array_equal(res.per_function["sleeps_on_slow"],
                                  [0.5, 0.5, 0, 0.5, 0.5, 0.5])
    assert res.metrics["reward/sleeps_on_slow/timeouts"] == 1


def test_columns_and_garbage():
    cfg = RewardsConfig(functions=[RewardFnConfig(f"{__name__}:echo_column"),
                                   RewardFnConfig(f"{__name__}:returns_garbage")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _score(RewardRunner(cfg), ["a", "b"], [{"color": "red"}, {"color": "blue"}])
    np.testing.assert_array_equal(res.per_function["echo_column"], [3, np.nan])
    np.testing.assert_array_equal(res.per_function["returns_garbage"], [0, 0])
    assert any("returned str" in str(w.message) for w in caught)


def test_kwargs_from_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"""
rewards:
  functions:
    - name: "{__name__}:with_knob"
      weight: 2.0
      kwargs: {{scale: 0.25}}
    - name: format
      kwargs: {{strict: false}}
""")
    cfg = load_config(str(path))
    res = _score(RewardRunner(cfg.rewards), ["x <think>a</think><answer>1</answer>"])
    assert res.total[0] == pytest.approx(2 * 0.25 + 1.0)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="unknown reward function 'acuracy'"):
        RewardRunner(RewardsConfig(functions=[RewardFnConfig("acuracy")]))
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        resolve("no_such_pkg.mod:fn")
    with pytest.raises(ValueError, match=r"'format': unknown kwargs \['stric'\]"):
        RewardRunner(RewardsConfig(functions=[RewardFnConfig("format", kwargs={"stric": 1})]))
    with pytest.raises(ValueError, match="on_error"):
        RewardRunner(RewardsConfig(on_error="explode"))
    with pytest.raises(ValueError, match="3 completions but 2 rows"):
        RewardRunner(RewardsConfig()).score(["p"] * 3, ["a"] * 3, [[1]] * 3, [{}] * 2)
    assert resolve("format") is format_reward


def nonfinite_by_text(completions, **kwargs):
    """NaN, +inf, -inf (as Python and numpy floats) selected by the completion's text."""
    return [{"nan": float("nan"), "inf": np.float32("inf"), "-inf": -np.inf}.get(completions[0], 0.25)]


@pytest.mark.parametrize("on_error", ["zero", "none"])
def test_nonfinite_score_is_a_failed_sample(on_error):
    cfg = RewardsConfig(functions=[RewardFnConfig(f"{__name__}:nonfinite_by_text", weight=2.0),
                                   RewardFnConfig("format", 1.0)], on_error=on_error)
    runner = RewardRunner(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _score(runner, ["ok", "nan", "inf", "ok", "-inf"])
    msgs = [str(w.message) for w in caught]
    for i, v in ((1, "nan"), (2, "inf"), (4, "-inf")):
        assert any(f"'nonfinite_by_text' returned a non-finite score on sample {i}: {v}" in m
                   for m in msgs), msgs
    s = res.per_function["nonfinite_by_text"]
    if on_error == "zero":
        np.testing.assert_array_equal(s, [0.25, 0, 0, 0.25, 0])
        assert res.metrics["reward/nonfinite_by_text"] == pytest.approx(0.1)
    else:
        np.testing.assert_array_equal(s[[0, 3]], [0.25, 0.25])
        assert np.isnan(s[[1, 2, 4]]).all()
        assert res.metrics["reward/nonfinite_by_text/none"] == 3
        assert res.metrics["reward/nonfinite_by_text"] == pytest.approx(0.25)
    # The total stays finite either way (on_none="zero"): no NaN reaches the advantages.
    assert np.isfinite(res.total).all()
    np.testing.assert_allclose(res.total, 2 * np.nan_to_num(s, nan=0.0))
    assert res.metrics["reward/nonfinite_by_text/nonfinite"] == 3
    assert res.metrics["reward/nonfinite_by_text/errors"] == 0
    assert res.metrics["reward/format/nonfinite"] == 0
    assert runner.counters["nonfinite_by_text/nonfinite"] == 3
