"""Several real JAX processes on loopback (r1jax's local launcher, gloo CPU collectives): the
hybrid mesh across processes; the GRPO loop on 2 and 4 processes against one; resuming across
process counts; failures that end the job in bounded time instead of hanging it (a SIGKILLed
process, a stuck one)."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import json
import shutil

import numpy as np
import pytest

from r1jax import checkpoint as ckpt_lib

HERE = os.path.dirname(os.path.abspath(__file__))
HELPER = os.path.join(HERE, "helpers_multihost.py")
pytestmark = [pytest.mark.subprocess]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "R1JAX_", "XLA_FLAGS"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


def _launch_helper(args, heartbeat_s, processes=2, devices=2):
    code = ("import sys; from r1jax.distributed import launch_local, Timeouts; "
            f"sys.exit(launch_local({processes}, {devices}, sys.argv[1:], timeouts=Timeouts({heartbeat_s}, "
            f"{heartbeat_s}, 60), program=[sys.executable, {HELPER!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    return proc, lines


def _read_until(lines, pattern, timeout, seen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r} in {timeout}s:\n{''.join(seen[-40:])}")


def _drain(proc, lines, seen, timeout):
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - t0
    time.sleep(0.2)
    while not lines.empty():
        seen.append(lines.get())
    return elapsed, "".join(seen)


def test_two_level_mesh_spans_processes_across_nodes_only():
    """4 processes x 2 devices, dcn data=4 and ici fsdp=2 (a 4-node miniature of h800x512):
    the across-node axis spans the processes, the inside-node axis stays in each one."""
    out = subprocess.run([sys.executable, "-m", "r1jax.cli", "--processes", "4", "--devices", "2", "mesh",
                          "mesh.ici={fsdp: 2}", "mesh.dcn={data: 4}"], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    for pid in range(4):  # every process joined, each with its own 2 devices, and says so
        assert re.search(rf"\[p{pid}\] \[r1jax\] process {pid} of 4 \(local, coordinator 127\.0\.0\.1:\d+\): "
                         r"2 local devices \[\d+, \d+\], 8 in all", text), text[-3000:]
    assert "[p0] mesh data=4 x fsdp=2 x tensor=1 on 8 cpu devices" in out.stdout
    assert "[p0]   axis data (size 4) spans 4 processes" in out.stdout
    assert "[p0]   axis fsdp (size 2) stays inside one process" in out.stdout
    assert "[p1] mesh" not in out.stdout  # one process prints the report
    # Each node is one process's two devices.
    nodes = re.findall(r"\[p0\]   node (\d): devices \[(\d+), (\d+)\]", out.stdout)
    assert len(nodes) == 4
    for _, a, b in nodes:
        assert int(a) // 2048 == int(b) // 2048  # CPU device ids are process_index * 2048 + k


@pytest.mark.slow
def test_a_stuck_process_is_ended_by_the_step_watchdog():
    """Process 1 stops making progress (no collective failure: heartbeats still flow), so only
    the step watchdog can end the job; it names the process and the phase it was stuck in."""
    proc, lines = _launch_helper(["100000", "--hang-at", "3", "--watchdog", "3"], heartbeat_s=60)
    seen: list = []
    _read_until(lines, r"\[p1\] STEP 2 ", 120, seen)
    elapsed, text = _drain(proc, lines, seen, timeout=60)
    assert proc.returncode not in (0, None), text[-3000:]
    assert elapsed < 30, f"took {elapsed:.1f}s\n{text[-3000:]}"
    assert re.search(r"\[p1\] \[r1jax\] watchdog: process 1 made no progress for \d+s \(limit 3s\) in step "
                     r"phase 'step 2'", text), text[-3000:]
    assert "helpers_multihost.py" in text  # the stuck stack is dumped


# ---------------------------------------------------------------------------------------------
# The GRPO loop on several processes. One set of runs shared by every assertion below:
#   A  1 process  x 8 devices, 3 updates (2 per rollout), dynamic sampling, checkpoint per step
#   B  2 processes x 4 devices, the same run (checkpoints 2 and 3)
#   C  B's run directory without step 3, resumed in 1 process -> step 3 equals A's
#   D  A's run directory without steps 2-3, resumed in 4 processes x 2 devices on a two-level
#      mesh (dcn data=4 across processes, ici fsdp=2 inside): 2 updates, from the middle of a
#      rollout, equal to A's
#   K  2 processes x 4 devices, process 1 SIGKILLed after the first update
# ---------------------------------------------------------------------------------------------
TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2",
    "model.num_kv_heads=1", "model.max_position_embeddings=64",
    "data.template=none", "data.max_prompt_len=16", "data.synthetic_kwargs={digits: 1, ops: '+'}",
    "sampler.max_new_tokens=12", "sampler.prompt_buckets=[16]",
    "sft.steps=3", "sft.batch_size=8",
    "grpo.group_size=4", "grpo.num_minibatches=2", "grpo.beta=0.01", "grpo.ref_reset_every=4",
    "grpo.dynamic_sampling=true", "train.prompts_per_rollout=4", "train.lr=1e-3",
    "eval.num_prompts=0", "run.progress=false", "run.tensorboard=false", "run.samples_to_log=4",
    # An untrained model earns no accuracy; the length penalty gives groups reward variance
    # (so gradients are not just noise, and dynamic sampling keeps some groups).
    "rewards.functions=[{name: accuracy}, {name: overlong_penalty, kwargs: {max_length: 12, cache_length: 11}}]",
    "checkpoint.every=2", "checkpoint.async_save=false",
]
# Sampling, data and rewards are exact across layouts; the updates' sums run in another order
# (gloo across processes instead of one process's all-reduce), so float32 results may differ
# in the last bits.
EXACT = ("reward/mean", "reward/std", "reward/batch_mean", "reward/accuracy", "reward/format",
         "completion/length_mean", "completion/length_max", "completion/truncated_frac",
         "dynamic_sampling/drop_rate", "adv/zero_std_groups", "rollout", "step")
CLOSE = ("kl", "entropy", "loss/policy", "grad_norm", "lr", "clip/region")
RTOL, ATOL = 1e-4, 1e-6


def _train_cmd(processes, devices, run_dir, *extra):
    return [sys.executable, "-m", "r1jax.cli", "--processes", str(processes), "--devices", str(devices),
            "--heartbeat-timeout", "5", "--shutdown-timeout", "10", "train", *TINY,
            f"run.dir={run_dir}", *extra]


def _run(cmd, timeout=900):
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    return text, time.monotonic() - t0


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _samples(run_dir):
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(run_dir, step):
    d = os.path.join(run_dir, "checkpoints")
    return {a.path: ckpt_lib.read_array(d, step, a.path) for a in ckpt_lib.inspect_step(d, step)
            if a.path.startswith("params/")}


def _same_row(want, got, where):
    for k in EXACT:
        assert got.get(k) == want.get(k), f"{where}: {k} {got.get(k)} != {want.get(k)}"
    for k in CLOSE:
        if want.get(k) is not None:
            np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=f"{where}: {k}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    dirs = {k: str(root / k) for k in "ABKCD"}
    walls = {}
    _, walls["A"] = _run(_train_cmd(1, 8, dirs["A"], "train.steps=3", "checkpoint.every=1"))
    _, walls["B"] = _run(_train_cmd(2, 4, dirs["B"], "train.steps=3"))

    # C: B without its last step, resumed in one process; D: A from step 1, in four.
    texts = {}
    two_level = ("mesh.ici={fsdp: 2}", "mesh.dcn={data: 4}")
    for resumed, source, layout, drop, extra in (("C", "B", (1, 8), (3,), ()), ("D", "A", (4, 2), (2, 3), two_level)):
        shutil.copytree(dirs[source], dirs[resumed])
        for step in drop:
            shutil.rmtree(os.path.join(dirs[resumed], "checkpoints", str(step)))
        texts[resumed], walls[resumed] = _run(_train_cmd(*layout, dirs[resumed], "train.steps=3", *extra))

    # K: process 1 killed after the first update; the other must end within the heartbeat.
    proc = subprocess.Popen(_train_cmd(2, 4, dirs["K"], "train.steps=50", "sft.steps=0"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen: list = []
    pids = {}
    for _ in range(2):
        m = _read_until(lines, r"\[p(\d)\] \[r1jax\] process \d of 2 .*pid (\d+)", 600, seen)
        pids[int(m.group(1))] = int(m.group(2))
    metrics = os.path.join(dirs["K"], "metrics.jsonl")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "K ended before its first update:\n" + "".join(seen[-40:])
    os.kill(pids[1], signal.SIGKILL)
    k_elapsed, k_text = _drain(proc, lines, seen, timeout=120)
    print(f"\nwall seconds: 1 x 8 {walls['A']:.1f}, 2 x 4 {walls['B']:.1f}", file=sys.stderr)
    return dict(dirs=dirs, walls=walls, k=(proc.returncode, k_elapsed, k_text), c_text=texts["C"],
                d_text=texts["D"])


@pytest.mark.slow
def test_two_processes_equal_one(runs):
    a, b = runs["dirs"]["A"], runs["dirs"]["B"]
    rows_a, rows_b = _rows(a), _rows(b)
    assert sorted(rows_a) == sorted(rows_b) == [1, 2, 3]
    for step in rows_a:
        _same_row(rows_a[step], rows_b[step], f"2x4 vs 1x8 step {step}")
    # The same prompts and completions (samples come from process 0's rows, the first ones).
    assert _samples(a) == _samples(b)
    pa, pb = _params(a, 3), _params(b, 3)
    assert sorted(pa) == sorted(pb) and len(pa) > 5
    for k in pa:
        np.testing.assert_allclose(pb[k], pa[k], rtol=RTOL, atol=1e-5, err_msg=k)
    summary = json.load(open(os.path.join(b, "summary.json")))
    assert summary["processes"]["process_count"] == 2 and summary["processes"]["process_id"] == 0
    assert summary["processes"]["local_device_count"] == 4


@pytest.mark.slow
def test_only_process_0_writes_the_run_directory(runs):
    a, b = runs["dirs"]["A"], runs["dirs"]["B"]

    def listing(d):
        out = set()
        for root, _, files in os.walk(d):
            rel = os.path.relpath(root, d)
            if rel.split(os.sep)[0] == "checkpoints":
                continue  # Orbax: every process writes its part
            out |= {os.path.normpath(os.path.join(rel, f)) for f in files}
        return out

    # The same files as the one-process run, plus each process's log.
    logs = {os.path.join("logs", f"process_{i}.log") for i in range(2)}
    assert listing(b) - listing(a) == logs and listing(a) - listing(b) == set()
    log1 = open(os.path.join(b, "logs", "process_1.log")).read()
    assert "[p1] [r1jax] process 1 of 2" in log1 and "[p0]" not in log1
    with open(os.path.join(b, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 3  # one writer: no duplicated rows


@pytest.mark.slow
def test_sigkill_of_a_training_process_ends_the_other_in_time(runs):
    rc, elapsed, text = runs["k"]
    assert rc not in (0, None), text[-3000:]
    assert elapsed < 5 + 20, f"took {elapsed:.1f}s:\n{text[-3000:]}"  # heartbeat + slack
    assert "[r1jax launcher] process 1 of 2 was killed by SIGKILL" in text, text[-3000:]
    # The survivor says what happened: JAX's coordination service names the lost task, or a
    # collective reports its peer gone.
    p0 = "\n".join(line for line in text.splitlines() if line.startswith("[p0]"))
    assert re.search(r"unhealthy|stopped sending heartbeats|another task died|Connection reset|"
                     r"Gloo .* failed", p0), p0[-3000:]


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one(runs):
    # The same data: step 3 is a fresh rollout drawn from the restored (global) data position.
    assert "resumed from step 2" in runs["c_text"]
    rows_a, rows_c = _rows(runs["dirs"]["A"]), _rows(runs["dirs"]["C"])
    assert sorted(rows_c) == [1, 2, 3]
    _same_row(rows_a[3], rows_c[3], "1-process resume of a 2-process checkpoint, step 3")


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_four_on_a_two_level_mesh(runs):
    text = runs["d_text"]
    assert "resumed from step 1" in text and "mesh data=4 x fsdp=2" in text
    for pid in range(4):
        assert f"[p{pid}] [r1jax] process {pid} of 4" in text
    rows_a, rows_d = _rows(runs["dirs"]["A"]), _rows(runs["dirs"]["D"])
    assert sorted(rows_d) == [1, 2, 3]
    for step in (2, 3):  # the saved half-used rollout, then a fresh one from the data position
        _same_row(rows_a[step], rows_d[step], f"4x2 two-level resume of a 1-process checkpoint, step {step}")
    pa, pd = _params(runs["dirs"]["A"], 3), _params(runs["dirs"]["D"], 3)
    for k in pa:
        np.testing.assert_allclose(pd[k], pa[k], rtol=RTOL, atol=1e-5, err_msg=k)
