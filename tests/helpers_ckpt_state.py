"""The train-state pytree the checkpoint tests save and restore (shared with the subprocesses)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


def make_state(mesh=None, seed=0):
    """params + adamw state (after one update, so mu/nu are not zero) + step + typed PRNG key,
    laid out by `state_shardings` on `mesh` (None: the default device)."""
    rng = np.random.default_rng(seed)
    params = {
        "embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
        "layers": {"w": jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32),
                   "b": jnp.asarray(rng.normal(size=(2, 8)), jnp.bfloat16)},
    }
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    updates, opt_state = opt.update(grads, opt_state, params)
    state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
             "step": jnp.int32(7), "rng": jax.random.key(3)}
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh))
    return state


def state_shardings(state, mesh):
    """The last two axes over ("data", "fsdp") where they divide, else replicated."""
    def one(x):
        shape = x.shape
        spec = P()
        if len(shape) >= 2 and shape[-2] % mesh.shape["data"] == 0 and shape[-1] % mesh.shape["fsdp"] == 0:
            spec = P(*([None] * (len(shape) - 2)), "data", "fsdp")
        elif len(shape) == 1 and shape[0] % mesh.shape["fsdp"] == 0:
            spec = P("fsdp")
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state)
