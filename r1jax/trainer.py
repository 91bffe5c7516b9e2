"""The training loop: one rollout moves through the rooms and back (../DESIGN.md).

    data -> sampler (P prompts x G samples) -> rewards (host threads) -> advantages
         -> reference log-probs -> M policy updates (jitted, donated) -> metrics / eval / ckpt

A rollout is stored in fixed shapes (prompts left-padded to the largest bucket), and the
unfinished part of it is checkpointed with the train state, so a run killed anywhere resumes
to bitwise the same parameters and metrics (on CPU).

Everything here is orchestration: the algorithm lives in grpo.py, the model in models/, the
rollout engine in sampler.py; this module only moves arrays between them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from r1jax import checkpoint as ckpt_lib
from r1jax import data as data_lib
from r1jax import grpo
from r1jax import mesh as mesh_lib
from r1jax import sampler as sampler_lib
from r1jax.config import Config, save_config, to_dict, validate
from r1jax.logprobs import sequence_logprobs
from r1jax.metrics import MetricsWriter, plot_run
from r1jax.models import hf
from r1jax.models.build import create, num_params
from r1jax.models.transformer import Transformer
from r1jax.evaluation import evaluate
from r1jax.rewards import RewardRunner
from r1jax.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("r1jax")


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------
def run_dir_for(cfg: Config) -> str:
    if cfg.run.dir:
        return cfg.run.dir
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{cfg.run.name}-{stamp}")


def build_tokenizer(cfg: Config) -> Tokenizer:
    path = cfg.data.tokenizer or cfg.model.path
    return load_tokenizer(path)


def model_config(cfg: Config, tokenizer: Tokenizer):
    """The ModelConfig to build: from the HF directory when model.path is set (the run's dtype,
    remat and scan choices applied on top), else cfg.model sized to the tokenizer."""
    m = cfg.model
    if m.path:
        return hf.load_config(m.path, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                              scan_layers=m.scan_layers)
    vocab = max(m.vocab_size, tokenizer.vocab_size)
    return dataclasses.replace(m, vocab_size=vocab, eos_token_id=tokenizer.eos_id,
                               pad_token_id=tokenizer.pad_id,
                               bos_token_id=tokenizer.bos_id if m.bos_token_id is None else m.bos_token_id)


def build_model(cfg: Config, mcfg, mesh, rules) -> Transformer:
    return create(mcfg, mesh=mesh, rules=rules, seed=cfg.train.seed)  # HF weights when mcfg.path


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _scalars(tree: Dict[str, Any]) -> Dict[str, float]:
    out = {}
    for k, v in jax.device_get(tree).items():
        v = np.asarray(v)
        if v.size == 1:
            out[k] = float(v.reshape(()))
    return out


def compiled_report(compiled, name: str) -> Dict[str, float]:
    """Per-device memory and FLOPs of a compiled step (MaxText's habit: know before running)."""
    rep: Dict[str, float] = {}
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            for attr in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                         "generated_code_size_in_bytes", "alias_size_in_bytes"):
                if hasattr(mem, attr):
                    rep[attr] = float(getattr(mem, attr))
            rep["peak_bytes_estimate"] = (rep.get("argument_size_in_bytes", 0) + rep.get("output_size_in_bytes", 0)
                                          + rep.get("temp_size_in_bytes", 0) - rep.get("alias_size_in_bytes", 0))
    except Exception as e:  # some backends lack memory analysis
        rep["memory_analysis_error"] = str(e)[:80]
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost:
            rep["flops"] = float(cost.get("flops", 0.0))
            rep["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    except Exception as e:
        rep["cost_analysis_error"] = str(e)[:80]
    gib = 1 << 30
    _say(f"[compile] {name}: per device: arguments {rep.get('argument_size_in_bytes', 0) / gib:.3f} GiB, "
         f"temporaries {rep.get('temp_size_in_bytes', 0) / gib:.3f} GiB, "
         f"peak ~{rep.get('peak_bytes_estimate', 0) / gib:.3f} GiB, {rep.get('flops', 0) / 1e9:.2f} GFLOP")
    return rep


# ---------------------------------------------------------------------------------------------
# Cold-start SFT (R1: a small SFT on long-CoT examples before RL)
# ---------------------------------------------------------------------------------------------
def sft(cfg: Config, graphdef, params, tokenizer: Tokenizer, mesh, rules, *, progress: bool = True):
    """Supervised fine-tuning on the data's worked `solution`s; returns new params and the
    last loss. Its own AdamW (cfg.sft.lr); the RL optimizer starts fresh afterwards."""
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, cfg.sft.lr, max(1, cfg.sft.warmup_steps),
                                           max(cfg.sft.steps, cfg.sft.warmup_steps + 1), cfg.sft.lr * 0.1),
        b1=0.9, b2=0.98, weight_decay=0.0))
    opt_state = opt.init(params)
    max_len = cfg.data.max_prompt_len + cfg.sampler.max_new_tokens
    # One padded length for every batch: a new length would mean a new compilation.
    batches = data_lib.sft_batches(cfg.data, tokenizer, cfg.sft.batch_size, max_len=max_len,
                                   buckets=[max_len])

    def loss_fn(p, tokens, mask, seg):
        model = nnx.merge(graphdef, p)
        logp, _ = sequence_logprobs(model, tokens, seg)
        m = mask[:, 1:]
        return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)

    @jax.jit
    def step(p, o, tokens, mask, seg):
        with mesh_lib.layout(mesh, rules):
            loss, g = jax.value_and_grad(loss_fn)(p, tokens, mask, seg)
        upd, o = opt.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    sh = mesh_lib.batch_sharding(mesh, rules, 2)
    bar = _progress(cfg.sft.steps, "sft", progress)
    loss = float("nan")
    for i in range(cfg.sft.steps):
        b = next(batches)
        put = lambda x: jax.device_put(np.asarray(x), sh)  # noqa: E731
        params, opt_state, loss_d = step(params, opt_state, put(b.tokens_BxT), put(b.loss_mask_BxT),
                                         put(b.segment_ids_BxT))
        if i % 10 == 0 or i == cfg.sft.steps - 1:
            loss = float(loss_d)
            bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
    bar.close()
    return params, loss


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0)


# ---------------------------------------------------------------------------------------------
# The GRPO run
# ---------------------------------------------------------------------------------------------
ROLLOUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logp_old",
                "advantages", "truncated")


class Trainer:
    """Owns one run: builds the mesh, model, data, rewards, optimizer and checkpointer from a
    Config, then `run()` executes the loop and returns the summary."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        c = cfg
        if c.grpo.group_size < 2:
            raise ValueError(f"grpo.group_size must be >= 2 (GRPO's baseline is the group mean), got {c.grpo.group_size}")
        self.n_rollout = c.train.prompts_per_rollout * c.grpo.group_size
        if self.n_rollout % c.grpo.num_minibatches:
            raise ValueError(f"grpo.num_minibatches={c.grpo.num_minibatches} does not divide the rollout's "
                             f"{c.train.prompts_per_rollout} x {c.grpo.group_size} = {self.n_rollout} samples")
        self.mb_size = self.n_rollout // c.grpo.num_minibatches
        if self.mb_size % c.grpo.micro_batches:
            raise ValueError(f"grpo.micro_batches={c.grpo.micro_batches} does not divide the mini-batch of {self.mb_size}")
        self.updates_per_rollout = c.grpo.num_minibatches * c.grpo.inner_epochs
        self.run_dir = run_dir_for(c)
        self.is_main = jax.process_index() == 0
        self.mesh = mesh_lib.make_mesh(c.mesh)
        self.train_rules = mesh_lib.train_rules(c.mesh)
        self.sample_rules = mesh_lib.sample_rules(c.mesh)
        self.tokenizer = build_tokenizer(c)
        self.mcfg = model_config(c, self.tokenizer)
        # The resolved config states the model actually built (HF shapes, vocab, eos).
        self.cfg = c = dataclasses.replace(c, model=self.mcfg)
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(c, os.path.join(self.run_dir, "config.yaml"))
            self.tokenizer.save(os.path.join(self.run_dir, "tokenizer"))
        model = build_model(c, self.mcfg, self.mesh, self.train_rules)
        self.graphdef, abs_state = nnx.split(model, nnx.Param)
        self.params_shardings = mesh_lib.params_shardings(abs_state, self.mesh, self.train_rules)
        self.params0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(abs_state))
        self._params_init = nnx.to_pure_dict(abs_state)  # used unless a checkpoint is resumed
        self.optimizer, self.schedule = grpo.make_optimizer(c.train)
        self.rewards = RewardRunner(c.rewards)
        self.tp_store = data_lib.bucket_length(c.data.max_prompt_len, c.sampler.prompt_buckets)
        self.batch_sh = mesh_lib.batch_sharding(self.mesh, self.train_rules, 2)
        self.metrics = MetricsWriter(self.run_dir, tensorboard=c.run.tensorboard, enabled=self.is_main)
        _say(f"[r1jax] run dir {self.run_dir}; mesh {mesh_lib.describe(self.mesh)} on "
             f"{len(jax.devices())} {jax.devices()[0].platform} devices; model "
             f"{num_params(self.mcfg) / 1e6:.2f}M parameters")

    # -- state ------------------------------------------------------------------------------
    def _state_shardings(self):
        return grpo.train_state_shardings(self.params_shardings, self.optimizer, self.params0, self.mesh)

    def _init_state(self, params):
        return jax.jit(lambda p: grpo.TrainState.create(p, self.optimizer),
                       out_shardings=self._state_shardings())(params)

    def _rollout_abstract(self):
        n, tp, tc = self.n_rollout, self.tp_store, self.cfg.sampler.max_new_tokens
        sh = self.batch_sh
        sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh if len(shape) > 1 else  # noqa: E731
                                                    mesh_lib.batch_sharding(self.mesh, self.train_rules, 1))
        out = {"prompt_ids": sd((n, tp), jnp.int32), "prompt_mask": sd((n, tp), jnp.int32),
               "completion_ids": sd((n, tc), jnp.int32), "completion_mask": sd((n, tc), jnp.int32),
               "logp_old": sd((n, tc), jnp.float32), "advantages": sd((n,), jnp.float32),
               "truncated": sd((n,), jnp.int32)}
        if self.cfg.grpo.beta:
            out["logp_ref"] = sd((n, tc), jnp.float32)
        return out

    def _ckpt_tree(self, state, ref, rollout, cursor):
        # Flat at the top so that `params` alone can be restored (eval, export) without
        # reading the optimizer state.
        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
                "rollout": rollout, "cursor": cursor}
        if ref is not None:
            tree["ref"] = ref
        return tree

    def _abstract_ckpt_tree(self):
        state_abs = jax.eval_shape(lambda p: grpo.TrainState.create(p, self.optimizer), self.params0)
        state_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 state_abs, self._state_shardings())
        ref_abs = None
        if self.cfg.grpo.beta:
            ref_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   self.params0, self.params_shardings)
        cursor = jax.ShapeDtypeStruct((3,), jnp.int32, sharding=mesh_lib.replicated(self.mesh))
        return self._ckpt_tree(state_abs, ref_abs, self._rollout_abstract(), cursor)

    # -- rollout ----------------------------------------------------------------------------
    def _sample_groups(self, params, batch, key):
        c = self.cfg
        out = sampler_lib.sample((self.graphdef, params), batch.prompt_ids_PxTp, prompt_mask=batch.prompt_mask_PxTp,
                                 key=key, num_samples=c.grpo.group_size, config=c.sampler, mesh=self.mesh,
                                 rules=self.sample_rules, tokenizer=self.tokenizer, pad_id=self.tokenizer.pad_id)
        g = c.grpo.group_size
        tokens, mask = _host(out.tokens), _host(out.mask)
        texts = self.tokenizer.batch_decode([t[m.astype(bool)] for t, m in zip(tokens, mask)])
        rows = [{k: v[p] for k, v in batch.fields.items()} for p in range(len(batch)) for _ in range(g)]
        prompts = [batch.prompts[p] for p in range(len(batch)) for _ in range(g)]
        ids = [t[m.astype(bool)].tolist() for t, m in zip(tokens, mask)]
        scored = self.rewards.score(prompts, texts, ids, rows)
        return out, texts, prompts, scored

    def make_rollout(self, params, ref, batches, key) -> Tuple[Dict[str, jax.Array], Dict[str, float], List[Dict]]:
        """P prompts x G samples -> the fixed-shape rollout arrays (on device, batch-sharded),
        the rollout's metrics, and a few samples to log."""
        c = self.cfg
        g, P = c.grpo.group_size, c.train.prompts_per_rollout
        t0 = time.perf_counter()
        parts: List[Dict[str, np.ndarray]] = []
        kept, seen, tries, first = 0, 0, 0, None
        reward_metrics: List[Dict[str, float]] = []
        sampled: List[Dict[str, np.ndarray]] = []  # every completion drawn, kept or not
        while kept < P:
            batch = next(batches)
            out, texts, prompts, scored = self._sample_groups(params, batch, jax.random.fold_in(key, tries))
            tries += 1
            r_PxG = scored.total.reshape(-1, g)
            keep = np.ones(r_PxG.shape[0], bool)
            if c.grpo.dynamic_sampling:
                keep, _ = grpo.filter_zero_variance_groups(r_PxG)
                if tries > c.grpo.dynamic_sampling_max_tries and kept + keep.sum() < P:
                    keep[:] = True  # give up filtering rather than loop forever; counted below
            seen += r_PxG.shape[0]
            reward_metrics.append(scored.metrics)
            sampled.append({"reward": scored.total, "length": _host(out.lengths),
                            "truncated": _host(out.truncated),
                            **{f"r_{k}": v for k, v in scored.per_function.items()}})
            rows = np.repeat(keep, g)
            pt = _host(out.prompt_tokens)
            pm = _host(out.prompt_mask)
            pad = self.tp_store - pt.shape[1]
            pt = np.pad(pt, ((0, 0), (pad, 0)), constant_values=self.tokenizer.pad_id)
            pm = np.pad(pm, ((0, 0), (pad, 0)))
            part = {"prompt_ids": np.repeat(pt, g, 0)[rows], "prompt_mask": np.repeat(pm, g, 0)[rows],
                    "completion_ids": _host(out.tokens)[rows], "completion_mask": _host(out.mask)[rows],
                    "logp_old": _host(out.logp_policy)[rows], "truncated": _host(out.truncated).astype(np.int32)[rows],
                    "reward": scored.total[rows], "texts": np.asarray(texts, object)[rows],
                    "prompts": np.asarray(prompts, object)[rows],
                    **{f"r_{k}": v[rows] for k, v in scored.per_function.items()}}
            parts.append(part)
            kept += int(keep.sum())
            if first is None:
                first = part
        roll = {k: np.concatenate([p[k] for p in parts])[: P * g] for k in parts[0]}
        t_sample = time.perf_counter() - t0
        r_PxG = roll["reward"].reshape(P, g)
        adv = np.asarray(grpo.group_advantages(r_PxG, scale=c.grpo.scale_rewards, eps=c.grpo.adv_eps))
        roll["advantages"] = adv.reshape(-1).astype(np.float32)
        arrays = {k: jax.device_put(np.asarray(roll[k]), mesh_lib.batch_sharding(self.mesh, self.train_rules, np.ndim(roll[k])))
                  for k in ROLLOUT_KEYS}
        if c.grpo.recompute_logp_old:
            arrays["logp_old"] = self._logprobs_in_chunks(self._policy_logp, params, arrays)
        t1 = time.perf_counter()
        if c.grpo.beta:
            arrays["logp_ref"] = self._logprobs_in_chunks(self._ref_logp, ref, arrays)
            jax.block_until_ready(arrays["logp_ref"])
        t_ref = time.perf_counter() - t1
        # Rewards and lengths describe the policy: every completion drawn, including the groups
        # dynamic sampling dropped; `reward/batch_mean` is what the updates train on.
        drawn = {k: np.concatenate([p[k] for p in sampled]) for k in sampled[0]}
        lengths = drawn["length"]
        m: Dict[str, float] = {
            "reward/mean": float(drawn["reward"].mean()), "reward/std": float(drawn["reward"].std()),
            "reward/batch_mean": float(roll["reward"].mean()),
            "completion/length_mean": float(lengths.mean()), "completion/length_max": float(lengths.max()),
            "completion/truncated_frac": float(drawn["truncated"].mean()),
            "time/rollout": t_sample, "time/reference": t_ref,
            "throughput/completion_tokens_per_s": float(lengths.sum() / max(t_sample, 1e-9)),
            "dynamic_sampling/drop_rate": float(1.0 - P / seen) if c.grpo.dynamic_sampling else 0.0,
            "adv/zero_std_groups": float(np.mean(r_PxG.std(axis=1) == 0)),
        }
        for k in drawn:
            if k.startswith("r_"):
                vals = drawn[k][~np.isnan(drawn[k])]
                m[f"reward/{k[2:]}"] = float(vals.mean()) if vals.size else float("nan")
        for key in reward_metrics[0]:
            if key.endswith(("/errors", "/timeouts", "/nonfinite", "/none")):
                m[key] = float(sum(rm.get(key, 0.0) for rm in reward_metrics))
        if "reward/accuracy" in m:
            m["accuracy"] = m["reward/accuracy"]
        samples = [{"prompt": str(first["prompts"][i]), "completion": str(first["texts"][i]),
                    "reward": float(first["reward"][i])} for i in range(min(self.cfg.run.samples_to_log, len(first["texts"])))]
        return arrays, m, samples

    def _logprobs_in_chunks(self, fn, params, arrays):
        outs = []
        for s in range(0, self.n_rollout, self.mb_size):
            sl = slice(s, s + self.mb_size)
            outs.append(fn(params, arrays["prompt_ids"][sl], arrays["prompt_mask"][sl], arrays["completion_ids"][sl]))
        return jax.device_put(jnp.concatenate(outs), self.batch_sh)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        c = self.cfg
        t_start = time.perf_counter()
        temp = c.sampler.temperature if c.sampler.temperature > 0 else 1.0
        mb_sh = {k: v.sharding for k, v in self._rollout_abstract().items()
                 if k != "truncated" or c.grpo.mask_truncated}
        self._ref_logp = grpo.reference_logprobs_fn(self.graphdef, temperature=temp, mesh=self.mesh,
                                                    rules=self.train_rules)
        self._policy_logp = self._ref_logp
        update = grpo.make_update_step(
            self.graphdef, self.optimizer, c.grpo, schedule=self.schedule, temperature=temp,
            max_len=c.sampler.max_new_tokens, state_shardings=self._state_shardings(),
            ref_shardings=self.params_shardings if c.grpo.beta else None, batch_shardings=mb_sh,
            mesh=self.mesh, rules=self.train_rules)

        ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        guard = ckpt_lib.PreemptionGuard().install()
        ckpt = ckpt_lib.Checkpointer(ckpt_dir, c.checkpoint, guard=guard)
        summary: Dict[str, Any] = {}
        try:
            restored = ckpt.restore(self._abstract_ckpt_tree()) if ckpt.latest_step() is not None else None
            data_iter = data_lib.prompt_batches(c.data, self.tokenizer, c.train.prompts_per_rollout,
                                                buckets=c.sampler.prompt_buckets)
            if restored is not None:
                tree = restored.state
                state = grpo.TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])
                ref, rollout = tree.get("ref"), tree["rollout"]
                cursor = [int(x) for x in _host(tree["cursor"])]
                data_iter.set_state(restored.data_state)
                summary.update(restored.metadata.get("summary", {}))
                rollout_metrics = restored.metadata.get("rollout_metrics", {})
                self.metrics.truncate_after(restored.step)
                _say(f"[r1jax] resumed from step {restored.step} in {ckpt_dir}")
            else:
                params, self._params_init = self._params_init, None
                if c.sft.steps > 0:
                    before_sft = self._eval(params, "before SFT") if c.eval.num_prompts else {}
                    params, sft_loss = sft(c, self.graphdef, params, self.tokenizer, self.mesh, self.train_rules,
                                           progress=c.run.progress)
                    summary["sft_loss"] = sft_loss
                    if before_sft:
                        summary["accuracy_before_sft"] = before_sft["eval/pass@1"]
                if c.eval.num_prompts:
                    ev = self._eval(params, "before RL")
                    summary["accuracy_before_rl"] = ev["eval/pass@1"]
                    summary.update({f"before_rl/{k}": v for k, v in ev.items()})
                state = self._init_state(params)
                ref = grpo.init_reference(state.params, c.grpo.beta)
                rollout, cursor, rollout_metrics = None, [0, 0, 0], {}
            step = int(_host(state.step))
            compiled = None
            bar = _progress(c.train.steps, "grpo", c.run.progress)
            bar.update(step)
            base_key = jax.random.PRNGKey(c.train.seed + 1)
            while step < c.train.steps:
                t_step = time.perf_counter()
                rollout_idx, mb_idx, _ = cursor
                if rollout is None or mb_idx >= self.updates_per_rollout:
                    if rollout is not None:
                        rollout_idx, mb_idx = rollout_idx + 1, 0
                    rollout, rollout_metrics, samples = self.make_rollout(
                        state.params, ref, data_iter, jax.random.fold_in(base_key, rollout_idx))
                    cursor = [rollout_idx, mb_idx, 0]
                    self.metrics.write_samples(step, samples)
                # R1: the rollout is split at random into M mini-batches, `inner_epochs` passes.
                epoch, j = divmod(mb_idx, c.grpo.num_minibatches)
                perm = grpo.minibatch_indices(np.random.default_rng([c.train.seed, rollout_idx, epoch]),
                                              self.n_rollout, c.grpo.num_minibatches)[j]
                batch = {k: v[perm] for k, v in rollout.items()}
                if not c.grpo.mask_truncated:
                    batch.pop("truncated")
                batch = {k: jax.device_put(v, mb_sh[k]) for k, v in batch.items()}
                if compiled is None:
                    compiled = update.lower(state, ref, batch).compile()
                    summary["update_compile"] = compiled_report(compiled, "GRPO update step")
                t_up = time.perf_counter()
                state, m = compiled(state, ref, batch)
                m = _scalars(m)
                t_update = time.perf_counter() - t_up
                step += 1
                mb_idx += 1
                cursor = [rollout_idx, mb_idx, 0]
                ref = grpo.maybe_reset_reference(step, ref, state.params, c.grpo.ref_reset_every)
                row = {**rollout_metrics, **{f"update/{k}": v for k, v in m.items()}}
                row.update({"kl": m.get("kl"), "entropy": m.get("entropy"), "loss/policy": m.get("pg_loss"),
                            "clip/low": m.get("clip_frac_low"), "clip/high": m.get("clip_frac_high"),
                            "clip/region": m.get("clip_frac"), "grad_norm": m.get("grad_norm"),
                            "lr": m.get("lr"), "time/update": t_update,
                            "time/step": time.perf_counter() - t_step + (rollout_metrics.get("time/rollout", 0)
                                                                         + rollout_metrics.get("time/reference", 0)
                                                                         if mb_idx == 1 else 0.0),
                            "rollout": rollout_idx})
                if c.eval.every and step % c.eval.every == 0 and step < c.train.steps:
                    row.update(self._eval(state.params, f"step {step}"))
                self.metrics.write(step, row)
                bar.set_postfix(reward=f"{row['reward/mean']:.3f}", acc=f"{row.get('accuracy', float('nan')):.3f}",
                                kl=f"{row['kl']:.4f}", tok_s=f"{row['throughput/completion_tokens_per_s']:.0f}")
                bar.update(1)
                meta = {"summary": {k: v for k, v in summary.items() if not isinstance(v, dict)},
                        "rollout_metrics": rollout_metrics, "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))}}
                tree = self._ckpt_tree(state, ref, rollout, jnp.asarray(cursor, jnp.int32))
                saved = ckpt.maybe_save(step, tree, data_state=data_iter.get_state(), config=to_dict(c), metadata=meta)
                if saved and ckpt.last_blocking_s is not None:
                    summary.setdefault("checkpoint_blocking_s", []).append(ckpt.last_blocking_s)
                if ckpt.preempted:
                    _say(f"[r1jax] preempted: saved step {step}; rerun the same command to resume")
                    summary["preempted_at"] = step
                    bar.close()
                    return summary
            bar.close()
            if step not in ckpt.all_steps() and step > 0:
                tree = self._ckpt_tree(state, ref, rollout, jnp.asarray(cursor, jnp.int32))
                meta = {"summary": {k: v for k, v in summary.items() if not isinstance(v, dict)},
                        "rollout_metrics": rollout_metrics}
                ckpt.save(step, tree, data_state=data_iter.get_state(), config=to_dict(c), metadata=meta)
            samples: List[Dict[str, Any]] = []
            if c.eval.num_prompts:
                ev = self._eval(state.params, "after RL", samples_out=samples)
                summary["accuracy_after_rl"] = ev["eval/pass@1"]
                summary.update({f"after_rl/{k}": v for k, v in ev.items()})
                self.metrics.write_samples(step, samples)
            ckpt.wait()
            summary.update(self._final_summary(step, t_start))
            self._write_summary(summary)
            return summary
        finally:
            ckpt.close()
            guard.uninstall()
            self.metrics.close()

    def _eval(self, params, when: str, samples_out=None) -> Dict[str, float]:
        t0 = time.perf_counter()
        ev = evaluate(self.cfg, self.graphdef, params, self.tokenizer, self.mesh, self.sample_rules,
                      seed=self.cfg.train.seed + 7, samples_out=samples_out)
        k = int(ev["eval/k"])
        _say(f"[eval {when}] pass@1 {ev['eval/pass@1']:.3f}  cons@{k} {ev[f'eval/cons@{k}']:.3f} on "
             f"{int(ev['eval/num_prompts'])} held-out prompts ({time.perf_counter() - t0:.1f}s)")
        return ev

    def _final_summary(self, step: int, t_start: float) -> Dict[str, Any]:
        out: Dict[str, Any] = {"steps": step, "wall_seconds": time.perf_counter() - t_start}
        from r1jax.metrics import read_metrics

        rows = read_metrics(self.run_dir) if self.is_main else []
        if rows:
            last = rows[-min(len(rows), self.updates_per_rollout):]
            for k in ("reward/mean", "accuracy", "kl", "completion/length_mean"):
                vals = [r[k] for r in last if r.get(k) is not None]
                if vals:
                    out[f"final/{k}"] = float(np.mean(vals))
            tps = [r["throughput/completion_tokens_per_s"] for r in rows if r.get("throughput/completion_tokens_per_s")]
            if tps:
                out["completion_tokens_per_s_mean"] = float(np.mean(tps))
        return out

    def _write_summary(self, summary: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        marks = {}
        if summary.get("accuracy_before_rl") is not None:
            marks["before RL (eval)"] = summary["accuracy_before_rl"]
        if summary.get("accuracy_after_rl") is not None:
            marks["after RL (eval)"] = summary["accuracy_after_rl"]
        if self.cfg.run.plots:
            plot_run(self.run_dir, {"accuracy": marks})
        b, a = summary.get("accuracy_before_rl"), summary.get("accuracy_after_rl")
        if b is not None and a is not None:
            _say(f"[r1jax] held-out accuracy: before RL {b:.3f} -> after RL {a:.3f} ({(a - b) * 100:+.1f} points)")
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
        _say(f"[r1jax] wrote {self.run_dir}/summary.json, metrics.jsonl, plots/")


def train(cfg: Config) -> Dict[str, Any]:
    """Run GRPO training as configured; returns the summary (also written to summary.json)."""
    validate(cfg)  # a Config built in Python has not been through load_config's checks
    return Trainer(cfg).run()
