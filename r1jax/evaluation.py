"""Evaluation as R1 reports it (pass@1 averaged over k samples, cons@k majority vote), and the
checkpoint-facing commands built on it (`r1jax eval`, `r1jax ckpt export-hf`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections import Counter
from typing import Any, Dict, List, Optional

import jax
import numpy as np
from flax import nnx

from r1jax import data as data_lib
from r1jax import mesh as mesh_lib
from r1jax import sampler as sampler_lib
from r1jax.config import Config, load_config
from r1jax.rewards import accuracy as accuracy_reward, extract_answer
from r1jax.tokenizer import Tokenizer, load_tokenizer


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


# ---------------------------------------------------------------------------------------------
# Evaluation: pass@1 averaged over k samples and cons@k (majority vote), as R1 reports them
# ---------------------------------------------------------------------------------------------
def evaluate(cfg: Config, graphdef, params, tokenizer: Tokenizer, mesh, rules, *,
             seed: int = 0, num_prompts: Optional[int] = None, k: Optional[int] = None,
             batch_size: int = 64, samples_out: Optional[List[Dict[str, Any]]] = None) -> Dict[str, float]:
    k = k or cfg.eval.k
    num_prompts = num_prompts or cfg.eval.num_prompts
    scfg = dataclasses.replace(cfg.sampler, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                               max_new_tokens=cfg.eval.max_new_tokens or cfg.sampler.max_new_tokens)
    batches = data_lib.eval_batches(cfg.data, tokenizer, min(batch_size, num_prompts),
                                    buckets=cfg.sampler.prompt_buckets)
    correct, votes_ok, n_prompts, lengths = [], [], 0, []
    key = jax.random.PRNGKey(seed)
    for bi, b in enumerate(batches):
        if n_prompts >= num_prompts:
            break
        take = min(len(b), num_prompts - n_prompts)
        out = sampler_lib.sample((graphdef, params), b.prompt_ids_PxTp[:take],
                                 prompt_mask=b.prompt_mask_PxTp[:take], key=jax.random.fold_in(key, bi),
                                 num_samples=k, config=scfg, mesh=mesh, rules=rules,
                                 tokenizer=tokenizer, pad_id=tokenizer.pad_id)
        tokens, mask = _host(out.tokens), _host(out.mask)
        texts = tokenizer.batch_decode([t[m.astype(bool)] for t, m in zip(tokens, mask)])
        answers = [a for a in b.answers[:take] for _ in range(k)]
        acc = np.asarray([x or 0.0 for x in accuracy_reward(completions=texts, answer=answers)], np.float32)
        correct.append(acc)
        lengths.append(mask.sum(-1))
        for p in range(take):
            group = range(p * k, (p + 1) * k)
            extracted = [extract_answer(texts[i]) for i in group]
            counts = Counter(e.strip() for e in extracted if e)
            if counts:
                top = counts.most_common(1)[0][0]
                winner = next(i for i in group if (extracted[i - p * k] or "").strip() == top)
                votes_ok.append(float(acc[winner]))
            else:
                votes_ok.append(0.0)
        if samples_out is not None and bi == 0:
            samples_out.extend({"prompt": b.prompts[i // k], "completion": texts[i],
                                "answer": answers[i], "correct": float(acc[i])}
                               for i in range(min(len(texts), cfg.run.samples_to_log)))
        n_prompts += take
    if not n_prompts:
        raise data_lib.DataError("evaluation found no held-out prompts (set data.eval_fraction or an eval split)")
    acc_all = np.concatenate(correct)
    return {"eval/pass@1": float(acc_all.mean()), f"eval/cons@{k}": float(np.mean(votes_ok)),
            "eval/num_prompts": float(n_prompts), "eval/k": float(k),
            "eval/length_mean": float(np.concatenate(lengths).mean())}


def _run_dir_of(ckpt_dir: str) -> str:
    ckpt_dir = os.path.abspath(ckpt_dir)
    return os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir


def evaluate_command(config_path: Optional[str], overrides: List[str], *, checkpoint: Optional[str] = None,
                     step: Optional[int] = None, default_config: Optional[str] = None) -> Dict[str, Any]:
    """`r1jax eval`: the model from a run's checkpoint (its saved config is the base) or from
    model.path (an HF directory)."""
    from r1jax import checkpoint as ckpt_lib
    from r1jax.models import build
    from r1jax.models.transformer import Transformer

    if checkpoint:
        run_dir = _run_dir_of(checkpoint)
        base = config_path or os.path.join(run_dir, "config.yaml")
        cfg = load_config(base, overrides)
        tok_dir = os.path.join(run_dir, "tokenizer")
        tokenizer = load_tokenizer(tok_dir if os.path.isdir(tok_dir) else (cfg.data.tokenizer or cfg.model.path))
        mesh = mesh_lib.make_mesh(cfg.mesh)
        rules = mesh_lib.sample_rules(cfg.mesh)
        mcfg = dataclasses.replace(cfg.model, path=None)
        abstract = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
        graphdef, abs_state = nnx.split(abstract, nnx.Param)
        shardings = mesh_lib.params_shardings(abs_state, mesh, rules)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nnx.to_pure_dict(abs_state), shardings)
        ck = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
        try:
            used_step, params = ck.restore_params_only(target, step=step)
        finally:
            ck.close()
        source = {"checkpoint": run_dir, "step": used_step}
    else:
        cfg = load_config(config_path or default_config, overrides)
        if not cfg.model.path:
            raise ValueError("eval needs a model: --checkpoint RUN_DIR or model.path=HF_DIR")
        tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.path)
        mesh = mesh_lib.make_mesh(cfg.mesh)
        rules = mesh_lib.sample_rules(cfg.mesh)
        model = build.from_pretrained(cfg.model.path, dtype=cfg.model.dtype, mesh=mesh, rules=rules)
        graphdef, state = nnx.split(model, nnx.Param)
        params = nnx.to_pure_dict(state)
        source = {"model": cfg.model.path}
    out = evaluate(cfg, graphdef, params, tokenizer, mesh, rules, seed=cfg.train.seed + 7)
    return {**source, **out}


def export_run(run_or_ckpt_dir: str, out_dir: str, *, step: Optional[int] = None) -> str:
    """A run's checkpoint as an HF directory, with the run's tokenizer beside the weights."""
    from r1jax import checkpoint as ckpt_lib

    run_dir = _run_dir_of(run_or_ckpt_dir)
    ckpt_dir = os.path.join(run_dir, "checkpoints") if os.path.isdir(os.path.join(run_dir, "checkpoints")) else run_dir
    ckpt_lib.export_hf(ckpt_dir, out_dir, step=step)
    tok_dir = os.path.join(run_dir, "tokenizer")
    if os.path.isdir(tok_dir):
        for name in os.listdir(tok_dir):
            shutil.copy(os.path.join(tok_dir, name), os.path.join(out_dir, name))
    return out_dir
