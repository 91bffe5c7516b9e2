"""The machine's jit matmul peak, measured in the same run as a benchmark (its denominator)."""

import time


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of the best of `reps` fp32 [n, n] @ [n, n] products after a warm-up."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
