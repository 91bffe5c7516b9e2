"""Runs `r1jax.cli.main(argv)` with one fault injected, for the fault-injection tests.

    python tests/faults/launch.py ACTION@module:attr#N [--disk-kib K] -- train CONFIG key=value ...

ACTION@module:attr#N wraps the callable `attr` of `module` (a dotted attribute such as
`Class.method` is allowed) and performs ACTION at its N-th call in this process:
    kill    SIGKILL this process before the call runs (nothing after it happens);
    killafter  run the call, then SIGKILL (an update is dispatched asynchronously, so the process
            dies while the device computes it);
    term    send SIGTERM to this process, then run the call (the run's own handler decides).
ACTION+settle first waits until no checkpoint write is in flight (no `*.orbax-checkpoint-tmp*`
in the run's checkpoints/), so that "killed during sampling" does not also mean "during the
write of the checkpoint before it" on a slow machine.
`none` injects nothing. Nothing in r1jax knows about this script: the faults come from outside,
through the same public functions the training loop calls, so the tests survive refactors as
long as those functions keep their names (the launcher fails loudly when a target is missing,
and the tests check that each fault fired).

--disk-kib K: run with the run's checkpoints/ directory on a tmpfs of K KiB (a full disk), in
a private mount namespace (root or CAP_SYS_ADMIN); afterwards whatever the checkpoints/
directory holds is copied back to the real disk, so the test can inspect and resume from it.
Exits 75 when the mount is not possible (the test then skips).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import shutil
import signal
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIRED = "R1JAX_FAULT_FIRED"  # the file the launcher touches when its fault fires

CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 0x40000


def _resolve(target: str):
    mod_name, attr = target.split(":")
    owner = importlib.import_module(mod_name)
    parts = attr.split(".")
    for p in parts[:-1]:
        owner = getattr(owner, p)
    if not hasattr(owner, parts[-1]):
        sys.exit(f"fault target {target} does not exist")
    return owner, parts[-1]


def _settle(run_dir: str, timeout_s: float = 120.0) -> None:
    ckpt = os.path.join(run_dir, "checkpoints")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and os.path.isdir(ckpt) and any(
            ".orbax-checkpoint-tmp" in name for name in os.listdir(ckpt)):
        time.sleep(0.05)


def install(spec: str, run_dir: str) -> None:
    if spec == "none":
        return
    action, rest = spec.split("@")
    action, settle = action.split("+")[0], action.endswith("+settle")
    target, n = rest.split("#")
    owner, name = _resolve(target)
    original, count = getattr(owner, name), [0]

    def fire():
        marker = os.environ.get(FIRED)
        if marker:
            with open(marker, "w") as f:
                f.write(spec)

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] != int(n):
            return original(*args, **kwargs)
        if settle:
            _settle(run_dir)
        fire()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)
        out = original(*args, **kwargs)
        if action == "killafter":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, wrapped)


def _mount_tmpfs(directory: str, kib: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        sys.exit(75)
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        sys.exit(75)
    os.makedirs(directory, exist_ok=True)
    if libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0, f"size={kib}k".encode()) != 0:
        sys.exit(75)


def main() -> int:
    args = sys.argv[1:]
    split = args.index("--")
    opts, argv = args[:split], args[split + 1:]
    spec, disk_kib = opts[0], None
    if "--disk-kib" in opts:
        disk_kib = int(opts[opts.index("--disk-kib") + 1])
    sys.path.insert(0, ROOT)
    ckpt = None
    if disk_kib is not None:
        run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("run.dir="))
        ckpt = os.path.join(run_dir, "checkpoints")
        saved = tempfile.mkdtemp(prefix="r1jax-disk-")
        if os.path.isdir(ckpt):
            shutil.copytree(ckpt, saved, dirs_exist_ok=True)
        _mount_tmpfs(ckpt, disk_kib)
        # Unfinished steps would be deleted on start anyway; copying them could fill the disk.
        shutil.copytree(saved, ckpt, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
    install(spec, next(a.split("=", 1)[1] for a in argv if a.startswith("run.dir=")))
    from r1jax.cli import main as cli_main

    try:
        rc = cli_main(argv)
    finally:
        if ckpt is not None:  # what the full disk holds goes back to the real one
            out = tempfile.mkdtemp(prefix="r1jax-disk-")
            shutil.copytree(ckpt, out, dirs_exist_ok=True)
            ctypes.CDLL(None).umount2(ckpt.encode(), 2)  # MNT_DETACH
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.copytree(out, ckpt)
    return rc


if __name__ == "__main__":
    sys.exit(main())
