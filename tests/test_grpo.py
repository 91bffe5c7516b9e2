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


def test_fully_masked_batch_gives_zero_loss_and_finite_metrics():
    logp, old, ref, adv, mask = _random_case(7)
    loss, metrics = grpo.policy_loss(logp, old, ref, adv, np.zeros_like(mask), eps_low=0.2,
                                     eps_high=0.2, beta=0.1, agg="seq_mean_token_mean")
    assert float(loss) == 0.0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["num_seqs"]) == 0


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
    loss = lambda lp, o, r, a, m, norm=None: grpo.policy_loss(  # noqa: E731
        lp, o, r, a, m, normaliser=norm, **kw)[0]
    whole_fn = jax.jit(jax.value_and_grad(loss))
    part_fn = jax.jit(jax.value_and_grad(loss))
    whole, g_whole = whole_fn(logp, old, ref, adv, mask)
    norm = grpo.loss_normaliser(jnp.asarray(mask), agg)
    parts = [part_fn(logp[i:i + 2], old[i:i + 2], ref[i:i + 2], adv[i:i + 2], mask[i:i + 2], norm)
             for i in range(0, 8, 2)]
    np.testing.assert_allclose(sum(float(v) for v, _ in parts), float(whole), rtol=1e-5)
    np.testing.assert_allclose(np.concatenate([np.asarray(g) for _, g in parts]),
                               np.asarray(g_whole), rtol=1e-5, atol=1e-8)
    # Without the global normaliser, token_mean micro-batches would NOT add up (uneven lengths).
    if agg == "token_mean":
        naive = np.mean([float(whole_fn(logp[i:i + 2], old[i:i + 2], ref[i:i + 2], adv[i:i + 2],
                                        mask[i:i + 2])[0]) for i in range(0, 8, 2)])
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


def test_weight_decay_skips_biases_and_norm_scales():
    params = {"layers": {"attn": {"q": jnp.ones((2, 4, 4)), "q_bias": jnp.ones((2, 4))},
                         "attn_norm": {"scale": jnp.ones((2, 4))}}, "embed": jnp.ones((8, 4))}
    optimizer, _ = grpo.make_optimizer(TrainConfig(lr=0.1, weight_decay=0.5, max_grad_norm=1.0))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    np.testing.assert_allclose(updates["layers"]["attn"]["q"], -0.05)  # -lr * wd * p
    np.testing.assert_allclose(updates["embed"], -0.05)
    assert float(jnp.abs(updates["layers"]["attn"]["q_bias"]).max()) == 0
    assert float(jnp.abs(updates["layers"]["attn_norm"]["scale"]).max()) == 0


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


# ---------------------------------------------------------------------------------------------
# Whole updates on a tiny model
# ---------------------------------------------------------------------------------------------
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from r1jax import mesh as mesh_lib  # noqa: E402
from r1jax import models  # noqa: E402
from r1jax.config import MeshConfig, ModelConfig  # noqa: E402

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2)
N, TP, TC = 16, 5, 6
# LLVM's optimisation passes dominate these tiny programs' compile time; results are unaffected.
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params, batch): a random model and a rollout-like batch whose logp_old and
    logp_ref are the model's own log-probs plus noise (so ratios leave the clip range)."""
    model = models.Transformer(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    p_len = rng.integers(2, TP + 1, N)
    prompt_mask = (np.arange(TP)[None] >= TP - p_len[:, None]).astype(np.int32)  # left padded
    prompt_ids = np.where(prompt_mask > 0, rng.integers(1, 64, (N, TP)), 0).astype(np.int32)
    c_len = rng.integers(1, TC + 1, N)
    c_len[:3] = TC
    completion_mask = (np.arange(TC)[None] < c_len[:, None]).astype(np.float32)
    completion_ids = np.where(completion_mask > 0, rng.integers(1, 64, (N, TC)), 0).astype(np.int32)
    truncated = np.zeros(N, bool)
    truncated[:2] = True  # ran into max_new_tokens without a stop
    logprobs = grpo.reference_logprobs_fn(graphdef, compiler_options=FAST)
    logp = np.asarray(logprobs(params, prompt_ids, prompt_mask, completion_ids))
    rewards = rng.integers(0, 2, (N // 4, 4)).astype(np.float32)
    rewards[0] = [1, 0, 0, 0]
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, truncated=truncated,
                 advantages=np.asarray(grpo.group_advantages(rewards)).reshape(-1),
                 logp_old=(logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32),
                 logp_ref=(logp + rng.normal(0, 0.1, logp.shape)).astype(np.float32))
    return graphdef, params, batch


def _geo(micro_batches=1, completion_len=TC):
    """The update's shapes for the `tiny` batch (N rows)."""
    return grpo.Geometry(prompts_per_rollout=N // 4, group_size=4, num_minibatches=1, inner_epochs=1,
                         micro_batches=micro_batches, minibatch_size=N, prompt_len=TP,
                         completion_len=completion_len, temperature=1.0)


def _state(params, optimizer):
    return grpo.TrainState.create(jax.tree.map(jnp.array, params), optimizer)


@pytest.mark.parametrize("agg", grpo.AGG_MODES)
def test_grad_accumulation_equals_one_big_batch(tiny, agg):
    graphdef, params, batch = tiny
    # Plain SGD: the parameter change IS the gradient (Adam's first step would hide its scale).
    optimizer = optax.sgd(1.0)
    beta = 0.0 if agg == "seq_mean_token_sum_norm" else 0.04
    if not beta:  # beta = 0: no reference anywhere, the batch carries no logp_ref
        batch = {k: v for k, v in batch.items() if k != "logp_ref"}
    results = {}
    for k in (1, 2, 4):
        cfg = GRPOConfig(beta=beta, eps_low=0.2, eps_high=0.28, loss_agg=agg, micro_batches=k,
                         mask_truncated=True)
        update = grpo.make_update_step(graphdef, optimizer, cfg, _geo(k, 8), compiler_options=FAST)
        results[k] = update(_state(params, optimizer), None, batch)
    state1, m1 = results[1]
    assert int(state1.step) == 1
    assert float(m1["clip_frac_low"]) > 0 and float(m1["clip_frac_high"]) > 0
    assert float(m1["num_seqs"]) == N - 2  # the truncated rows left the loss
    assert (float(m1["kl"]) > 0) == bool(beta)
    delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state1.params, params)
    assert max(np.abs(d).max() for d in jax.tree.leaves(delta)) > 1e-3
    for k in (2, 4):
        state_k, m_k = results[k]
        for a, b in zip(jax.tree.leaves(state_k.params), jax.tree.leaves(state1.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)
        for key in m1:
            np.testing.assert_allclose(float(m_k[key]), float(m1[key]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"metric {key}, micro_batches={k}")


def test_sharded_update_equals_unsharded(tiny, devices):
    graphdef, params, batch = tiny
    batch = {k: v for k, v in batch.items() if k != "logp_ref"}  # reference forward in the step
    optimizer, schedule = grpo.make_optimizer(TrainConfig(lr=1e-3, warmup_steps=2))
    cfg = GRPOConfig(beta=0.04, loss_agg="token_mean", micro_batches=2)

    ref = grpo.init_reference(params, cfg.beta)
    update = grpo.make_update_step(graphdef, optimizer, cfg, _geo(2), schedule=schedule,
                                   compiler_options=FAST)
    state = _state(params, optimizer)
    plain = []
    for _ in range(2):
        state, m = update(state, ref, batch)
        plain.append(m)

    mesh = mesh_lib.make_mesh(MeshConfig(ici={"data": 2, "fsdp": 2, "tensor": 2}))
    rules = mesh_lib.TRAIN_RULES
    abstract = nnx.eval_shape(lambda: models.Transformer(TINY, rngs=nnx.Rngs(0)))
    p_sh = mesh_lib.params_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(p_sh))
    s_sh = grpo.train_state_shardings(p_sh, optimizer, params, mesh)
    b_sh = {k: mesh_lib.batch_sharding(mesh, rules, np.ndim(v), np.shape(v))
            for k, v in batch.items()}
    sharded_params = jax.device_put(params, p_sh)
    s_ref = grpo.init_reference(sharded_params, cfg.beta)
    s_state = grpo.init_train_state(jax.tree.map(jnp.copy, sharded_params), optimizer, s_sh)
    opt_sh = jax.tree.leaves(s_sh.opt_state)
    assert all(a.sharding == b for a, b in zip(jax.tree.leaves(s_state.opt_state), opt_sh))
    assert sum(s.spec != jax.sharding.PartitionSpec() for s in opt_sh) == 2 * sum(
        s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(p_sh))  # Adam mu, nu
    s_update = grpo.make_update_step(graphdef, optimizer, cfg, _geo(2), schedule=schedule,
                                     state_shardings=s_sh, ref_shardings=p_sh,
                                     batch_shardings=b_sh, mesh=mesh, rules=rules,
                                     compiler_options=FAST)
    s_batch = jax.device_put(batch, b_sh)
    for step in range(2):
        old = s_state
        s_state, s_m = s_update(s_state, s_ref, s_batch)
        assert old.params["embed"].is_deleted()  # the state was donated
        for key in plain[step]:
            np.testing.assert_allclose(float(s_m[key]), float(plain[step][key]), rtol=1e-5,
                                       atol=1e-6, err_msg=f"metric {key}, update {step}")
    # The reference is neither donated nor changed.
    for a, b in zip(jax.tree.leaves(s_ref), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b, sh in zip(jax.tree.leaves(s_state.params), jax.tree.leaves(state.params),
                        jax.tree.leaves(p_sh)):
        assert a.sharding == sh
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert int(s_state.step) == 2
    assert float(plain[0]["kl"]) == 0 and float(plain[1]["kl"]) > 0  # reference = initial policy
    assert float(plain[0]["lr"]) == pytest.approx(5e-4)  # warmup
    assert float(plain[1]["lr"]) == pytest.approx(1e-3)
    moved = max(float(jnp.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))
    assert moved > 5e-4  # two Adam steps of ~lr each really happened

    # A reset reference owns its buffers: the next update donates the policy it was copied from.
    new_ref = grpo.maybe_reset_reference(2, s_ref, s_state.params, every=2)
    snapshot = jax.tree.map(np.asarray, s_state.params)
    s_state, _ = s_update(s_state, new_ref, s_batch)
    for a, b, sh in zip(jax.tree.leaves(new_ref), jax.tree.leaves(snapshot), jax.tree.leaves(p_sh)):
        assert not a.is_deleted() and a.sharding == sh
        np.testing.assert_array_equal(np.asarray(a), b)


def test_beta_zero_update_needs_no_reference(tiny):
    graphdef, params, batch = tiny
    optimizer = optax.sgd(0.1)
    cfg = GRPOConfig(beta=0.0, micro_batches=1)
    assert grpo.init_reference(params, cfg.beta) is None
    with pytest.raises(ValueError, match="logp_ref"):
        grpo.make_update_step(graphdef, optimizer, GRPOConfig(beta=0.1), _geo())(
            _state(params, optimizer), None, {k: v for k, v in batch.items() if k != "logp_ref"})
    with pytest.raises(ValueError, match="micro_batches"):
        grpo.make_update_step(graphdef, optimizer, GRPOConfig(beta=0.0), _geo(3))(
            _state(params, optimizer), None, batch)


def test_update_metrics_are_policy_loss_on_the_batch(tiny):
    """What the tests check against numpy (policy_loss) is what the update runs: its metrics
    equal policy_loss on the model's own log-probs, for several micro-batches too."""
    graphdef, params, batch = tiny
    optimizer = optax.sgd(0.0)
    cfg = GRPOConfig(beta=0.04, eps_low=0.2, eps_high=0.28, loss_agg="token_mean", mask_truncated=True)
    logp = np.asarray(grpo.reference_logprobs_fn(graphdef, compiler_options=FAST)(
        params, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"]))
    mask = batch["completion_mask"] * (1.0 - batch["truncated"])[:, None]
    _, want = grpo.policy_loss(logp, batch["logp_old"], batch["logp_ref"], batch["advantages"], mask,
                               eps_low=0.2, eps_high=0.28, beta=0.04, agg="token_mean", max_len=TC)
    for k in (1, 4):
        _, got = grpo.make_update_step(graphdef, optimizer, cfg, _geo(k), compiler_options=FAST)(
            _state(params, optimizer), None, batch)
        for key in want:
            if key != "entropy":
                np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=2e-5, atol=1e-6,
                                           err_msg=f"{key}, micro_batches={k}")


def test_nonfinite_update_is_not_applied(tiny):
    graphdef, params, batch = tiny
    optimizer, _ = grpo.make_optimizer(TrainConfig(lr=1e-2))
    update = grpo.make_update_step(graphdef, optimizer, GRPOConfig(beta=0.04), _geo(), donate=False,
                                   compiler_options=FAST)
    state = _state(params, optimizer)
    good, m_good = update(state, None, batch)
    assert float(m_good["finite"]) == 1.0
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(state.params)))
    assert moved > 1e-4
    for poison in ({"advantages": np.full(N, np.nan, np.float32)},
                   {"logp_ref": np.where(np.arange(TC) == 0, np.inf, batch["logp_ref"]).astype(np.float32)}):
        bad, m_bad = update(good, None, {**batch, **poison})
        assert float(m_bad["finite"]) == 0.0 and int(bad.step) == int(good.step) + 1
        for a, b in zip(jax.tree.leaves((bad.params, bad.opt_state)), jax.tree.leaves((good.params, good.opt_state))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
