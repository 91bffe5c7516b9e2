"""GRPO algorithm tests: the loss against a plain-numpy transcription of the paper's formula,
finite-difference gradients, advantages, the host-side helpers, and whole jitted updates
(sharded vs unsharded, gradient accumulation, the reference model)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from r1jax import grpo  # noqa: E402
from r1jax.config import GRPOConfig, TrainConfig  # noqa: E402


# ---------------------------------------------------------------------------------------------
# An independent transcription of the paper's loss, one token at a time.
# ---------------------------------------------------------------------------------------------
def np_grpo_loss(logp, old, ref, adv, mask, *, eps_low, eps_high, beta, agg, max_len=None):
    n, t_len = logp.shape
    max_len = t_len if max_len is None else max_len
    per_seq, all_tok = [], []
    for i in range(n):
        toks = []
        for t in range(t_len):
            if not mask[i, t]:
                continue
            rho = np.exp(logp[i, t] - old[i, t])
            surr = min(rho * adv[i], min(max(rho, 1 - eps_low), 1 + eps_high) * adv[i])
            kl = 0.0
            if beta:
                kl = np.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
            toks.append(-(surr - beta * kl))
        all_tok += toks
        if not toks:  # a sequence with no loss tokens leaves the group
            continue
        if agg == "seq_mean_token_mean":
            per_seq.append(sum(toks) / len(toks))
        elif agg == "seq_mean_token_sum_norm":
            per_seq.append(sum(toks) / max_len)
    if agg == "token_mean":
        return sum(all_tok) / len(all_tok)
    return sum(per_seq) / len(per_seq)


def _random_case(seed, n=6, t_len=7, spread=0.5, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, (n, t_len))
    old = logp + rng.normal(0, spread, (n, t_len))
    ref = logp + rng.normal(0, 0.3, (n, t_len))
    adv = rng.normal(0, 1.0, (n,))
    adv[0], adv[1] = 1.3, -0.7  # both signs for sure
    lengths = rng.integers(1, t_len + 1, n)
    lengths[0] = t_len
    mask = (np.arange(t_len)[None, :] < lengths[:, None]).astype(np.float32)
    return tuple(x.astype(dtype) for x in (logp, old, ref, adv)) + (mask,)


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
@pytest.mark.parametrize("clipping", ["active", "inactive"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_matches_numpy(agg, clipping, beta):
    logp, old, ref, adv, mask = _random_case(1)
    eps_low, eps_high = (0.2, 0.28) if clipping == "active" else (10.0, 10.0)
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta=beta, agg=agg, max_len=11)
    loss, metrics = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old),
                                     jnp.asarray(ref) if beta else None, jnp.asarray(adv),
                                     jnp.asarray(mask), **kw)
    want = np_grpo_loss(logp, old, ref, adv, mask, **kw)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)

    valid = mask > 0
    rho = np.exp(logp - old)[valid]
    a = np.broadcast_to(adv[:, None], mask.shape)[valid]
    low = ((rho < 1 - eps_low) & (a < 0)).mean()
    high = ((rho > 1 + eps_high) & (a > 0)).mean()
    if clipping == "active":
        assert low > 0 and high > 0  # the case really exercises both clips
    else:
        assert low == 0 and high == 0
    np.testing.assert_allclose(float(metrics["clip_frac_low"]), low, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["clip_frac_high"]), high, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["clip_frac"]), low + high, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), rho.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_min"]), rho.min(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_max"]), rho.max(), rtol=1e-5)
    d = (ref - logp)[valid]
    want_kl = (np.exp(d) - d - 1).mean() if beta else 0.0
    np.testing.assert_allclose(float(metrics["kl"]), want_kl, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["num_tokens"]), mask.sum())
    np.testing.assert_allclose(float(metrics["adv_mean"]), adv.mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["adv_max"]), adv.max(), rtol=1e-6)
    # The policy-gradient part alone is the beta = 0 loss.
    want_pg = np_grpo_loss(logp, old, ref, adv, mask, **{**kw, "beta": 0.0})
    np.testing.assert_allclose(float(metrics["pg_loss"]), want_pg, rtol=1e-5, atol=1e-6)


def test_policy_loss_aggregations_differ_and_truncated_rows_leave_the_group():
    logp, old, ref, adv, mask = _random_case(2)
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.01)
    losses = {agg: float(grpo.policy_loss(logp, old, ref, adv, mask, agg=agg, **kw)[0])
              for agg in grpo.AGG_MODES}
    assert len({round(v, 6) for v in losses.values()}) == 3
    # A fully masked row changes neither the numerator nor (with our convention) the count.
    mask2 = mask.copy()
    mask2[3] = 0
    for agg in grpo.AGG_MODES:
        got = float(grpo.policy_loss(logp, old, ref, adv, mask2, agg=agg, **kw)[0])
        want = np_grpo_loss(logp, old, ref, adv, mask2, agg=agg, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_padding_garbage_does_not_leak():
    logp, old, ref, adv, mask = _random_case(3)
    old_bad = np.where(mask > 0, old, -1e4).astype(np.float32)  # exp(logp - old) would overflow
    ref_bad = np.where(mask > 0, ref, 1e4).astype(np.float32)
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.1, agg="token_mean")
    f = lambda lp, o, r: grpo.policy_loss(lp, o, r, adv, mask, **kw)[0]  # noqa: E731
    clean, g_clean = jax.value_and_grad(f)(logp, old, ref)
    bad, g_bad = jax.value_and_grad(f)(logp, old_bad, ref_bad)
    assert np.isfinite(float(bad)) and np.all(np.isfinite(np.asarray(g_bad)))
    np.testing.assert_allclose(float(bad), float(clean), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_bad), np.asarray(g_clean), rtol=1e-6)
    assert np.all(np.asarray(g_bad)[mask == 0] == 0)


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_policy_loss_gradient_matches_finite_differences(agg):
    with jax.enable_x64(True):
        logp, old, ref, adv, mask = _random_case(4, n=3, t_len=4, spread=0.4, dtype=np.float64)
        kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05, agg=agg, max_len=6)
        f = lambda x: grpo.policy_loss(x, old, ref, adv, mask, **kw)[0]  # noqa: E731
        g = np.asarray(jax.grad(f)(jnp.asarray(logp)))
        assert g.dtype == np.float64
        h = 1e-6
        fd = np.zeros_like(logp)
        for idx in np.ndindex(*logp.shape):
            e = np.zeros_like(logp)
            e[idx] = h
            fd[idx] = (np_grpo_loss(logp + e, old, ref, adv, mask, **kw)
                       - np_grpo_loss(logp - e, old, ref, adv, mask, **kw)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
        assert np.abs(g).max() > 1e-3 and np.all(g[mask == 0] == 0)


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_micro_batches_with_global_normaliser_sum_to_the_whole(agg):
    logp, old, ref, adv, mask = _random_case(5, n=8)
    kw = dict(eps_low=0.2, eps_high=0.2, beta=0.02, agg=agg)
    f = lambda lp, sl, norm=None: grpo.policy_loss(  # noqa: E731
        lp[sl], old[sl], ref[sl], adv[sl], mask[sl], normaliser=norm, **kw)[0]
    whole, g_whole = jax.value_and_grad(f)(logp, slice(None))
    norm = grpo.loss_normaliser(jnp.asarray(mask), agg)
    parts = [jax.value_and_grad(f)(logp, slice(i, i + 2), norm) for i in range(0, 8, 2)]
    np.testing.assert_allclose(sum(float(v) for v, _ in parts), float(whole), rtol=1e-5)
    np.testing.assert_allclose(sum(np.asarray(g) for _, g in parts), np.asarray(g_whole),
                               rtol=1e-5, atol=1e-8)
    # Without the global normaliser, token_mean micro-batches would NOT add up (uneven lengths).
    if agg == "token_mean":
        naive = np.mean([float(f(logp, slice(i, i + 2))) for i in range(0, 8, 2)])
        assert abs(naive - float(whole)) > 1e-4


def test_policy_loss_bad_shapes_are_named():
    logp, old, ref, adv, mask = _random_case(6)
    with pytest.raises(ValueError, match="advantages"):
        grpo.policy_loss(logp, old, ref, adv[:3], mask, eps_low=0.2, eps_high=0.2, beta=0.0)
    with pytest.raises(ValueError, match="logp_ref"):
        grpo.policy_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.1)
    with pytest.raises(ValueError, match="loss_agg"):
        grpo.policy_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
                         agg="mean")


# ---------------------------------------------------------------------------------------------
# Advantages and host-side helpers
# ---------------------------------------------------------------------------------------------
REWARDS = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]], np.float32)


def test_group_advantages_hand_computed():
    adv = np.asarray(grpo.group_advantages(REWARDS, scale="group", eps=0.0)[:2])
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], rtol=1e-6)  # mean .5, std .5
    # A zero-variance group: every member gets exactly 0 (no nan, thanks to eps).
    adv = np.asarray(grpo.group_advantages(REWARDS, scale="group", eps=1e-4))
    assert np.all(adv[1] == 0)
    # mean .25, population std sqrt(3)/4: A = -1/sqrt(3) and sqrt(3).
    np.testing.assert_allclose(adv[2], np.array([-1, -1, -1, 3]) / np.sqrt(3) * (
        np.sqrt(3) / 4) / (np.sqrt(3) / 4 + 1e-4), rtol=1e-5)
    none = np.asarray(grpo.group_advantages(REWARDS, scale="none"))
    np.testing.assert_allclose(none, [[.5, -.5, -.5, .5], [0, 0, 0, 0], [-.25, -.25, -.25, .75]])
    # Batch std: 7 ones out of 12 -> std = sqrt(7/12 * 5/12) = sqrt(35) / 12.
    batch = np.asarray(grpo.group_advantages(REWARDS, scale="batch", eps=0.0))
    np.testing.assert_allclose(batch, none / (np.sqrt(35) / 12), rtol=1e-5)


def test_group_of_one_is_rejected():
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(np.ones((4, 1)))
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(REWARDS, scale="global")


def test_filter_zero_variance_groups():
    keep, drop = grpo.filter_zero_variance_groups(REWARDS)
    assert keep.tolist() == [True, False, True]
    assert drop == pytest.approx(1 / 3)
    keep, drop = grpo.filter_zero_variance_groups(np.zeros((2, 4)))
    assert not keep.any() and drop == 1.0


def test_minibatch_indices_partition_whole_samples():
    parts = grpo.minibatch_indices(np.random.default_rng(0), 48, 4)
    assert len(parts) == 4 and all(len(p) == 12 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(48))
    assert not np.array_equal(np.concatenate(parts), np.arange(48))  # shuffled
    again = grpo.minibatch_indices(0, 48, 4)
    assert all(np.array_equal(a, b) for a, b in zip(grpo.minibatch_indices(0, 48, 4), again))
    with pytest.raises(ValueError, match="num_minibatches"):
        grpo.minibatch_indices(0, 50, 4)


def test_schedule_warmup_then_constant_or_cosine():
    sched = grpo.make_schedule(TrainConfig(lr=1.0, warmup_steps=4, steps=12, schedule="constant"))
    np.testing.assert_allclose([float(sched(s)) for s in range(6)], [.25, .5, .75, 1, 1, 1])
    sched = grpo.make_schedule(TrainConfig(lr=1.0, warmup_steps=2, steps=10, schedule="cosine"))
    assert float(sched(0)) == pytest.approx(0.5)
    assert float(sched(2)) == pytest.approx(1.0)
    assert float(sched(6)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(0.0, abs=1e-7)
    assert float(grpo.make_schedule(TrainConfig(lr=3e-6))(0)) == pytest.approx(3e-6)


def test_reference_resets_exactly_at_multiples():
    params = {"w": jnp.zeros(3)}
    ref = grpo.init_reference(params, beta=0.001)
    resets = []
    for step in range(1, 13):
        params = {"w": params["w"] + 1.0}
        new_ref = grpo.maybe_reset_reference(step, ref, params, every=4)
        if new_ref is not ref:
            resets.append(step)
            assert new_ref["w"] is not params["w"]  # a copy: safe when params are donated
            np.testing.assert_array_equal(new_ref["w"], params["w"])
        ref = new_ref
    assert resets == [4, 8, 12]
    np.testing.assert_array_equal(ref["w"], np.full(3, 12.0))
    assert grpo.maybe_reset_reference(400, None, params, every=400) is None
    assert grpo.init_reference(params, beta=0.0) is None
    assert grpo.maybe_reset_reference(8, ref, params, every=0) is ref
