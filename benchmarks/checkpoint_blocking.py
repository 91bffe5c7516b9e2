"""How long a checkpoint save blocks the training loop: async save vs the same save done sync.

    python benchmarks/checkpoint_blocking.py [--params 50e6] [--repeats 3] [--dir DIR]

The state is a transformer-like dict of float32 parameters (--params in total) plus Adam's
mu and nu (optax.adam), i.e. 3x the parameter bytes, on the default backend. "blocked" is the
time `Checkpointer.save` takes to return (device->host copy, then the write goes on in the
background); "sync" is the same save followed by waiting for it to be on disk. Each save goes
to a new step after the previous one finished, as in a loop that saves every K updates.
Prints one JSON line.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from r1jax.checkpoint import Checkpointer
from r1jax.config import CheckpointConfig


def make_state(n_params: int):
    d = 1024
    n_layers = max(1, n_params // (4 * d * d))
    key = jax.random.key(0)
    params = {"layers": {"w": jax.random.normal(key, (n_layers, 4 * d, d), jnp.float32)},
              "embed": jax.random.normal(key, (max(1, (n_params - n_layers * 4 * d * d) // d), d))}
    opt_state = jax.jit(optax.adam(1e-3).init)(params)
    # non-zero moments, so compression does not flatter the numbers
    opt_state = jax.tree.map(lambda x: x + 0.1 if x.ndim else x, opt_state)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(0)}
    jax.block_until_ready(state)
    return state


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed after)")
    ap.add_argument("--verify", default="size", choices=["checksum", "size", "none"],
                    help="file-list level; checksum adds a CRC32 pass to the background write")
    a = ap.parse_args(argv)
    root = a.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
    state = make_state(int(a.params))
    n = sum(x.size for x in jax.tree.leaves(state["params"]))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    blocked, sync = [], []
    try:
        with Checkpointer(os.path.join(root, "ckpt"), CheckpointConfig(keep=2, verify=a.verify)) as c:
            step = 0
            for _ in range(a.repeats):
                step += 1
                t = time.perf_counter()
                c.save(step, state)
                blocked.append(time.perf_counter() - t)
                c.wait()
                step += 1
                t = time.perf_counter()
                c.save(step, state, block=True)
                sync.append(time.perf_counter() - t)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    out = {
        "benchmark": "checkpoint_blocking", "backend": jax.default_backend(),
        "devices": jax.device_count(), "verify": a.verify, "params": int(n), "state_bytes": int(nbytes),
        "blocked_s": round(statistics.median(blocked), 4), "sync_s": round(statistics.median(sync), 4),
        "blocked_all_s": [round(x, 4) for x in blocked], "sync_all_s": [round(x, 4) for x in sync],
    }
    out["blocked_fraction"] = round(out["blocked_s"] / out["sync_s"], 4)
    out["goal_met"] = out["blocked_fraction"] < 0.05
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
