"""Run untrusted programs (model-written code) in a contained child process.

Every call starts a fresh *launcher* process (``jail.py``, a stdlib-only script run by the
base interpreter in isolated mode). The launcher builds the jail, runs the program once per
test case inside it (a fresh interpreter per run: ``python -I -S``, stdlib only, unless
``python``/``python_args``/``ro_binds`` say otherwise), and reports JSON back on its stdout.
Nothing beyond the kernel and libc is needed: namespaces and mounts are made through libc
(``ctypes``), so no ``unshare``/``bwrap`` binary and no apt package is required. Three isolation
levels exist; ``auto`` picks the strongest that works on the machine (probed once per host
process):

``namespaces`` (running as root, or with CAP_SYS_ADMIN; what CI and the dev machines use)
    * new PID, mount, network, IPC and UTS namespaces (``unshare(2)`` through libc; no extra
      package needed). The launcher is PID 1 of the jail; when it exits the kernel kills
      every process left in it (background daemons do not outlive the run), and it gets
      SIGKILL if its own parent dies (``PR_SET_PDEATHSIG``).
    * the program runs as a fresh random uid/gid (no supplementary groups, no capabilities,
      ``no_new_privs``, not dumpable), so it cannot signal or ptrace the launcher, and the
      process-count limit (``RLIMIT_NPROC``, which counts per uid) is private to this run:
      a fork bomb here does not starve other sandboxes.
    * filesystem: ``chroot`` into a new read-only tmpfs root holding read-only,
      nosuid bind mounts of ``/usr``, ``/bin``, ``/lib*``, ``/sbin``, the interpreter's
      prefix, ``/etc/ld.so.cache`` and ``/etc/localtime`` (plus any ``ro_binds`` you add),
      ``/dev/{null,zero,full,random,urandom}``, and a private writable ``/tmp`` (a size- and
      inode-capped tmpfs owned by the program's uid, also its cwd and ``$HOME``). Nothing else
      of the host is visible: no ``/home``, ``/root`` (except the interpreter's prefix when it
      lives there, e.g. pyenv), ``/work``, host ``/tmp``, ``/proc``, ``/sys``, ``/run`` (so no
      docker or other unix sockets). Every tmpfs lives only in the
      jail's mount namespace and disappears with it; ``/tmp`` is recreated empty between test
      cases.
    * network: an empty network namespace (loopback down): ``connect`` to ``127.0.0.1`` or
      anywhere fails, abstract unix sockets are private.
``userns`` (not root, unprivileged user namespaces enabled)
    The same jail built inside a new user namespace. Differences: the program keeps the
    caller's uid (mapped to 1000 inside), so ``RLIMIT_NPROC`` is counted in the new user
    namespace only; files it could reach would be owned by the caller, but none are reachable
    writable outside the jail's tmpfs.
``rlimits`` (fallback: no namespaces available; a warning is emitted once)
    A plain child process in its own session with the resource limits below, a clean
    environment, a private temporary directory (removed afterwards) as cwd. When running as
    root it still switches to a random uid, so it cannot write root's files or signal the
    host (the interpreter must then be readable by other users: pass
    ``python=/usr/bin/python3`` when the default one lives under ``/root``). NOT contained in
    this mode: network access, reading world-readable files, writes to world-writable
    directories, and (as non-root) signals to the caller's processes (``os.kill(-1, 9)``
    would kill the caller's own processes). Do not run untrusted code in this mode outside
    throwaway machines; set ``isolation="namespaces"`` to refuse it.

Limits applied to every program in every mode: wall-clock (enforced by the launcher, with a
host-side backstop that kills the whole launcher process group), CPU seconds
(``RLIMIT_CPU``, whole seconds, rounded up), address space per process (``RLIMIT_AS``:
allocating 10 GB fails with MemoryError), processes/threads (``RLIMIT_NPROC``), size of any
file written, including stdout/stderr (``RLIMIT_FSIZE``: printing 1 GB stops at the cap;
the host reads at most ``max_output_bytes``), open files (``RLIMIT_NOFILE``), no core dumps,
and a clean environment (``PATH``, ``HOME=/tmp``, ``LANG=C.UTF-8``, ``PYTHONHASHSEED=0``).

Where ``namespaces`` is unavailable: GitHub-hosted runners run as a sudo-capable user, so run
the tests under ``sudo`` (or allow unprivileged user namespaces: on Ubuntu 24.04
``sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0``); Docker's default seccomp
profile refuses ``unshare``, so a container needs ``--cap-add SYS_ADMIN`` (or
``--privileged``) for ``namespaces``, otherwise the fallback applies.

Not contained / known limits (all modes):
    * memory is limited per process, so the worst case for one run is ``memory_mb *
      max_processes`` (no cgroup is created); keep both small on shared machines. The jail's
      tmpfs mounts (root 16 MiB, ``/tmp`` ``tmp_mb``, captured output) also live in RAM.
    * no seccomp filter: every syscall the kernel allows an unprivileged user is available
      (a kernel exploit is out of scope).
    * CPU time is not shared fairly between concurrent sandboxes and the trainer; the
      caller's thread count bounds how many run at once.
    * in assert-style tests, the asserts run in the same interpreter as the program (that is
      what makes them useful): a program that exits early (``sys.exit``, ``os._exit``)
      scores 0 because each assert's success is reported with a per-run secret the program
      never sees, but a program that introspects the harness's frames could find it, and a
      program can still return objects whose ``__eq__`` lies.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

ISOLATION_LEVELS = ("namespaces", "userns", "rlimits")


@dataclass
class Limits:
    """Per-run resource limits (one run = one test case's process tree)."""

    wall_s: float = 5.0  # wall clock per run
    cpu_s: float = 5.0  # CPU seconds per process
    memory_mb: int = 1024  # address space per process
    max_processes: int = 32  # processes + threads of the program's uid
    max_output_bytes: int = 1 << 20  # stdout (and any one file) cap; the host reads no more
    tmp_mb: int = 64  # size of the private /tmp
    max_open_files: int = 64


@dataclass
class RunResult:
    """What one run did. `ok` means: exited 0, no timeout, no truncation, no jail error."""

    returncode: Optional[int] = None  # exit status, or -signal when killed by a signal
    timed_out: bool = False
    wall_s: float = 0.0
    cpu_s: float = 0.0
    stdout: str = ""
    stderr: str = ""  # the last 4 KiB
    output_truncated: bool = False
    error: Optional[str] = None  # the jail itself failed (not the program)
    asserts: Optional[List[bool]] = None  # assert mode: one entry per test statement

    @property
    def ok(self) -> bool:
        return (self.error is None and not self.timed_out and self.returncode == 0
                and not self.output_truncated)


class SandboxError(RuntimeError):
    """The sandbox could not be set up (not a failure of the program under test)."""


# =============================================================================================
# Host side
# =============================================================================================
_PROBED: dict = {}
_JAIL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")


def _base_python() -> str:
    """The interpreter without the venv (its prefix is what the jail must show)."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _launch(request: dict, timeout_s: float) -> dict:
    """Start a launcher, hand it `request`, return its JSON reply (or raise SandboxError)."""
    cmd = [_base_python(), "-I", "-S", "-B", _JAIL_SCRIPT]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, env={},
                            close_fds=True, cwd="/")
    try:
        out, err = proc.communicate(json.dumps(request).encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # Backstop only: the launcher enforces per-run limits itself. Its whole process group
        # dies; the jail (its own PID namespace) goes with its PID-1 via PDEATHSIG.
        _killpg(proc.pid)
        proc.communicate()
        raise SandboxError(f"launcher exceeded the host-side deadline of {timeout_s:.1f}s")
    finally:
        if proc.poll() is None:
            _killpg(proc.pid)
            proc.wait()
    if proc.returncode != 0 or not out:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise SandboxError(f"launcher failed (rc={proc.returncode}): {tail[0]}")
    return json.loads(out)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def probe(level: str) -> Optional[str]:
    """None if `level` works here, else the reason it does not (cached per process)."""
    if level not in _PROBED:
        try:
            res = Sandbox(isolation=level, limits=Limits(wall_s=10, cpu_s=10)).run(
                "print(6 * 7)", [""])[0]
            ok = res.ok and res.stdout.strip() == "42"
            _PROBED[level] = None if ok else (res.error or f"probe program failed: {res}")
        except SandboxError as e:
            _PROBED[level] = str(e)
    return _PROBED[level]


def best_isolation() -> str:
    """The strongest isolation level that works on this machine."""
    reasons = []
    for level in ISOLATION_LEVELS[:-1]:
        why = probe(level)
        if why is None:
            return level
        reasons.append(f"{level}: {why}")
    if "warned" not in _PROBED:
        _PROBED["warned"] = True
        warnings.warn("r1jax sandbox: no Linux namespaces available (" + "; ".join(reasons)
                      + "); untrusted code runs with resource limits only (no network or "
                      "filesystem isolation). See r1jax/rewards/sandbox.py.", RuntimeWarning)
    return "rlimits"


class Sandbox:
    """Runs a Python program against test inputs under `limits` (see the module docstring).

    Args:
      limits: per-run resource limits.
      isolation: "auto" | "namespaces" | "userns" | "rlimits".
      python: interpreter for the program (default: the base interpreter, stdlib only).
      python_args: its flags (default isolated mode, no site).
      ro_binds: extra host directories shown read-only in the jail (e.g. a venv's prefix).
    """

    def __init__(self, limits: Optional[Limits] = None, isolation: str = "auto",
                 python: Optional[str] = None, python_args: Sequence[str] = ("-I", "-S"),
                 ro_binds: Sequence[str] = ()):
        if isolation not in ("auto",) + ISOLATION_LEVELS:
            raise ValueError(f"sandbox isolation must be one of auto, "
                             f"{', '.join(ISOLATION_LEVELS)}; got {isolation!r}")
        self.limits = limits or Limits()
        self._isolation = isolation
        self.python = python or _base_python()
        self.python_args = list(python_args)
        prefix = os.path.realpath(sys.base_prefix)
        self.ro_binds = [prefix] + [os.path.realpath(p) for p in ro_binds]

    @property
    def isolation(self) -> str:
        if self._isolation == "auto":
            self._isolation = best_isolation()
        return self._isolation

    def _request(self, program: str, runs: list, asserts: Optional[list]) -> dict:
        return {"mode": self.isolation, "uid": secrets.randbelow(1 << 30) + (1 << 30),
                "python": self.python, "python_args": self.python_args,
                "binds": self.ro_binds, "limits": asdict(self.limits), "program": program,
                "runs": runs, "asserts": asserts, "nonce": secrets.token_hex(16)}

    def _deadline(self, n_runs: int) -> float:
        return n_runs * (self.limits.wall_s + 2.0) + 10.0

    def run(self, program: str, stdins: Sequence[str]) -> List[RunResult]:
        """Run `program` once per stdin string; one RunResult each."""
        runs = [{"stdin": s if isinstance(s, str) else str(s)} for s in stdins]
        if not runs:
            return []
        reply = _launch(self._request(program, runs, None), self._deadline(len(runs)))
        return [_result(r) for r in reply["results"]]

    def run_asserts(self, program: str, statements: Sequence[str]) -> RunResult:
        """Run `program`, then each of `statements` in its namespace (setup or test).

        Returns one RunResult whose `asserts` holds, per statement, whether it ran without
        raising. The harness reports through a file descriptor with a secret per run, so a
        program that exits early cannot fake a pass.
        """
        reply = _launch(self._request(program, [{"stdin": "", "harness": True}],
                                      list(statements)), self._deadline(1))
        return _result(reply["results"][0])


def _result(d: dict) -> RunResult:
    return RunResult(**{k: d.get(k) for k in RunResult.__dataclass_fields__ if k in d})
