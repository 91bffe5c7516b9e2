"""The GRPO run: a short loop, with everything else hanging off it as hooks.

    (optional) cold-start SFT (sft.py) -> eval before RL
    loop:  rollout (rollout.py: sample, score, dynamic sampling, advantages, logp_ref; drawn in
           step or ahead on a sampling mesh of its own: offpolicy.py, train.rollout_mode)
           -> M mini-batch updates per rollout (grpo.make_update_step: jitted, donated)
           -> hooks: eval, metrics, samples, progress, checkpoint (each with its own `every`)
    -> eval after RL -> summary.json, plots

A rollout is stored in fixed shapes and its unfinished part is checkpointed with the train
state, so a run killed anywhere resumes to bitwise the same parameters and metrics (on CPU).

The reference-reset rule: R1 replaces the reference with the policy every `ref_reset_every`
updates. Its log-probs are computed once per rollout, so the reset happens only between
rollouts: `ref_reset_every` must be a multiple of the updates per rollout (checked by
grpo.Geometry.from_config), and the rollout after a reset scores against the new reference.

Non-finite guard: an update whose loss or gradients are not finite is not applied (the update
step keeps the old parameters), is counted, and stops the run after
`train.max_nonfinite_updates` consecutive ones; nothing is checkpointed while the last update
was not finite, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import aot
from r1jax import checkpoint as ckpt_lib
from r1jax import data as data_lib
from r1jax import distributed
from r1jax import grpo
from r1jax import mesh as mesh_lib
from r1jax import offpolicy
from r1jax import rollout as rollout_lib
from r1jax import sft as sft_lib
from r1jax.config import Config, save_config, to_dict, validate
from r1jax.evaluation import evaluate
from r1jax.metrics import MetricsWriter, plot_run, read_metrics, update_row
from r1jax.models.build import abstract_model, build_model, num_params, resolve_model_config
from r1jax.rewards import RewardRunner
from r1jax.rewards.accuracy import run_settings
from r1jax.sampler import Sampler
from r1jax.tokenizer import Tokenizer, load_tokenizer


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with a non-finite loss or gradient."""


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def run_dir_for(cfg: Config) -> str:
    if cfg.run.dir:
        return cfg.run.dir
    # Process 0's clock for every process: one run directory even across a second boundary.
    stamp = datetime.datetime.fromtimestamp(distributed.agreed_time()).strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{cfg.run.name}-{stamp}")


def build_tokenizer(cfg: Config) -> Tokenizer:
    return load_tokenizer(cfg.data.tokenizer or cfg.model.path)


def _scalars(tree: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(np.asarray(v).reshape(())) for k, v in jax.device_get(tree).items()
            if np.asarray(v).size == 1}


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class Hook:
    """`fn(loop)` after every `every`-th update (every <= 0: never)."""

    fn: Callable[["Loop"], None]
    every: int = 1


@dataclasses.dataclass
class Loop:
    """What the loop carries from one update to the next (and what hooks see)."""

    step: int  # updates done
    state: grpo.TrainState
    ref: Any  # reference params, None when beta = 0
    rollout: Optional[Dict[str, jax.Array]]
    cursor: List[int]  # [rollout index, updates done on it, 0]
    info: Optional[rollout_lib.RolloutInfo]  # the current rollout's metrics and samples
    rollout_metrics: Dict[str, float]
    row: Dict[str, Any] = dataclasses.field(default_factory=dict)  # this update's metrics
    new_rollout: bool = False
    nonfinite_streak: int = 0


class Trainer:
    """One run: `Trainer(cfg)` builds the mesh, tokenizer, abstract model, data, rewards,
    sampler and optimizer (no parameters yet: a resumed run restores them, a fresh one builds
    them); `run()` executes the loop and returns the summary. `add_hook(fn, every)` attaches
    more side work."""

    def __init__(self, cfg: Config, devices=None):
        # train.rollout_mode=async: the last train.sampling_devices devices sample (offpolicy).
        train_devices, sample_devices = offpolicy.split_devices(cfg, jax.devices() if devices is None else devices)
        self.mesh = mesh_lib.make_mesh(cfg.mesh, devices=train_devices)
        self.sample_mesh = sample_devices and mesh_lib.make_mesh(cfg.mesh, devices=sample_devices)
        self.train_rules = mesh_lib.train_rules(cfg.mesh)
        self.sample_rules = mesh_lib.sample_rules(cfg.mesh)
        self.tokenizer = build_tokenizer(cfg)
        # The resolved config states the model actually built (HF shapes, vocab, eos).
        self.cfg = c = dataclasses.replace(cfg, model=resolve_model_config(cfg.model, self.tokenizer))
        self.geometry = geo = grpo.Geometry.from_config(c)
        # The rows the update shards over the batch axes: named here, before the partitioner's
        # message about an array shape and a tiling factor.
        rows = {"rollout rows (train.prompts_per_rollout x grpo.group_size)": geo.rollout_size}
        if not c.grpo.packing:  # packed mini-batches are chunk counts, bucketed per shard
            rows["mini-batch rows (rollout rows / grpo.num_minibatches)"] = geo.minibatch_size
        mesh_lib.check_batch_divides(self.mesh, self.train_rules, rows)
        self.run_dir = run_dir_for(c)
        self.is_main = jax.process_index() == 0
        distributed.attach_run_dir(self.run_dir)  # logs/process_I.log (multi-process runs)
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(c, os.path.join(self.run_dir, "config.yaml"))
            self.tokenizer.save(os.path.join(self.run_dir, "tokenizer"))
        self.graphdef, self.params_abstract = abstract_model(c.model, self.mesh, self.train_rules)
        self.params_shardings = jax.tree.map(lambda a: a.sharding, self.params_abstract)
        self.optimizer, self.schedule = grpo.make_optimizer(c.train)
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params_abstract)
        self.state_shardings = grpo.train_state_shardings(self.params_shardings, self.optimizer, shapes, self.mesh)
        self.state_abstract = _abstract(jax.eval_shape(lambda p: grpo.TrainState.create(p, self.optimizer), shapes),
                                        self.state_shardings)
        self.sampler = Sampler(self.graphdef, c.sampler, mesh=self.mesh, rules=self.sample_rules,
                               tokenizer=self.tokenizer, pad_id=self.tokenizer.pad_id)
        rollout_sampler = offpolicy.rollout_sampler(self.graphdef, c, mesh=self.mesh, rules=self.sample_rules,
                                                    tokenizer=self.tokenizer, base=self.sampler)
        self.collector = rollout_lib.Collector(
            self.geometry, c.grpo, rollout_sampler, RewardRunner(c.rewards), self.tokenizer, mesh=self.mesh,
            rules=self.train_rules, params_shardings=self.params_shardings, samples_to_log=c.run.samples_to_log,
            graphdef=self.graphdef, model_cfg=c.model)
        self.batch_shardings = {k: v.sharding for k, v in self.collector.layout.items()}
        self.metrics = MetricsWriter(self.run_dir, tensorboard=c.run.tensorboard, enabled=self.is_main)
        self.summary: Dict[str, Any] = {}
        self.hooks: List[Hook] = []
        self._bar = None
        sampling = f" + sampling mesh {mesh_lib.describe(self.sample_mesh)}" if self.sample_mesh else ""
        _say(f"[r1jax] run dir {self.run_dir}; mesh {mesh_lib.describe(self.mesh)}{sampling} on "
             f"{len(jax.devices())} {jax.devices()[0].platform} devices; model "
             f"{num_params(c.model) / 1e6:.2f}M parameters")

    def add_hook(self, fn: Callable[[Loop], None], every: int = 1) -> None:
        self.hooks.append(Hook(fn, every))

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        c, geo = self.cfg, self.geometry
        t_start = time.perf_counter()
        guard = ckpt_lib.PreemptionGuard().install()
        # A process that stops making progress (stuck in a collective another never joined)
        # ends the job; JAX's heartbeats only catch dead ones.
        dog = self.watchdog = distributed.StepWatchdog(c.run.step_timeout_s).start()
        self.summary["processes"] = distributed.describe()
        self.ckpt = ckpt = ckpt_lib.Checkpointer(os.path.join(self.run_dir, "checkpoints"), c.checkpoint, guard=guard)
        try:
            # Every process reads the same global sequence of P-prompt batches (the sampler
            # splits each over the devices): the data order and the checkpointed data position
            # do not depend on the process count.
            data_iter = data_lib.prompt_batches(c.data, self.tokenizer, geo.prompts_per_rollout,
                                                buckets=[geo.prompt_len], shard_options=data_lib.global_order())
            self.rollouts = offpolicy.make_rollouts(self, data_iter, jax.random.PRNGKey(c.train.seed + 1))
            loop = self._resume(data_iter) or self._start()
            self.data_iter = data_iter
            update = self._compile_update(loop)
            self._install_hooks(loop)
            while loop.step < c.train.steps:
                t_step = time.perf_counter()
                r, u, _ = loop.cursor
                loop.new_rollout = loop.rollout is None or u >= geo.updates_per_rollout
                dog.beat(f"update {loop.step + 1}")
                if loop.new_rollout:
                    r, u = (r + 1, 0) if loop.rollout is not None else (r, u)
                    loop.rollout, loop.info = self.rollouts.next(r, loop.state.params, loop.ref)
                    loop.rollout_metrics = loop.info.metrics
                # R1: the rollout is split at random into M mini-batches, `inner_epochs` passes.
                epoch, j = divmod(u, geo.num_minibatches)
                rows = grpo.minibatch_indices(np.random.default_rng([c.train.seed, r, epoch]),
                                              geo.rollout_size, geo.num_minibatches)[j]
                batch = rollout_lib.minibatch(loop.rollout, rows, c.grpo, self.batch_shardings)
                if self.collector.packer is not None:  # grpo.packing: r1jax.packing's layout
                    batch = self.collector.packer.pack(batch)
                t_up = time.perf_counter()
                loop.state, m = update(loop.state, loop.ref, batch)
                m = _scalars(m)
                loop.step, loop.cursor = loop.step + 1, [r, u + 1, 0]
                self._check_finite(loop, m)
                loop.ref = grpo.maybe_reset_reference(loop.step, loop.ref, loop.state.params, c.grpo.ref_reset_every)
                loop.row = {**loop.rollout_metrics, **update_row(m), "time/update": time.perf_counter() - t_up,
                            "time/step": time.perf_counter() - t_step, "rollout": r}
                for hook in self.hooks:
                    if hook.every > 0 and loop.step % hook.every == 0:
                        hook.fn(loop)
                self._stop_if_nonfinite(loop)
                if ckpt.preempted:
                    _say(f"[r1jax] preempted: saved step {loop.step}; rerun the same command to resume")
                    self.summary["preempted_at"] = loop.step
                    return self.summary
            dog.beat("the end: final checkpoint, evaluation, summary")
            return self._finish(loop, t_start)
        finally:
            if getattr(self, "rollouts", None) is not None:
                self.rollouts.close()
            self.watchdog.stop()
            if self._bar is not None:
                self._bar.close()
            ckpt.close()
            guard.uninstall()
            self.metrics.close()

    def _check_finite(self, loop: Loop, m: Dict[str, float]) -> None:
        if m.get("finite", 1.0):
            loop.nonfinite_streak = 0
            return
        loop.nonfinite_streak += 1
        self.summary["nonfinite_updates"] = self.summary.get("nonfinite_updates", 0) + 1
        _say(f"[r1jax] update {loop.step}: loss {m.get('loss')} / grad_norm {m.get('grad_norm')} not "
             f"finite: skipped, parameters unchanged ({loop.nonfinite_streak} in a row)")

    def _stop_if_nonfinite(self, loop: Loop) -> None:
        limit = self.cfg.train.max_nonfinite_updates
        if loop.nonfinite_streak > limit:
            raise NonFiniteError(
                f"stopped at update {loop.step}: {loop.nonfinite_streak} consecutive updates with a "
                f"non-finite loss or gradient (train.max_nonfinite_updates={limit}); none was applied "
                f"and the latest checkpoint predates them (check the rewards for NaN/inf, the "
                f"learning rate, the data)")

    # -- start: a fresh run (build, SFT, eval) or a resumed one (restore only) ---------------
    def _ckpt_tree(self, state, ref, rollout, cursor, inflight=None):
        # Flat at the top so that `params` alone can be restored (eval, export) without
        # reading the optimizer state.
        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
                "rollout": rollout, "cursor": cursor}
        if ref is not None:
            tree["ref"] = ref
        if inflight is not None:  # async rollouts drawn and not yet taken (offpolicy)
            tree["inflight"] = inflight
        return tree

    def _abstract_ckpt_tree(self):
        ref = self.params_abstract if self.cfg.grpo.beta else None
        cursor = jax.ShapeDtypeStruct((3,), jnp.int32, sharding=mesh_lib.replicated(self.mesh))
        return self._ckpt_tree(self.state_abstract, ref, self.collector.layout, cursor, self.rollouts.abstract())

    def _resume(self, data_iter) -> Optional[Loop]:
        if self.ckpt.latest_step() is None:
            return None
        self._check_resume_layout()
        restored = self.ckpt.restore(self._abstract_ckpt_tree())
        if restored is None:
            return None
        tree = restored.state
        state = grpo.TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])
        data_iter.set_state(restored.data_state)
        self.rollouts.restore(tree.get("inflight"), restored.metadata.get("inflight", []),
                              int(jax.device_get(tree["cursor"])[0]))
        self.summary.update(restored.metadata.get("summary", {}))
        self.metrics.truncate_after(restored.step)
        _say(f"[r1jax] resumed from step {restored.step} in {self.ckpt.directory}")
        return Loop(step=int(jax.device_get(state.step)), state=state, ref=tree.get("ref"),
                    rollout=tree["rollout"], cursor=[int(x) for x in jax.device_get(tree["cursor"])],
                    info=None, rollout_metrics=restored.metadata.get("rollout_metrics", {}))

    # Settings that decide which arrays a checkpoint holds (in-flight rollouts, the reference,
    # recorded routes): resuming under other values could only fail inside Orbax's restore.
    _LAYOUT_KEYS = ("train.rollout_mode", "train.max_staleness", "grpo.beta", "model.moe.routing_replay")

    def _check_resume_layout(self) -> None:
        try:
            saved = (self.ckpt.read_json(ckpt_lib.CONFIG) or {}).get("config") or {}
        except Exception:  # noqa: BLE001 - a damaged latest step is reported (and skipped) by restore
            return
        now = to_dict(self.cfg)

        def get(tree, dotted):
            for part in dotted.split("."):
                tree = tree.get(part) if isinstance(tree, dict) else None
            return tree

        if get(saved, "train.rollout_mode") == "sync" and get(now, "train.rollout_mode") == "sync":
            keys = [k for k in self._LAYOUT_KEYS if not k.startswith("train.")]
        else:
            keys = list(self._LAYOUT_KEYS)
        # beta only decides whether a reference is stored: 0 against any other value
        same = {"grpo.beta": lambda a, b: bool(a) == bool(b)}
        changed = [f"{k}={get(saved, k)!r} (now {get(now, k)!r})" for k in keys
                   if get(saved, k) is not None
                   and not same.get(k, lambda a, b: a == b)(get(saved, k), get(now, k))]
        if changed:
            raise ckpt_lib.CheckpointError(
                f"the checkpoint in {self.ckpt.directory} was written with {', '.join(changed)}, which "
                "change what a checkpoint holds: resume with the saved values or start a new run.dir")

    def _start(self) -> Loop:
        c = self.cfg
        _, params = build_model(c.model, self.mesh, self.train_rules, seed=c.train.seed)
        if c.sft.steps > 0:
            before = self._eval(params, "before SFT") if c.eval.num_prompts else {}
            bar = self._progress(c.sft.steps, "sft")
            params, loss = sft_lib.train(
                self.graphdef, params, sft_cfg=c.sft, data_cfg=c.data, tokenizer=self.tokenizer,
                max_len=self.geometry.prompt_len + self.geometry.completion_len, mesh=self.mesh,
                rules=self.train_rules, params_shardings=self.params_shardings,
                progress=lambda i, loss: (bar.set_postfix(loss=f"{loss:.3f}"), bar.update(1)))
            bar.close()
            self.summary["sft_loss"] = loss
            if before:
                self.summary["accuracy_before_sft"] = before["eval/pass@1"]
        if c.eval.num_prompts:
            ev = self._eval(params, "before RL")
            self.summary["accuracy_before_rl"] = ev["eval/pass@1"]
            self.summary.update({f"before_rl/{k}": v for k, v in ev.items()})
        state = grpo.init_train_state(params, self.optimizer, self.state_shardings)
        return Loop(step=0, state=state, ref=grpo.init_reference(state.params, c.grpo.beta),
                    rollout=None, cursor=[0, 0, 0], info=None, rollout_metrics={})

    def _compile_update(self, loop: Loop):
        c = self.cfg
        # What the update reads of the rollout (rollout.minibatch drops the rest).
        mb = {k: v for k, v in self.batch_shardings.items() if k != "truncated" or c.grpo.mask_truncated}
        self.batch_shardings = mb
        n = self.geometry.minibatch_size
        batch = {k: jax.ShapeDtypeStruct((n,) + v.shape[1:], v.dtype, sharding=v.sharding)
                 for k, v in self.collector.layout.items() if k in mb}
        packer = self.collector.packer
        if packer is not None:  # the packed layout's shapes, at the most chunks a mini-batch can need
            batch = packer.abstract(batch)
        update = grpo.make_update_step(
            self.graphdef, self.optimizer, c.grpo, self.geometry, schedule=self.schedule,
            state_shardings=self.state_shardings, ref_shardings=self.params_shardings if c.grpo.beta else None,
            batch_shardings={k: v.sharding for k, v in batch.items()}, mesh=self.mesh, rules=self.train_rules)
        ref = self.params_abstract if c.grpo.beta else None
        compiled = update.lower(self.state_abstract, ref, batch).compile()
        rep = aot.program_report(compiled, collectives=False)
        gib = 1 << 30
        _say(f"[compile] GRPO update step: per device: arguments {rep.get('argument_bytes', 0) / gib:.3f} GiB, "
             f"temporaries {rep.get('temp_bytes', 0) / gib:.3f} GiB, peak ~{rep.get('peak_bytes', 0) / gib:.3f} GiB, "
             f"{rep.get('flops', 0) / 1e9:.2f} GFLOP")
        self.summary["update_compile"] = {k: v for k, v in rep.items() if isinstance(v, (int, float))}
        # Packed chunk counts are bucketed (r1jax.packing.bucket_count): the jitted step compiles
        # each bucket once, the report above being the largest.
        return update if packer is not None else compiled

    # -- hooks ------------------------------------------------------------------------------
    def _install_hooks(self, loop: Loop) -> None:
        """The built-in side work, in the order it runs after an update."""
        c = self.cfg
        self._bar = self._progress(c.train.steps, "grpo")
        self._bar.update(loop.step)
        base = [Hook(self._samples_hook, 1), Hook(self._eval_hook, c.eval.every), Hook(self._metrics_hook, 1),
                Hook(self._progress_hook, 1), Hook(self._checkpoint_hook, 1)]
        self.hooks = base + self.hooks

    def _samples_hook(self, loop: Loop) -> None:
        if loop.new_rollout and loop.info is not None:
            self.metrics.write_samples(loop.step - 1, loop.info.samples)

    def _eval_hook(self, loop: Loop) -> None:
        if self.cfg.eval.num_prompts and loop.step < self.cfg.train.steps:
            loop.row.update(self._eval(loop.state.params, f"step {loop.step}"))

    def _metrics_hook(self, loop: Loop) -> None:
        self.metrics.write(loop.step, loop.row)

    def _progress_hook(self, loop: Loop) -> None:
        row = loop.row
        self._bar.set_postfix(reward=f"{row.get('reward/mean', float('nan')):.3f}",
                              acc=f"{row.get('accuracy', float('nan')):.3f}",
                              kl=f"{row.get('kl') if row.get('kl') is not None else float('nan'):.4f}",
                              tok_s=f"{row.get('throughput/completion_tokens_per_s', 0):.0f}")
        self._bar.update(1)

    def _save(self, loop: Loop, *, final: bool) -> bool:
        if loop.nonfinite_streak:
            return False  # never checkpoint right after a skipped (non-finite) update
        inflight, inflight_meta = None, []
        if self.sample_mesh is not None:
            # Async: a save drains the sampler (offpolicy); between saves it is skipped, and a
            # preemption flag set meanwhile (sticky) is saved at the next update.
            guard, every = self.ckpt.guard, self.cfg.checkpoint.every
            if not (final or (guard is not None and guard.requested) or (every > 0 and loop.step % every == 0)):
                return False
            inflight, inflight_meta = self.rollouts.inflight()
        meta = {"summary": {k: v for k, v in self.summary.items() if not isinstance(v, dict)},
                "rollout_metrics": loop.rollout_metrics, "inflight": inflight_meta,
                "metrics": {k: v for k, v in loop.row.items() if isinstance(v, (int, float))}}
        cursor = distributed.put_global(np.asarray(loop.cursor, np.int32), mesh_lib.replicated(self.mesh))
        tree = self._ckpt_tree(loop.state, loop.ref, loop.rollout, cursor, inflight)
        kw = dict(data_state=self.data_iter.get_state(), config=to_dict(self.cfg), metadata=meta)
        if final:
            self.ckpt.save(loop.step, tree, **kw)
            return True
        return self.ckpt.maybe_save(loop.step, tree, **kw)

    def _checkpoint_hook(self, loop: Loop) -> None:
        if self._save(loop, final=False) and self.ckpt.last_blocking_s is not None:
            self.summary.setdefault("checkpoint_blocking_s", []).append(self.ckpt.last_blocking_s)

    # -- the end ----------------------------------------------------------------------------
    def _finish(self, loop: Loop, t_start: float) -> Dict[str, Any]:
        c = self.cfg
        if loop.step > 0 and loop.step not in self.ckpt.all_steps():
            self._save(loop, final=True)
        if c.eval.num_prompts:
            samples: List[Dict[str, Any]] = []
            ev = self._eval(loop.state.params, "after RL", samples_out=samples)
            self.summary["accuracy_after_rl"] = ev["eval/pass@1"]
            self.summary.update({f"after_rl/{k}": v for k, v in ev.items()})
            self.metrics.write_samples(loop.step, samples)
        self.ckpt.wait()
        self.summary.update(self._final_summary(loop.step, t_start))
        self._write_summary(self.summary)
        return self.summary

    def _eval(self, params, when: str, samples_out=None) -> Dict[str, float]:
        t0 = time.perf_counter()
        c = self.cfg
        ev = evaluate(self.sampler, params, eval_cfg=c.eval, data_cfg=c.data, tokenizer=self.tokenizer,
                      prompt_len=self.geometry.prompt_len, seed=c.train.seed + 7,
                      samples_to_log=c.run.samples_to_log, samples_out=samples_out,
                      answer_kwargs=run_settings(c.rewards.functions))
        k = int(ev["eval/k"])
        _say(f"[eval {when}] pass@1 {ev['eval/pass@1']:.3f}  cons@{k} {ev[f'eval/cons@{k}']:.3f} on "
             f"{int(ev['eval/num_prompts'])} held-out prompts ({time.perf_counter() - t0:.1f}s)")
        return ev

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True,
                    disable=not self.cfg.run.progress or not self.is_main)

    def _final_summary(self, step: int, t_start: float) -> Dict[str, Any]:
        out: Dict[str, Any] = {"steps": step, "wall_seconds": time.perf_counter() - t_start}
        rows = read_metrics(self.run_dir) if self.is_main else []
        if rows:
            last = rows[-min(len(rows), self.geometry.updates_per_rollout):]
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


__all__ = ["Trainer", "Hook", "Loop", "NonFiniteError", "train", "run_dir_for", "build_tokenizer"]
