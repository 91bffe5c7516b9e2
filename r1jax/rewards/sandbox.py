"""Run untrusted programs (model-written code) in a contained child process.

Every call starts a fresh *launcher* process (this file, run as a script with the base
interpreter in isolated mode). The launcher builds the jail, runs the program once per test
case inside it, and reports JSON back on its stdout. Three isolation levels exist; ``auto``
picks the strongest that works on the machine (probed once per host process):

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
      of the host is visible: no ``/home``, ``/root``, ``/work``, host ``/tmp``, ``/proc``,
      ``/sys``, ``/run`` (so no docker or other unix sockets). Every tmpfs lives only in the
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
    host. NOT contained in this mode: network access, reading world-readable files, writes to
    world-writable directories, and (as non-root) signals to the caller's processes
    (``os.kill(-1, 9)`` would kill the caller's own processes). Do not run untrusted code
    in this mode outside throwaway machines; set ``isolation="namespaces"`` to refuse it.

Limits applied to every program in every mode: wall-clock (enforced by the launcher, with a
host-side backstop that kills the whole launcher process group), CPU seconds
(``RLIMIT_CPU``), address space per process (``RLIMIT_AS``: allocating 10 GB fails with
MemoryError), processes/threads (``RLIMIT_NPROC``), size of any file written, including
stdout/stderr (``RLIMIT_FSIZE``: printing 1 GB stops at the cap; the host reads at most
``max_output_bytes``), open files (``RLIMIT_NOFILE``), no core dumps, and a clean
environment (``PATH``, ``HOME=/tmp``, ``LANG=C.UTF-8``, ``PYTHONHASHSEED=0``).

Not contained / known limits (all modes):
    * memory is limited per process, so the worst case for one run is ``memory_mb *
      max_processes`` (no cgroup is created); keep both small on shared machines.
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

import base64
import ctypes
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

# -- kernel constants (linux/sched.h, linux/mount.h, linux/prctl.h); identical on x86-64 and arm64
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38

ISOLATION_LEVELS = ("namespaces", "userns", "rlimits")
_JAIL_ROOT = "/tmp"  # mount point of the jail's root tmpfs, inside the private mount namespace
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
_DEV_FILES = ("null", "zero", "full", "random", "urandom")


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


def _base_python() -> str:
    """The interpreter without the venv (its prefix is what the jail must show)."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _launch(request: dict, timeout_s: float) -> dict:
    """Start a launcher, hand it `request`, return its JSON reply (or raise SandboxError)."""
    cmd = [_base_python(), "-I", "-S", "-B", os.path.abspath(__file__)]
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


# =============================================================================================
# Launcher side (this file run as a script; stdlib only, no r1jax imports)
# =============================================================================================
_HARNESS = r'''
import os, json
def _r1jax_harness():
    nonce = os.read(3, 64).decode()
    os.close(3)
    with open("/sandbox/asserts.json") as f:
        statements = json.load(f)
    with open(PROGRAM) as f:
        source = f.read()
    ns = {"__name__": "__solution__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "solution.py", "exec"), ns)
    except BaseException:
        os.write(4, ("%s setup-failed\n" % nonce).encode())
        raise
    for i, stmt in enumerate(statements):
        try:
            exec(compile(stmt, "test_%d" % i, "exec"), ns)
            ok = 1
        except BaseException:
            ok = 0
        os.write(4, ("%s %d %d\n" % (nonce, i, ok)).encode())
_r1jax_harness()
'''


def _libc():
    # The interpreter's own symbols include libc's (find_library would spawn ldconfig).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    return libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else s.encode()


class _Jail:
    """Builds the chroot and runs programs in it (launcher process, PID 1 of the jail)."""

    def __init__(self, req: dict, libc):
        self.req, self.libc = req, libc
        self.mode = req["mode"]
        self.lim = req["limits"]
        self.userns = self.mode == "userns"
        if self.mode == "namespaces":
            self.uid = self.gid = req["uid"]
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
        self.root = _JAIL_ROOT if self.mode != "rlimits" else None

    # -- mounts -----------------------------------------------------------------------------
    def mount(self, src, dst, fstype, flags, data=None):
        _check(self.libc.mount(_b(src), _b(dst), _b(fstype), flags, _b(data)),
               f"mount {src} on {dst}")

    def bind_ro(self, src: str, dst: str) -> None:
        self.mount(src, dst, None, MS_BIND)
        # Remounting must keep the flags the kernel locked on the source (user namespaces).
        st = os.statvfs(src).f_flag
        keep = ((st & os.ST_NOEXEC and MS_NOEXEC) | (st & os.ST_NOATIME and MS_NOATIME)
                | (st & os.ST_NODIRATIME and MS_NODIRATIME)
                | (st & os.ST_RELATIME and MS_RELATIME))
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | keep
        self.mount(None, dst, None, flags)

    def tmpfs(self, dst: str, size_mb: int, mode: str, owner: bool) -> None:
        opts = f"size={size_mb}m,nr_inodes=4096,mode={mode}"
        if owner and not self.userns:
            opts += f",uid={self.uid},gid={self.gid}"
        self.mount("tmpfs", dst, "tmpfs", MS_NOSUID | MS_NODEV, opts)

    def build(self) -> None:
        r = self.root
        self.mount(None, "/", None, MS_REC | MS_PRIVATE)
        self.tmpfs(r, 16, "0755", owner=False)
        for path in list(_SYSTEM_DIRS) + list(self.req["binds"]):
            if not os.path.lexists(path) or os.path.realpath(path).startswith(r + "/"):
                continue
            dst = r + path
            if os.path.lexists(dst):
                continue  # already provided by a parent bind or symlink
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.islink(path):
                os.symlink(os.readlink(path), dst)
            elif os.path.isdir(path):
                os.makedirs(dst, exist_ok=True)
                self.bind_ro(path, dst)
        os.makedirs(r + "/etc", exist_ok=True)
        for path in _ETC_FILES:
            if os.path.isfile(path):
                open(r + path, "w").close()
                self.bind_ro(path, r + path)
        os.makedirs(r + "/dev")
        for name in _DEV_FILES:
            if os.path.exists("/dev/" + name):
                open(f"{r}/dev/{name}", "w").close()
                self.mount("/dev/" + name, f"{r}/dev/{name}", None, MS_BIND)
        os.makedirs(r + "/sandbox")
        with open(r + "/sandbox/prog.py", "w") as f:
            f.write(self.req["program"])
        if self.req.get("asserts") is not None:
            with open(r + "/sandbox/asserts.json", "w") as f:
                json.dump(self.req["asserts"], f)
            with open(r + "/sandbox/harness.py", "w") as f:
                f.write('PROGRAM = "/sandbox/prog.py"\n' + _HARNESS)
        for d in ("/tmp", "/out"):
            os.makedirs(r + d)
        # The root stays read-only from here on; only /tmp (program) and /out (launcher) write.
        self.mount(None, r, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        self.tmpfs(r + "/out", 2 * (self.lim["max_output_bytes"] >> 20) + 8, "0700", owner=False)
        os.chroot(r)
        os.chdir("/")

    def fresh_tmp(self) -> None:
        if os.path.ismount("/tmp"):
            _check(self.libc.umount2(b"/tmp", MNT_DETACH), "umount /tmp")
        self.tmpfs("/tmp", self.lim["tmp_mb"], "0700", owner=True)

    # -- one run ----------------------------------------------------------------------------
    def run_one(self, idx: int, run: dict) -> dict:
        lim = self.lim
        if self.mode == "rlimits":
            work = tempfile.mkdtemp(prefix="r1jax-sbx-")
            os.chmod(work, 0o711)  # the program's uid may traverse, not list
            out_dir, tmp_dir, prog_dir = work + "/out", work + "/tmp", work + "/sandbox"
            os.makedirs(out_dir, mode=0o700)
            os.makedirs(tmp_dir, mode=0o700)
            os.makedirs(prog_dir)
            _write(prog_dir + "/prog.py", self.req["program"])
            if self.req.get("asserts") is not None:
                _write(prog_dir + "/asserts.json", json.dumps(self.req["asserts"]))
                _write(prog_dir + "/harness.py", f"PROGRAM = {prog_dir + '/prog.py'!r}\n"
                       + _HARNESS.replace("/sandbox/asserts.json", prog_dir + "/asserts.json"))
            if os.getuid() == 0:
                self.uid = self.gid = self.req["uid"]
                os.chown(tmp_dir, self.uid, self.gid)
        else:
            work, out_dir, tmp_dir, prog_dir = None, "/out", "/tmp", "/sandbox"
            self.fresh_tmp()
        try:
            return self._exec(run, out_dir, tmp_dir, prog_dir)
        finally:
            if work is not None:
                import shutil

                shutil.rmtree(work, ignore_errors=True)

    def _exec(self, run: dict, out_dir: str, tmp_dir: str, prog_dir: str) -> dict:
        lim = self.lim
        harness = bool(run.get("harness"))
        stdin_path = out_dir + "/stdin"
        _write(stdin_path, run.get("stdin", ""))
        fds = {
            0: os.open(stdin_path, os.O_RDONLY),
            1: os.open(out_dir + "/stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
            2: os.open(out_dir + "/stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
        }
        nonce = self.req["nonce"]
        if harness:
            r_fd, w_fd = os.pipe()
            os.write(w_fd, nonce.encode())
            os.close(w_fd)
            fds[3] = r_fd
            fds[4] = os.open(out_dir + "/result", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        script = prog_dir + ("/harness.py" if harness else "/prog.py")
        argv = [self.req["python"]] + list(self.req["python_args"]) + [script]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp_dir, "TMPDIR": tmp_dir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the program (never returns)
            try:
                self._child(fds, argv, env, tmp_dir)
            except BaseException as e:  # e.g. the interpreter is not reachable by the uid
                os.write(2, f"sandbox: cannot start the program: {e}\n".encode())
            finally:
                os._exit(127)
        for fd in fds.values():
            os.close(fd)
        status, rusage, timed_out = self._wait(pid, lim["wall_s"])
        wall = time.monotonic() - t0
        self._kill_leftovers(pid, reap=True)
        rc = (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
        cap = lim["max_output_bytes"]
        with open(out_dir + "/stdout", "rb") as f:
            raw = f.read(cap + 1)
        with open(out_dir + "/stderr", "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            err = f.read(4096)
        res = {"returncode": rc, "timed_out": timed_out, "wall_s": wall,
               "cpu_s": rusage.ru_utime + rusage.ru_stime if rusage else 0.0,
               "stdout": raw[:cap].decode("utf-8", errors="replace"),
               "stderr": err.decode("utf-8", errors="replace"),
               "output_truncated": len(raw) >= cap}
        if harness:
            n = len(self.req["asserts"])
            passed = [False] * n
            with open(out_dir + "/result", "rb") as f:
                for line in f.read(cap).decode(errors="replace").splitlines():
                    parts = line.split()
                    if len(parts) == 3 and parts[0] == nonce and parts[1].isdigit():
                        i = int(parts[1])
                        if i < n:
                            passed[i] = parts[2] == "1"
            res["asserts"] = passed
        for name in ("stdout", "stderr", "stdin", "result"):
            try:
                os.unlink(out_dir + "/" + name)
            except FileNotFoundError:
                pass
        return res

    def _child(self, fds: dict, argv: list, env: dict, cwd: str) -> None:
        import resource

        lim = self.lim
        os.setsid()
        self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # Move every source above the targets first, so no dup2 clobbers a later source.
        import fcntl

        high = {t: fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for t, fd in fds.items()}
        for target, fd in high.items():
            os.dup2(fd, target)
        os.closerange(max(fds) + 1, 1 << 16)
        cpu = max(1, int(lim["cpu_s"] + 0.999))
        mem = int(lim["memory_mb"]) << 20
        for res_id, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                              (resource.RLIMIT_AS, (mem, mem)),
                              (resource.RLIMIT_NPROC, (lim["max_processes"],) * 2),
                              (resource.RLIMIT_FSIZE, (lim["max_output_bytes"],) * 2),
                              (resource.RLIMIT_NOFILE, (lim["max_open_files"],) * 2),
                              (resource.RLIMIT_CORE, (0, 0)),
                              (resource.RLIMIT_MEMLOCK, (0, 0)),
                              (resource.RLIMIT_MSGQUEUE, (0, 0))):
            resource.setrlimit(res_id, value)
        if os.getuid() == 0 and self.uid != 0:
            os.setgroups([])
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)
            if os.getuid() == 0 or os.geteuid() == 0:
                os._exit(126)
        self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.chdir(cwd)
        os.execve(argv[0], argv, env)

    def _wait(self, pid: int, wall_s: float):
        deadline = time.monotonic() + wall_s
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        timed_out = False
        while True:
            wpid, status, rusage = os.wait4(pid, os.WNOHANG)
            if wpid == pid:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                self._kill_leftovers(pid, reap=False)
                _, status, rusage = os.wait4(pid, 0)
                break
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.005))
        if pidfd is not None:
            os.close(pidfd)
        return status, rusage, timed_out

    def _kill_leftovers(self, pid: int, reap: bool) -> None:
        """Kill the program and everything it spawned (daemons included); reap if asked."""
        if self.mode == "rlimits":
            _killpg_quiet(pid)
            self._kill_uid_rlimits()
        else:
            try:
                os.kill(-1, signal.SIGKILL)  # from PID 1 of the jail: everyone but ourselves
            except ProcessLookupError:
                pass
        while reap:  # as PID 1 we also inherit the orphans: wait for all of them
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break

    def _kill_uid_rlimits(self) -> None:
        """Fallback mode: the program ran as its own uid (when root); kill every such process."""
        if self.uid == 0 or self.uid == os.getuid():
            return
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}").st_uid == self.uid:
                        os.kill(int(entry), signal.SIGKILL)
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    pass


def _killpg_quiet(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", errors="replace") as f:
        f.write(text)


def _launcher_main() -> None:
    req = json.loads(sys.stdin.buffer.read())
    libc = _libc()
    mode = req["mode"]
    out = sys.stdout.buffer
    if mode == "rlimits":
        jail = _Jail(req, libc)
        results = [jail.run_one(i, r) for i, r in enumerate(req["runs"])]
        out.write(json.dumps({"results": results}).encode())
        return
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if mode == "userns":
        flags |= CLONE_NEWUSER
    _check(libc.unshare(flags), "unshare")
    if mode == "userns":
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"1000 {uid} 1")
        _write("/proc/self/gid_map", f"1000 {gid} 1")
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # PID 1 of the new namespace
        os.close(r_fd)
        code = 1
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
            # PID 1 only receives signals from inside the jail for which it has a handler;
            # Python installs one for SIGINT, so drop it (the program may share our uid).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            jail = _Jail(req, libc)
            jail.build()
            results = [jail.run_one(i, r) for i, r in enumerate(req["runs"])]
            payload = json.dumps({"results": results}).encode()
            code = 0
        except BaseException as e:  # report the jail failure, never hang
            payload = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
        with os.fdopen(w_fd, "wb") as f:
            f.write(payload)
        os._exit(code)
    os.close(w_fd)
    with os.fdopen(r_fd, "rb") as f:
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    reply = json.loads(payload or b'{"error": "jail died"}')
    if "error" in reply:
        sys.stderr.write(reply["error"] + "\n")
        sys.exit(3)
    out.write(payload)


if __name__ == "__main__":
    _launcher_main()
