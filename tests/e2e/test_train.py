"""Whole runs through the CLI: outputs a researcher relies on, and exact resume after SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from r1jax import checkpoint as ckpt_lib

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")

# A tiny run: 2-layer model from scratch on the arithmetic task, 4 prompts x G 4 per rollout,
# 2 mini-batches (2 updates per rollout), 3 SFT steps, eval on 8 prompts x k 2.
TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
    "model.num_kv_heads=1", "model.max_position_embeddings=64",
    "data.template=none", "data.max_prompt_len=16", "data.synthetic_kwargs={digits: 1, ops: '+'}",
    "sampler.max_new_tokens=12", "sampler.prompt_buckets=[16]",
    "sft.steps=3", "sft.batch_size=8",
    "grpo.group_size=4", "grpo.num_minibatches=2", "grpo.beta=0.01", "grpo.ref_reset_every=4",
    "train.prompts_per_rollout=4", "train.lr=1e-3",
    "eval.num_prompts=8", "eval.k=2", "run.progress=false", "run.tensorboard=true",
]

DOCUMENTED_KEYS = [
    "step", "reward/mean", "reward/std", "reward/accuracy", "reward/format", "accuracy",
    "completion/length_mean", "completion/length_max", "completion/truncated_frac", "kl", "entropy",
    "clip/low", "clip/high", "clip/region", "grad_norm", "lr", "time/rollout", "time/reference",
    "time/update", "time/step", "throughput/completion_tokens_per_s", "dynamic_sampling/drop_rate",
]


def _train(args, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.Popen([sys.executable, "-m", "r1jax.cli", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.subprocess
def test_short_run_writes_every_output(tmp_path):
    run = str(tmp_path / "run")
    out = _finish(_train([*TINY, f"run.dir={run}", "train.steps=4", "checkpoint.every=2",
                          "grpo.dynamic_sampling=true"]))
    assert "[compile] GRPO update step: per device" in out and "GFLOP" in out
    assert "before RL" in out and "after RL" in out
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in DOCUMENTED_KEYS:
        assert all(key in r for r in rows), f"metrics.jsonl lacks '{key}'"
    summary = json.load(open(os.path.join(run, "summary.json")))
    for key in ("accuracy_before_rl", "accuracy_after_rl", "steps", "update_compile"):
        assert key in summary
    assert os.path.isfile(os.path.join(run, "config.yaml"))
    for png in ("reward.png", "accuracy.png", "length.png", "kl.png"):
        assert os.path.getsize(os.path.join(run, "plots", png)) > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run))
    assert os.path.getsize(os.path.join(run, "samples.jsonl")) > 0
    assert ckpt_lib.list_steps(os.path.join(run, "checkpoints")) == [2, 4]
    # (The reference reset's effect is tested in-process: tests/test_trainer.py.)


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "reward/seconds"))}


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_mid_rollout_then_resume_is_exact_and_resumes_on_other_device_counts(tmp_path):
    # 2 updates per rollout: the step-3 checkpoint holds the unfinished half of rollout 1, so
    # the resumed run must take the rest of that rollout from the checkpoint, not resample it.
    k = 3
    common = [*TINY, f"train.steps={2 * k}", f"checkpoint.every={k}", "eval.num_prompts=0", "sft.steps=0"]
    ref_dir, cut_dir, other_dir = str(tmp_path / "ref"), str(tmp_path / "cut"), str(tmp_path / "other")
    _finish(_train([*common, f"run.dir={ref_dir}"]))

    proc = _train([*common, f"run.dir={cut_dir}"])
    ckpt_dir = os.path.join(cut_dir, "checkpoints")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpt_dir) and k in ckpt_lib.list_steps(ckpt_dir):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its step-K checkpoint was seen: " + proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt_lib.list_steps(ckpt_dir)[-1] < 2 * k, "killed too late to test anything"
    shutil.copytree(cut_dir, other_dir)
    out = _finish(_train([*common, f"run.dir={cut_dir}"]))
    assert f"resumed from step {k}" in out

    ref_rows, cut_rows = _rows(ref_dir), _rows(cut_dir)
    assert [r["step"] for r in cut_rows] == list(range(1, 2 * k + 1))
    for a, b in zip(ref_rows, cut_rows):
        assert _comparable(a) == _comparable(b), f"step {a['step']} differs"
    ref_ckpt = os.path.join(ref_dir, "checkpoints")
    names = [a.path for a in ckpt_lib.inspect_step(ref_ckpt, 2 * k)]
    for name in ("params/layers/mlp/up", "params/embed", "opt_state/1/0/mu/layers/attn/q"):
        assert name in names, f"{name} not in the checkpoint: {names[:8]}"
        np.testing.assert_array_equal(ckpt_lib.read_array(ref_ckpt, 2 * k, name),
                                      ckpt_lib.read_array(ckpt_dir, 2 * k, name))

    # The same checkpoint resumed on 2 devices (the batch and fsdp split 2 ways): the rest of
    # the saved rollout gives the same update up to float reduction order.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "R1JAX_DEVICES": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "r1jax.cli", "train", *common, f"run.dir={other_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _finish(proc)
    assert f"resumed from step {k}" in out and "on 2 cpu devices" in out
    other_rows = _rows(other_dir)
    assert [r["step"] for r in other_rows] == list(range(1, 2 * k + 1))
    a, b = ref_rows[k], other_rows[k]  # update k + 1: the saved half of the rollout
    for key in ("update/loss", "kl", "grad_norm", "update/ratio_max", "entropy", "reward/mean"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key


@pytest.mark.slow
@pytest.mark.subprocess
def test_run_is_inspectable_exportable_and_evaluable(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run = str(tmp_path / "run")
    _finish(_train([*TINY, f"run.dir={run}", "train.steps=2", "eval.num_prompts=0", "sft.steps=2"]))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}

    def cli(*argv):
        out = subprocess.run([sys.executable, "-m", "r1jax.cli", *argv], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    listing = cli("ckpt", "inspect", run)
    assert "params/layers/mlp/up" in listing and "opt_state" in listing
    arr = json.loads(cli("ckpt", "inspect", run, "--array", "params/layers/mlp/up", "--index", "0, :2, :3"))
    assert arr["shape"] == [2, 3]
    hf_dir = str(tmp_path / "hf")
    cli("ckpt", "export-hf", run, hf_dir)
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    full = ckpt_lib.read_array(os.path.join(run, "checkpoints"), 2, "params/layers/mlp/up")
    got = model.model.layers[1].mlp.up_proj.weight.detach().numpy().T
    np.testing.assert_allclose(got, full[1], atol=1e-6)
    ev = json.loads(cli("eval", "--checkpoint", run, "eval.num_prompts=4", "eval.k=2").strip().splitlines()[-1])
    assert ev["step"] == 2 and ev["eval/num_prompts"] == 4 and 0.0 <= ev["eval/pass@1"] <= 1.0
    assert "eval/cons@2" in ev
