"""Several real JAX processes on loopback (r1jax's local launcher, gloo CPU collectives): the
hybrid mesh across processes, and failures that end the job in bounded time instead of
hanging it (a SIGKILLed process, a stuck one)."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

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
def test_sigkill_of_one_process_ends_the_other_within_the_heartbeat_timeout():
    heartbeat = 4
    proc, lines = _launch_helper(["100000"], heartbeat)
    seen: list = []
    pids = {}
    for _ in range(2):
        m = _read_until(lines, r"READY (\d) (\d+)", 120, seen)
        pids[int(m.group(1))] = int(m.group(2))
    _read_until(lines, r"\[p0\] STEP 5 ", 60, seen)
    os.kill(pids[1], signal.SIGKILL)
    elapsed, text = _drain(proc, lines, seen, timeout=heartbeat + 30)
    assert proc.returncode not in (0, None), text[-3000:]
    # Bounded: the heartbeat timeout plus start-up slack, never the default minutes.
    assert elapsed < heartbeat + 10, f"took {elapsed:.1f}s\n{text[-3000:]}"
    assert "[r1jax launcher] process 1 of 2 was killed by SIGKILL" in text, text[-3000:]
    # The survivor says what happened: JAX's coordination service names the lost task, or a
    # collective reports its peer gone.
    p0 = "\n".join(line for line in text.splitlines() if line.startswith("[p0]"))
    assert re.search(r"unhealthy|stopped sending heartbeats|another task died|Connection reset|"
                     r"Gloo .* failed", p0), p0[-3000:]


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
