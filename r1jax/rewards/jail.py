"""The sandbox's launcher: run as a script (stdlib only, kept light because every sandboxed
run starts one), it builds the jail and runs the program in it. r1jax.rewards.sandbox starts it
and documents what is contained; read that module first.

Protocol: one JSON request on stdin (program, stdin per run, limits, isolation mode, uid,
interpreter, read-only binds, nonce); one JSON reply on stdout ({"results": [...]}); on a jail
failure, a one-line reason on stderr and exit status 3.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time

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

_JAIL_ROOT = "/tmp"  # mount point of the jail's root tmpfs, inside the private mount namespace
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
_DEV_FILES = ("null", "zero", "full", "random", "urandom")


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


def _b(s):
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
        if self.mode == "rlimits":
            import tempfile

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
    os.waitpid(pid, 0)
    reply = json.loads(payload or b'{"error": "jail died"}')
    if "error" in reply:
        sys.stderr.write(reply["error"] + "\n")
        sys.exit(3)
    out.write(payload)


if __name__ == "__main__":
    _launcher_main()
