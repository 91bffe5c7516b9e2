"""The cost model: R1's table from its hours, recipe projections, the `r1jax cost` command."""

import dataclasses

import pytest

from r1jax import cost, hardware, study
from r1jax.config import load_config


def test_published_table_is_reproduced_exactly_from_its_hours():
    t = cost.published_table()
    got = {r["phase"]: (r["gpu_hours"], r["dollars"]) for r in t["rows"]}
    assert got == cost.PUBLISHED_PRINTED
    rows = {r["phase"]: r for r in t["rows"]}
    # From the hours: 512 GPUs x 198 h and x 80 h; the SFT data's 5K GPU-h as published.
    assert rows["DeepSeek-R1-Zero"]["gpu_hours_exact"] == 512 * 198
    assert rows["DeepSeek-R1"]["gpu_hours_exact"] == 512 * 80
    # The published dollars are the rounded hours x $2 (unrounded: $202.75K and $294.67K).
    assert rows["total"]["dollars_k"] == 294 and 2 * rows["total"]["gpu_hours_exact"] / 1e3 > 294.5
    text = cost.format_table(t)
    for hours, dollars in cost.PUBLISHED_PRINTED.values():
        assert hours in text and dollars in text


def _tiny_recipe(**kw):
    r = dict(name="t", model="configs/model/qwen2.5-math-1.5b.yaml", updates=32,
             prompts_per_rollout=8, group_size=4, num_minibatches=4, prompt_len=64,
             length_curve=((0, 200),), max_len=512, profile="h200", devices=8)
    r.update(kw)
    return cost.Recipe(**r)


def test_projection_is_the_sum_of_its_parts_and_scales():
    r = _tiny_recipe()
    p = cost.project(r)
    assert p["rollouts"] == 8
    assert p["wall_hours"] == pytest.approx(sum(p["part_hours"].values()))
    assert p["gpu_hours"] == pytest.approx(8 * p["wall_hours"])
    assert p["dollars"] is None  # no price assumed for the H200 profile
    priced = cost.project(r, rate=3.0)
    assert priced["dollars"] == pytest.approx(3.0 * priced["gpu_hours"])
    double = cost.project(dataclasses.replace(r, updates=64))
    assert double["wall_hours"] == pytest.approx(2 * p["wall_hours"])
    sync = cost.project(dataclasses.replace(r, decode="synchronous"))
    assert sync["part_hours"]["decode"] > 2 * p["part_hours"]["decode"]  # 512 steps vs 200
    assert 0 < p["utilisation"] < 1
    calibrated = cost.project(r, calibration={"update": 2.0})
    assert calibrated["part_hours"]["update"] == pytest.approx(2 * p["part_hours"]["update"])


def test_decode_step_seconds_follow_the_roofline_by_hand():
    # A dense model's decode step on one H200: memory bound; bytes = weights + the KV cache
    # read (prompt once per prompt, completions per sample) + a few activations.
    r = _tiny_recipe(devices=1)
    m = dataclasses.replace(load_config("configs/model/qwen2.5-math-1.5b.yaml", []).model, remat="full")
    parts = cost.part_seconds(m, r, hardware.get("h200"), 200, hardware.DEFAULT_ASSUMPTIONS)
    d = parts["decode"]
    weights = 2 * study.param_counts(m)["total"]
    kv_tok = m.num_layers * 2 * m.num_kv_heads * (m.hidden_size // m.num_heads) * 2
    context = 64 + 100  # continuous batching: on average half-way through 200 tokens
    kv = (8 * 64 + 32 * (context - 64)) * kv_tok
    acts = 32 * m.hidden_size * 2 * 4
    by_hand = (weights + kv + acts) / (4.8e12 * 0.6)
    assert d["bound"] == "memory" and d["calls"] == 200
    assert d["seconds_per_call"] == pytest.approx(by_hand, rel=1e-6)


def test_r1_zero_projection_and_implied_utilisation():
    p = cost.project(cost.RECIPES["r1-zero"])
    assert p["rollouts"] == 650 and p["decode_model_parallel"] == 32
    assert p["dollars"] == pytest.approx(2.0 * p["gpu_hours"])
    u = cost.implied_utilisation(cost.RECIPES["r1-zero"], 101000)
    assert u["model_flops"] == pytest.approx(p["model_flops"])
    assert u["utilisation"] == pytest.approx(
        p["model_flops"] / (101000 * 3600 * hardware.PROFILES["h800"].peak_flops))
    text = cost.format_projection(p)
    assert "assumptions" in text and "matmul 40%" in text


def test_bad_recipes_fail_in_one_line():
    with pytest.raises(ValueError, match="num_minibatches=3"):
        _tiny_recipe(num_minibatches=3)
    with pytest.raises(ValueError, match="decode must be"):
        _tiny_recipe(decode="paged")
    with pytest.raises(ValueError, match="neither a config file"):
        cost.model_config("gpt-5")


def test_cost_command(capsys):
    from r1jax import cli

    assert cli.main(["cost"]) == 0
    out = capsys.readouterr().out
    for hours, dollars in cost.PUBLISHED_PRINTED.values():
        assert hours in out and dollars in out
    assert "implies a model-FLOPs utilisation" in out and "Projection" in out
    assert cli.main(["cost", "--recipe", "r1-zero-qwen7b-h200x8", "--length", "0:400,10400:800",
                     "--efficiency", "decode.hbm=0.8"]) == 0
    out = capsys.readouterr().out
    assert "8 x h200" in out and "HBM 80%" in out
    assert cli.main(["cost", "--recipe", "nope"]) == 1
    err = capsys.readouterr().err
    assert "--recipe" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["cost", "--length", "x:1"]) == 1
    assert "--length" in capsys.readouterr().err
