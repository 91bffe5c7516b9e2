"""Fault injection: one run is hit by a fault after another and resumed after each; at the end
its metrics and parameters must equal those of an uninterrupted run, step for step.

Every run goes through the command line (tests/faults/launch.py wraps `r1jax.cli.main` and
injects one fault through a public function the loop calls). The chain, on a 12-update run
(4 prompts x G 4 per rollout, 2 updates per rollout, checkpoints every 3 updates so most fall
inside a rollout, an evaluation at update 6 in the runs that reach it), with a reward function that returns NaN, raises
and hangs on some samples in every run:

  A  SIGKILL during sampling (the 3rd rollout's completions are drawn, not yet scored)
  B  SIGTERM during the evaluation at update 6: it finishes, saves update 6 and exits 0
  C  SIGKILL during an update (update 8 dispatched, not finished)
  D  SIGKILL during the asynchronous write of checkpoint 9 (its items written, not renamed)
  E  a full disk (a tmpfs just too small) during the write of checkpoint 9: one-line error,
     checkpoint 6 stays the latest and restorable
  F  resume to the end; compared with the uninterrupted run R (run in parallel with the chain)
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from r1jax import checkpoint as ckpt_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LAUNCH = os.path.join(os.path.dirname(__file__), "launch.py")
STEPS = 12

ARGS = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
    "model.num_kv_heads=1", "model.max_position_embeddings=64",
    "data.template=none", "data.max_prompt_len=16", "data.synthetic_kwargs={digits: 1, ops: '+'}",
    "sampler.max_new_tokens=12", "sampler.prompt_buckets=[16]", "sft.steps=0",
    "grpo.group_size=4", "grpo.num_minibatches=2", "grpo.beta=0.01", "grpo.ref_reset_every=4",
    "train.prompts_per_rollout=4", "train.lr=1e-3", f"train.steps={STEPS}",
    "checkpoint.every=3", "checkpoint.keep=3", "eval.num_prompts=0",
    "run.progress=false", "run.tensorboard=false", "run.plots=false",
    ("rewards.functions=[{name: accuracy}, {name: format}, "
     "{name: 'faulty_rewards:flaky', weight: 0.5, timeout_s: 2.0}]"),
]
# Only the runs that reach update 6 from before it evaluate (evaluation changes no training
# state, and each evaluating process pays for compiling another sampler shape).
EVAL = ["eval.every=6", "eval.num_prompts=4", "eval.k=1"]
FAULTS = {
    "A": "kill+settle@r1jax.rewards.registry:RewardRunner.score#3",
    "B": "term@r1jax.evaluation:evaluate#1",
    "C": "killafter+settle@jax.stages:Compiled.__call__#2",
    "D": "kill@r1jax.checkpoint:Checkpointer._write_file_list#1",
    "E": "none",
    "F": "none",
}
# Keys that differ between runs by design: timings, and how the flaky reward's one hang per
# process split into timeouts and errors (their sum is compared instead).
VARIABLE = ("time/", "throughput/", "reward/seconds", "reward/flaky/timeouts", "reward/flaky/errors")


def _start(run_dir, fault, marker, disk_kib=None, extra=()):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "R1JAX_FAULT_FIRED": marker}
    opts = [fault] + (["--disk-kib", str(disk_kib)] if disk_kib else [])
    return subprocess.Popen([sys.executable, LAUNCH, *opts, "--", "train", *ARGS, *extra, f"run.dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _final_state(run_dir):
    """Every array of the last checkpoint, restored onto the host: {path: array}."""
    ck = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    try:
        restored = ck.restore(step=STEPS)
    finally:
        ck.close()
    leaves = jax.tree_util.tree_flatten_with_path(restored.state)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _kib_used(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(-(-os.path.getsize(os.path.join(root, f)) // 4096) * 4 for f in files)
    return total


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    ref_dir, run_dir = str(base / "reference"), str(base / "chain")
    ref = _start(ref_dir, "none", str(base / "R.fired"), extra=EVAL)
    seg = {}
    ckpts = os.path.join(run_dir, "checkpoints")
    for name, fault in FAULTS.items():
        marker = str(base / f"{name}.fired")
        disk = None
        if name == "E":  # room for what is there plus half a step: the next save cannot fit
            steps = ckpt_lib.list_steps(ckpts) if os.path.isdir(ckpts) else []
            assert steps, f"segments A-D left no checkpoint: {seg}"
            disk = sum(_kib_used(os.path.join(ckpts, str(s))) for s in steps)
            disk += _kib_used(os.path.join(ckpts, str(steps[-1]))) // 2
        proc = _start(run_dir, fault, marker, disk, extra=EVAL if name == "B" else ())
        out, err = proc.communicate(timeout=900)
        seg[name] = {"rc": proc.returncode, "out": out, "err": err, "fired": os.path.exists(marker),
                     "rows": [r["step"] for r in _rows(run_dir)],
                     "steps": ckpt_lib.list_steps(ckpts) if os.path.isdir(ckpts) else [],
                     "entries": sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []}
        if name == "E" and proc.returncode != 75:  # what the full disk kept, before F writes more
            seg[name]["verify_6"] = ckpt_lib.verify_step(os.path.join(ckpts, "6"))
            ck = ckpt_lib.Checkpointer(ckpts, read_only=True)
            try:
                step, params = ck.restore_params_only()
                seg[name]["restored"] = (step, all(np.isfinite(x).all() for x in jax.tree.leaves(params)))
            finally:
                ck.close()
    out, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err[-3000:]
    return {"ref": ref_dir, "run": run_dir, "seg": seg}


def _why(s):
    return f"rc={s['rc']}\n{s['err'][-2500:]}"


def _comparable(row):
    out = {k: v for k, v in row.items() if not k.startswith(VARIABLE)}
    out["flaky_failed"] = row.get("reward/flaky/timeouts", 0) + row.get("reward/flaky/errors", 0)
    return out


pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def test_reward_faults_are_counted_and_the_run_stays_finite(chain):
    rows = _rows(chain["ref"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert sum(r["reward/flaky/nonfinite"] for r in rows) > 0
    assert sum(r["reward/flaky/errors"] for r in rows) > 0
    assert sum(r["reward/flaky/timeouts"] for r in rows) >= 1  # the hang, abandoned after 2 s
    for r in rows:
        for k in ("reward/mean", "kl", "grad_norm", "loss/policy", "entropy"):
            assert r[k] is not None and np.isfinite(r[k]), (r["step"], k, r[k])
    for path, x in _final_state(chain["ref"]).items():
        if np.issubdtype(x.dtype, np.floating):
            assert np.isfinite(x).all(), path


def test_sigkill_during_sampling_loses_nothing_checkpointed(chain):
    a = chain["seg"]["A"]
    assert a["fired"] and a["rc"] == -9, _why(a)
    assert a["rows"] == [1, 2, 3, 4] and a["steps"] == [3], a


def test_sigterm_during_evaluation_finishes_it_saves_and_exits(chain):
    b = chain["seg"]["B"]
    assert b["fired"] and b["rc"] == 0, _why(b)
    assert "resumed from step 3" in b["out"] and "preempted" in b["out"], b["out"][-2000:]
    assert b["rows"] == list(range(1, 7)) and b["steps"][-1] == 6, b
    row6 = _rows(chain["ref"])[5]
    assert any(k.startswith("eval/") for k in row6)  # the evaluation interrupted was part of row 6


def test_sigkill_during_an_update(chain):
    c = chain["seg"]["C"]
    assert c["fired"] and c["rc"] == -9, _why(c)
    assert "resumed from step 6" in c["out"]
    assert c["rows"] == list(range(1, 8)) and c["steps"][-1] == 6, c


def test_sigkill_during_an_asynchronous_checkpoint_write(chain):
    d = chain["seg"]["D"]
    assert d["fired"] and d["rc"] == -9, _why(d)
    assert d["steps"][-1] == 6, d
    assert any(e.startswith("9.orbax-checkpoint-tmp") for e in d["entries"]), d["entries"]


def test_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(chain):
    e = chain["seg"]["E"]
    if e["rc"] == 75:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN); tests/test_checkpoint.py "
                    "covers a failed write with a patched writer")
    assert e["rc"] == 1, _why(e)
    lines = [line for line in e["err"].splitlines() if line.strip()]
    assert "Traceback" not in e["err"], e["err"][-3000:]
    assert lines[-1].startswith("r1jax train: error: checkpoint step 9 in "), lines[-1]
    assert "no space left on device (ENOSPC); the latest complete step is 6" in lines[-1], lines[-1]
    assert e["steps"][-1] == 6 and not any("tmp" in x for x in e["entries"]), e
    # What the full disk kept is intact and restores: its file list matches, params read back.
    assert e["verify_6"] is None and e["restored"] == (6, True), e


def test_resumed_after_every_fault_equals_the_uninterrupted_run(chain):
    f = chain["seg"]["F"]
    assert f["rc"] == 0, _why(f)
    assert "resumed from step 6" in f["out"]
    ref_rows, rows = _rows(chain["ref"]), _rows(chain["run"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(ref_rows, rows):
        assert _comparable(a) == _comparable(b), f"step {a['step']} differs"
    ref, run = _final_state(chain["ref"]), _final_state(chain["run"])
    assert sorted(ref) == sorted(run)
    assert any(p.startswith("['params']") for p in ref) and any(p.startswith("['opt_state']") for p in ref)
    for path in ref:
        np.testing.assert_array_equal(ref[path], run[path], err_msg=path)
