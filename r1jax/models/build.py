"""The one place that resolves a model's config and builds the model: abstractly (shapes and
shardings only, no memory), randomly initialised straight into its shards, or read from a
Hugging Face directory slice by slice into its shards.

Every caller (trainer, sampler, evaluation, the ahead-of-time compiler, the layout report)
goes through these functions, so that `model.path=HF_DIR` means the same model everywhere.
The architecture is looked up in r1jax.models.registry.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import jax
from flax import nnx

from r1jax import mesh as mesh_lib
from r1jax.config import ModelConfig
from r1jax.models import hf, registry

Params = Dict[str, Any]  # a pure nested dict of arrays (or of ShapeDtypeStruct when abstract)


def resolve_model_config(model_cfg: ModelConfig, tokenizer=None) -> ModelConfig:
    """The ModelConfig to build.

    With `model_cfg.path` (an HF directory): its config.json's shapes, with the run's
    dtype, param_dtype, remat and scan_layers applied on top. Otherwise `model_cfg` itself.
    With a tokenizer: the vocabulary is at least the tokenizer's (a dataclass config is grown to
    it; a checkpoint smaller than its tokenizer is an error), and eos/pad/bos token ids not set
    by the config come from the tokenizer (eos and pad always, for a dataclass config).
    """
    m = model_cfg
    registry.get(m.architecture)  # an unknown architecture fails here, naming the valid ones
    if m.path:
        cfg = hf.load_config(m.path, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                             scan_layers=m.scan_layers)
        if tokenizer is None:
            return cfg
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"{m.path}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"checkpoint's embedding only {cfg.vocab_size}")
        return dataclasses.replace(
            cfg,
            eos_token_id=tokenizer.eos_id if cfg.eos_token_id is None else cfg.eos_token_id,
            pad_token_id=tokenizer.pad_id if cfg.pad_token_id is None else cfg.pad_token_id,
            bos_token_id=tokenizer.bos_id if cfg.bos_token_id is None else cfg.bos_token_id)
    if tokenizer is None:
        return m
    return dataclasses.replace(
        m, vocab_size=max(m.vocab_size, tokenizer.vocab_size), eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id if m.bos_token_id is None else m.bos_token_id)


def _module(mcfg: ModelConfig, seed: int) -> nnx.Module:
    return registry.get(mcfg.architecture).model(mcfg, rngs=nnx.Rngs(seed))


def _split_params(module: nnx.Module):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree.leaves(rest):
        paths = sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(rest))
        raise ValueError(f"model '{type(module).__name__}' holds non-Param state "
                         f"({', '.join(paths[:3])}); r1jax builds and trains nnx.Param leaves only")
    return graphdef, params


def abstract_model(mcfg: ModelConfig, mesh=None, rules=None) -> Tuple[nnx.GraphDef, Params]:
    """(graphdef, abstract params): a pure dict of jax.ShapeDtypeStruct, each carrying its
    NamedSharding under `rules` (default: r1jax.mesh.TRAIN_RULES) when a mesh is given.
    Nothing is allocated. `nnx.merge(graphdef, params)` makes the module from real params."""
    graphdef, state = _split_params(nnx.eval_shape(lambda: _module(mcfg, 0)))
    shapes = nnx.to_pure_dict(state)
    if mesh is None:
        return graphdef, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), shapes)
    shardings = mesh_lib.params_shardings(state, mesh, mesh_lib.TRAIN_RULES if rules is None else rules)
    return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  shapes, shardings)


def shardings(abstract: Params) -> Params:
    """The NamedShardings carried by `abstract_model(..., mesh=...)`'s params, as a pure dict
    (for a jit's in/out_shardings)."""
    return jax.tree.map(lambda a: a.sharding, abstract)


def build_model(mcfg: ModelConfig, mesh=None, rules=None, seed: int = 0) -> Tuple[nnx.GraphDef, Params]:
    """(graphdef, params) with params a pure dict of arrays placed by `rules` on `mesh`
    (default device when mesh is None). With `mcfg.path` the weights are read from that HF
    directory (each device reads only its own slices); otherwise initialised from `seed`
    inside one jit whose outputs are the shards, so no device ever holds a whole parameter."""
    graphdef, abstract = abstract_model(mcfg, mesh, rules)
    if mcfg.path:
        return graphdef, hf.load_params(mcfg.path, mcfg, abstract)

    def init():
        return nnx.to_pure_dict(_split_params(_module(mcfg, seed))[1])

    if mesh is None:  # eager: each op's compilation is cached across models of the same shapes
        return graphdef, init()
    return graphdef, jax.jit(init, out_shardings=shardings(abstract))()


def create(mcfg: ModelConfig, *, mesh=None, rules=None, seed: int = 0) -> nnx.Module:
    """`build_model` as an nnx Module (HF weights when mcfg.path, else random from seed)."""
    return nnx.merge(*build_model(mcfg, mesh, rules, seed))


def from_pretrained(path: str, *, dtype: Optional[str] = None, param_dtype: Optional[str] = None,
                    mesh=None, rules=None, **overrides) -> nnx.Module:
    """The model of an HF directory, each tensor read lazily into its sharding.

    dtype: compute dtype, param_dtype: storage dtype (default: the checkpoint's). With a mesh,
    parameters are sharded by `rules` (default: training rules). `overrides`: other
    ModelConfig fields (remat, scan_layers, ...).
    """
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    return create(hf.load_config(path, **overrides), mesh=mesh, rules=rules)


def num_params(mcfg: ModelConfig) -> int:
    """Parameter count, from the abstract shapes (so it holds for every family)."""
    return sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_model(mcfg)[1]))
