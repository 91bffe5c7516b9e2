"""One GRPO policy update of a DeepSeek-V3-shaped MoE model, as a share of the matmul peak.

The update is r1jax's own (`grpo.make_update_step`: forward, GRPO loss, backward, AdamW with
global-norm clipping) on a random mini-batch of `--rows` sequences of `--prompt-len` +
`--completion-len` tokens, on `--devices` fake CPU devices (experts split over them, the batch
too) or one. Useful FLOPs = 6 x active parameters x tokens (each token uses K routed experts, the
shared one, attention and the output head; the capacity padding and dropped assignments are
overhead, not useful work), divided by the median update time and by the jitted fp32 matmul
peak measured in the same run (benchmarks/_peak.py). Prints ONE JSON line.

    python benchmarks/moe_update.py                      # configs/model/deepseek-v3-mid.yaml
    python benchmarks/moe_update.py --devices 8 --mesh configs/mesh/h800x8_ep.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/model/deepseek-v3-mid.yaml")
    ap.add_argument("--mesh", default=None, help="a mesh config (needs --devices)")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=192)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--capacity-factor", type=float, default=None)
    args = ap.parse_args()
    if args.devices > 1:
        from r1jax.mesh import set_host_device_count

        set_host_device_count(args.devices)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from _peak import matmul_peak_flops

    from r1jax import grpo
    from r1jax import mesh as mesh_lib
    from r1jax.config import Config, load_config
    from r1jax.models import build, moe_decoder

    cfg: Config = load_config(args.config, [])
    mcfg = dataclasses.replace(cfg.model, num_mtp_layers=0)  # RL updates train the main model
    if args.capacity_factor is not None:
        mcfg = dataclasses.replace(mcfg, moe=dataclasses.replace(mcfg.moe, capacity_factor=args.capacity_factor))
    mesh = rules = None
    if args.mesh:
        mcfg_mesh = load_config(args.mesh, []).mesh
        mesh = mesh_lib.make_mesh(mcfg_mesh)
        rules = mesh_lib.train_rules(mcfg_mesh)
    graphdef, abstract = build.abstract_model(mcfg, mesh, rules)
    rng = np.random.RandomState(0)

    def init(a):  # numpy init: a jitted initialiser of every expert compiles for minutes on 2 cores
        x = jnp.asarray(rng.normal(0, 0.02, a.shape).astype(a.dtype))
        return jax.device_put(x, a.sharding) if getattr(a, "sharding", None) is not None else x

    params = jax.tree.map(init, abstract)
    optimizer, schedule = grpo.make_optimizer(cfg.train)
    n, tp, tc = args.rows, args.prompt_len, args.completion_len
    cfg.train.prompts_per_rollout, cfg.grpo.group_size, cfg.grpo.num_minibatches = n // 2, 2, 1
    cfg.sampler.max_new_tokens, cfg.data.max_prompt_len = tc, tp
    geometry = grpo.Geometry.from_config(cfg)
    state = grpo.init_train_state(params, optimizer)
    cfg.grpo.beta = 0.0
    update = grpo.make_update_step(graphdef, optimizer, cfg.grpo, geometry, schedule=schedule,
                                   mesh=mesh, rules=rules)
    v = mcfg.vocab_size
    batch = {
        "prompt_ids": jnp.asarray(rng.randint(0, v, (n, tp)), jnp.int32),
        "prompt_mask": jnp.ones((n, tp), jnp.int32),
        "completion_ids": jnp.asarray(rng.randint(0, v, (n, tc)), jnp.int32),
        "completion_mask": jnp.ones((n, tc), jnp.int32),
        "advantages": jnp.asarray(rng.normal(size=(n,)), jnp.float32),
        "logp_old": jnp.full((n, tc), -np.log(v), jnp.float32),
    }
    t0 = time.perf_counter()
    state, metrics = update(state, None, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = update(state, None, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    peak = matmul_peak_flops()
    tokens = n * (tp + tc)
    active = moe_decoder.active_params(mcfg) - mcfg.vocab_size * mcfg.hidden_size  # the lookup is no matmul
    useful = 6 * active * tokens
    print(json.dumps({
        "config": args.config, "mesh": args.mesh, "devices": len(jax.devices()),
        "params": moe_decoder.num_params(mcfg), "active_params": moe_decoder.active_params(mcfg),
        "capacity_factor": mcfg.moe.capacity_factor, "rows": n, "tokens": tokens,
        "first_update_s": round(first, 2), "update_s": round(step, 3),
        "useful_gflops_per_s": round(useful / step / 1e9, 2),
        "matmul_peak_gflops": round(peak / 1e9, 2),
        "fraction_of_matmul_peak": round(useful / step / peak, 4),
        "loss_finite": bool(np.isfinite(float(metrics.get("loss", 0.0)))),
    }))


if __name__ == "__main__":
    main()
