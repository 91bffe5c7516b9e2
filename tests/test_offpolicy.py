"""Asynchronous off-policy rollouts (r1jax.offpolicy) through Trainer.run, in-process, on the 8
fake devices split 4 (training) + 4 (sampling): the staleness schedule with a slowed sampler,
async max_staleness=0 against sync sampling on 4 devices, an exact resume from a checkpoint
holding in-flight rollouts, weights reaching the sampling mesh without a host copy; the
bfloat16 sampler (sampler.dtype) against the float32 trainer rides on the sync comparison."""

import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

from r1jax import checkpoint as ckpt_lib
from r1jax import offpolicy
from r1jax import rollout as rollout_lib
from r1jax import trainer as trainer_lib
from r1jax.config import load_config

pytestmark = pytest.mark.slow  # whole runs compile the sampler and the update

# 4 prompts x G 4 per rollout, 2 mini-batches (2 updates per rollout); beta > 0 so the
# reference log-probs are the trainer's part of an async rollout. Every run samples with the
# bfloat16 sampler against the float32 trainer (pi_old recomputed in float32, TIS): the
# mismatch case, and one set of programs for the compilation cache to share.
TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=2",
    "model.num_kv_heads=1", "model.max_position_embeddings=64",
    "data.template=none", "data.max_prompt_len=16", "data.synthetic_kwargs={digits: 1, ops: '+'}",
    "sampler.max_new_tokens=6", "sampler.prompt_buckets=[16]", "sft.steps=0", "eval.num_prompts=0",
    "grpo.group_size=4", "grpo.num_minibatches=2", "grpo.beta=0.01", "grpo.ref_reset_every=0",
    "train.prompts_per_rollout=4", "train.lr=1e-2", "run.progress=false", "run.tensorboard=false",
    "run.plots=false", "rewards.functions=[{name: 'test_offpolicy:slow_parity'}]",
    "sampler.dtype=bfloat16", "grpo.recompute_logp_old=true", "grpo.rollout_correction=tis",
]
SLOW_S = 0.0  # set by a test: seconds each reward call sleeps (slows the sampler thread)


def slow_parity(completions, completion_ids=None, **_):
    """A reward a random model earns half the time; sleeps SLOW_S (the sampler's side)."""
    time.sleep(SLOW_S)
    return [float(ids[0] % 2) if len(ids) else 0.0 for ids in completion_ids]


@pytest.fixture(scope="module", autouse=True)
def shared_compiles(tmp_path_factory):
    """The module's four runs compile the same tiny programs (one model, 4-device meshes): a
    persistent compilation cache for this module only lets the later runs load them. Restored
    (and JAX's once-per-process cache check reset) afterwards, so no other test sees it."""
    from jax.experimental.compilation_cache import compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0), strict=True):
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


def _cfg(run_dir, *extra):
    return load_config(None, [*TINY, f"run.dir={run_dir}", *extra])


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run(cfg, devices=None, slow_trainer_s=0.0):
    """Trainer.run with a hook recording each new rollout's tokens and the final params."""
    t = trainer_lib.Trainer(cfg, devices=devices)
    seen = {"tokens": {}, "params": None}

    def hook(loop):
        if loop.new_rollout:
            seen["tokens"][loop.cursor[0]] = np.asarray(jax.device_get(loop.rollout["completion_ids"]))
        seen["params"] = loop.state.params
        time.sleep(slow_trainer_s)

    t.add_hook(hook, every=1)
    summary = t.run()
    return t, summary, seen


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    """max_staleness=1, a sampler slowed by its rewards, 6 updates = 3 rollouts; checkpoints at
    3 (inside rollout 1, rollout 2 in flight) and 6."""
    global SLOW_S
    run = str(tmp_path_factory.mktemp("offpolicy") / "async")
    SLOW_S = 0.2
    try:
        out = _run(_cfg(run, "train.rollout_mode=async", "train.max_staleness=1", "train.steps=6",
                        "checkpoint.every=3"))
    finally:
        SLOW_S = 0.0
    return run, out


def test_staleness_follows_the_schedule_with_a_slow_sampler(async_run):
    run, (t, summary, _) = async_run
    assert summary["steps"] == 6
    assert [d.id for d in t.mesh.devices.flat] == [0, 1, 2, 3]
    assert [d.id for d in t.sample_mesh.devices.flat] == [4, 5, 6, 7]
    rows = _rows(run)
    for r in rows:
        k = r["rollout"]
        assert r["offpolicy/version"] == offpolicy.producing_version(k, 1) == max(0, k - 1)
        assert 0 <= r["offpolicy/staleness"] <= 1
        for key in ("time/trainer_wait_rollout", "time/sampler_wait_weights"):
            assert r[key] >= 0, key
    assert [r["offpolicy/staleness"] for r in rows] == [0, 0, 1, 1, 1, 1]
    # Rollout 0 cannot start before the trainer pushes version 0: the trainer waits at least
    # its slowed rewards (0.2 s per reward call).
    assert rows[0]["time/trainer_wait_rollout"] > 0.2


def test_resume_from_inflight_checkpoint_is_exact(async_run, tmp_path):
    """Killed after update 3 (its checkpoint holds rollout 1's rest and rollout 2, drawn by
    version 1, in flight): a resumed run ends where the uninterrupted one did, bitwise."""
    run, (_, _, seen) = async_run
    ckpt = os.path.join(run, "checkpoints")
    assert ckpt_lib.list_steps(ckpt) == [3, 6]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    _, summary, seen2 = _run(_cfg(resumed, "train.rollout_mode=async", "train.max_staleness=1",
                                  "train.steps=6", "checkpoint.every=3"))
    assert summary["steps"] == 6
    a, b = _rows(run), _rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a[3:], b[3:], strict=True):
        for key in ("loss/policy", "reward/mean", "kl", "grad_norm", "offpolicy/version", "offpolicy/staleness"):
            assert ra[key] == rb[key], (ra["step"], key)
    np.testing.assert_array_equal(seen["tokens"][2], seen2["tokens"][2])
    np.testing.assert_array_equal(ckpt_lib.read_array(ckpt, 6, "params/embed"),
                                  ckpt_lib.read_array(os.path.join(resumed, "checkpoints"), 6, "params/embed"))
    pa = jax.tree.leaves(jax.device_get(seen["params"]))
    pb = jax.tree.leaves(jax.device_get(seen2["params"]))
    for x, y in zip(pa, pb, strict=True):
        np.testing.assert_array_equal(x, y)


def test_weights_reach_the_sampling_mesh_without_a_host_copy(async_run):
    _, (t, _, seen) = async_run
    params = seen["params"]
    with jax.transfer_guard_device_to_host("disallow_explicit"), \
            jax.transfer_guard_host_to_device("disallow_explicit"):
        t.rollouts.push(99, params)
        moved = jax.block_until_ready(t.rollouts._versions[99])
        with pytest.raises(Exception, match="[Dd]isallowed"):  # the guard does catch a host copy
            jax.device_get(jax.tree.leaves(moved)[0] * 2)  # (a fresh array: no cached host copy)
    sampling = {d.id for d in t.sample_mesh.devices.flat}
    for x, y in zip(jax.tree.leaves(moved), jax.tree.leaves(params), strict=True):
        assert {d.id for d in x.sharding.device_set} == sampling
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_async_max_staleness_0_equals_sync_on_the_sampling_mesh_size(tmp_path, devices):
    """Both with the bfloat16 sampler (sampler.dtype) against the float32 trainer, pi_old
    recomputed in float32 and TIS: the same tokens and rewards, losses within fp32 rounding, and
    the mismatch statistics see the sampler/trainer gap."""
    extra = ("train.steps=4", "checkpoint.every=0")
    s_run, a_run = str(tmp_path / "sync"), str(tmp_path / "async")
    t, _, s = _run(_cfg(s_run, *extra), devices=devices[:4])
    assert t.collector.sampler is not t.sampler and t.collector.sampler.graphdef != t.graphdef
    p = rollout_lib.sampler_params(s["params"], "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(p)} == {np.dtype("bfloat16")}
    _, _, a = _run(_cfg(a_run, "train.rollout_mode=async", "train.max_staleness=0", *extra))
    assert sorted(s["tokens"]) == sorted(a["tokens"]) == [0, 1]
    for r in (0, 1):
        np.testing.assert_array_equal(s["tokens"][r], a["tokens"][r])
    rs, ra = _rows(s_run), _rows(a_run)
    for x, y in zip(rs, ra, strict=True):
        assert x["reward/mean"] == y["reward/mean"]
        assert y["offpolicy/staleness"] == 0
        assert x["update/mismatch/kl_k3"] > 0 and x["update/mismatch/ratio_max"] > x["update/mismatch/ratio_min"]
        for key in ("loss/policy", "kl", "grad_norm", "update/mismatch/kl_k3"):
            np.testing.assert_allclose(x[key], y[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_async_needs_two_devices_and_one_process(tmp_path, devices):
    cfg = _cfg(str(tmp_path / "run"), "train.rollout_mode=async")
    with pytest.raises(ValueError, match="train.sampling_devices in \\[1, 0\\] of the 1 devices"):
        offpolicy.split_devices(cfg, devices[:1])
    train, sample = offpolicy.split_devices(_cfg(str(tmp_path), "train.rollout_mode=async",
                                                 "train.sampling_devices=2"), devices)
    assert (len(train), len(sample)) == (6, 2)
