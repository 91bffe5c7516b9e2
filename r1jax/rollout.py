"""Rollouts: P prompts in, the fixed-shape arrays GRPO's updates consume out.

    prompt batches -> sampler (P prompts x G samples, on device)
                   -> token ids to the host ONCE -> detokenise -> rewards (host threads)
                   -> keep whole groups (dynamic sampling) -> scatter into a fixed-size buffer
                   -> advantages (host, from the rewards) -> reference log-probs (device)

The sampler's device arrays (tokens, mask, log-probs, prompts) go straight into the rollout
buffer on device; only token ids and lengths travel to the host, and only the advantages come
back. The buffer has the rollout's storage shape whatever dynamic sampling kept, so its
refill is one compiled scatter: how many groups a draw kept never changes a shape.

Storage layout (`abstract`): N = P x G rows, row r = p * G + g (the G samples of a prompt
adjacent, rows of one group never split), sharded over the batch axes of the training rules:

    prompt_ids, prompt_mask      int32 [N, Tp]   left-padded to Geometry.prompt_len
    completion_ids               int32 [N, Tc]   pad after the end
    completion_mask              int32 [N, Tc]   1 on generated tokens up to and including the stop
    logp_old                     f32   [N, Tc]   log pi_old: the sampler's untruncated logp_policy
                                                 (or a recomputing forward, grpo.recompute_logp_old)
    advantages                   f32   [N]       group-relative, from the rewards
    truncated                    int32 [N]       1 when max_new_tokens cut the completion
    logp_ref                     f32   [N, Tc]   only when beta > 0
    logp_sampler                 f32   [N, Tc]   only when it differs from logp_old: the log-prob
                                                 under the truncated (top-k / top-p) distribution
                                                 actually sampled, or when logp_old is recomputed
    prompt_routes                u8|i16 [N, Tp, Lm, K]  only with model.moe.routing_replay=rollout:
    completion_routes            u8|i16 [N, Tc, Lm, K]  the experts the sampler routed each token to
                                                 in each of the Lm MoE layers (the update replays
                                                 them; r1jax.models.moe.compact_routes' type)

Several processes: every process runs the same program on global arrays (the sampler's
row r draws from fold_in(key, r), whatever process holds it) and reads back only the rows its
devices hold (`distributed.local_rows`): those it detokenises and scores with its own reward
runner. Rewards and lengths, a few numbers per row, are then all-gathered, so the keep
decisions, the buffer's global order (`dst` below) and the advantages are computed the same
on every process, and the rollout does not depend on the process count.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import distributed
from r1jax import grpo
from r1jax import mesh as mesh_lib
from r1jax import packing
from r1jax.config import GRPOConfig, SamplerConfig
from r1jax.sampler import FINISH_LENGTH, Sampler

# Always present, in this order (the checkpoint's `rollout` tree holds exactly `keys(...)`).
BASE_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logp_old",
             "advantages", "truncated")
_INT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated")
# What the sampler hands over per draw (advantages and logp_ref are filled in afterwards).
_DRAWN_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logp_old",
               "truncated", "logp_sampler", "prompt_routes", "completion_routes")
_ROUTE_KEYS = ("prompt_routes", "completion_routes")


def replays(model_cfg) -> bool:
    """Routing replay is on: the rollout carries the sampler's recorded experts."""
    moe = getattr(model_cfg, "moe", None)
    return moe is not None and moe.routing_replay == "rollout"


def keys(grpo_cfg: GRPOConfig, sampler_cfg: SamplerConfig, model_cfg=None) -> Tuple[str, ...]:
    """The arrays a rollout holds under these configs (see the module docstring)."""
    out = list(BASE_KEYS)
    if grpo_cfg.beta:
        out.append("logp_ref")
    truncating = sampler_cfg.top_k > 0 or sampler_cfg.top_p < 1.0
    if truncating or grpo_cfg.recompute_logp_old:
        out.append("logp_sampler")
    if replays(model_cfg):
        out.extend(_ROUTE_KEYS)
    return tuple(out)


def abstract(geometry: grpo.Geometry, rollout_keys: Sequence[str], mesh, rules, model_cfg=None
             ) -> Dict[str, jax.ShapeDtypeStruct]:
    """The rollout's storage layout as sharded ShapeDtypeStructs: the trainer's buffer, the
    checkpoint's restore target and the compile command's batch are all built from it
    (`model_cfg`: the MoE model whose routes the rollout keys hold, if it holds them)."""
    n, tp, tc = geometry.rollout_size, geometry.prompt_len, geometry.completion_len
    shapes = {"prompt_ids": (n, tp), "prompt_mask": (n, tp), "completion_ids": (n, tc),
              "completion_mask": (n, tc), "logp_old": (n, tc), "advantages": (n,),
              "truncated": (n,), "logp_ref": (n, tc), "logp_sampler": (n, tc)}
    dtypes = {}
    if any(k in rollout_keys for k in _ROUTE_KEYS):
        from r1jax.models import moe as moe_lib

        routes = moe_lib.recorded_routes(model_cfg, n, tp, tc)
        shapes.update({k: shape for k, (shape, _) in routes.items()})
        dtypes = {k: dtype for k, (_, dtype) in routes.items()}
    out = {}
    for k in rollout_keys:
        shape = shapes[k]
        dtype = dtypes.get(k, jnp.int32 if k in _INT_KEYS else jnp.float32)
        out[k] = jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.batch_sharding(
            mesh, rules, len(shape)))
    return out


def minibatch(rollout: Dict[str, jax.Array], rows: np.ndarray, grpo_cfg: GRPOConfig,
              shardings: Optional[Dict[str, Any]] = None) -> Dict[str, jax.Array]:
    """The update's batch: `rows` of the rollout (whole samples), with the keys the update
    reads (`truncated` only with mask_truncated; logp_sampler, when the rollout has it, for the
    mismatch statistics and grpo.rollout_correction)."""
    skip = set() if grpo_cfg.mask_truncated else {"truncated"}
    batch = {k: v[rows] for k, v in rollout.items() if k not in skip}
    if shardings is not None:
        batch = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
    return batch


@dataclasses.dataclass
class RolloutInfo:
    """Host-side results of one rollout: its metrics (names as metrics.jsonl shows them), a
    few samples to log, and the rewards of the stored rows."""

    metrics: Dict[str, float]
    samples: List[Dict[str, Any]]
    rewards_N: np.ndarray


def sampler_params(params, dtype: Optional[str]):
    """The parameters the sampler gets: float leaves cast to sampler.dtype (None: as they
    are). The trainer's own copy and the log-prob passes keep the model's dtype."""
    return params if dtype is None else _cast_floats(params, dtype)


@functools.partial(jax.jit, static_argnums=1)  # one program for the whole tree, not one per leaf shape
def _cast_floats(params, dtype: str):
    dt = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _scatter(buffer: Dict[str, jax.Array], part: Dict[str, jax.Array], dst_R: jax.Array):
    """Write rows of one draw into the buffer: part row i goes to buffer row dst_R[i]; rows
    with dst = N (not kept, or past a full buffer) are dropped. Fixed shapes: one program."""
    return {k: buffer[k].at[dst_R].set(part[k].astype(buffer[k].dtype), mode="drop")
            for k in buffer}


class Collector:
    """Collects rollouts for one run: owns the sampler (and its compiled programs), the jitted
    scatter into the buffer and the log-prob forward; holds the reward runner and tokenizer.

        collector = Collector(geometry, cfg.grpo, sampler, rewards, tokenizer, mesh=mesh,
                              rules=train_rules)
        rollout, info = collector.collect(params, ref_params, prompt_batches, key)
    """

    def __init__(self, geometry: grpo.Geometry, grpo_cfg: GRPOConfig, sampler: Sampler,
                 rewards, tokenizer, *, mesh, rules, params_shardings=None,
                 samples_to_log: int = 4, graphdef=None, model_cfg=None):
        if sampler.graphdef is None:
            raise ValueError("Collector: the sampler needs the model's graphdef")
        self.geometry, self.grpo_cfg = geometry, grpo_cfg
        self.sampler, self.rewards, self.tokenizer = sampler, rewards, tokenizer
        self.mesh, self.rules = mesh, rules
        self.samples_to_log = int(samples_to_log)
        # model_cfg: the model's config, for routing replay's recorded routes (an MoE model
        # with model.moe.routing_replay=rollout); None: no routes.
        self.replay = replays(model_cfg)
        self.keys = keys(grpo_cfg, sampler.config, model_cfg)
        self.layout = abstract(geometry, self.keys, mesh, rules, model_cfg)
        drawn = {k: v for k, v in self.layout.items() if k in _DRAWN_KEYS}
        self._drawn_shardings = {k: v.sharding for k, v in drawn.items()}
        self._zeros = jax.jit(
            lambda: {k: jnp.zeros(v.shape, v.dtype) for k, v in drawn.items()},
            out_shardings=self._drawn_shardings)
        # A fresh callable per Collector: jit's compiled-program cache is shared by every jit of
        # one function, so another Collector's geometry would show up as this one's recompile.
        self._scatter = jax.jit(lambda buffer, part, dst_R: _scatter(buffer, part, dst_R),
                                donate_argnums=(0,), out_shardings=self._drawn_shardings)
        self._rows_sharding = rows_sh = mesh_lib.batch_sharding(mesh, rules, 2)
        # The log-prob passes run the trainer's model (`graphdef`), also when the sampler's is
        # another dtype (sampler.dtype).
        graphdef = sampler.graphdef if graphdef is None else graphdef
        self._logp = grpo.reference_logprobs_fn(
            graphdef, temperature=geometry.temperature, params_shardings=params_shardings,
            batch_shardings=rows_sh if params_shardings is not None else None,
            out_shardings=rows_sh if params_shardings is not None else None,
            mesh=mesh, rules=rules)
        # grpo.packing: the update's batches and the log-prob passes are packed (r1jax.packing).
        self.packer = packing.Packer(geometry, grpo_cfg, mesh=mesh, rules=rules) if grpo_cfg.packing else None
        if self.packer is not None:
            self._logp_packed = grpo.reference_logprobs_fn(
                graphdef, temperature=geometry.temperature, params_shardings=params_shardings,
                batch_shardings=rows_sh if params_shardings is not None else None,
                out_shardings=rows_sh if params_shardings is not None else None,
                mesh=mesh, rules=rules, packed=True)
        if self.replay and grpo_cfg.recompute_logp_old:  # pi_old recomputed through the routes
            self._logp_old = grpo.reference_logprobs_fn(
                graphdef, temperature=geometry.temperature, params_shardings=params_shardings,
                batch_shardings=rows_sh if params_shardings is not None else None,
                out_shardings=rows_sh if params_shardings is not None else None,
                mesh=mesh, rules=rules, packed=self.packer is not None, replay=True)

    # -- one draw: P prompts x G samples, scored --------------------------------------------
    def _draw(self, params, batch, key):
        g = self.geometry.group_size
        out = self.sampler.sample(sampler_params(params, self.sampler.config.dtype), batch.prompt_ids_PxTp,
                                  prompt_mask=batch.prompt_mask_PxTp, key=key, num_samples=g)
        # The only device -> host transfer of a draw: this process's rows of token ids and
        # lengths, detokenised and scored here; then every row's reward and length reach every
        # process (a few numbers per row), for the global keep decisions and advantages.
        rows_R, tokens = distributed.local_rows(out.tokens)
        _, lengths = distributed.local_rows(out.lengths)
        _, finish = distributed.local_rows(out.finish_reason)
        ids = [t[:n].tolist() for t, n in zip(tokens, lengths)]
        texts = self.tokenizer.batch_decode(ids)
        rows = [{k: v[r // g] for k, v in batch.fields.items()} for r in rows_R]
        prompts = [batch.prompts[r // g] for r in rows_R]
        local = self.rewards.score(prompts, texts, ids, rows)
        n = out.tokens.shape[0]
        gather = lambda v: distributed.gather_rows(rows_R, v, n)  # noqa: E731
        counts = {k: v for k, v in local.metrics.items() if k.endswith(_COUNTERS)}
        counts = {k: float(v) for k, v in distributed.sum_across_processes(counts).items()}
        scored = dataclasses.replace(local, total=gather(local.total), metrics={**local.metrics, **counts},
                                     per_function={k: gather(v) for k, v in local.per_function.items()})
        lengths, finish = gather(lengths), gather(finish)
        part = {"prompt_ids": jnp.repeat(out.prompt_tokens, g, axis=0),
                "prompt_mask": jnp.repeat(out.prompt_mask, g, axis=0),
                "completion_ids": out.tokens, "completion_mask": out.mask,
                "logp_old": out.logp_policy,
                "truncated": (out.finish_reason == FINISH_LENGTH).astype(jnp.int32),
                "logp_sampler": out.logp}
        if self.replay:
            if out.routes is None:
                raise ValueError("rollout: model.moe.routing_replay=rollout but the sampler recorded no "
                                 "routes (its model config differs from the rollout's)")
            part.update(prompt_routes=jnp.repeat(out.prompt_routes, g, axis=0),
                        completion_routes=out.routes)
        host = {"lengths": lengths, "truncated": finish == FINISH_LENGTH, "rows": rows_R, "ids": ids}
        return part, host, scored

    def _samples(self, rows: np.ndarray, batch, host, scored) -> List[Dict[str, Any]]:
        """The logged samples: global rows `rows` (the first kept ones), decoded from the token
        ids of whichever process holds them, so every process count logs the same samples."""
        tc = self.geometry.completion_len
        where = {int(r): i for i, r in enumerate(host["rows"])}
        held = [j for j, r in enumerate(rows) if int(r) in where]
        ids = np.zeros((len(held), tc), np.int32)
        for k, j in enumerate(held):
            t = host["ids"][where[int(rows[j])]]
            ids[k, :len(t)] = t
        ids = distributed.gather_rows(held, ids, len(rows))
        g = self.geometry.group_size
        return [{"prompt": str(batch.prompts[int(r) // g]),
                 "completion": self.tokenizer.decode(ids[j, :int(host["lengths"][r])].tolist()),
                 "reward": float(scored.total[r])} for j, r in enumerate(rows)]

    def _keep(self, r_PxG: np.ndarray, tries: int, kept: int) -> np.ndarray:
        """Which groups of a draw to keep: all of them, or with DAPO's dynamic sampling those
        whose rewards differ (after `dynamic_sampling_max_tries` draws it gives up filtering
        for whatever is still missing, rather than loop forever)."""
        keep = np.ones(r_PxG.shape[0], bool)
        if self.grpo_cfg.dynamic_sampling:
            keep, _ = grpo.filter_zero_variance_groups(r_PxG)
            if tries > self.grpo_cfg.dynamic_sampling_max_tries and kept + keep.sum() < self.geometry.prompts_per_rollout:
                keep[:] = True
        return keep

    def collect(self, params, ref_params, batches: Iterator, key: jax.Array
                ) -> Tuple[Dict[str, jax.Array], RolloutInfo]:
        """One rollout: draws P prompts at a time from `batches` (each a data.PromptBatch
        padded to geometry.prompt_len) until P groups are kept; draw i samples with
        fold_in(key, i). Returns the rollout arrays (storage layout, on device) and its
        RolloutInfo."""
        geo, c = self.geometry, self.grpo_cfg
        g, P, N = geo.group_size, geo.prompts_per_rollout, geo.rollout_size
        t0 = time.perf_counter()
        buf = self._zeros()
        rewards_N = np.zeros(N, np.float32)
        kept, seen, tries = 0, 0, 0
        drawn: List[Dict[str, Any]] = []  # every completion drawn, kept or not (metrics)
        reward_metrics: List[Dict[str, float]] = []
        samples: List[Dict[str, Any]] = []
        while kept < P:
            batch = next(batches)
            if batch.prompt_ids_PxTp.shape != (P, geo.prompt_len):
                raise ValueError(f"rollout: a prompt batch of shape {batch.prompt_ids_PxTp.shape}, "
                                 f"expected (P, Tp) = {(P, geo.prompt_len)}")
            part, host, scored = self._draw(params, batch, jax.random.fold_in(key, tries))
            tries += 1
            r_PxG = scored.total.reshape(-1, g)
            keep_P = self._keep(r_PxG, tries, kept)
            seen += r_PxG.shape[0]
            # Kept groups fill the buffer in order; the rest (and any overflow) go to row N.
            take_P = keep_P & (np.cumsum(keep_P) <= P - kept)
            slot_P = np.where(take_P, kept + np.cumsum(take_P) - 1, P)
            dst_R = (slot_P[:, None] * g + np.arange(g)[None, :]).reshape(-1)
            dst_R = np.where(np.repeat(take_P, g), dst_R, N).astype(np.int32)
            buf = self._scatter(buf, {k: part[k] for k in buf}, jnp.asarray(dst_R))
            rows = np.repeat(take_P, g)
            rewards_N[dst_R[rows]] = scored.total[rows]
            if not samples:
                idx = np.flatnonzero(np.repeat(keep_P, g))[: self.samples_to_log]
                samples = self._samples(idx, batch, host, scored)
            kept += int(take_P.sum())
            reward_metrics.append(scored.metrics)
            drawn.append({"reward": scored.total, "length": host["lengths"],
                          "truncated": host["truncated"],
                          **{f"r_{k}": v for k, v in scored.per_function.items()}})
        t_sample = time.perf_counter() - t0
        r_PxG = rewards_N.reshape(P, g)
        adv = np.asarray(grpo.group_advantages(r_PxG, scale=c.scale_rewards, eps=c.adv_eps))
        rollout = dict(buf)
        rollout["advantages"] = jax.device_put(adv.reshape(-1).astype(np.float32),
                                               self.layout["advantages"].sharding)
        if c.recompute_logp_old:
            rollout["logp_old"] = self.logprobs(params, rollout, replay=self.replay)
        t1 = time.perf_counter()
        if "logp_ref" in self.keys:
            rollout["logp_ref"] = jax.block_until_ready(self.logprobs(ref_params, rollout))
        t_ref = time.perf_counter() - t1
        rollout = {k: rollout[k] for k in self.keys}
        metrics = _rollout_metrics(drawn, reward_metrics, rewards_N, r_PxG, P=P, seen=seen,
                                   dynamic=c.dynamic_sampling, t_sample=t_sample, t_ref=t_ref)
        return rollout, RolloutInfo(metrics=metrics, samples=samples, rewards_N=rewards_N)

    def logprobs(self, params, rollout: Dict[str, jax.Array], *, replay: bool = False) -> jax.Array:
        """log pi(completion | prompt) under `params` for every row, [N, Tc], one mini-batch
        of rows at a time (the update's batch size bounds the forward's memory); with
        grpo.packing, packed, in groups of chunks holding as many tokens. replay: route through
        the rollout's recorded experts (pi_old recomputed with routing replay)."""
        if self.packer is not None:
            fn = self._logp_old if replay else self._logp_packed
            return jax.device_put(self.packer.logprobs(fn, params, rollout, replay=replay),
                                  self.layout["logp_old"].sharding)
        n, mb = self.geometry.rollout_size, self.geometry.minibatch_size
        fn = self._logp_old if replay else self._logp
        names = ("prompt_ids", "prompt_mask", "completion_ids") + (_ROUTE_KEYS if replay else ())
        rows = lambda k, s: jax.device_put(rollout[k][s:s + mb], self._rows_sharding)  # noqa: E731
        outs = [fn(params, *(rows(k, s) for k in names)) for s in range(0, n, mb)]
        return jax.device_put(jnp.concatenate(outs), self.layout["logp_old"].sharding)


# Reward counters summed over a rollout (and over processes); the rest are means.
_COUNTERS = ("/errors", "/timeouts", "/nonfinite", "/none")


def _rollout_metrics(drawn, reward_metrics, rewards_N, r_PxG, *, P, seen, dynamic, t_sample,
                     t_ref) -> Dict[str, float]:
    """Rewards and lengths describe the policy: every completion drawn, including the groups
    dynamic sampling dropped; `reward/batch_mean` is what the updates train on."""
    d = {k: np.concatenate([x[k] for x in drawn]) for k in drawn[0]}
    lengths = d["length"]
    m: Dict[str, float] = {
        "reward/mean": float(d["reward"].mean()), "reward/std": float(d["reward"].std()),
        "reward/batch_mean": float(rewards_N.mean()),
        "completion/length_mean": float(lengths.mean()), "completion/length_max": float(lengths.max()),
        "completion/truncated_frac": float(d["truncated"].mean()),
        "time/rollout": t_sample, "time/reference": t_ref,
        "throughput/completion_tokens_per_s": float(lengths.sum() / max(t_sample, 1e-9)),
        "dynamic_sampling/drop_rate": float(1.0 - P / seen) if dynamic else 0.0,
        "adv/zero_std_groups": float(np.mean(r_PxG.std(axis=1) == 0)),
    }
    for k in d:
        if k.startswith("r_"):
            vals = d[k][~np.isnan(d[k])]
            m[f"reward/{k[2:]}"] = float(vals.mean()) if vals.size else float("nan")
    for key in reward_metrics[0]:
        if key.endswith(_COUNTERS):
            m[key] = float(sum(rm.get(key, 0.0) for rm in reward_metrics))
    if "reward/accuracy" in m:
        m["accuracy"] = m["reward/accuracy"]
    return m


__all__ = ["BASE_KEYS", "Collector", "RolloutInfo", "abstract", "keys", "minibatch", "sampler_params", "replays"]
