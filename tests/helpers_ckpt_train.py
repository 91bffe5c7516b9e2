"""Subprocess for tests/test_checkpoint.py: a tiny optax loop checkpointed by r1jax.checkpoint.

python helpers_ckpt_train.py DIR --steps N [--every K] [--sleep S] [--kill-at STEP]
Prints one JSON line per step, "PREEMPTED <step>" when stopped by a signal, and at the end
"FINAL <sha256 of the final params>" so runs can be compared bitwise.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from r1jax.checkpoint import Checkpointer, PreemptionGuard, abstract_state  # noqa: E402
from r1jax.config import CheckpointConfig  # noqa: E402


def init_state():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(32, 32)), jnp.float32), "b": jnp.zeros((32,), jnp.float32)}
    return {"params": params, "opt_state": optax.adam(1e-2).init(params), "rng": jax.random.key(1)}


def batch(step):
    rng = np.random.default_rng(1000 + step)
    return jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)


@jax.jit
def update(state, x_BxD):
    rng, sub = jax.random.split(state["rng"])

    def loss_fn(p):
        noise = 0.01 * jax.random.normal(sub, x_BxD.shape)
        return jnp.mean((jnp.tanh((x_BxD + noise) @ p["w"] + p["b"]) - x_BxD) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = optax.adam(1e-2).update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state, "rng": rng}, loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--kill-at", type=int, default=None)
    a = ap.parse_args()
    state = init_state()
    with PreemptionGuard() as guard, Checkpointer(a.dir, CheckpointConfig(every=a.every, keep=3),
                                                  guard=guard) as ckpt:
        restored = ckpt.restore(abstract_state(state))
        start = 1
        if restored is not None:
            state, start = restored.state, restored.step + 1
            assert restored.data_state == {"pos": restored.step}, restored.data_state
            print(f"RESUMED {restored.step}", flush=True)
        for step in range(start, a.steps + 1):
            state, loss = update(state, batch(step))
            print(json.dumps({"step": step, "loss": float(loss)}), flush=True)
            ckpt.maybe_save(step, state, data_state={"pos": step}, metadata={"loss": loss})
            if ckpt.preempted:
                print(f"PREEMPTED {step}", flush=True)
                return
            if a.kill_at == step:
                # The async write of this step has only just started: die mid-write.
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(a.sleep)
        ckpt.save(a.steps, state, data_state={"pos": a.steps}, block=True)
    blob = b"".join(np.asarray(v).tobytes() for v in jax.tree.leaves(state["params"]))
    print("FINAL " + hashlib.sha256(blob).hexdigest(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
