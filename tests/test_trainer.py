"""The training loop in-process (as nanodo's train test): a few updates through Trainer.run,
resumed mid-rollout without building a model, the visible effect of a reference reset, the
cached log pi_old of later mini-batches, and the non-finite guard."""

import json
import os

import numpy as np
import pytest

from r1jax import checkpoint as ckpt_lib
from r1jax import grpo
from r1jax import trainer as trainer_lib
from r1jax.config import ConfigError, load_config

pytestmark = pytest.mark.slow  # whole rollouts / runs compile the sampler and update

# 4 prompts x G 4 per rollout, 2 mini-batches (2 updates per rollout), on the 8 fake devices.
TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
    "model.num_kv_heads=1", "model.max_position_embeddings=64",
    "data.template=none", "data.max_prompt_len=16", "data.synthetic_kwargs={digits: 1, ops: '+'}",
    "sampler.max_new_tokens=8", "sampler.prompt_buckets=[16]", "sft.steps=0", "eval.num_prompts=0",
    "grpo.group_size=4", "grpo.num_minibatches=2", "grpo.beta=0.01", "grpo.ref_reset_every=4",
    "train.prompts_per_rollout=4", "train.lr=1e-2", "run.progress=false", "run.tensorboard=false",
    "run.plots=false", "rewards.functions=[{name: 'test_trainer:first_token_parity'}]",
]


def first_token_parity(completions, completion_ids=None, **_):
    """A reward a random model earns half the time: a gradient signal from the first update."""
    return [float(ids[0] % 2) if len(ids) else 0.0 for ids in completion_ids]


def _cfg(run_dir, *extra):
    return load_config(None, [*TINY, f"run.dir={run_dir}", *extra])


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """3 updates (the last checkpoint falls inside rollout 2), then the same run dir continued
    to 6 updates by a Trainer that must not build a model (it restores one)."""
    run = str(tmp_path_factory.mktemp("trainer") / "run")
    first = trainer_lib.train(_cfg(run, "train.steps=3", "checkpoint.every=3"))
    assert first["steps"] == 3

    def no_fresh_model(*a, **k):
        raise AssertionError("a resumed run built a fresh model")

    original = trainer_lib.build_model
    trainer_lib.build_model = no_fresh_model
    try:
        t = trainer_lib.Trainer(_cfg(run, "train.steps=6", "checkpoint.every=3"))
        seen = []
        t.add_hook(lambda loop: seen.append((loop.step, loop.cursor[:2], loop.new_rollout)), every=1)
        summary = t.run()
    finally:
        trainer_lib.build_model = original
    return run, summary, seen


def test_run_resumes_mid_rollout_without_building_a_model(resumed_run):
    run, summary, seen = resumed_run
    assert summary["steps"] == 6
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # The resumed loop finished rollout 1 (index 1) from the checkpoint, then drew rollout 2;
    # the user hook ran after every update with the loop's cursor.
    assert seen == [(4, [1, 2], False), (5, [2, 1], True), (6, [2, 2], False)]
    assert [r["rollout"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert ckpt_lib.list_steps(os.path.join(run, "checkpoints")) == [3, 6]
    for r in rows:
        for key in ("reward/mean", "kl", "entropy", "loss/policy", "clip/region", "grad_norm", "lr",
                    "update/ratio_mean", "time/update", "time/step"):
            assert key in r, key
        assert r["update/finite"] == 1.0


def test_later_minibatches_use_the_cached_logp_old(resumed_run):
    rows = _rows(resumed_run[0])
    for first, second in ((rows[0], rows[1]), (rows[2], rows[3])):
        # First update of a rollout: pi_theta is pi_old, every ratio is 1 (float rounding).
        assert abs(first["update/ratio_min"] - 1) < 1e-4 and abs(first["update/ratio_max"] - 1) < 1e-4
        # The second one scores the same rollout's log pi_old after an update: ratios moved.
        assert second["update/ratio_max"] - second["update/ratio_min"] > 1e-3


def test_reference_reset_shows_in_the_next_rollout(resumed_run):
    rows = _rows(resumed_run[0])
    # ref_reset_every=4 = 2 rollouts: rollout 2 (updates 5-6) is scored against the policy after
    # update 4, so the first update of that rollout has KL 0 (reference = policy), while
    # rollout 1's first update (3) still measured KL to the initial policy.
    assert rows[2]["kl"] > 1e-6
    assert rows[4]["kl"] < rows[2]["kl"] * 1e-2
    assert rows[5]["kl"] > rows[4]["kl"]


def test_ref_reset_every_must_be_a_multiple_of_the_updates_per_rollout(tmp_path):
    with pytest.raises(ValueError, match=r"grpo.ref_reset_every=3 is not a multiple of the 2 updates"):
        grpo.Geometry.from_config(_cfg(tmp_path, "grpo.ref_reset_every=3"))
    grpo.Geometry.from_config(_cfg(tmp_path, "grpo.ref_reset_every=3", "grpo.beta=0"))  # no reference
    with pytest.raises((ValueError, ConfigError), match="num_minibatches"):
        grpo.Geometry.from_config(_cfg(tmp_path, "grpo.num_minibatches=3"))


def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """A poisoned rollout (NaN advantages, as a NaN reward would give) from the second rollout
    on: its updates are not applied, not checkpointed, and the second one in a row stops."""
    real = grpo.group_advantages
    calls = []

    def poisoned(r, **kw):
        calls.append(1)
        adv = np.asarray(real(r, **kw))
        return adv * np.nan if len(calls) > 1 else adv

    monkeypatch.setattr(grpo, "group_advantages", poisoned)
    run = str(tmp_path / "run")
    with pytest.raises(trainer_lib.NonFiniteError) as err:
        trainer_lib.train(_cfg(run, "train.steps=6", "checkpoint.every=1", "train.max_nonfinite_updates=1"))
    msg = str(err.value)
    assert "\n" not in msg and "stopped at update 4" in msg and "train.max_nonfinite_updates=1" in msg
    rows = _rows(run)
    assert [r["update/finite"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    ckpt_dir = os.path.join(run, "checkpoints")
    assert ckpt_lib.list_steps(ckpt_dir) == [1, 2]  # the last good checkpoint stays the latest
    embed = ckpt_lib.read_array(ckpt_dir, 2, "params/embed")
    assert np.isfinite(embed).all()


@pytest.mark.parametrize("change,named", [
    (["train.rollout_mode=async"], "train.rollout_mode='sync' (now 'async')"),
    (["grpo.beta=0"], "grpo.beta=0.01 (now 0"),
])
def test_resume_under_settings_that_change_the_checkpoint_layout_is_one_line(resumed_run, tmp_path, change, named):
    """A sync run resumed in async mode (in-flight rollouts) or without a reference would fail
    inside Orbax's restore (and report every step unusable): one line naming the settings, and
    the checkpoints are left as they were."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(resumed_run[0], run)
    steps = ckpt_lib.list_steps(os.path.join(run, "checkpoints"))
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        trainer_lib.Trainer(_cfg(run, "train.steps=9", *change)).run()
    msg = str(e.value)
    assert "\n" not in msg and named in msg and "change what a checkpoint holds" in msg, msg
    assert ckpt_lib.list_steps(os.path.join(run, "checkpoints")) == steps
