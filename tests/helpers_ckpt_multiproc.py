"""Subprocess for tests/test_checkpoint.py: restore a checkpoint in a 2-process run.

python helpers_ckpt_multiproc.py DIR PORT PROCESS_ID
Each process has 4 fake CPU devices; together they form a (4 x 2) mesh over 8 devices. The
state saved by the test (make_state in test_checkpoint.py, rebuilt here from the same seed) is
restored with target NamedShardings, and every addressable shard is compared with it.
"""

import os
import signal
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
    directory, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=60)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from helpers_ckpt_state import make_state, state_shardings

    from r1jax.checkpoint import Checkpointer, PreemptionGuard, abstract_state

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    expected = make_state(None)  # numpy reference values
    target = abstract_state(expected, state_shardings(expected, mesh))
    with Checkpointer(directory) as ckpt:
        restored = ckpt.restore(target)
    assert restored.step == 7, restored.step
    n = 0
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(expected)):
        if jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        assert got.sharding.mesh.devices.shape == (4, 2) if hasattr(got.sharding, "mesh") else True
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want)[shard.index])
            n += 1
    assert restored.data_state == {"epoch": 1, "pos": 7}
    print(f"OK process {pid}: {n} shards equal", flush=True)

    # Preemption across processes: only process 1 gets SIGTERM (JAX's notifier owns it in a
    # multi-process run); both must stop at the same step, or one would hang in a collective.
    with PreemptionGuard() as guard:
        for step in range(1, 400):
            if pid == 1 and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            if guard.should_stop(step):
                print(f"STOP {step}", flush=True)
                break
            time.sleep(0.01)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
