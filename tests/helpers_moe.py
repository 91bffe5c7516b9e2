"""Shared by the MoE model tests: one compiled forward, the fused expert layout, random weights."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from r1jax.models import build


@jax.jit
def forward(model, toks):
    """(logits, MoE side outputs) in one compiled call (eager dispatch is slow on 2 cores)."""
    h, _, aux = model.hidden_and_aux(toks)
    return jnp.einsum("btd,dv->btv", h, model.unembed_matrix()), aux


def fuse_experts(src: str, dst: str):
    """Rewrite a per-expert checkpoint in the fused layout ([E, 2F, D] gate_up, [E, D, F] down)."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    layers = sorted({k.split(".mlp.experts.")[0] for k in tensors if ".mlp.experts." in k})
    for pre in layers:
        n = len({k for k in tensors if k.startswith(pre + ".mlp.experts.") and k.endswith("gate_proj.weight")})
        g = [tensors[f"{pre}.mlp.experts.{e}.gate_proj.weight"] for e in range(n)]
        u = [tensors[f"{pre}.mlp.experts.{e}.up_proj.weight"] for e in range(n)]
        out[f"{pre}.mlp.experts.gate_up_proj"] = np.stack([np.concatenate([a, b]) for a, b in zip(g, u)])
        out[f"{pre}.mlp.experts.down_proj"] = np.stack(
            [tensors[f"{pre}.mlp.experts.{e}.down_proj.weight"] for e in range(n)])
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


def random_model(cfg, seed):
    """A model with random weights, drawn in numpy (jit-compiling the initialiser of a many-leaf
    MoE model costs more than the rest of the test)."""
    graphdef, abstract = build.abstract_model(cfg)
    r = np.random.RandomState(seed)
    params = jax.tree.map(lambda a: jnp.asarray(r.normal(0, 0.1, a.shape).astype(a.dtype)), abstract)
    return nnx.merge(graphdef, params)
