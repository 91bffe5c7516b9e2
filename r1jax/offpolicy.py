"""Where rollouts come from: drawn in step with the updates (sync) or ahead of them on a
sampling mesh of their own, with a bounded staleness (async).

    sync:   rollout k = collect(current policy)                        (on the run's mesh)
    async:  devices = training mesh | sampling mesh (train.sampling_devices, default half)
            trainer: at rollout k, push version k (its params, device to device) -> take rollout k
            sampler thread: for k = 0, 1, ...: wait for version v(k) -> collect -> hand over

Versions. Policy version v is the policy after the updates of rollouts 0..v-1 (version 0 the
initial one), so it exists once the trainer starts rollout v. Rollout k is produced by version
v(k) = max(0, k - train.max_staleness): a fixed schedule, so tokens, rewards and updates never
depend on thread timing (the thread only decides *when* rollout k is drawn, not what from);
staleness k - v(k) <= max_staleness by construction, and max_staleness = 0 draws exactly the
rollouts a synchronous run on a mesh like the sampling mesh draws. AReaL (Fu et al. 2025,
arXiv:2505.24298) bounds staleness the same way (its eta); PipelineRL and slime's async modes
overlap the same two roles.

Why a thread rather than one thread and async dispatch: a rollout is not one device program.
It syncs with the host per draw (token ids to detokenise and score, dynamic sampling's keep
decisions) and per decode segment, and every update reads its metrics back; one thread would
serialise those waits. A thread per role lets the sampler's host work (rewards) and device work
overlap the trainer's updates; JAX dispatch is thread safe.

Log-probabilities. A rollout's logp_old is its producing version's (the sampler's logp_policy,
or grpo.recompute_logp_old recomputed on the sampling mesh with that version's params), so the
importance ratio pi_theta / pi_old is against the policy that produced it, and the clipping
bounds how far the current policy moved from it. logp_ref is computed by the trainer when it
takes the rollout (the reference lives on the training mesh; its resets are between rollouts).

Weights. Once per rollout the trainer's params move to the sampling mesh: resharded to the
sampling layout on the training mesh, then jax.device_put shard by shard onto the sampling
mesh's NamedShardings: device to device, never through the host (tests/test_offpolicy.py
checks it under jax.transfer_guard; meshes of equal shape, as the default half/half split
gives them; for unequal ones jax.device_put picks its own route). The sampler holds at most the
versions still scheduled (<= max_staleness + 2 copies of the weights on the sampling mesh).

Exact resume. The checkpoint holds the rollouts drawn but not yet taken (`inflight`, with
their versions). Before a save the trainer drains the thread: it waits until the sampler has
drawn every rollout whose version exists (k <= r + max_staleness at rollout r), so a checkpoint
holds exactly max_staleness of them and the data position after them, whatever the timing. The
sampler always fills its window, whatever train.steps says: a longer resumed run continues
exactly as an uninterrupted one (a run's last max_staleness rollouts are drawn and unused).

One process only: the sampler thread's rollouts all-gather rewards across processes, which
would interleave with the trainer's collectives; several processes are a one-line error.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from r1jax import mesh as mesh_lib
from r1jax import rollout as rollout_lib
from r1jax.config import Config
from r1jax.models.build import abstract_model
from r1jax.sampler import Sampler


def producing_version(k: int, max_staleness: int) -> int:
    """The policy version that draws rollout k: max(0, k - max_staleness)."""
    return max(0, int(k) - int(max_staleness))


def split_devices(cfg: Config, devices: Sequence[Any]) -> Tuple[list, Optional[list]]:
    """(training devices, sampling devices or None): async takes the last
    train.sampling_devices (0: half) of `devices` for sampling."""
    devices, t = list(devices), cfg.train
    if t.rollout_mode == "sync":
        return devices, None
    if jax.process_count() > 1:
        raise ValueError(f"train.rollout_mode=async runs in one process ({jax.process_count()} "
                         f"here): use rollout_mode=sync with --processes")
    s = t.sampling_devices or len(devices) // 2
    if not 0 < s < len(devices):
        raise ValueError(f"train.rollout_mode=async needs train.sampling_devices in [1, "
                         f"{len(devices) - 1}] of the {len(devices)} devices, got {s} "
                         f"(async needs at least 2 devices)")
    return devices[:len(devices) - s], devices[len(devices) - s:]


def rollout_sampler(graphdef, cfg: Config, *, mesh, rules, tokenizer, base: Optional[Sampler] = None
                    ) -> Sampler:
    """The sampler rollouts draw with: `base` (sharing its compiled programs) unless
    sampler.dtype asks for other weights and compute dtype than the model's, then a sampler of
    the model built in that dtype (rollout.sampler_params casts the weights it is handed)."""
    d = cfg.sampler.dtype
    if d is not None and (d != cfg.model.dtype or d != cfg.model.param_dtype):
        graphdef, _ = abstract_model(dataclasses.replace(cfg.model, dtype=d, param_dtype=d))
    elif base is not None and base.mesh is mesh:
        return base
    return Sampler(graphdef, cfg.sampler, mesh=mesh, rules=rules, tokenizer=tokenizer,
                   pad_id=tokenizer.pad_id)


class SyncRollouts:
    """Rollout r drawn with the current policy when the trainer asks for it."""

    def __init__(self, collector: rollout_lib.Collector, data_iter, base_key: jax.Array):
        self.collector, self.data_iter, self.base_key = collector, data_iter, base_key

    def next(self, r: int, params, ref):
        return self.collector.collect(params, ref, self.data_iter, jax.random.fold_in(self.base_key, r))

    def abstract(self):
        return None

    def inflight(self):
        return None, []

    def restore(self, tree, meta, r: int) -> None:
        pass

    def close(self) -> None:
        pass


class AsyncRollouts:
    """The sampler thread and the trainer's side of the hand-over (see the module docstring).

        rollouts = AsyncRollouts(sampling_collector, train_collector, data_iter, key,
                                 max_staleness=1, params_shardings=sampling_layout)
        rollout, info = rollouts.next(r, params, ref)   # the trainer, at the start of rollout r
    """

    def __init__(self, collector: rollout_lib.Collector, train_collector: rollout_lib.Collector,
                 data_iter, base_key: jax.Array, *, max_staleness: int, params_shardings, train_mesh):
        self.collector, self.train = collector, train_collector
        self.data_iter, self.base_key = data_iter, base_key
        self.max_staleness = int(max_staleness)
        self.params_shardings = params_shardings
        # A device_put between device sets that also changes the layout goes through the host
        # (jax 0.10, seen under transfer_guard); one that keeps it copies shard by shard. So
        # the layout changes first, on the training mesh (one jitted identity), then the shards
        # move. Meshes of different shapes cannot keep a layout: jax.device_put does it all.
        same = dict(train_mesh.shape) == dict(jax.tree.leaves(params_shardings)[0].mesh.shape)
        self._relayout = jax.jit(lambda t: t, out_shardings=jax.tree.map(
            lambda sh: NamedSharding(train_mesh, sh.spec), params_shardings)) if same else None
        self._cv = threading.Condition()
        self._versions: Dict[int, Any] = {}  # version -> params on the sampling mesh
        self._ready: Dict[int, tuple] = {}  # k -> (version, rollout, info, sampler's wait for weights)
        self._next_k = 0  # the next rollout the thread draws
        self._pushed = -1  # the newest version pushed
        self._error: Optional[BaseException] = None
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    # -- the weights ------------------------------------------------------------------------
    def push(self, version: int, params) -> None:
        """Hand version `version`'s params to the sampler: device to device onto the sampling
        mesh (jax.device_put between NamedShardings; nothing through the host)."""
        if self._relayout is not None:
            params = self._relayout(params)
        moved = jax.device_put(params, self.params_shardings)
        with self._cv:
            self._versions[version] = moved
            self._pushed = max(self._pushed, version)
            self._cv.notify_all()

    # -- the sampler thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    k = self._next_k
                    v = producing_version(k, self.max_staleness)
                    t0 = time.perf_counter()
                    while v not in self._versions and not self._stop:
                        self._cv.wait()
                    if self._stop:
                        return
                    params, waited = self._versions[v], time.perf_counter() - t0
                rollout, info = self.collector.collect(params, None, self.data_iter,
                                                       jax.random.fold_in(self.base_key, k))
                jax.block_until_ready(rollout)
                with self._cv:
                    self._ready[k] = (v, rollout, info, waited)
                    self._next_k = k + 1
                    keep = producing_version(k + 1, self.max_staleness)
                    for old in [u for u in self._versions if u < keep]:
                        del self._versions[old]  # no later rollout is scheduled on it
                    self._cv.notify_all()
        except BaseException as e:  # handed to the trainer, raised by its next call
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _wait(self, until) -> float:
        t0 = time.perf_counter()
        with self._cv:
            while not until() and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise RuntimeError(f"async rollouts: the sampler thread failed: {self._error!r}") from self._error
        return time.perf_counter() - t0

    # -- the trainer's side -----------------------------------------------------------------
    def next(self, r: int, params, ref):
        """Rollout r, at the start of rollout r: version r (= `params`) goes to the sampler
        first, then the rollout scheduled on version v(r) is taken (drawn already, or waited
        for), moved to the training mesh and given its reference log-probs."""
        if r > self._pushed:
            self.push(r, params)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="r1jax-sampler", daemon=True)
            self._thread.start()
        waited = self._wait(lambda: r in self._ready)
        with self._cv:
            v, rollout, info, waited_weights = self._ready.pop(r)
        layout = self.train.layout
        out = {k: jax.device_put(x, layout[k].sharding) for k, x in rollout.items()}
        t0 = time.perf_counter()
        if "logp_ref" in layout:
            out["logp_ref"] = jax.block_until_ready(self.train.logprobs(ref, out))
        out = {k: out[k] for k in self.train.keys}
        info.metrics.update({"offpolicy/staleness": float(r - v), "offpolicy/version": float(v),
                             "time/trainer_wait_rollout": waited,
                             "time/sampler_wait_weights": waited_weights})
        if "logp_ref" in layout:
            info.metrics["time/reference"] = time.perf_counter() - t0
        return out, info

    # -- checkpoints ------------------------------------------------------------------------
    def abstract(self):
        """The checkpoint's `inflight` restore target: max_staleness rollouts (sampling
        layout) and their [rollout index, version]; None when max_staleness = 0."""
        s = self.max_staleness
        if s == 0:
            return None
        rep = mesh_lib.replicated(self.collector.mesh)
        return {"rollouts": {str(i): dict(self.collector.layout) for i in range(s)},
                "index": jax.ShapeDtypeStruct((s, 2), jnp.int32, sharding=rep)}

    def inflight(self):
        """(tree, metadata) of the rollouts drawn and not taken, after waiting until the sampler
        has drawn every one whose version exists: always max_staleness of them."""
        if self._thread is not None:
            self._wait(lambda: producing_version(self._next_k, self.max_staleness) not in self._versions)
        with self._cv:
            ks = sorted(self._ready)
        if len(ks) != self.max_staleness:
            raise RuntimeError(f"async rollouts: {len(ks)} rollouts in flight at a checkpoint, "
                               f"expected max_staleness={self.max_staleness}")
        if not ks:
            return None, []
        index = np.asarray([[k, self._ready[k][0]] for k in ks], np.int32)
        tree = {"rollouts": {str(i): self._ready[k][1] for i, k in enumerate(ks)},
                "index": jax.device_put(index, mesh_lib.replicated(self.collector.mesh))}
        meta = [{"metrics": self._ready[k][2].metrics, "samples": self._ready[k][2].samples,
                 "wait_weights": self._ready[k][3]} for k in ks]
        return tree, meta

    def restore(self, tree, meta, r: int) -> None:
        """The state `inflight` saved, the trainer being at rollout r."""
        self._next_k, self._pushed = r + 1, r
        if tree is None:
            return
        index = np.asarray(jax.device_get(tree["index"]))
        for i, (k, v) in enumerate(index.tolist()):
            info = rollout_lib.RolloutInfo(metrics=dict(meta[i]["metrics"]), samples=meta[i]["samples"],
                                           rewards_N=np.zeros(0, np.float32))
            self._ready[k] = (v, tree["rollouts"][str(i)], info, meta[i]["wait_weights"])
        self._next_k = int(index[:, 0].max()) + 1

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()


def make_rollouts(trainer, data_iter, base_key: jax.Array):
    """The run's rollout source: SyncRollouts on the trainer's collector, or AsyncRollouts with
    a collector of its own on the sampling mesh."""
    c = trainer.cfg
    if trainer.sample_mesh is None:
        return SyncRollouts(trainer.collector, data_iter, base_key)
    mesh, rules = trainer.sample_mesh, trainer.sample_rules
    sampler = rollout_sampler(trainer.graphdef, c, mesh=mesh, rules=rules, tokenizer=trainer.tokenizer)
    # beta = 0 here: logp_ref is the trainer's (AsyncRollouts.next); no params_shardings: the
    # log-prob pass of recompute_logp_old takes the pushed params in the sampling layout.
    collector = rollout_lib.Collector(
        trainer.geometry, dataclasses.replace(c.grpo, beta=0.0), sampler, trainer.collector.rewards,
        trainer.tokenizer, mesh=mesh, rules=trainer.train_rules, samples_to_log=c.run.samples_to_log,
        graphdef=trainer.graphdef, model_cfg=c.model)
    _, abstract = abstract_model(c.model, mesh, rules)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return AsyncRollouts(collector, trainer.collector, data_iter, base_key,
                         max_staleness=c.train.max_staleness, params_shardings=shardings, train_mesh=trainer.mesh)


__all__ = ["AsyncRollouts", "SyncRollouts", "make_rollouts", "producing_version", "rollout_sampler",
           "split_devices"]
