"""A tiny multi-process program for tests/test_multihost.py: all-reduces in a loop, under the
launcher, r1jax.distributed's start-up and its step watchdog.

python helpers_multihost.py STEPS [--hang-at K --hang-process I] [--watchdog S]
Prints "STEP k sum" every step on every process ("READY pid" first). With --hang-at, process I
sleeps without beating at step K (a stuck process: only the watchdog can end it).
"""

import argparse
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("steps", type=int)
    ap.add_argument("--hang-at", type=int, default=-1)
    ap.add_argument("--hang-process", type=int, default=1)
    ap.add_argument("--watchdog", type=float, default=0)
    args = ap.parse_args()
    from r1jax import distributed
    from r1jax.mesh import set_host_device_count

    set_host_device_count(int(os.environ["R1JAX_DEVICES"]))
    distributed.initialize(distributed.detect(), distributed.timeouts_from())
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    pid = jax.process_index()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), np.full(jax.local_device_count(), pid + 1, np.float32))
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))
    print(f"READY {pid} {os.getpid()}", flush=True)
    with distributed.StepWatchdog(args.watchdog) as dog:
        for step in range(args.steps):
            if step == args.hang_at and pid == args.hang_process:
                time.sleep(3600)
            s = float(total(x))
            print(f"STEP {step} {s}", flush=True)
            dog.beat(f"step {step}")
            time.sleep(0.05)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
