"""Several processes, one program: starting JAX's multi-controller runtime, the local launcher,
per-process logs, and making sure a lost or stuck process ends the job instead of hanging it.

Where a process learns its place in the job, first match wins:

  * explicit: `--coordinator HOST[:PORT] --num-processes N --process-id I` or the same in
    R1JAX_COORDINATOR / R1JAX_NUM_PROCESSES / R1JAX_PROCESS_ID (a hand-run cluster, the local
    launcher). A Kubernetes indexed Job (or JobSet) gives the process id as
    JOB_COMPLETION_INDEX, so its manifest sets only the coordinator and the count;
  * SLURM (inside `srun`): SLURM_PROCID / SLURM_NTASKS, the coordinator is the first node of
    SLURM_STEP_NODELIST (SLURM_JOB_NODELIST) on a port derived from the job id;
  * a TPU pod: TPU_WORKER_ID / TPU_WORKER_HOSTNAMES (GKE sets them; launch/tpu_pod.sh sets
    them on TPU VMs), MEGASCALE_* for several slices;
  * otherwise one process, and jax.distributed is not started.

Every jax.distributed.initialize argument is passed, with cluster detection deactivated: JAX's
own SLURM detection would give each process one GPU (r1jax runs one process per node driving
all its GPUs), and its TPU detection queries a metadata server; a test must only ever touch
loopback.

This module imports jax only inside functions: the launcher and the log tee must not start a
backend, and `initialize` must run before anything else does.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence

DEFAULT_PORT = 8476  # explicit coordinators given without a port
TPU_PORT = 8482  # the port JAX's own TPU detection uses
HEARTBEAT_TIMEOUT_S = 60  # a process silent this long is declared dead, and the job ends
SHUTDOWN_TIMEOUT_S = 120  # how long a finishing process waits for the others at exit
INIT_TIMEOUT_S = 300  # how long processes wait for each other at start-up
EXIT_WATCHDOG = 3  # exit status of a process ended by the step watchdog
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class DistributedError(ValueError):
    """A cluster description that cannot work, with a one-line message naming the culprit."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """This process's place in a multi-process job: what jax.distributed.initialize needs."""

    coordinator_address: str  # host:port of process 0's coordination service
    num_processes: int
    process_id: int
    # Local device ordinals this process drives (None: every device it sees, e.g. all chips
    # of a TPU host or all GPUs of a node whose count the environment does not state).
    local_device_ids: Optional[List[int]]
    source: str  # explicit | kubernetes | slurm | tpu | local


@dataclasses.dataclass(frozen=True)
class Timeouts:
    heartbeat_s: int = HEARTBEAT_TIMEOUT_S
    shutdown_s: int = SHUTDOWN_TIMEOUT_S
    init_s: int = INIT_TIMEOUT_S


# ---------------------------------------------------------------------------------------------
# Where am I? (pure functions of the environment: tested dry with faked variables)
# ---------------------------------------------------------------------------------------------
def _int(value, name: str, minimum: int = 0) -> int:
    try:
        out = int(str(value).strip())
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None
    if out < minimum:
        raise DistributedError(f"{name} must be >= {minimum}, got {out}")
    return out


def parse_device_ids(text: str, name: str = "--local-device-ids") -> List[int]:
    """'0,1,2,3' or '0-3' (or a mix) -> [0, 1, 2, 3]."""
    out: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(_int(lo, name), _int(hi, name) + 1))
        else:
            out.append(_int(part, name))
    if not out or len(set(out)) != len(out):
        raise DistributedError(f"{name} must list distinct device ordinals like 0,1,2,3 or 0-3, got {text!r}")
    return out


def with_port(address: str, default_port: int = DEFAULT_PORT) -> str:
    """'host' -> 'host:PORT'; 'host:1234' and '[v6::addr]:1234' stay."""
    address = address.strip()
    if not address:
        raise DistributedError("the coordinator address is empty")
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{default_port}"
    if address.count(":") == 1:
        host, port = address.rsplit(":", 1)
        _int(port, f"the coordinator port in {address!r}", 1)
        return address
    if address.count(":") > 1:  # a bare IPv6 address
        return f"[{address}]:{default_port}"
    return f"{address}:{default_port}"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-010,012],cpu1' -> 'gpu003'."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]*)\])?", nodelist)
    if not m or not m.group(1):
        raise DistributedError(f"cannot read a host name from SLURM's node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_tasks_per_node(env: Mapping[str, str], ntasks: int) -> int:
    # SLURM_NTASKS_PER_NODE is set with --ntasks-per-node; SLURM_TASKS_PER_NODE ("8(x4),4")
    # always: the first node's count is this layout's count on a homogeneous allocation.
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            m = re.match(r"\s*(\d+)", env[key])
            return _int(m.group(1) if m else env[key], key, 1)
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    return max(1, ntasks // _int(nodes, "SLURM_NNODES", 1)) if nodes else 1


def _gpus_on_node(env: Mapping[str, str]) -> Optional[int]:
    if env.get("SLURM_GPUS_ON_NODE"):
        return _int(env["SLURM_GPUS_ON_NODE"], "SLURM_GPUS_ON_NODE", 0)
    for key in ("SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS_PER_NODE"):
        if env.get(key):  # "8" or "h800:8"
            return _int(env[key].split(":")[-1].split("(")[0], key, 0)
    return None


def slurm_local_devices(env: Mapping[str, str], ntasks: int) -> Optional[List[int]]:
    """The GPUs one SLURM task drives: all of the node's with one task per node (r1jax's
    layout), else this task's contiguous share (SLURM_LOCALID-th of tasks-per-node)."""
    per_node = _slurm_tasks_per_node(env, ntasks)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    n_visible = len([x for x in visible.split(",") if x.strip()]) if visible else None
    gpus = _gpus_on_node(env)
    if per_node == 1:
        n = n_visible if n_visible is not None else gpus
        return list(range(n)) if n else None
    local = _int(env.get("SLURM_LOCALID", "0"), "SLURM_LOCALID")
    if n_visible is not None and gpus is not None and n_visible < gpus:
        return list(range(n_visible))  # SLURM already bound this task's GPUs (--gpus-per-task)
    n = n_visible if n_visible is not None else gpus
    if not n:
        return [local]  # one GPU per task, JAX's own SLURM convention
    if n % per_node:
        raise DistributedError(f"{n} GPUs per node do not split over {per_node} SLURM tasks per node")
    k = n // per_node
    return list(range(local * k, (local + 1) * k))


def detect(env: Optional[Mapping[str, str]] = None, *, coordinator: Optional[str] = None,
           num_processes: Optional[int] = None, process_id: Optional[int] = None,
           local_device_ids: Optional[str] = None) -> Optional[ClusterSpec]:
    """This process's ClusterSpec from flags (keyword arguments) and the environment, or None
    for a single-process run. Reads nothing but `env` (default: os.environ)."""
    env = os.environ if env is None else env
    coordinator = coordinator or env.get("R1JAX_COORDINATOR")
    count = num_processes if num_processes is not None else env.get("R1JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else env.get("R1JAX_PROCESS_ID")
    devs = local_device_ids if local_device_ids is not None else env.get("R1JAX_LOCAL_DEVICE_IDS")
    devs = parse_device_ids(devs) if devs not in (None, "") else None

    if coordinator or count is not None or pid is not None:
        source = "explicit"
        if pid is None and env.get("JOB_COMPLETION_INDEX") is not None:
            pid, source = env["JOB_COMPLETION_INDEX"], "kubernetes"
        missing = [n for n, v in (("--coordinator / R1JAX_COORDINATOR", coordinator),
                                  ("--num-processes / R1JAX_NUM_PROCESSES", count),
                                  ("--process-id / R1JAX_PROCESS_ID (or JOB_COMPLETION_INDEX)", pid))
                   if v is None or v == ""]
        if missing:
            raise DistributedError(f"an explicit multi-process job needs {', '.join(missing)} as well")
        spec = ClusterSpec(with_port(coordinator), _int(count, "the process count", 1),
                           _int(pid, "the process id"), devs, env.get("R1JAX_LAUNCHER", source))
    elif all(env.get(k) is not None for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")) and (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")):
        ntasks = _int(env["SLURM_NTASKS"], "SLURM_NTASKS", 1)
        port = env.get("R1JAX_COORDINATOR_PORT") or env.get("JAX_COORDINATOR_PORT")
        # JAX's own choice: a port in the ephemeral range derived from the job id, the same on
        # every node without any communication.
        port = _int(port, "R1JAX_COORDINATOR_PORT", 1) if port else (
            _int(env["SLURM_JOB_ID"].split("_")[0], "SLURM_JOB_ID") % 4096 + 65535 - 4095)
        host = first_slurm_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        spec = ClusterSpec(f"{host}:{port}", ntasks, _int(env["SLURM_PROCID"], "SLURM_PROCID"),
                           devs if devs is not None else slurm_local_devices(env, ntasks), "slurm")
    elif env.get("TPU_WORKER_ID") is not None and (env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")):
        hosts = [h.strip() for h in (env.get("TPU_PROCESS_ADDRESSES") or env["TPU_WORKER_HOSTNAMES"]).split(",")
                 if h.strip()]
        slices = _int(env.get("MEGASCALE_NUM_SLICES") or 1, "MEGASCALE_NUM_SLICES", 1)
        slice_id = _int(env.get("MEGASCALE_SLICE_ID") or 0, "MEGASCALE_SLICE_ID")
        worker = _int(env["TPU_WORKER_ID"], "TPU_WORKER_ID")
        if worker >= len(hosts) or slice_id >= slices:
            raise DistributedError(f"TPU_WORKER_ID={worker} (MEGASCALE_SLICE_ID={slice_id}) is outside the "
                                   f"{len(hosts)} hosts x {slices} slices of TPU_WORKER_HOSTNAMES")
        # Several slices: the coordinator is the megascale coordinator (host 0 of slice 0).
        head = (env.get("MEGASCALE_COORDINATOR_ADDRESS") or hosts[0]).split(":")[0]
        port = env.get("R1JAX_COORDINATOR_PORT") or TPU_PORT
        spec = ClusterSpec(f"{head}:{_int(port, 'R1JAX_COORDINATOR_PORT', 1)}", len(hosts) * slices,
                           slice_id * len(hosts) + worker, devs, "tpu")  # None: every chip of the host
    else:
        return None
    if not 0 <= spec.process_id < spec.num_processes:
        raise DistributedError(f"process id {spec.process_id} is outside 0..{spec.num_processes - 1} "
                               f"({spec.source} job of {spec.num_processes} processes)")
    return spec if spec.num_processes > 1 else None


def timeouts_from(env: Optional[Mapping[str, str]] = None, *, heartbeat_s=None, shutdown_s=None,
                  init_s=None) -> Timeouts:
    env = os.environ if env is None else env
    pick = lambda flag, key, default: _int(flag if flag is not None else env.get(key, default), key, 1)  # noqa: E731
    return Timeouts(pick(heartbeat_s, "R1JAX_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT_S),
                    pick(shutdown_s, "R1JAX_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S),
                    pick(init_s, "R1JAX_INIT_TIMEOUT", INIT_TIMEOUT_S))


# ---------------------------------------------------------------------------------------------
# Starting the runtime
# ---------------------------------------------------------------------------------------------
_STATE: Dict[str, object] = {}


def initialize_arguments(spec: ClusterSpec, timeouts: Timeouts) -> Dict[str, object]:
    """Every jax.distributed.initialize argument, stated: nothing is left to auto-detection."""
    host = spec.coordinator_address.rsplit(":", 1)[0]
    port = spec.coordinator_address.rsplit(":", 1)[1]
    # Loopback jobs bind loopback only; a cluster's coordinator listens on every interface.
    bind = spec.coordinator_address if host in LOOPBACK else f"[::]:{port}"
    return dict(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                process_id=spec.process_id, local_device_ids=spec.local_device_ids,
                cluster_detection_method="deactivate", initialization_timeout=timeouts.init_s,
                heartbeat_timeout_seconds=timeouts.heartbeat_s, shutdown_timeout_seconds=timeouts.shutdown_s,
                coordinator_bind_address=bind, slice_index=None, partition_index=None)


def initialize(spec: Optional[ClusterSpec], timeouts: Timeouts = Timeouts(), *, tee_logs: bool = True) -> None:
    """Start jax.distributed for `spec` (nothing for None: one process). Call before any other
    jax use. CPU jobs get gloo collectives; every process's output is prefixed with its id."""
    if spec is None:
        return
    if tee_logs:
        start_log_tee(spec.process_id)
    import jax

    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        # CPU devices of different processes talk through gloo (the default has none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    args = initialize_arguments(spec, timeouts)
    try:
        jax.distributed.initialize(**args)
    except Exception as e:  # an unreachable coordinator, a port in use, a bad id
        raise RuntimeError(f"jax.distributed.initialize failed for process {spec.process_id} of "
                           f"{spec.num_processes} (coordinator {spec.coordinator_address}, {spec.source}): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    _STATE.update(spec=spec, timeouts=timeouts)
    info = describe()
    print(f"[r1jax] process {info['process_id']} of {info['process_count']} ({spec.source}, coordinator "
          f"{spec.coordinator_address}): {info['local_device_count']} local devices {info['local_devices']}, "
          f"{info['device_count']} in all; heartbeat timeout {timeouts.heartbeat_s}s; pid {os.getpid()}",
          file=sys.stderr, flush=True)


def describe() -> Dict[str, object]:
    """The process layout for the run's summary: count, this process's id, its devices."""
    import jax

    spec = _STATE.get("spec")
    return {"process_count": jax.process_count(), "process_id": jax.process_index(),
            "local_device_count": jax.local_device_count(), "device_count": jax.device_count(),
            "local_devices": [int(d.id) for d in jax.local_devices()],
            "source": spec.source if spec is not None else "single",
            "coordinator": spec.coordinator_address if spec is not None else None}


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Per-process logs: every line of stdout/stderr (C++ logs included) prefixed with the process
# id, and copied into RUN_DIR/logs/process_N.log once the run directory is known.
# ---------------------------------------------------------------------------------------------
_TEE: Dict[str, object] = {}
_TEE_BUFFER_LINES = 20000


def start_log_tee(process_id: int) -> None:
    """Route this process's fds 1 and 2 through a small helper process that prefixes lines and
    writes the log file. A separate process, not a thread: when this one is aborted (JAX ends a
    process whose peer died) or killed, the helper still drains what was written."""
    if _TEE:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    saved_out, saved_err = os.dup(1), os.dup(2)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from r1jax.distributed import _tee_main; _tee_main(sys.argv[1:])",
         str(process_id), str(out_r), str(err_r), str(ctl_r), str(saved_out), str(saved_err)],
        pass_fds=(out_r, err_r, ctl_r, saved_out, saved_err), stdin=subprocess.DEVNULL,
        start_new_session=True)  # a terminal's Ctrl-C must not kill it before it drains
    for fd in (out_r, err_r, ctl_r, saved_out, saved_err):
        os.close(fd)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):  # replaced streams (pytest capture)
            pass
    _TEE.update(proc=proc, ctl=ctl_w, process_id=process_id)


def attach_run_dir(run_dir: str) -> Optional[str]:
    """Start writing RUN_DIR/logs/process_N.log (everything since start-up included)."""
    if not _TEE:
        return None
    path = os.path.abspath(os.path.join(run_dir, "logs", f"process_{_TEE['process_id']}.log"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.write(_TEE["ctl"], (path + "\n").encode())
    return path


def _tee_main(argv: Sequence[str]) -> None:
    pid, out_r, err_r, ctl_r, out_fd, err_fd = (int(a) for a in argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    prefix = f"[p{pid}] ".encode()
    sinks = {out_r: out_fd, err_r: err_fd}
    at_line_start = {out_r: True, err_r: True}
    pending: List[bytes] = []  # log bytes before the log file is known
    log = None
    open_fds = {out_r, err_r, ctl_r}
    ctl_buf = b""
    while open_fds - {ctl_r}:
        ready, _, _ = select.select(list(open_fds), [], [])
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
                continue
            if fd == ctl_r:
                ctl_buf += chunk
                while b"\n" in ctl_buf:
                    line, ctl_buf = ctl_buf.split(b"\n", 1)
                    if log is None:
                        log = open(line.decode(), "ab", buffering=0)
                        log.write(b"".join(pending))
                        pending = []
                continue
            # Prefix at every line start, however the chunks fall.
            parts = chunk.split(b"\n")
            text = b""
            for i, part in enumerate(parts):
                if i:
                    text += b"\n"
                if part and (at_line_start[fd] if i == 0 else True):
                    text += prefix
                text += part
            at_line_start[fd] = chunk.endswith(b"\n")
            try:
                os.write(sinks[fd], text)
            except OSError:  # the console went away; keep the log file going
                pass
            if log is not None:
                log.write(text)
            elif len(pending) < _TEE_BUFFER_LINES:
                pending.append(text)


# ---------------------------------------------------------------------------------------------
# The step watchdog: JAX's heartbeats catch dead processes, not stuck ones.
# ---------------------------------------------------------------------------------------------
class StepWatchdog:
    """Ends the process when `beat()` is not called for `timeout_s` seconds: it names the stuck
    phase, dumps every thread's stack, and exits with EXIT_WATCHDOG (the other processes then
    see a dead peer). faulthandler backs it up a few seconds later in case the GIL is held."""

    def __init__(self, timeout_s: float, *, what: str = "step"):
        self.timeout_s = float(timeout_s)
        self.what = what
        self._last = time.monotonic()
        self._phase = "start-up"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "StepWatchdog":
        if self.timeout_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="r1jax-watchdog", daemon=True)
            self._thread.start()
            self.beat(self._phase)
        return self

    def beat(self, phase: str = "") -> None:
        self._last = time.monotonic()
        self._phase = phase or self._phase
        if self._thread is not None:
            faulthandler.dump_traceback_later(self.timeout_s + 10, exit=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            faulthandler.cancel_dump_traceback_later()
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "StepWatchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                pid = _TEE.get("process_id", os.environ.get("R1JAX_PROCESS_ID", 0))
                sys.stderr.write(
                    f"[r1jax] watchdog: process {pid} made no progress for {idle:.0f}s (limit "
                    f"{self.timeout_s:.0f}s) in {self.what} phase '{self._phase}': probably waiting on a "
                    "collective that another process never joined, or a stuck reward/sandbox call. "
                    "Ending the job (rerun the same command to resume from the last checkpoint).\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(all_threads=True)
                os._exit(EXIT_WATCHDOG)


# ---------------------------------------------------------------------------------------------
# The local launcher: N processes x D fake CPU devices on 127.0.0.1 (how tests run multi-host
# code, and how a layout is tried before a cluster is paid for).
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_flag(argv: Sequence[str], flag: str) -> List[str]:
    """argv without `flag VALUE` / `flag=VALUE` (before the subcommand's own arguments)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _exit_reason(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    if rc == EXIT_WATCHDOG:
        return f"was ended by the step watchdog (exit {rc})"
    if rc == 134:
        return "aborted (exit 134: JAX ends a process whose peer died)"
    return f"exited with status {rc}"


def launch_local(num_processes: int, devices: int, argv: Sequence[str], *,
                 timeouts: Optional[Timeouts] = None, env: Optional[Mapping[str, str]] = None,
                 program: Optional[Sequence[str]] = None) -> int:
    """Run `r1jax ARGV` (or `program ARGV`) as `num_processes` processes with `devices` CPU
    devices each, joined on 127.0.0.1 with gloo collectives. Returns 0 when all succeed, else
    the first failure's status; once one fails the others get the heartbeat + shutdown time
    to stop, then are killed, so the launcher itself never hangs."""
    if num_processes < 1:
        raise DistributedError(f"--processes must be >= 1, got {num_processes}")
    if devices is None or devices < 1:
        raise DistributedError(f"--processes {num_processes} needs --devices D (CPU devices per process)")
    timeouts = timeouts or timeouts_from()
    coordinator = f"127.0.0.1:{free_port()}"
    base = dict(os.environ if env is None else env)
    for key in [k for k in base if k.startswith(("SLURM_", "TPU_WORKER", "MEGASCALE_", "JOB_COMPLETION_INDEX"))]:
        base.pop(key)  # a local emulation inside an allocation is still local
    base.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", R1JAX_DEVICES=str(devices),
                R1JAX_COORDINATOR=coordinator, R1JAX_NUM_PROCESSES=str(num_processes),
                R1JAX_LOCAL_DEVICE_IDS=f"0-{devices - 1}", R1JAX_LAUNCHER="local",
                R1JAX_HEARTBEAT_TIMEOUT=str(timeouts.heartbeat_s), R1JAX_SHUTDOWN_TIMEOUT=str(timeouts.shutdown_s),
                R1JAX_INIT_TIMEOUT=str(timeouts.init_s))
    cmd = [*(program or (sys.executable, "-m", "r1jax.cli")), *argv]
    procs: List[subprocess.Popen] = []
    for i in range(num_processes):
        procs.append(subprocess.Popen(cmd, env={**base, "R1JAX_PROCESS_ID": str(i)}))

    def forward(sig, _frame):  # preemption (SIGTERM) and Ctrl-C reach every process
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failure: Optional[int] = None
    deadline = None
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                rc = p.poll()
                if rc not in (None, 0) and first_failure is None:
                    first_failure = i
                    deadline = time.monotonic() + timeouts.heartbeat_s + timeouts.shutdown_s
                    print(f"[r1jax launcher] process {i} of {num_processes} {_exit_reason(rc)}; the others "
                          f"stop within {timeouts.heartbeat_s}s (heartbeat timeout)", file=sys.stderr, flush=True)
            if deadline is not None and time.monotonic() > deadline:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        print(f"[r1jax launcher] process {i} did not stop in time: killing it",
                              file=sys.stderr, flush=True)
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if first_failure is None and all(c == 0 for c in codes):
        return 0
    if first_failure is None:
        first_failure = next(i for i, c in enumerate(codes) if c != 0)
    print(f"[r1jax launcher] failed: process {first_failure} {_exit_reason(codes[first_failure])}; exit "
          f"statuses {codes}", file=sys.stderr, flush=True)
    rc = codes[first_failure]
    return rc if 0 < rc < 256 else 128 + (-rc if rc < 0 else 1)


def mesh_process_report(mesh) -> List[str]:
    """Which mesh axes cross process boundaries: in a hybrid mesh the across-node (dcn) axes
    span processes and the inside-node (ici) axes stay within one. Empty for one process."""
    import numpy as np

    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    n = len(np.unique(procs))
    if n == 1:
        return []
    lines = [f"  {n} processes, {mesh.devices.size // n} devices each"]
    for i, name in enumerate(mesh.axis_names):
        size = procs.shape[i]
        if size == 1:
            continue
        rows = np.moveaxis(procs, i, -1).reshape(-1, size)
        spans = max(len(set(r.tolist())) for r in rows)
        where = f"spans {spans} processes" if spans > 1 else "stays inside one process"
        lines.append(f"  axis {name} (size {size}) {where}")
    return lines


# ---------------------------------------------------------------------------------------------
# Host <-> global arrays. One code path for one and many processes: a process reads back only
# the rows that live on its devices, and gets the (small) per-row host values of the others
# through an all-gather; global arrays are assembled with JAX's process-local constructors.
# ---------------------------------------------------------------------------------------------
def local_rows(x):
    """(row ids, values) of the rows of `x` (split along its first axis) that this process's
    devices hold, sorted by row; shards replicated over local devices are read once."""
    import numpy as np

    if x.ndim == 0:
        raise ValueError("local_rows needs an array with a row axis")
    pieces = {}
    for shard in x.addressable_shards:
        if any(s != slice(None) for s in shard.index[1:]):
            raise ValueError(f"local_rows: an array of shape {x.shape} split along a non-row axis "
                             f"({shard.index}); reshard it over rows only first")
        rows = range(x.shape[0])[shard.index[0]]
        pieces.setdefault((rows.start, rows.stop), shard.data)
    pieces = {k: np.asarray(v) for k, v in pieces.items()}
    keys = sorted(pieces)
    ids = np.concatenate([np.arange(a, b) for a, b in keys]) if keys else np.zeros(0, np.int64)
    return ids, np.concatenate([pieces[k] for k in keys]) if keys else np.asarray(x)[:0]


def gather_rows(ids, values, num_rows: int):
    """Every process's (row ids, values) -> the whole [num_rows, ...] array, on every process.
    A row held by several processes (replicated layouts) is taken from the first. Every
    process must call it (a collective in multi-process runs); every row must be held."""
    import jax
    import numpy as np

    ids = np.asarray(ids, np.int64)
    values = np.asarray(values)
    out = np.zeros((num_rows, *values.shape[1:]), values.dtype)
    have = np.zeros(num_rows, bool)
    out[ids], have[ids] = values, True
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        all_out, all_have = multihost_utils.process_allgather((out, have))  # [processes, rows, ...]
        first = np.argmax(all_have, axis=0)  # the first process holding each row
        out = np.take_along_axis(all_out, first.reshape(1, -1, *([1] * (values.ndim - 1))), axis=0)[0]
        have = all_have.any(axis=0)
    if not have.all():
        raise RuntimeError(f"gather_rows: {int((~have).sum())} of {num_rows} rows are held by no process")
    return out


def all_rows(x):
    """The whole of a row-split global array on every process's host (for small per-row
    values: lengths, rewards); reads only addressable shards, then all-gathers."""
    ids, values = local_rows(x)
    return gather_rows(ids, values, x.shape[0])


def put_global(value, sharding):
    """A global array from a host value that every process holds in full (the same on every
    process: a global prompt batch, a row permutation): each process writes only the shards
    its devices hold."""
    import jax
    import numpy as np

    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def sum_across_processes(tree):
    """Elementwise sums of a tree of host numbers over processes (counters, sums for means)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(jax.tree.map(np.asarray, tree))
    return jax.tree.map(lambda a: np.sum(a, axis=0), gathered)


def agreed_time() -> float:
    """Process 0's wall clock (seconds since the epoch, whole), the same on every process: names
    that embed a time (a default run directory) then agree across processes."""
    import jax
    import numpy as np

    now = int(time.time())
    if jax.process_count() == 1:
        return float(now)
    from jax.experimental import multihost_utils

    # Two 16-bit halves: the collective runs in int32 (no x64) on every backend.
    hi, lo = multihost_utils.broadcast_one_to_all(np.asarray(divmod(now, 1 << 16), np.int32))
    return float(int(hi) * (1 << 16) + int(lo))
