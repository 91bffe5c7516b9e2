"""The objectives toolbox against plain-numpy transcriptions of the papers' formulas (GSPO,
GSPO-token, TIS, MIS, the mismatch statistics; every aggregation mode), gradients against
finite differences in float64 (scoped with jax.enable_x64), and the exact top-p bias test on a
tiny enumerated vocabulary."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import objectives as obj


# ---------------------------------------------------------------------------------------------
# Independent transcription: one sequence, one token at a time.
# ---------------------------------------------------------------------------------------------
def np_objective(logp, old, samp, adv, mask, *, level, eps_low, eps_high, agg, max_len,
                 correction="none", cap=obj.TIS_CAP, band=obj.MIS_BAND):
    n, t_len = logp.shape
    per_seq, all_tok = [], []
    for i in range(n):
        idx = [t for t in range(t_len) if mask[i, t]]
        if not idx:
            continue
        rho = [math.exp(old[i, t] - samp[i, t]) for t in idx]
        if correction == "tis":
            w = [min(r, cap) for r in rho]
        elif correction == "mis":
            seq_rho = math.prod(rho)
            if not band[0] <= seq_rho <= band[1]:
                continue  # the whole sequence leaves the loss and its normaliser
            w = [seq_rho] * len(idx)
        else:
            w = [1.0] * len(idx)
        if level == "token":
            ratios = [math.exp(logp[i, t] - old[i, t]) for t in idx]
        else:  # GSPO: (pi_theta(y|x) / pi_old(y|x)) ** (1 / |y|)
            s = (math.prod(math.exp(logp[i, t]) for t in idx)
                 / math.prod(math.exp(old[i, t]) for t in idx)) ** (1.0 / len(idx))
            ratios = [s] * len(idx)
        toks = []
        for wt, r in zip(w, ratios):
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            toks.append(-wt * min(r * adv[i], clipped * adv[i]))
        all_tok += toks
        if agg == "seq_mean_token_mean":
            per_seq.append(sum(toks) / len(toks))
        elif agg == "seq_mean_token_sum_norm":
            per_seq.append(sum(toks) / max_len)
    if agg == "token_mean":
        return sum(all_tok) / max(len(all_tok), 1)
    return sum(per_seq) / max(len(per_seq), 1)


def jax_objective(logp, old, samp, adv, mask, *, level, eps_low, eps_high, agg, max_len,
                  correction="none", cap=obj.TIS_CAP, band=obj.MIS_BAND, layout=obj.ROWS):
    weights, loss_mask = obj.mismatch_correction(old, samp, mask, kind=correction, tis_cap=cap,
                                                 mis_band=band, layout=layout)
    loss, _ = obj.policy_gradient_loss(logp, old, layout.to_tokens(adv), loss_mask,
                                       eps_low=eps_low, eps_high=eps_high, level=level,
                                       is_weights_tok=weights, layout=layout)
    return obj.aggregate(loss, loss_mask, agg, max_len=max_len, layout=layout)


def random_case(seed, n=7, t_len=6, spread=0.3, mismatch=0.4, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, (n, t_len))
    old = logp + rng.normal(0, spread, (n, t_len))
    samp = old + rng.normal(0, mismatch, (n, t_len))
    adv = rng.normal(0, 1.0, n)
    adv[0], adv[1] = 1.3, -0.7
    lengths = rng.integers(1, t_len + 1, n)
    lengths[0], lengths[-1] = t_len, 0  # a full row and an empty one
    mask = (np.arange(t_len)[None] < lengths[:, None]).astype(np.float32)
    # Padding holds garbage the functions must never read.
    logp, old, samp = (np.where(mask > 0, x, -np.inf if k else 1e4)
                       for k, x in enumerate((logp, old, samp)))
    return tuple(np.asarray(x, dtype) for x in (logp, old, samp, adv)) + (mask,)


CASES = [("token", "none"), ("sequence", "none"), ("token", "tis"), ("token", "mis"),
         ("sequence", "tis"), ("sequence", "mis")]


@pytest.mark.parametrize("agg", obj.AGG_MODES)
@pytest.mark.parametrize("level,correction", CASES)
def test_objective_matches_numpy(agg, level, correction):
    logp, old, samp, adv, mask = random_case(1)
    eps = (0.2, 0.28) if level == "token" else (0.03, 0.04)
    kw = dict(level=level, eps_low=eps[0], eps_high=eps[1], agg=agg, max_len=9,
              correction=correction, cap=1.5, band=(0.6, 1.8))
    want = np_objective(logp.astype(np.float64), old.astype(np.float64),
                        samp.astype(np.float64), adv.astype(np.float64), mask, **kw)
    got = float(jax_objective(logp, old, samp, adv, mask, **kw))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_the_cases_exercise_clipping_capping_and_masking():
    """The random case is not trivial: ratios leave both clip ranges, TIS caps tokens, MIS drops
    some sequences and keeps others (so the numpy comparisons above test every branch)."""
    logp, old, samp, adv, mask = random_case(1)
    r = np.exp(logp - old)[mask > 0]
    assert (r < 0.8).any() and (r > 1.28).any()
    s = np.asarray(obj.sequence_ratio(logp, old, mask))[mask.sum(1) > 0]
    assert (s < 0.97).any() and (s > 1.04).any()
    rho = np.exp(old[mask > 0] - samp[mask > 0])
    assert (rho > 1.5).any()
    _, kept = obj.mis_weights(obj.mismatch_log_ratio(old, samp, mask), mask, (0.6, 1.8))
    kept_rows = np.asarray(kept).sum(1) > 0
    assert kept_rows.any() and (~kept_rows & (mask.sum(1) > 0)).any()


def test_gspo_matches_the_sequence_formula_and_gspo_token_has_its_gradient():
    logp, old, _, adv, mask = random_case(2)
    kw = dict(eps_low=0.03, eps_high=0.04)
    l_N = np.asarray(obj.gspo_loss(logp, old, adv, mask, **kw))
    for i in range(len(adv)):
        idx = mask[i] > 0
        s = np.exp(np.mean(logp[i, idx] - old[i, idx])) if idx.any() else 1.0
        want = -min(s * adv[i], np.clip(s, 0.97, 1.04) * adv[i])
        np.testing.assert_allclose(l_N[i], want, rtol=1e-5, atol=1e-7)

    def seq_level(lp):  # GSPO: the sequence loss, a mean over sequences
        per_seq = obj.gspo_loss(lp, old, adv, mask, **kw)
        return obj.aggregate(obj.ROWS.to_tokens(per_seq) * jnp.ones_like(lp), mask,
                             "seq_mean_token_mean")

    def token_level(lp):  # GSPO-token with A_it = A_i
        loss = obj.gspo_token_loss(lp, old, adv[:, None], mask, **kw)
        return obj.aggregate(loss, mask, "seq_mean_token_mean")

    np.testing.assert_allclose(float(seq_level(logp)), float(token_level(logp)), rtol=1e-6)
    g_seq, g_tok = jax.grad(seq_level)(jnp.asarray(logp)), jax.grad(token_level)(jnp.asarray(logp))
    assert np.abs(np.asarray(g_seq)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(g_tok), np.asarray(g_seq), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("level,correction", [("token", "tis"), ("sequence", "mis"),
                                              ("sequence", "none")])
@pytest.mark.parametrize("agg", obj.AGG_MODES)
def test_gradient_matches_finite_differences_float64(agg, level, correction):
    with jax.enable_x64(True):
        logp, old, samp, adv, mask = random_case(3, n=5, t_len=4, dtype=np.float64)
        eps = (0.2, 0.28) if level == "token" else (0.05, 0.06)
        kw = dict(level=level, eps_low=eps[0], eps_high=eps[1], agg=agg, max_len=6,
                  correction=correction, cap=1.5, band=(0.6, 1.8))
        grad = np.asarray(jax.grad(lambda lp: jax_objective(lp, old, samp, adv, mask, **kw))(
            jnp.asarray(logp)))
        assert grad.dtype == np.float64
        h = 1e-6
        fd = np.zeros_like(logp)
        for i, t in zip(*np.nonzero(mask)):
            up, dn = logp.copy(), logp.copy()
            up[i, t] += h
            dn[i, t] -= h
            fd[i, t] = (np_objective(up, old, samp, adv, mask, **kw)
                        - np_objective(dn, old, samp, adv, mask, **kw)) / (2 * h)
        assert np.abs(fd).max() > 1e-3
        np.testing.assert_allclose(grad * mask, fd, rtol=1e-6, atol=1e-8)
    assert jnp.zeros(1).dtype == jnp.float32  # x64 stayed scoped to this test


def test_mismatch_metrics_match_numpy():
    _, old, samp, _, mask = random_case(4)
    band, cap = (0.6, 1.8), 1.5
    m = obj.mismatch_metrics(old, samp, mask, tis_cap=cap, mis_band=band)
    valid = mask > 0
    rho = np.exp(old[valid].astype(np.float64) - samp[valid])
    seq = [math.prod(np.exp(old[i, mask[i] > 0].astype(np.float64) - samp[i, mask[i] > 0]))
           for i in range(len(mask)) if mask[i].any()]
    want = {"ratio_mean": rho.mean(), "ratio_min": rho.min(), "ratio_max": rho.max(),
            "kl_k3": np.mean(rho - 1 - np.log(rho)), "tis_capped_frac": np.mean(rho > cap),
            "seq_ratio_min": min(seq), "seq_ratio_max": max(seq),
            "seq_out_of_band": np.mean([not band[0] <= s <= band[1] for s in seq])}
    assert set(m) == {f"mismatch/{k}" for k in want}
    for k, v in want.items():
        np.testing.assert_allclose(float(m[f"mismatch/{k}"]), v, rtol=2e-5, err_msg=k)
    assert 0 < want["seq_out_of_band"] < 1 and want["kl_k3"] > 0
    # No mismatch: every statistic at its identity.
    same = obj.mismatch_metrics(old, old, mask)
    assert float(same["mismatch/kl_k3"]) == 0.0 and float(same["mismatch/seq_out_of_band"]) == 0.0
    assert float(same["mismatch/ratio_min"]) == float(same["mismatch/ratio_max"]) == 1.0


def test_an_empty_batch_is_finite():
    z = np.zeros((2, 3), np.float32)
    for kind in obj.CORRECTIONS:
        for level in obj.IS_LEVELS:
            for agg in obj.AGG_MODES:
                loss = jax_objective(z, z, z, np.ones(2, np.float32), z, level=level,
                                     eps_low=0.2, eps_high=0.2, agg=agg, max_len=3,
                                     correction=kind)
                assert float(loss) == 0.0
    m = obj.mismatch_metrics(z, z, z)
    assert all(np.isfinite(float(v)) for v in m.values())


def test_bad_choices_are_named():
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="importance_sampling_level='seq'; valid: token, sequence"):
        obj.importance_ratio(z, z, z, level="seq")
    with pytest.raises(ValueError, match="rollout_correction='is'; valid: none, tis, mis"):
        obj.mismatch_correction(z, z, z, kind="is")
    with pytest.raises(ValueError, match="loss_agg='mean'"):
        obj.aggregate(z, z, "mean")
    with pytest.raises(ValueError, match="tis_cap must be > 0"):
        obj.tis_weights(z, z, 0.0)
    with pytest.raises(ValueError, match=r"mis_band must satisfy 0 <= low < high, got \[2.0, 0.5\]"):
        obj.mis_weights(z, z, (2.0, 0.5))
    with pytest.raises(ValueError, match="needs max_len"):
        obj.aggregation_weights(z, "seq_mean_token_sum_norm")


# ---------------------------------------------------------------------------------------------
# The top-p bias test: enumerate every sequence of a tiny autoregressive policy.
# ---------------------------------------------------------------------------------------------
V, T, TOP_P = 4, 3, 0.75


def _top_p(probs, p):
    """Keep the most likely tokens until their mass reaches p; renormalise over them."""
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros_like(probs, bool)
    keep[order[before < p]] = True
    q = np.where(keep, probs, 0.0)
    return q / q.sum()


def _policy_logp(theta, seqs):
    """log pi_theta(y_t | y_<t) of a tabular policy whose logits depend on the previous token
    (row V is the start state): [S, T]."""
    prev = jnp.concatenate([jnp.full((seqs.shape[0], 1), V), seqs[:, :-1]], axis=1)
    logits = theta[prev]  # [S, T, V]
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), seqs[..., None], -1)[..., 0]


@pytest.mark.parametrize("level", obj.IS_LEVELS)
def test_top_p_correction_gives_the_exact_gradient_on_the_support(level):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        theta_old = jnp.asarray(rng.normal(0, 1.5, (V + 1, V)))
        seqs = jnp.asarray(list(itertools.product(range(V), repeat=T)))
        pi_old = np.asarray(_policy_logp(theta_old, seqs))  # log pi_old(y_t | y_<t): logp_policy
        # The sampler: top-p on pi_old at every step, renormalised; logp = log q(y_t | y_<t).
        probs = np.asarray(jax.nn.softmax(theta_old, -1))
        q_tab = np.stack([_top_p(row, TOP_P) for row in probs])
        prev = np.concatenate([np.full((len(seqs), 1), V), np.asarray(seqs)[:, :-1]], 1)
        q_tok = q_tab[prev, np.asarray(seqs)]
        support = (q_tok > 0).all(axis=1)
        seqs, pi_old, q_tok = seqs[support], pi_old[support], q_tok[support]
        q_seq = q_tok.prod(axis=1)
        np.testing.assert_allclose(q_seq.sum(), 1.0)
        assert (q_tab > 0).sum(1).min() < V  # truncation really removes tokens
        logq = np.log(q_tok)
        adv = jnp.asarray(rng.normal(0, 1.0, len(seqs)))
        mask = np.ones(seqs.shape)

        def exact(theta):  # J_S = sum over the sampler's support of pi_theta(y) A(y)
            return jnp.sum(jnp.exp(_policy_logp(theta, seqs).sum(1)) * adv)

        def expected_loss(theta, correction):
            """E_{y ~ q}[ sum_t l_t(y) ]: the estimator's expectation, enumerated."""
            logp = _policy_logp(theta, seqs)
            w, m = obj.mismatch_correction(pi_old, logq, mask, kind=correction,
                                           mis_band=(0.05, 2.0))
            loss, _ = obj.policy_gradient_loss(logp, pi_old, adv[:, None], m, eps_low=0.2,
                                               eps_high=0.2, level=level, is_weights_tok=w)
            return jnp.sum(q_seq * jnp.sum(loss, axis=1))

        g_exact = np.asarray(jax.jit(jax.grad(exact))(theta_old))
        grad = jax.jit(jax.grad(expected_loss), static_argnums=1)
        g_mis, g_none, g_tis = (-np.asarray(grad(theta_old, c)) for c in ("mis", "none", "tis"))
        np.testing.assert_allclose(g_mis, g_exact, rtol=1e-10, atol=1e-12)
        rel = lambda g: np.linalg.norm(g - g_exact) / np.linalg.norm(g_exact)  # noqa: E731
        assert rel(g_none) > 0.05  # sampling from q but dividing by pi_old is biased
        # Token-level TIS weights each token by its own rho_t = Z_t, not by the sequence's
        # prod_t Z_t: exact for one-token sequences (below), biased for longer ones.
        assert rel(g_tis) > 1e-3 and rel(g_tis) < rel(g_none)

        # One decision (T = 1): rho = pi_old / q = the kept mass Z <= 1 < cap, so TIS is exact.
        first = jnp.asarray(np.arange(V)[:, None])
        q1 = q_tab[V]
        keep = q1 > 0
        first = first[keep]
        lp_old1 = np.asarray(_policy_logp(theta_old, first))
        adv1 = adv[: int(keep.sum())]

        def exact1(theta):
            return jnp.sum(jnp.exp(_policy_logp(theta, first)[:, 0]) * adv1)

        def tis1(theta):
            logp = _policy_logp(theta, first)
            w, m = obj.mismatch_correction(lp_old1, np.log(q1[keep])[:, None], np.ones((len(first), 1)),
                                           kind="tis")
            loss, _ = obj.policy_gradient_loss(logp, lp_old1, adv1[:, None], m, eps_low=0.2,
                                               eps_high=0.2, level=level, is_weights_tok=w)
            return jnp.sum(q1[keep] * loss[:, 0])

        np.testing.assert_allclose(-np.asarray(jax.grad(tis1)(theta_old)),
                                   np.asarray(jax.grad(exact1)(theta_old)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("agg", obj.AGG_MODES)
@pytest.mark.parametrize("level,correction", [("sequence", "mis"), ("token", "tis")])
def test_grpo_policy_loss_runs_these_objectives(agg, level, correction):
    """The update's loss function (grpo.policy_loss, beta = 0) with the level and the mismatch
    weights is the numpy transcription above."""
    from r1jax import grpo

    logp, old, samp, adv, mask = random_case(5)
    kw = dict(eps_low=0.03, eps_high=0.04, agg=agg, max_len=9)
    w, m = obj.mismatch_correction(old, samp, mask, kind=correction, tis_cap=1.5, mis_band=(0.6, 1.8))
    loss, metrics = grpo.policy_loss(logp, old, None, adv, m, beta=0.0, level=level,
                                     is_weights_NxT=w, **kw)
    want = np_objective(logp.astype(np.float64), old.astype(np.float64), samp.astype(np.float64),
                        adv.astype(np.float64), mask, level=level, correction=correction, cap=1.5,
                        band=(0.6, 1.8), **kw)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["pg_loss"]), want, rtol=2e-5, atol=1e-6)
