"""Backend-aware numerics: three GRPO updates of a tiny model, computed once in fp32 on CPU and
committed (grpo_tiny.json), rerun on whatever backend is present.

Inputs are built with numpy from fixed seeds (the same on every backend); matmuls run at
"highest" precision so a GPU does not silently use TF32 nor a TPU single-pass bf16. The
tolerances (relative, absolute) per compute dtype and backend are in TOLERANCES; bf16 compute is
compared with the fp32 golden at its own, looser tolerance.

Regenerate (on CPU, after an intended numerics change): python tests/golden/test_golden.py
"""

import json
import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GOLDEN = os.path.join(HERE, "grpo_tiny.json")
UPDATES = 3

# (rtol, atol) per (compute dtype, backend).
TOLERANCES = {
    ("float32", "cpu"): (2e-5, 1e-6),
    ("float32", "gpu"): (2e-4, 1e-5),
    ("float32", "tpu"): (2e-3, 1e-4),
    # bf16 activations (8-bit mantissa) against the fp32 golden, after three updates: the
    # gradient norm of the last update moves most (~17% measured on CPU).
    ("bfloat16", "cpu"): (0.25, 1e-2),
    ("bfloat16", "gpu"): (0.25, 1e-2),
    ("bfloat16", "tpu"): (0.25, 1e-2),
}
METRICS = ("loss", "pg_loss", "kl", "grad_norm", "entropy")


def compute(dtype: str = "float32"):
    """The golden quantities on the default backend: per update the metrics above, then per
    parameter leaf the sum and L2 norm of its final value."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from r1jax import grpo
    from r1jax.config import load_config
    from r1jax.models import build

    cfg = load_config(os.path.join(ROOT, "configs/model/tiny.yaml"), [
        f"model.dtype={dtype}", "train.prompts_per_rollout=4", "grpo.group_size=4",
        "grpo.num_minibatches=1", "data.max_prompt_len=8", "sampler.max_new_tokens=8",
        "sampler.prompt_buckets=[8]", "grpo.beta=0.04", "train.lr=1e-3", "train.warmup_steps=0",
        "train.weight_decay=0.0", "grpo.micro_batches=2"])
    with jax.default_matmul_precision("highest"):
        geom = grpo.Geometry.from_config(cfg)
        graphdef, abstract = build.abstract_model(cfg.model)
        rng = np.random.default_rng(0)
        flat = traverse_util.flatten_dict(abstract, sep="/")
        params = traverse_util.unflatten_dict({
            k: jnp.asarray(np.ones(a.shape) if "norm" in k else 0.05 * rng.standard_normal(a.shape),
                           a.dtype) for k, a in sorted(flat.items())}, sep="/")
        n, tp, tc, v = geom.minibatch_size, geom.prompt_len, geom.completion_len, cfg.model.vocab_size
        lengths = rng.integers(2, tc + 1, n)
        pmask = np.ones((n, tp), np.int32)
        pmask[:, :2] = 0  # left padding
        batch = {"prompt_ids": rng.integers(1, v, (n, tp)).astype(np.int32), "prompt_mask": pmask,
                 "completion_ids": rng.integers(1, v, (n, tc)).astype(np.int32),
                 "completion_mask": (np.arange(tc)[None] < lengths[:, None]).astype(np.int32),
                 "advantages": rng.standard_normal(n).astype(np.float32)}
        batch = {k: jnp.asarray(x) for k, x in batch.items()}
        ref = grpo.reference_logprobs_fn(graphdef, temperature=geom.temperature)
        logp = ref(params, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"])
        batch["logp_old"] = logp
        batch["logp_ref"] = logp
        optimizer, schedule = grpo.make_optimizer(cfg.train)
        state = grpo.init_train_state(jax.tree.map(jnp.copy, params), optimizer)
        update = grpo.make_update_step(graphdef, optimizer, cfg.grpo, geom, schedule=schedule)
        rows = []
        for _ in range(UPDATES):
            state, m = update(state, params, batch)
            rows.append({k: float(m[k]) for k in METRICS})
        final = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    leaves = {k: {"sum": float(np.sum(np.asarray(x, np.float64))),
                  "norm": float(np.linalg.norm(np.asarray(x, np.float64)))}
              for k, x in sorted(final.items())}
    return {"updates": rows, "params": leaves}


def _flat(g):
    out = {f"update{i}/{k}": v for i, r in enumerate(g["updates"]) for k, v in r.items()}
    out.update({f"{k}/{s}": v[s] for k, v in g["params"].items() for s in ("sum", "norm")})
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grpo_updates_match_the_golden_file(dtype):
    import jax

    backend = jax.default_backend()
    if (dtype, backend) not in TOLERANCES:
        pytest.fail(f"no tolerance stated for {dtype} on backend {backend!r}: add it to TOLERANCES")
    rtol, atol = TOLERANCES[(dtype, backend)]
    with open(GOLDEN) as f:
        golden = _flat(json.load(f))
    got = _flat(compute(dtype))
    assert set(got) == set(golden)
    bad = [(k, golden[k], got[k]) for k in sorted(golden)
           if not np.isclose(got[k], golden[k], rtol=rtol, atol=atol)]
    assert not bad, f"{len(bad)} of {len(golden)} values off on {backend}/{dtype}: {bad[:5]}"
    # The updates did something: the loss and the parameters moved.
    assert got["update0/loss"] != got["update2/loss"]


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with open(GOLDEN, "w") as f:
        json.dump(compute("float32"), f, indent=1)
    print("wrote", GOLDEN)
