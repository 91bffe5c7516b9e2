"""The GRPO toolbox's objectives as pure functions: importance ratios at the token and the
sequence level (GSPO), the clipped surrogate, the aggregation modes, and the correction for a
sampler whose distribution differs from pi_old (TIS, MIS) with the raw statistics of that gap.

Three distributions score each sampled token y_t:

    q         the sampler's: what y_t was actually drawn from (temperature, top-k/top-p
              truncation renormalised, the sampler's weights and dtype): SampleOutput.logp
    pi_old    the behaviour policy the trainer's ratio divides by: SampleOutput.logp_policy
              (untruncated) or a recomputed forward (grpo.recompute_logp_old)
    pi_theta  the policy being trained (the only one differentiated)

and two ratios are built from them:

    r_t   = pi_theta(y_t) / pi_old(y_t)     the trust-region ratio GRPO/PPO clip
    rho_t = pi_old(y_t) / q(y_t)            the mismatch ratio TIS/MIS correct with (a constant)

Layouts. A batch of N sequences is either padded rows ([N, T], row i is sequence i: `ROWS`) or
packed chunks ([C, L], several sequences per row: `r1jax.packing.Packed`). Every function that
needs "the tokens of sequence i" takes a `layout` with two methods, `seq_sum(x) -> [N]` (sum of
a per-token array over each sequence) and `to_tokens(v_N)` (a per-sequence value at each of its
tokens), so the same code serves both layouts.

Shape suffixes: N sequences, T tokens per row; `_tok` marks a per-token array of either layout.
All arithmetic runs in at least float32 and follows float64 inputs.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

AGG_MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
IS_LEVELS = ("token", "sequence")
CORRECTIONS = ("none", "tis", "mis")

# Defaults of the mismatch corrections, with their sources.
# TIS cap C: Yao et al. 2025 ("Your Efficient RL Framework Secretly Brings You Off-Policy RL
# Training") weight each token by min(rho_t, C); C = 2 is verl's default `rollout_is_threshold`
# (the rollout-correction module written with the TIS and MIS authors) and its token-TIS preset.
TIS_CAP = 2.0
# MIS band [low, high]: Liu, Li et al. 2025 ("When Speed Kills Stability: Demystifying RL
# Collapse from the Training-Inference Mismatch") mask whole sequences whose ratio rho(y) leaves
# the band; [0.5, 2] is verl's sequence-IS + sequence-rejection preset (`decoupled_seq_is_rs`,
# rejection bounds "0.5_2.0" on the product ratio).
MIS_BAND = (0.5, 2.0)


def _sg(x):
    return jax.lax.stop_gradient(x)


def _float(x) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Rows:
    """The padded layout: row i of every [N, T] array is sequence i."""

    @staticmethod
    def seq_sum(x_NxT: jax.Array) -> jax.Array:
        return jnp.sum(x_NxT, axis=-1)

    @staticmethod
    def to_tokens(v_N: jax.Array) -> jax.Array:
        return jnp.asarray(v_N)[..., None]


ROWS = Rows()


def check_choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r}; valid: {', '.join(valid)}")


# ---------------------------------------------------------------------------------------------
# Importance ratios
# ---------------------------------------------------------------------------------------------
def log_ratio(logp_tok, logp_base_tok, mask_tok) -> jax.Array:
    """log(p / p_base) on loss tokens, 0 elsewhere.

    Padding may hold anything (0, -inf, garbage): zeroing the difference there keeps exp()
    finite in the forward and the gradient (no inf * 0 = nan)."""
    logp = _float(logp_tok)
    return jnp.where(jnp.asarray(mask_tok) > 0, logp - _float(logp_base_tok).astype(logp.dtype),
                     jnp.zeros((), logp.dtype))


def sequence_lengths(mask_tok, layout=ROWS) -> jax.Array:
    """|y_i|: loss tokens per sequence, [N]."""
    return layout.seq_sum((jnp.asarray(mask_tok) > 0).astype(jnp.float32))


def sequence_mean(x_tok, mask_tok, layout=ROWS) -> jax.Array:
    """1/|y_i| sum_t m_it x_it, [N] (0 for a sequence without loss tokens)."""
    x = _float(x_tok)
    m = (jnp.asarray(mask_tok) > 0).astype(x.dtype)
    return layout.seq_sum(x * m) / jnp.maximum(layout.seq_sum(m), 1.0)


def token_ratio(logp_tok, logp_old_tok, mask_tok) -> jax.Array:
    """GRPO / PPO: r_it = pi_theta(y_it | x, y_i<t) / pi_old(y_it | x, y_i<t)."""
    return jnp.exp(log_ratio(logp_tok, logp_old_tok, mask_tok))


def sequence_ratio(logp_tok, logp_old_tok, mask_tok, layout=ROWS) -> jax.Array:
    """GSPO's sequence ratio (Zheng et al. 2025, arXiv 2507.18071), [N]:

        s_i = (pi_theta(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|)
            = exp( 1/|y_i| sum_t log(pi_theta(y_it | x, y_i<t) / pi_old(y_it | x, y_i<t)) )

    the geometric mean of the token ratios; length normalisation keeps s_i in a range where one
    clip width serves short and long responses. Differentiable in logp."""
    return jnp.exp(sequence_mean(log_ratio(logp_tok, logp_old_tok, mask_tok), mask_tok, layout))


def sequence_token_ratio(logp_tok, logp_old_tok, mask_tok, layout=ROWS) -> jax.Array:
    """GSPO-token's per-token ratio (same paper): the value of s_i, the gradient of token t.

        s_it = sg[s_i] * pi_theta(y_it | x, y_i<t) / sg[pi_theta(y_it | x, y_i<t)]

    Numerically s_it = s_i; d s_it = s_i d log pi_theta(y_it), so with A_it = A_i the
    GSPO-token objective has exactly GSPO's gradient, and it admits per-token advantages."""
    logp = _float(logp_tok)
    lr = log_ratio(logp, logp_old_tok, mask_tok)
    seq = _sg(sequence_mean(lr, mask_tok, layout))
    valid = jnp.asarray(mask_tok) > 0
    own = jnp.where(valid, logp - _sg(logp), jnp.zeros((), logp.dtype))
    return jnp.exp(layout.to_tokens(seq) + own)


def importance_ratio(logp_tok, logp_old_tok, mask_tok, *, level: str = "token",
                     layout=ROWS) -> jax.Array:
    """The per-token ratio the clipped surrogate uses: `token` (GRPO's r_it) or `sequence`
    (GSPO, in its GSPO-token form so that every aggregation mode and per-token weights apply)."""
    check_choice("importance_sampling_level", level, IS_LEVELS)
    if level == "token":
        return token_ratio(logp_tok, logp_old_tok, mask_tok)
    return sequence_token_ratio(logp_tok, logp_old_tok, mask_tok, layout)


def clipped_surrogate(ratio, adv, eps_low: float, eps_high: float) -> jax.Array:
    """PPO's clipped surrogate as a loss (negated), elementwise:

        l = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)

    eps_low != eps_high is DAPO's clip-higher."""
    ratio = _float(ratio)
    a = _float(adv).astype(ratio.dtype)
    return -jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * a)


def gspo_loss(logp_tok, logp_old_tok, adv_N, mask_tok, *, eps_low: float, eps_high: float,
              layout=ROWS) -> jax.Array:
    """GSPO's per-sequence loss, [N]: l_i = -min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i).

    GSPO's objective is J = E[1/G sum_i min(s_i A_i, clip(s_i) A_i)]: whole sequences are
    clipped (the paper's runs use eps_low = 3e-4, eps_high = 4e-4, section 5.1), and the
    loss is a mean over sequences, i.e. `aggregate(layout.to_tokens(l_N), ...)` with
    seq_mean_token_mean. The other aggregation modes spread l_i over the tokens the same way."""
    s_N = sequence_ratio(logp_tok, logp_old_tok, mask_tok, layout)
    return clipped_surrogate(s_N, adv_N, eps_low, eps_high)


def gspo_token_loss(logp_tok, logp_old_tok, adv_tok, mask_tok, *, eps_low: float,
                    eps_high: float, layout=ROWS) -> jax.Array:
    """GSPO-token's per-token loss: -min(s_it A_it, clip(s_it) A_it), s_it as in
    `sequence_token_ratio`; `adv_tok` may be per token or per sequence broadcast."""
    s_tok = sequence_token_ratio(logp_tok, logp_old_tok, mask_tok, layout)
    return clipped_surrogate(s_tok, adv_tok, eps_low, eps_high)


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------
def aggregation_weights(mask_tok, agg: str, *, max_len=None, layout=ROWS) -> jax.Array:
    """Per-token weights w with sum_t w_t l_t = the aggregated loss's numerator.

        token_mean               w = m                     (DAPO)
        seq_mean_token_mean      w = m / |y_i|             (DeepSeekMath / R1)
        seq_mean_token_sum_norm  w = m / max_len           (Dr.GRPO)

    max_len is Dr.GRPO's constant (the sampler's max_new_tokens); required for that mode."""
    check_choice("loss_agg", agg, AGG_MODES)
    m = (jnp.asarray(mask_tok) > 0).astype(jnp.float32)
    if agg == "token_mean":
        return m
    if agg == "seq_mean_token_mean":
        return m / jnp.maximum(layout.to_tokens(layout.seq_sum(m)), 1.0)
    if max_len is None:
        raise ValueError("loss_agg=seq_mean_token_sum_norm needs max_len (max_new_tokens)")
    return m / float(max_len)


def normaliser(mask_tok, agg: str, *, layout=ROWS) -> jax.Array:
    """The aggregated loss's denominator over a whole mini-batch: the loss tokens (token_mean)
    or the sequences with at least one loss token (the seq modes: a completion masked out
    entirely leaves the mean rather than counting as a zero)."""
    check_choice("loss_agg", agg, AGG_MODES)
    m = (jnp.asarray(mask_tok) > 0).astype(jnp.float32)
    if agg == "token_mean":
        return jnp.sum(m)
    return jnp.sum((layout.seq_sum(m) > 0).astype(jnp.float32))


def aggregate(loss_tok, mask_tok, agg: str, *, max_len=None, layout=ROWS,
              denominator=None) -> jax.Array:
    """sum_t w_t l_t / denominator (default: this batch's `normaliser`, at least 1). Pass the
    whole mini-batch's normaliser when `loss_tok` is one micro-batch of it."""
    loss = _float(loss_tok)
    w = aggregation_weights(mask_tok, agg, max_len=max_len, layout=layout).astype(loss.dtype)
    den = normaliser(mask_tok, agg, layout=layout) if denominator is None else denominator
    total = jnp.sum(jnp.where(w > 0, w * loss, jnp.zeros((), loss.dtype)))
    return total / jnp.maximum(den, 1.0).astype(loss.dtype)


# ---------------------------------------------------------------------------------------------
# Sampler / trainer mismatch
# ---------------------------------------------------------------------------------------------
def mismatch_log_ratio(logp_old_tok, logp_sampler_tok, mask_tok) -> jax.Array:
    """log rho_t = log pi_old(y_t) - log q(y_t) on loss tokens (0 elsewhere), never
    differentiated: both are constants of the rollout."""
    return _sg(log_ratio(logp_old_tok, logp_sampler_tok, mask_tok))


def tis_weights(log_rho_tok, mask_tok, cap: float = TIS_CAP) -> jax.Array:
    """Truncated importance sampling (Yao et al. 2025): w_t = min(rho_t, C), 0 off the mask.

    The policy-gradient term of token t is multiplied by w_t; the cap bounds the variance a
    token the sampler found much less likely than pi_old would add, at the cost of a bias
    towards the sampler's distribution on those tokens."""
    if not cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    valid = jnp.asarray(mask_tok) > 0
    lr = _float(log_rho_tok)
    return jnp.where(valid, jnp.minimum(jnp.exp(lr), cap), jnp.zeros((), lr.dtype))


def mis_weights(log_rho_tok, mask_tok, band=MIS_BAND, *, layout=ROWS
                ) -> Tuple[jax.Array, jax.Array]:
    """Sequence-level masked importance sampling (Liu, Li et al. 2025):

        rho(y_i) = prod_t pi_old(y_it) / q(y_it)
        w_it     = rho(y_i) * 1[low <= rho(y_i) <= high]

    A sequence whose ratio leaves the band is dropped whole, from the loss and from its
    normaliser (the returned mask); the kept ones carry their exact sequence weight, so on
    them the estimator is unbiased for the gradient under pi_old.

    Returns (w_tok, mask_tok): the weights and the loss mask without the dropped sequences."""
    low, high = float(band[0]), float(band[1])
    if not 0.0 <= low < high:
        raise ValueError(f"mis_band must satisfy 0 <= low < high, got [{low}, {high}]")
    m = jnp.asarray(mask_tok)
    valid = m > 0
    lr = _float(log_rho_tok)
    log_seq = layout.seq_sum(jnp.where(valid, lr, 0.0))
    log_low = math.log(low) if low > 0 else -math.inf
    keep_N = (log_seq >= log_low) & (log_seq <= math.log(high))
    keep_tok = valid & layout.to_tokens(keep_N)
    w = jnp.where(keep_tok, jnp.exp(layout.to_tokens(log_seq)), jnp.zeros((), lr.dtype))
    return w, jnp.where(keep_tok, m, jnp.zeros((), m.dtype))


def mismatch_correction(logp_old_tok, logp_sampler_tok, mask_tok, *, kind: str,
                        tis_cap: float = TIS_CAP, mis_band=MIS_BAND, layout=ROWS
                        ) -> Tuple[Optional[jax.Array], jax.Array]:
    """(weights_tok or None, mask_tok) for `kind` in none | tis | mis; see `tis_weights`
    and `mis_weights`. `none` returns (None, mask) unchanged."""
    check_choice("rollout_correction", kind, CORRECTIONS)
    if kind == "none":
        return None, mask_tok
    log_rho = mismatch_log_ratio(logp_old_tok, logp_sampler_tok, mask_tok)
    if kind == "tis":
        return tis_weights(log_rho, mask_tok, tis_cap), mask_tok
    return mis_weights(log_rho, mask_tok, mis_band, layout=layout)


def mismatch_metrics(logp_old_tok, logp_sampler_tok, mask_tok, *, tis_cap: float = TIS_CAP,
                     mis_band=MIS_BAND, layout=ROWS) -> Dict[str, jax.Array]:
    """Raw statistics of rho = pi_old / q over the loss tokens, before any truncation or masking.

    ratio_mean/min/max: of the token ratios rho_t. kl_k3: the token mean of
    rho - 1 - log rho, Schulman's k3 estimate of KL(q || pi_old) from samples of q (>= 0,
    0 iff the two agree on every sampled token). tis_capped_frac: tokens whose rho_t exceeds
    the TIS cap. seq_ratio_min/max: of the sequence ratios rho(y_i) = prod_t rho_t.
    seq_out_of_band: the share of sequences (with loss tokens) whose rho(y_i) leaves the MIS
    band, i.e. what MIS would drop."""
    m = jnp.asarray(mask_tok)
    valid = m > 0
    lr = mismatch_log_ratio(logp_old_tok, logp_sampler_tok, mask_tok)
    rho = jnp.exp(lr)
    mf = valid.astype(lr.dtype)
    tokens = jnp.sum(mf)
    any_tok = tokens > 0
    den = jnp.maximum(tokens, 1.0)
    log_seq = layout.seq_sum(lr)
    has = layout.seq_sum(mf) > 0
    seqs = jnp.sum(has.astype(lr.dtype))
    low, high = float(mis_band[0]), float(mis_band[1])
    log_low = math.log(low) if low > 0 else -math.inf
    out = has & ((log_seq < log_low) | (log_seq > math.log(high)))
    one = jnp.ones((), lr.dtype)
    return {
        "mismatch/ratio_mean": jnp.sum(rho * mf) / den,
        "mismatch/ratio_min": jnp.where(any_tok, jnp.min(jnp.where(valid, rho, jnp.inf)), one),
        "mismatch/ratio_max": jnp.where(any_tok, jnp.max(jnp.where(valid, rho, -jnp.inf)), one),
        "mismatch/kl_k3": jnp.sum((rho - 1.0 - lr) * mf) / den,
        "mismatch/tis_capped_frac": jnp.sum((rho > tis_cap) * mf) / den,
        "mismatch/seq_ratio_min": jnp.where(seqs > 0, jnp.exp(jnp.min(jnp.where(has, log_seq, jnp.inf))), one),
        "mismatch/seq_ratio_max": jnp.where(seqs > 0, jnp.exp(jnp.max(jnp.where(has, log_seq, -jnp.inf))), one),
        "mismatch/seq_out_of_band": jnp.sum(out.astype(lr.dtype)) / jnp.maximum(seqs, 1.0),
    }


# ---------------------------------------------------------------------------------------------
# The policy-gradient term, composed
# ---------------------------------------------------------------------------------------------
def policy_gradient_loss(logp_tok, logp_old_tok, adv_tok, mask_tok, *, eps_low: float,
                         eps_high: float, level: str = "token", is_weights_tok=None,
                         layout=ROWS) -> Tuple[jax.Array, jax.Array]:
    """The per-token policy-gradient loss and the ratio it clipped:

        l_it = -w_it min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i)

    r_it = `importance_ratio(level)` (token: GRPO; sequence: GSPO-token, which equals GSPO for
    per-sequence advantages), w_it the mismatch weights (TIS / MIS; 1 when None). `adv_tok` is
    per token, or layout.to_tokens(adv_N).

    Returns (l_tok, r_tok)."""
    ratio = importance_ratio(logp_tok, logp_old_tok, mask_tok, level=level, layout=layout)
    loss = clipped_surrogate(ratio, adv_tok, eps_low, eps_high)
    if is_weights_tok is not None:
        loss = loss * _sg(_float(is_weights_tok)).astype(loss.dtype)
    return loss, ratio


__all__ = [
    "AGG_MODES", "IS_LEVELS", "CORRECTIONS", "TIS_CAP", "MIS_BAND", "Rows", "ROWS",
    "log_ratio", "sequence_lengths", "sequence_mean", "token_ratio", "sequence_ratio",
    "sequence_token_ratio", "importance_ratio", "clipped_surrogate", "gspo_loss",
    "gspo_token_loss", "aggregation_weights", "normaliser", "aggregate", "mismatch_log_ratio",
    "tis_weights", "mis_weights", "mismatch_correction", "mismatch_metrics",
    "policy_gradient_loss",
]
