"""GRPO (DeepSeekMath / DeepSeek-R1) as pure functions, and the jitted policy update.

The objective as DeepSeekMath (arXiv 2402.03300) and DeepSeek-R1 (arXiv 2501.12948) write it,
for one question q with G outputs o_i:

    J(theta) = E[ 1/G sum_i 1/|o_i| sum_t ( min(rho_it A_i, clip(rho_it, 1-eps_low, 1+eps_high) A_i)
                                            - beta KL_it ) ]
    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    A_i    = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)
    KL_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1            (Schulman's "k3", always >= 0)

We minimise L = -J. The 1/G 1/|o_i| normalisation is one of three aggregation modes (R1 does
not publish its own): see `policy_loss`.

Everything here is a pure function of arrays and pytrees. The host-side helpers (rollout split,
dynamic-sampling filter) take numpy arrays; the rest is jnp and jit-safe.

Shape suffixes: P prompts, G samples per prompt, N = P*G sequences (of a mini-batch),
Tp prompt length, Tc (or T) completion length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from r1jax import mesh as mesh_lib
from r1jax import objectives
from r1jax import packing as packing_lib
from r1jax.config import GRPOConfig, TrainConfig
from r1jax.logprobs import chunk_len_for, completion_logprobs, logprob_temperature
from r1jax.models import moe as moe_lib
from r1jax.models import moe_decoder
from r1jax.padding import bucket_length

AGG_MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
SCALE_MODES = ("group", "batch", "none")

# The batch an update consumes. `logp_ref` is needed only when beta > 0 (or computed in the step
# from the reference parameters); `logp_old` absent means on-policy (pi_old = sg(pi_theta));
# `truncated` is needed only with mask_truncated.
BATCH_KEYS_REQUIRED = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                       "advantages")
BATCH_KEYS_OPTIONAL = ("logp_old", "logp_ref", "truncated", "logp_sampler") + packing_lib.ROUTE_KEYS
# With grpo.packing the batch is in r1jax.packing's layout: per-token arrays [C, L] (the
# completion-side keys and the layout's own), per-sequence ones [N] (advantages, truncated).
PACKED_KEYS_REQUIRED = packing_lib.LAYOUT_KEYS + ("completion_mask", "advantages")

Params = Any  # a nested dict of arrays


# ---------------------------------------------------------------------------------------------
# Rollout geometry: every shape rule of a GRPO run, validated once
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Geometry:
    """The shapes of a GRPO run, and the rules relating them, checked in one place.

    A rollout is P prompts x G samples = N rows, stored with prompts left-padded to
    `prompt_len` (data.max_prompt_len's bucket) and completions of `completion_len`
    (sampler.max_new_tokens) tokens. It feeds M mini-batches per pass, `inner_epochs` passes:
    `updates_per_rollout` = M x inner_epochs updates, each on `minibatch_size` rows, split into
    `micro_batches` for gradient accumulation. `temperature` is the one log-probs are taken at:
    the sampler's, with temperature 0 (greedy sampling) scored at 1.

    Build it with `Geometry.from_config(cfg)`; the trainer, the rollout, the update step and the
    ahead-of-time compiler all read their shapes from it.
    """

    prompts_per_rollout: int  # P (R1: 512)
    group_size: int  # G (R1: 16)
    num_minibatches: int  # M (R1: 16)
    inner_epochs: int  # passes over a rollout (R1: 1)
    micro_batches: int  # gradient-accumulation steps inside one update
    minibatch_size: int  # rows per update: N / M unless compiling for another batch
    prompt_len: int  # Tp, the stored (bucketed) prompt length
    completion_len: int  # Tc = max_new_tokens
    temperature: float  # log-prob temperature (the sampler's; 0 -> 1)

    @property
    def rollout_size(self) -> int:
        """N = P x G rows."""
        return self.prompts_per_rollout * self.group_size

    @property
    def updates_per_rollout(self) -> int:
        return self.num_minibatches * self.inner_epochs

    @classmethod
    def from_config(cls, cfg, *, minibatch_size: Optional[int] = None,
                    prompt_len: Optional[int] = None,
                    completion_len: Optional[int] = None) -> "Geometry":
        """The geometry of `cfg` (a Config). The keyword arguments override what the config
        implies (the compile command compiles one update for other shapes)."""
        g, t, s = cfg.grpo, cfg.train, cfg.sampler
        p, G, M = int(t.prompts_per_rollout), int(g.group_size), int(g.num_minibatches)
        for key, v, lo in (("train.prompts_per_rollout", p, 1), ("grpo.group_size", G, 2),
                           ("grpo.num_minibatches", M, 1), ("grpo.inner_epochs", g.inner_epochs, 1),
                           ("grpo.micro_batches", g.micro_batches, 1),
                           ("sampler.max_new_tokens", s.max_new_tokens, 1),
                           ("data.max_prompt_len", cfg.data.max_prompt_len, 1)):
            if int(v) < lo:
                why = " (GRPO's baseline is the group mean)" if key == "grpo.group_size" else ""
                raise ValueError(f"{key} must be >= {lo}{why}, got {v}")
        n = p * G
        if minibatch_size is None:
            if n % M:
                raise ValueError(f"grpo.num_minibatches={M} does not divide the rollout's "
                                 f"{p} x {G} = {n} samples (train.prompts_per_rollout x grpo.group_size)")
            minibatch_size = n // M
        if int(minibatch_size) < 1:
            raise ValueError(f"mini-batch size must be >= 1, got {minibatch_size}")
        if int(minibatch_size) % int(g.micro_batches):
            raise ValueError(f"grpo.micro_batches={g.micro_batches} does not divide the mini-batch "
                             f"of {minibatch_size} sequences")
        tp = int(prompt_len if prompt_len is not None
                 else bucket_length(cfg.data.max_prompt_len, s.prompt_buckets))
        tc = int(completion_len if completion_len is not None else s.max_new_tokens)
        for key, v in (("prompt_len", tp), ("completion_len", tc)):
            if v < 1:
                raise ValueError(f"{key} must be >= 1, got {v}")
        if s.temperature < 0:
            raise ValueError(f"sampler.temperature must be >= 0, got {s.temperature}")
        geom = cls(prompts_per_rollout=p, group_size=G, num_minibatches=M,
                   inner_epochs=int(g.inner_epochs), micro_batches=int(g.micro_batches),
                   minibatch_size=int(minibatch_size), prompt_len=tp, completion_len=tc,
                   temperature=logprob_temperature(s.temperature))
        every = int(g.ref_reset_every)
        if g.beta and every > 0 and every % geom.updates_per_rollout:
            raise ValueError(
                f"grpo.ref_reset_every={every} is not a multiple of the {geom.updates_per_rollout} "
                f"updates per rollout (grpo.num_minibatches x grpo.inner_epochs): the reference "
                f"resets only between rollouts, whose reference log-probs are computed once "
                f"(R1: 400 = 25 x 16); use e.g. {max(1, round(every / geom.updates_per_rollout)) * geom.updates_per_rollout}")
        return geom



# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards_PxG, *, scale: str = "group", eps: float = 1e-4) -> jax.Array:
    """Group-relative advantages, GRPO's replacement for a critic.

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)          scale="group"  (DeepSeekMath eq. 3)
        A_i = (r_i - mean_g(r)) / (std_batch(r) + eps)      scale="batch"  (one std over all P*G)
        A_i =  r_i - mean_g(r)                              scale="none"   (Dr.GRPO)

    `std` is the population standard deviation (ddof = 0). The paper writes
    std({r_1, ..., r_G}), the spread of the group's rewards as a set, not an estimate of some
    wider population; ddof = 0 also keeps |A| bounded by sqrt(G - 1) and makes a 1-vs-(G-1)
    group symmetric. TRL uses torch.std (ddof = 1), which scales every advantage by
    sqrt((G-1)/G) relative to ours (0.97 at G = 16): a learning-rate-sized difference only.

    A group whose rewards are all equal gets A = 0 for every member (it carries no signal).

    Args:
      rewards_PxG: rewards, one row per prompt, one column per sample of that prompt.
      scale: "group" | "batch" | "none".
      eps: added to the std before dividing (guards zero-variance groups).
    Returns:
      adv_PxG, float32.
    """
    r = jnp.asarray(rewards_PxG)
    if not jnp.issubdtype(r.dtype, jnp.floating):
        r = r.astype(jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"group_advantages: rewards must be [P, G], got shape {r.shape}")
    if r.shape[1] < 2:
        raise ValueError(
            f"group_advantages: group_size G = {r.shape[1]}; GRPO needs group_size >= 2 "
            "(the group mean is the baseline, so a single sample always gets advantage 0)")
    if scale not in SCALE_MODES:
        raise ValueError(f"group_advantages: scale={scale!r}; valid: {', '.join(SCALE_MODES)}")
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "none":
        return centred
    if scale == "group":
        std = r.std(axis=1, keepdims=True)
    else:
        std = r.std()
    return centred / (std + eps)


# ---------------------------------------------------------------------------------------------
# Dynamic sampling (DAPO) and the rollout split
# ---------------------------------------------------------------------------------------------
def filter_zero_variance_groups(rewards_PxG, *, atol: float = 0.0) -> Tuple[np.ndarray, float]:
    """DAPO's dynamic-sampling filter: keep the groups whose rewards are not all equal.

    A group with max(r) - min(r) <= atol has A_i = 0 for every sample, so it contributes no
    policy gradient (only KL) while still diluting the seq/token means. The trainer drops those
    groups and refills from further prompts.

    Returns:
      (keep_P, drop_rate): a boolean mask over prompts, and the share of groups dropped.
    """
    r = np.asarray(rewards_PxG)
    if r.ndim != 2:
        raise ValueError(f"filter_zero_variance_groups: rewards must be [P, G], got {r.shape}")
    keep_P = (r.max(axis=1) - r.min(axis=1)) > atol
    drop_rate = float(1.0 - keep_P.mean()) if r.shape[0] else 0.0
    return keep_P, drop_rate


def minibatch_indices(rng, num_samples: int, num_minibatches: int) -> List[np.ndarray]:
    """R1's rollout schedule: split one rollout into M mini-batches at random.

    Whole samples are shuffled (never tokens): each returned index array selects rows of the
    rollout's [N, ...] arrays for one policy update (R1: 8,192 outputs into 16 mini-batches).

    Args:
      rng: a numpy Generator, or an int seed.
      num_samples: N, rows in the rollout.
      num_minibatches: M; must divide N so every update sees the same batch shape (one compile).
    """
    if num_minibatches < 1:
        raise ValueError(f"minibatch_indices: num_minibatches must be >= 1, got {num_minibatches}")
    if num_samples % num_minibatches:
        raise ValueError(
            f"minibatch_indices: num_minibatches = {num_minibatches} does not divide the rollout's "
            f"{num_samples} samples (prompts x group_size)")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    perm = rng.permutation(num_samples)
    return list(perm.reshape(num_minibatches, -1))


# ---------------------------------------------------------------------------------------------
# The policy loss
# ---------------------------------------------------------------------------------------------
def _check_agg(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"loss_agg={agg!r}; valid: {', '.join(AGG_MODES)}")


def _aggregate(x_NxT, m_NxT, agg: str, max_len, layout=objectives.ROWS) -> jax.Array:
    """Sum of per-sequence (or per-token) contributions, BEFORE the global normaliser (the
    aggregation weights are r1jax.objectives', for padded rows or packed chunks)."""
    w = objectives.aggregation_weights(m_NxT, agg, max_len=max_len, layout=layout).astype(x_NxT.dtype)
    return jnp.sum(jnp.where(w > 0, w * x_NxT, 0.0))


def loss_normaliser(mask_NxT, agg: str, layout=objectives.ROWS) -> jax.Array:
    """The denominator of the aggregated loss over a whole mini-batch.

    token_mean: the number of loss tokens; the seq modes: the number of sequences with at least
    one loss token (a completion masked out entirely, e.g. by mask_truncated, leaves the group
    rather than counting as a zero). Compute it over the whole mini-batch and pass it to every
    micro-batch's `policy_loss` so that accumulating gradients gives the mini-batch's update.
    Inside jit, global arrays make this count global across processes too.
    """
    _check_agg(agg)
    return objectives.normaliser(mask_NxT, agg, layout=layout)


def _loss_sums(logp_NxT, logp_old_NxT, logp_ref_NxT, adv_N, mask_NxT, entropy_NxT, *,
               eps_low, eps_high, beta, agg, max_len, level="token", is_weights_NxT=None,
               layout=objectives.ROWS) -> Dict[str, jax.Array]:
    """Unnormalised sums (and min/max) of one (micro-)batch; see `policy_loss`."""
    _check_agg(agg)
    if logp_NxT.ndim != 2 or mask_NxT.shape != logp_NxT.shape:
        raise ValueError(f"policy_loss: logp {logp_NxT.shape} and mask {mask_NxT.shape} must be "
                         "the same [N, T] shape")
    if logp_old_NxT.shape != logp_NxT.shape:
        raise ValueError(f"policy_loss: logp_old {logp_old_NxT.shape} != logp {logp_NxT.shape}")
    if layout is objectives.ROWS and adv_N.shape != logp_NxT.shape[:1]:
        raise ValueError(f"policy_loss: advantages {adv_N.shape} must be [N] = "
                         f"[{logp_NxT.shape[0]}] (one per sequence, already flattened from [P, G])")
    if beta and logp_ref_NxT is None:
        raise ValueError(f"policy_loss: beta = {beta} > 0 needs logp_ref")
    dtype = jnp.promote_types(logp_NxT.dtype, jnp.float32)
    logp = logp_NxT.astype(dtype)
    m = mask_NxT.astype(dtype)
    valid = m > 0
    if max_len is None:
        max_len = logp.shape[1]
    # The token ratio (GRPO) or GSPO's sequence ratio; 0 log-ratio on padding (objectives).
    ratio = objectives.importance_ratio(logp, logp_old_NxT, m, level=level, layout=layout)
    a = layout.to_tokens(adv_N.astype(dtype))
    pg_NxT = objectives.clipped_surrogate(ratio, a, eps_low, eps_high)
    if is_weights_NxT is not None:  # TIS / MIS weights: constants of the rollout
        pg_NxT = pg_NxT * jax.lax.stop_gradient(is_weights_NxT.astype(dtype))
    if logp_ref_NxT is not None:
        d = jnp.where(valid, logp_ref_NxT.astype(dtype) - logp, 0.0)
        kl_NxT = jnp.exp(d) - d - 1.0  # k3: unbiased for KL(pi_theta || pi_ref), always >= 0
    else:
        kl_NxT = jnp.zeros_like(logp)
    loss_NxT = pg_NxT + beta * kl_NxT if beta else pg_NxT

    # Clip fractions as TRL/verl report them: tokens whose gradient the clip zeroes.
    low = (ratio < 1.0 - eps_low) & (a < 0)
    high = (ratio > 1.0 + eps_high) & (a > 0)
    sg = jax.lax.stop_gradient
    ent = jnp.zeros_like(logp) if entropy_NxT is None else entropy_NxT.astype(dtype)
    return {
        "objective": _aggregate(loss_NxT, m, agg, max_len, layout),
        "pg": sg(_aggregate(pg_NxT, m, agg, max_len, layout)),
        "tokens": jnp.sum(m),
        "seqs": jnp.sum((layout.seq_sum(m) > 0).astype(dtype)),
        "kl": sg(jnp.sum(kl_NxT * m)),
        "clip_low": jnp.sum(low * m),
        "clip_high": jnp.sum(high * m),
        "ratio": sg(jnp.sum(ratio * m)),
        "ratio_min": sg(jnp.min(jnp.where(valid, ratio, jnp.inf))),
        "ratio_max": sg(jnp.max(jnp.where(valid, ratio, -jnp.inf))),
        "entropy": sg(jnp.sum(ent * m)),
    }


def _finalise(sums: Dict[str, jax.Array], normaliser) -> Dict[str, jax.Array]:
    """Metrics of a whole mini-batch from its accumulated sums."""
    sg = jax.lax.stop_gradient
    norm = jnp.maximum(normaliser, 1.0)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    any_tok = sums["tokens"] > 0
    clip_low = sums["clip_low"] / tokens
    clip_high = sums["clip_high"] / tokens
    return {
        "loss": sg(sums["objective"] / norm),
        "pg_loss": sums["pg"] / norm,
        "kl": sums["kl"] / tokens,
        "clip_frac_low": clip_low,
        "clip_frac_high": clip_high,
        "clip_frac": clip_low + clip_high,  # the two events are disjoint (sign of A)
        "ratio_mean": sums["ratio"] / tokens,
        "ratio_min": jnp.where(any_tok, sums["ratio_min"], 1.0),
        "ratio_max": jnp.where(any_tok, sums["ratio_max"], 1.0),
        "entropy": sums["entropy"] / tokens,
        "num_tokens": sums["tokens"],
        "num_seqs": sums["seqs"],
    }


def advantage_metrics(adv_N, mask_NxT=None, layout=objectives.ROWS) -> Dict[str, jax.Array]:
    """Mean / std / min / max of the advantages (over sequences still in the loss if a mask is
    given), plus the share of sequences with A = 0 (zero-variance groups)."""
    a = jnp.asarray(adv_N, jnp.float32)
    w = (jnp.ones_like(a) if mask_NxT is None
         else (layout.seq_sum(mask_NxT.astype(jnp.float32)) > 0).astype(jnp.float32))
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(a * w) / n
    any_seq = jnp.sum(w) > 0
    return {
        "adv_mean": mean,
        "adv_std": jnp.sqrt(jnp.sum(w * (a - mean) ** 2) / n),
        "adv_min": jnp.where(any_seq, jnp.min(jnp.where(w > 0, a, jnp.inf)), 0.0),
        "adv_max": jnp.where(any_seq, jnp.max(jnp.where(w > 0, a, -jnp.inf)), 0.0),
        "adv_zero_frac": jnp.sum(w * (a == 0)) / n,
    }


def policy_loss(logp_NxT, logp_old_NxT, logp_ref_NxT, adv_N, mask_NxT, *,
                eps_low: float, eps_high: float, beta: float, agg: str = "seq_mean_token_mean",
                max_len: Optional[int] = None, normaliser=None, entropy_NxT=None,
                level: str = "token", is_weights_NxT=None, layout=objectives.ROWS
                ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """GRPO's clipped-surrogate loss with the k3 KL penalty, per token, then aggregated.

    Per token (m_it = mask, A_i broadcast over the sequence's tokens):

        rho_it = exp(logp_it - logp_old_it)
        l_it   = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
                 + beta (exp(ref_it - logp_it) - (ref_it - logp_it) - 1)

    eps_low != eps_high is DAPO's "clip-higher". Aggregation (`agg`), S = sequences with at least
    one loss token:

        seq_mean_token_mean      1/|S| sum_i 1/|o_i| sum_t m_it l_it     (DeepSeekMath / R1)
        token_mean               1/sum m  sum_i sum_t m_it l_it          (DAPO)
        seq_mean_token_sum_norm  1/|S| sum_i 1/max_len sum_t m_it l_it   (Dr.GRPO)

    Args:
      logp_NxT: log pi_theta of the sampled tokens (differentiated).
      logp_old_NxT: log pi_old (the sampler's policy); treated as a constant.
      logp_ref_NxT: log pi_ref, or None when beta = 0 (then KL is neither computed nor logged).
      adv_N: one advantage per sequence (A_i).
      mask_NxT: 1 on loss tokens (generated tokens up to and including the stop).
      max_len: Dr.GRPO's constant normaliser (the sampler's max_new_tokens); default T.
      normaliser: the denominator (|S| or sum m) of the WHOLE mini-batch, when this call sees only
        one micro-batch (see `loss_normaliser`); default: computed from this call's mask.
      entropy_NxT: optional per-token entropies, only for the metric.
      level: the clipped ratio, `token` (rho_it above) or `sequence` (GSPO: rho_it replaced by
        the sequence's length-normalised ratio s_i, in GSPO-token form; r1jax.objectives).
      is_weights_NxT: sampler/trainer mismatch weights (TIS / MIS) multiplying each token's
        policy-gradient term, or None.
      layout: r1jax.objectives.ROWS (padded [N, T] rows) or an r1jax.packing.Packed layout
        (then every per-token argument is [C, L] and adv_N stays [N]).
    Returns:
      (loss, metrics): metrics hold loss, pg_loss, kl (token mean of k3), clip_frac_low,
      clip_frac_high, clip_frac, ratio_mean/min/max, entropy, num_tokens, num_seqs and the
      advantage statistics (adv_mean/std/min/max/zero_frac).
    """
    sums = _loss_sums(logp_NxT, logp_old_NxT, logp_ref_NxT, adv_N, mask_NxT, entropy_NxT,
                      eps_low=eps_low, eps_high=eps_high, beta=beta, agg=agg, max_len=max_len,
                      level=level, is_weights_NxT=is_weights_NxT, layout=layout)
    if normaliser is None:
        normaliser = loss_normaliser(mask_NxT, agg, layout)
    loss = sums["objective"] / jnp.maximum(normaliser, 1.0)
    metrics = _finalise(sums, normaliser)
    metrics.update(advantage_metrics(adv_N, mask_NxT, layout))
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Train state and optimiser
# ---------------------------------------------------------------------------------------------
class TrainState(flax.struct.PyTreeNode):
    """What the update replaces (and donates): the step counter, the policy params, Adam's state."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState

    @classmethod
    def create(cls, params: Params, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=optimizer.init(params))


def init_train_state(params: Params, optimizer: optax.GradientTransformation,
                     shardings: Optional[TrainState] = None) -> TrainState:
    """A fresh TrainState; with `shardings` (see `train_state_shardings`) the optimizer state is
    created directly in its sharded layout, never materialised whole on one device.

    The returned state may share buffers with `params` (jit forwards unchanged inputs), and the
    update step donates the state: copy `params` first if you still need them (the reference
    does: `init_reference` copies)."""
    if shardings is None:
        return TrainState.create(params, optimizer)
    create = jax.jit(lambda p: TrainState.create(p, optimizer),
                     in_shardings=(shardings.params,), out_shardings=shardings)
    return create(params)


def make_schedule(train_cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `lr` over `warmup_steps`, then constant or cosine decay to 0 at `steps`.

    The warmup starts at lr / warmup_steps (not 0) so the first update is not wasted.
    """
    lr, warm, total = float(train_cfg.lr), int(train_cfg.warmup_steps), int(train_cfg.steps)
    if train_cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"train.schedule={train_cfg.schedule!r}; valid: constant, cosine")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm_f = jnp.minimum((step + 1.0) / max(warm, 1), 1.0) if warm > 0 else 1.0
        if train_cfg.schedule == "constant":
            return lr * warm_f
        frac = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
        return lr * warm_f * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def make_optimizer(train_cfg: TrainConfig) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decoupled weight decay, not on biases and norm scales: `decay_mask`) after
    global-norm clipping, on the warmup schedule.

    Returns (optimizer, schedule); the schedule maps the update count to the learning rate.
    """
    schedule = make_schedule(train_cfg)
    parts = []
    if train_cfg.max_grad_norm and train_cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.adam_eps,
                             weight_decay=train_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def decay_mask(params: Params) -> Params:
    """True for the matrices weight decay applies to; False for biases and norm scales.

    Decided by name, not rank: stacked layers give biases and norm scales a leading layer axis,
    so a `ndim >= 2` rule would decay them too."""
    def keep(path, _leaf):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        return not (name.endswith("bias") or name == "scale")

    return jax.tree_util.tree_map_with_path(keep, params)


def train_state_shardings(params_shardings: Params, optimizer: optax.GradientTransformation,
                          params: Params, mesh: jax.sharding.Mesh) -> TrainState:
    """A TrainState-shaped tree of NamedShardings: optimizer moments sharded like their params,
    everything else (counters) replicated. `params` may be abstract (jax.eval_shape)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(optimizer.init, params)
    opt_sh = optax.tree_utils.tree_map_params(
        optimizer, lambda _p, s: s, abstract_opt, params_shardings,
        transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params_shardings, opt_state=opt_sh)


# ---------------------------------------------------------------------------------------------
# Reference model
# ---------------------------------------------------------------------------------------------
def _copy_tree(tree):
    # jnp.copy is a real copy (keeps the sharding): the reference must not alias buffers the
    # update step donates.
    return jax.tree.map(jnp.copy, tree)


def init_reference(params: Params, beta: float) -> Optional[Params]:
    """The frozen reference: a copy of the initial policy, or None when beta = 0 (no memory)."""
    return _copy_tree(params) if beta else None


def maybe_reset_reference(step: int, ref_params: Optional[Params], params: Params,
                          every: int) -> Optional[Params]:
    """R1's hard reset: after update number `step` (1-based count of updates done), the
    reference becomes a copy of the current policy whenever step is a positive multiple of
    `every` (R1: 400). None stays None (beta = 0); every <= 0 never resets."""
    if ref_params is None:
        return None
    step = int(step)
    if every > 0 and step > 0 and step % every == 0:
        return _copy_tree(params)
    return ref_params


def _completion_logprobs(graphdef, params, batch, temperature, batch_shards: int = 1, *,
                         replay: bool = False):
    """(log pi(completion | prompt), entropies, MoE side outputs): [N, Tc] each; the log-prob
    chunk is sized by the rows one device holds (N / batch_shards). A packed batch
    (r1jax.packing: `tokens`, `segment_ids`, `positions`) gives them per packed token instead,
    [C, L]. MoE models report their side outputs (expert load, drops, balance loss; {} for a
    dense model); with `replay` they route every token to the batch's recorded experts
    (routing replay: `routes` packed, `prompt_routes` + `completion_routes` padded)."""
    model = nnx.merge(graphdef, params)
    if hasattr(model, "hidden_and_aux"):
        routes = None
        if replay:
            routes = batch["routes"] if "tokens" in batch else jnp.concatenate(
                [batch["prompt_routes"], batch["completion_routes"]], axis=1)
        model = moe_decoder.RoutedForward(model, routes)
    if "tokens" in batch:
        c, length = batch["tokens"].shape
        chunk = chunk_len_for(max(1, c // max(1, batch_shards)), length - 1, model.cfg.vocab_size)
        logp, ent = packing_lib.packed_logprobs(model, batch["tokens"], batch["segment_ids"],
                                                batch["positions"], temperature=temperature,
                                                chunk_len=chunk)
    else:
        n, tc = batch["completion_ids"].shape
        chunk = chunk_len_for(max(1, n // max(1, batch_shards)), tc, model.cfg.vocab_size)
        logp, ent = completion_logprobs(model, batch["prompt_ids"], batch["prompt_mask"],
                                        batch["completion_ids"], temperature=temperature,
                                        chunk_len=chunk)
    return logp, ent, getattr(model, "aux", {})


def _under_layout(fn, mesh, rules):
    """Trace `fn` with the model's activation-sharding constraints active (r1jax.mesh.layout)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args):
        with mesh_lib.layout(mesh, rules if rules is not None else mesh_lib.TRAIN_RULES):
            return fn(*args)

    return wrapped


def _shards(mesh, rules) -> int:
    return mesh_lib.batch_shards(mesh, rules if rules is not None else mesh_lib.TRAIN_RULES)


def reference_logprobs_fn(graphdef, *, temperature: float = 1.0, params_shardings=None,
                          batch_shardings=None, out_shardings=None, mesh=None,
                          rules=None, compiler_options: Optional[Dict[str, Any]] = None,
                          packed: bool = False, replay: bool = False) -> Callable:
    """A jitted forward: (params, prompt_ids_NxTp, prompt_mask_NxTp, completion_ids_NxTc) ->
    logp_NxTc. Parameters are not donated (the reference is reused; the same function also
    recomputes log pi_old under the policy when grpo.recompute_logp_old is set). With `mesh`,
    the model's activation constraints follow `rules` (default TRAIN_RULES).

    packed: the function is (params, tokens_CxL, segment_ids_CxL, positions_CxL) -> logp_CxL
    in r1jax.packing's layout instead (the packed reference pass).

    replay: the function takes the recorded routes after the tokens (padded: prompt_routes,
    completion_routes; packed: routes) and routes through them: pi_old recomputed under the
    rollout policy with routing replay. The reference pass never replays (config.MoEConfig)."""
    shards = _shards(mesh, rules)
    names = (packing_lib.ROUTE_KEYS[2:] if packed else packing_lib.ROUTE_KEYS[:2]) if replay else ()

    def fn(params, a, b, c, *routes):
        batch = ({"tokens": a, "segment_ids": b, "positions": c} if packed else
                 {"prompt_ids": a, "prompt_mask": b, "completion_ids": c})
        batch.update(zip(names, routes))
        return _completion_logprobs(graphdef, params, batch, temperature, shards, replay=replay)[0]

    fn = _under_layout(fn, mesh, rules)
    kw: Dict[str, Any] = {"compiler_options": compiler_options}
    if params_shardings is not None or batch_shardings is not None:
        kw["in_shardings"] = (params_shardings,) + (batch_shardings,) * (3 + len(names))
    if out_shardings is not None:
        kw["out_shardings"] = out_shardings
    return jax.jit(fn, **kw)


# ---------------------------------------------------------------------------------------------
# The update step
# ---------------------------------------------------------------------------------------------
def _split_micro(x, k: int):
    """[N, ...] -> [k, N/k, ...], micro-batch j = rows j, j+k, j+2k, ... Strided rather than
    contiguous so that with the batch sharded over devices every micro-batch stays spread over
    all of them (a reshape to [N/k, k] keeps the sharded axis first, then swap)."""
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def _join_micro(x):
    """The inverse of `_split_micro`: [k, N/k, ...] -> [N, ...] in the original row order."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _tree_zeros_f32(tree):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                        tree)


def check_batch(batch: Mapping[str, Any], grpo_cfg: GRPOConfig, *, has_ref_params: bool) -> None:
    """One-line errors for a batch the update cannot use (missing or unknown keys)."""
    required = PACKED_KEYS_REQUIRED if grpo_cfg.packing else BATCH_KEYS_REQUIRED
    missing = [key for key in required if key not in batch]
    if missing:
        layout = " (grpo.packing: r1jax.packing's layout)" if grpo_cfg.packing else ""
        raise ValueError(f"GRPO update: batch lacks {missing}{layout}; it has {sorted(batch)}")
    unknown = set(batch) - set(required) - set(BATCH_KEYS_OPTIONAL)
    if unknown:
        raise ValueError(f"GRPO update: unknown batch keys {sorted(unknown)}")
    if grpo_cfg.beta and "logp_ref" not in batch and not has_ref_params:
        raise ValueError(f"GRPO update: beta = {grpo_cfg.beta} > 0 needs batch['logp_ref'] or "
                         "ref_params")
    if grpo_cfg.mask_truncated and "truncated" not in batch:
        raise ValueError("GRPO update: mask_truncated needs batch['truncated']")


def _replays(moe_cfg, batch) -> bool:
    """Whether the update routes through recorded experts (model.moe.routing_replay=rollout);
    one-line error when that is configured but the batch carries no routes."""
    if moe_cfg is None or moe_cfg.routing_replay != "rollout":
        return False
    need = ("routes",) if "tokens" in batch else ("prompt_routes", "completion_routes")
    missing = [k for k in need if k not in batch]
    if missing:
        raise ValueError(f"GRPO update: model.moe.routing_replay=rollout needs batch {missing} "
                         f"(the sampler's recorded experts: r1jax.rollout keeps them); it has {sorted(batch)}")
    return True


def _sum_micro_aux(aux: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """MoE side outputs of a mini-batch from its micro-batches' (stacked on axis 0): counts
    summed, the balance loss averaged (each micro-batch's is a row mean)."""
    return {k: jnp.mean(v, 0) if k == "balance_loss" else jnp.sum(v, 0) for k, v in aux.items()}


def _replay_ratio_metrics(logp, logp_free, logp_old, mask) -> Dict[str, jax.Array]:
    """Ratio statistics with routing replay (the update's) and without it (the router's own
    choices, same parameters): mean |log rho| and the extremes over the loss tokens."""
    m = mask > 0
    n = jnp.maximum(jnp.sum(m), 1)
    out = {}
    for name, lp in (("replay", logp), ("free", logp_free)):
        d = jnp.where(m, lp - logp_old, 0.0)
        out[f"moe/{name}_abs_log_ratio"] = jnp.sum(jnp.abs(d)) / n
        out[f"moe/{name}_ratio_min"] = jnp.exp(jnp.min(jnp.where(m, d, jnp.inf)))
        out[f"moe/{name}_ratio_max"] = jnp.exp(jnp.max(jnp.where(m, d, -jnp.inf)))
    return out


def make_update_step(graphdef, optimizer: optax.GradientTransformation, grpo_cfg: GRPOConfig,
                     geometry: Geometry, *, schedule: Optional[optax.Schedule] = None,
                     state_shardings: Optional[TrainState] = None, ref_shardings=None,
                     batch_shardings=None, mesh=None, rules=None, donate: bool = True,
                     compiler_options: Optional[Dict[str, Any]] = None) -> Callable:
    """The jitted GRPO policy update: (state, ref_params | None, batch) -> (state, metrics).

    One call is one optimiser step on one mini-batch. Inside, the mini-batch is split into
    `geometry.micro_batches` micro-batches (lax.scan) whose gradients are summed; each
    micro-batch's loss is `policy_loss` with the normaliser of the WHOLE mini-batch
    (`loss_normaliser`), so the summed gradient is exactly the mini-batch's, for every
    aggregation mode. The metrics are `policy_loss`'s on the whole mini-batch (from the
    micro-batches' log-probs): the function the tests check against numpy is the one that runs.

    Non-finite guard: when the loss, the gradient norm or the update's norm is not finite, the
    parameters and the optimiser state come back unchanged (the step counter still advances:
    it counts the mini-batches consumed) and metrics["finite"] is 0. The caller decides when
    to stop (the trainer: after train.max_nonfinite_updates consecutive ones).

    The state is donated; `ref_params` never is (and the optimiser never sees it). It is only
    used when the batch lacks `logp_ref` and beta > 0: then the reference log-probs are computed
    in the step, per micro-batch, under stop_gradient. With beta = 0 pass None. It must not share
    buffers with the state (donating an array that is also a live input crashes XLA on CPU):
    `init_reference` and `maybe_reset_reference` copy for that reason.

    Args:
      graphdef: from `nnx.split(model, nnx.Param)`; `nnx.merge(graphdef, params)` is the model.
      optimizer, schedule: from `make_optimizer` (the schedule only feeds the `lr` metric).
      grpo_cfg: eps_low/eps_high, beta, loss_agg, mask_truncated.
      geometry: temperature (the sampler's: log pi_theta is the distribution that was sampled),
        completion_len (Dr.GRPO's constant) and micro_batches.
      state_shardings / ref_shardings / batch_shardings: NamedSharding trees (a TrainState of
        shardings, a params tree, a dict of shardings or one sharding for every batch array);
        None leaves everything to the compiler's propagation. Metrics are replicated.
      mesh, rules: trace under r1jax.mesh.layout(mesh, rules) so the model's activation
        constraints apply (rules default: TRAIN_RULES).
      compiler_options: XLA options for this jit (e.g. tests lower CPU optimisation levels).
    Batch (dict of arrays, N rows): see BATCH_KEYS_REQUIRED / BATCH_KEYS_OPTIONAL; advantages is
      [N] (the [P, G] advantages flattened row-major, matching the sequence order). With
      grpo.packing it is r1jax.packing's layout (PACKED_KEYS_REQUIRED: per-token arrays
      [C, L] from `PackPlan.pack_batch`, advantages / truncated [N]); micro-batches are then
      groups of chunks of grpo.micro_batch_tokens tokens, so C must be a whole number of them.
      `logp_sampler` (log q, the sampler's distribution) adds the `mismatch/*` statistics and
      enables grpo.rollout_correction (tis | mis); without it q = pi_old and nothing is
      corrected. grpo.importance_sampling_level picks the token (GRPO) or sequence (GSPO) ratio.
    Metrics: policy_loss's, plus grad_norm (before clipping), update_norm, lr and finite, and
      `mismatch/*` (r1jax.objectives.mismatch_metrics) when the batch has logp_sampler.
    """
    agg = grpo_cfg.loss_agg
    _check_agg(agg)
    packed = bool(grpo_cfg.packing)
    k = int(geometry.micro_batches)
    if k < 1:
        raise ValueError(f"grpo.micro_batches must be >= 1, got {k}")
    if packed and k != 1:
        raise ValueError(f"grpo.micro_batches={k} with grpo.packing: packed micro-batches are "
                         "counted in tokens, set grpo.micro_batch_tokens instead")
    beta = float(grpo_cfg.beta)
    level, correction = grpo_cfg.importance_sampling_level, grpo_cfg.rollout_correction
    objectives.check_choice("grpo.importance_sampling_level", level, objectives.IS_LEVELS)
    objectives.check_choice("grpo.rollout_correction", correction, objectives.CORRECTIONS)
    band = (float(grpo_cfg.mis_low), float(grpo_cfg.mis_high))
    if not band[0] < band[1]:
        raise ValueError(f"grpo.mis_low={band[0]} must be below grpo.mis_high={band[1]}")
    tis_cap = float(grpo_cfg.tis_cap)
    loss_kw = dict(eps_low=float(grpo_cfg.eps_low), eps_high=float(grpo_cfg.eps_high), beta=beta,
                   agg=agg, max_len=int(geometry.completion_len), level=level)
    temperature = float(geometry.temperature)
    shards = _shards(mesh, rules)

    def update(state: TrainState, ref_params, batch: Mapping[str, jax.Array]):
        check_batch(batch, grpo_cfg, has_ref_params=ref_params is not None)
        need_ref_forward = bool(beta) and "logp_ref" not in batch
        moe_cfg = getattr(nnx.merge(graphdef, state.params).cfg, "moe", None)
        replay = _replays(moe_cfg, batch)
        compare = replay and moe_cfg.replay_compare and "logp_old" in batch
        mb_split = k
        if packed:
            # Packed: [C, L] per-token arrays, [N] per-sequence ones; micro-batches are groups
            # of chunks (counted in tokens, r1jax.packing), the per-sequence arrays stay whole.
            n = batch["advantages"].shape[0]
            c, length = batch["tokens"].shape
            m = packing_lib.micro_chunks(int(grpo_cfg.micro_batch_tokens), length, shards)
            mb_split = 1 if m is None else c // (shards * m)
            if m is not None and c % (shards * m):
                raise ValueError(f"GRPO update: {c} packed chunks are not whole micro-batches of "
                                 f"{shards} shards x {m} chunks (pack with packing.plan(..., "
                                 f"num_shards={shards}, chunks_per_micro={m}))")
            layout = packing_lib.Packed(seq_index=batch["seq_index"], num_seqs=n)
            seq = {"advantages": batch["advantages"]}
        else:
            n = batch["completion_ids"].shape[0]
            if n % k:
                raise ValueError(f"GRPO update: micro_batches = {k} does not divide the "
                                 f"mini-batch's {n} sequences")
            layout, seq = objectives.ROWS, {}
        mask = batch["completion_mask"].astype(jnp.float32)
        if grpo_cfg.mask_truncated:
            mask = mask * layout.to_tokens(1.0 - batch["truncated"].astype(jnp.float32))
        data = {key: v for key, v in batch.items()
                if key not in ("truncated", "logp_sampler") and key not in seq}
        mismatch = {}
        if "logp_sampler" in batch:
            # The sampler's distribution q vs pi_old: raw statistics, then TIS / MIS (MIS
            # drops sequences from the mask before the normaliser is counted).
            if "logp_old" not in batch:
                raise ValueError("GRPO update: batch['logp_sampler'] needs batch['logp_old'] "
                                 "(the mismatch ratio is pi_old / q)")
            mm = dict(tis_cap=tis_cap, mis_band=band, layout=layout)
            mismatch = objectives.mismatch_metrics(batch["logp_old"], batch["logp_sampler"], mask, **mm)
            weights, mask = objectives.mismatch_correction(batch["logp_old"], batch["logp_sampler"],
                                                           mask, kind=correction, **mm)
            if weights is not None:
                data["is_weights"] = weights
        data["loss_mask"] = mask
        if not bool(beta):
            data.pop("logp_ref", None)  # never read: keep the KL out of metrics and the loss
        normaliser = loss_normaliser(mask, agg, layout)

        def inputs(logp, mb, logp_ref):
            logp_old = mb.get("logp_old")
            if logp_old is None:
                logp_old = jax.lax.stop_gradient(logp)
            adv = seq["advantages"] if packed else mb["advantages"]
            return logp, logp_old, logp_ref, adv, mb["loss_mask"]

        def mb_layout(mb):
            return packing_lib.Packed(mb["seq_index"], n) if packed else objectives.ROWS

        def micro_loss(params, mb):
            logp, entropy, moe_aux = _completion_logprobs(graphdef, params, mb, temperature, shards,
                                                          replay=replay)
            logp_ref = mb.get("logp_ref")
            if need_ref_forward:
                # The reference never replays: pi_ref is the reference model's own routing (the
                # recorded experts are the rollout policy's, not its).
                logp_ref = jax.lax.stop_gradient(
                    _completion_logprobs(graphdef, ref_params, mb, temperature, shards)[0])
            loss, _ = policy_loss(*inputs(logp, mb, logp_ref), normaliser=normaliser,
                                  entropy_NxT=entropy, is_weights_NxT=mb.get("is_weights"),
                                  layout=mb_layout(mb), **loss_kw)
            if moe_aux and moe_cfg.seq_aux_loss_coef:
                # V3's sequence-wise balance loss (alpha * sum over MoE layers), each
                # micro-batch's row mean weighted so the mini-batch's is their mean. Packed,
                # a row is a chunk: its sequences are balanced together.
                loss = loss + moe_cfg.seq_aux_loss_coef * jnp.sum(moe_aux["balance_loss"]) / mb_split
            logp_free = None
            if compare:  # the same forward with the router's own choices: replay's effect
                logp_free = jax.lax.stop_gradient(
                    _completion_logprobs(graphdef, params, mb, temperature, shards)[0])
            moe_aux = {k: jax.lax.stop_gradient(v) for k, v in moe_aux.items() if k != "routes"}
            return loss, (jax.lax.stop_gradient(logp), entropy, logp_ref, moe_aux, logp_free)

        grad_fn = jax.grad(micro_loss, has_aux=True)
        if mb_split == 1:
            grads, (logp, entropy, logp_ref, moe_aux, logp_free) = grad_fn(state.params, data)
        else:
            micro = jax.tree.map(functools.partial(_split_micro, k=mb_split), data)
            zeros = _tree_zeros_f32(state.params)
            if state_shardings is not None:
                zeros = jax.lax.with_sharding_constraint(zeros, state_shardings.params)

            def body(g_acc, mb):
                g, aux = grad_fn(state.params, mb)
                return jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g), aux

            grads, aux = jax.lax.scan(body, zeros, micro)
            logp, entropy, logp_ref, _, logp_free = jax.tree.map(_join_micro, aux[:3] + (None,) + aux[4:])
            moe_aux = _sum_micro_aux(aux[3])
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        # The mini-batch's metrics: policy_loss on all its rows at once (no gradient here).
        _, metrics = policy_loss(*inputs(logp, data, logp_ref), normaliser=normaliser,
                                 entropy_NxT=entropy, is_weights_NxT=data.get("is_weights"),
                                 layout=layout, **loss_kw)
        metrics.update(mismatch)
        if moe_aux:
            metrics.update(moe_decoder.moe_metrics(moe_aux))
        if compare:
            metrics.update(_replay_ratio_metrics(logp, logp_free, data["logp_old"], mask))
        metrics["grad_norm"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics["update_norm"] = optax.tree.norm(updates)
        finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
                  & jnp.isfinite(metrics["update_norm"]))
        metrics["finite"] = finite.astype(jnp.float32)
        params = optax.apply_updates(state.params, updates)
        # A non-finite update is never applied: keep the old parameters and optimiser state.
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep, params, state.params)
        if moe_aux and moe_cfg.bias_update_gamma:
            # Aux-loss-free balancing (V3 2.1.2) from this update's measured expert load; a
            # skipped (non-finite) update moves no bias either.
            biased = moe_lib.update_params_router_bias(params, moe_aux["load"], moe_cfg.bias_update_gamma)
            params = jax.tree.map(keep, biased, params)
        new_state = state.replace(step=state.step + 1, params=params,
                                  opt_state=jax.tree.map(keep, opt_state, state.opt_state))
        return new_state, metrics

    update = _under_layout(update, mesh, rules)
    kw: Dict[str, Any] = {"compiler_options": compiler_options}
    if donate:
        kw["donate_argnums"] = (0,)
    if state_shardings is not None:
        state_mesh = jax.tree.leaves(state_shardings)[0].mesh
        kw["in_shardings"] = (state_shardings, ref_shardings, batch_shardings)
        kw["out_shardings"] = (state_shardings, NamedSharding(state_mesh, PartitionSpec()))
    return jax.jit(update, **kw)


__all__ = [
    "AGG_MODES", "SCALE_MODES", "Geometry", "TrainState", "group_advantages",
    "filter_zero_variance_groups", "minibatch_indices", "policy_loss", "loss_normaliser",
    "advantage_metrics", "make_schedule", "make_optimizer", "decay_mask", "train_state_shardings",
    "init_train_state", "init_reference", "maybe_reset_reference", "reference_logprobs_fn",
    "make_update_step", "check_batch",
]
