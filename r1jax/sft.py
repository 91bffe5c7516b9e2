"""Cold-start supervised fine-tuning (R1: a small SFT on long chain-of-thought examples before
RL), as a pure step jitted like the GRPO update: explicit shardings, parameters and optimiser
state donated.

The loss is the token mean of -log p over each sequence's solution and eos (data.SFTBatch's
loss mask), under the model's own forward; the RL optimiser starts fresh afterwards.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from r1jax import data as data_lib
from r1jax import distributed
from r1jax import mesh as mesh_lib
from r1jax.config import DataConfig, SFTConfig
from r1jax.logprobs import chunk_len_for, sequence_logprobs


def make_optimizer(sft_cfg: SFTConfig) -> optax.GradientTransformation:
    """AdamW (sft.b1, b2, weight_decay) after global-norm clipping (sft.max_grad_norm; 0: off),
    on a warmup (sft.warmup_steps) then cosine decay to lr * final_lr_ratio at sft.steps."""
    c = sft_cfg
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, c.lr, max(1, c.warmup_steps), max(c.steps, c.warmup_steps + 1), c.lr * c.final_lr_ratio)
    parts = [optax.clip_by_global_norm(c.max_grad_norm)] if c.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay))
    return optax.chain(*parts)


def sft_loss(graphdef, params, tokens_BxT, loss_mask_BxT, segment_ids_BxT, *,
             batch_shards: int = 1) -> jax.Array:
    """Mean -log p(token | prefix) over the loss tokens (mask[:, 1:]: targets are shifted)."""
    model = nnx.merge(graphdef, params)
    b, t = tokens_BxT.shape
    chunk = chunk_len_for(max(1, b // batch_shards), t - 1, model.cfg.vocab_size)
    logp, _ = sequence_logprobs(model, tokens_BxT, segment_ids_BxT, chunk_len=chunk)
    m = loss_mask_BxT[:, 1:].astype(jnp.float32)
    return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)


def make_step(graphdef, optimizer: optax.GradientTransformation, *, params_shardings=None,
              opt_shardings=None, mesh=None, rules=None) -> Callable:
    """The jitted SFT step: (params, opt_state, tokens, loss_mask, segment_ids) ->
    (params, opt_state, loss); params and opt_state donated. With a mesh, the batch is split
    over the batch axes of `rules` and the model's activation constraints apply."""
    rules = rules if rules is not None else mesh_lib.TRAIN_RULES
    shards = mesh_lib.batch_shards(mesh, rules)

    def step(params, opt_state, tokens, mask, seg):
        def run():
            loss, g = jax.value_and_grad(
                lambda p: sft_loss(graphdef, p, tokens, mask, seg, batch_shards=shards))(params)
            upd, o = optimizer.update(g, opt_state, params)
            return optax.apply_updates(params, upd), o, loss

        if mesh is None:
            return run()
        with mesh_lib.layout(mesh, rules):
            return run()

    kw: Dict[str, Any] = {"donate_argnums": (0, 1)}
    if mesh is not None and params_shardings is not None:
        batch = mesh_lib.batch_sharding(mesh, rules, 2)
        kw["in_shardings"] = (params_shardings, opt_shardings, batch, batch, batch)
        kw["out_shardings"] = (params_shardings, opt_shardings, mesh_lib.replicated(mesh))
    return jax.jit(step, **kw)


def opt_state_shardings(optimizer, params_abstract, params_shardings, mesh):
    """Optimiser moments sharded like their parameters, counters replicated."""
    replicated = mesh_lib.replicated(mesh)
    abstract_opt = jax.eval_shape(optimizer.init, params_abstract)
    return optax.tree_utils.tree_map_params(optimizer, lambda _p, s: s, abstract_opt, params_shardings,
                                            transform_non_params=lambda _: replicated)


def train(graphdef, params, *, sft_cfg: SFTConfig, data_cfg: DataConfig, tokenizer, max_len: int,
          mesh, rules, params_shardings=None, progress: Optional[Callable[[int, float], None]] = None
          ) -> Tuple[Any, float]:
    """Run sft.steps steps on batches of data prompts + their worked `solution`s, every batch
    padded to `max_len` (one compilation). `params` are donated. `progress(i, loss)` is called
    after each step (the loss read back every 10 steps and at the end, so the host does not wait
    on the device every step). Returns (params, last loss)."""
    optimizer = make_optimizer(sft_cfg)
    opt_sh = None
    if mesh is not None and params_shardings is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        opt_sh = opt_state_shardings(optimizer, abstract, params_shardings, mesh)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    else:
        opt_state = optimizer.init(params)
    step = make_step(graphdef, optimizer, params_shardings=params_shardings, opt_shardings=opt_sh,
                     mesh=mesh, rules=rules)
    # The global batch on every process (the same order for any process count); each process
    # places only the rows its devices hold.
    batches = data_lib.sft_batches(data_cfg, tokenizer, sft_cfg.batch_size, max_len=max_len,
                                   buckets=[max_len], shard_options=data_lib.global_order())
    sh = (mesh_lib.batch_sharding(mesh, rules if rules is not None else mesh_lib.TRAIN_RULES, 2)
          if mesh is not None else None)
    loss = float("nan")
    for i in range(sft_cfg.steps):
        b = next(batches)
        put = lambda x: distributed.put_global(x, sh) if sh is not None else jax.device_put(np.asarray(x))  # noqa: E731
        params, opt_state, loss_d = step(params, opt_state, put(b.tokens_BxT), put(b.loss_mask_BxT),
                                         put(b.segment_ids_BxT))
        if i % 10 == 0 or i == sft_cfg.steps - 1:
            loss = float(loss_d)
        if progress is not None:
            progress(i, loss)
    return params, loss


__all__ = ["make_optimizer", "make_step", "sft_loss", "train", "opt_state_shardings"]
