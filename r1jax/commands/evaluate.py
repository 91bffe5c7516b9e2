"""`r1jax eval [CONFIG] [key=value ...] [--checkpoint RUN_DIR [--step N]]`: pass@1 over k
samples and cons@k on the held-out split, of a run's checkpoint (its saved config is the base)
or of an HF directory (model.path)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

from r1jax.commands import DEMO, ckpt_dir, run_dir_of


def evaluate_command(config_path, overrides: List[str], *, checkpoint: Optional[str] = None,
                     step: Optional[int] = None, default_config: Optional[str] = DEMO) -> Dict[str, Any]:
    from r1jax import checkpoint as ckpt_lib
    from r1jax import grpo
    from r1jax import mesh as mesh_lib
    from r1jax.config import load_config
    from r1jax.evaluation import evaluate
    from r1jax.rewards.accuracy import run_settings
    from r1jax.models.build import abstract_model, build_model, resolve_model_config
    from r1jax.sampler import Sampler
    from r1jax.tokenizer import load_tokenizer

    if checkpoint:
        run_dir = run_dir_of(checkpoint)
        cfg = load_config(config_path or os.path.join(run_dir, "config.yaml"), overrides)
        tok_dir = os.path.join(run_dir, "tokenizer")
        tokenizer = load_tokenizer(tok_dir if os.path.isdir(tok_dir) else (cfg.data.tokenizer or cfg.model.path))
    else:
        cfg = load_config(config_path or default_config, overrides)
        if not cfg.model.path:
            raise ValueError("eval needs a model: --checkpoint RUN_DIR or model.path=HF_DIR")
        tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.path)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = mesh_lib.sample_rules(cfg.mesh)
    if checkpoint:
        # The run's saved config holds the resolved model: only the parameters are read.
        graphdef, target = abstract_model(dataclasses.replace(cfg.model, path=None), mesh, rules)
        ck = ckpt_lib.Checkpointer(ckpt_dir(run_dir), read_only=True)
        try:
            used_step, params = ck.restore_params_only(target, step=step)
        finally:
            ck.close()
        source: Dict[str, Any] = {"checkpoint": run_dir, "step": used_step}
    else:
        mcfg = resolve_model_config(cfg.model, tokenizer)
        graphdef, params = build_model(mcfg, mesh, rules)
        source = {"model": cfg.model.path}
    sampler = Sampler(graphdef, cfg.sampler, mesh=mesh, rules=rules, tokenizer=tokenizer,
                      pad_id=tokenizer.pad_id)
    prompt_len = grpo.Geometry.from_config(cfg).prompt_len
    out = evaluate(sampler, params, eval_cfg=cfg.eval, data_cfg=cfg.data, tokenizer=tokenizer,
                   prompt_len=prompt_len, seed=cfg.train.seed + 7,
                   answer_kwargs=run_settings(cfg.rewards.functions))
    return {**source, **out}


def run(args) -> int:
    out = evaluate_command(args.config_path, args.config_overrides,
                           checkpoint=args.checkpoint and ckpt_dir(args.checkpoint), step=args.step)
    print(json.dumps(out))
    return 0
