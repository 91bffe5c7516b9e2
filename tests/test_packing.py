"""Sequence packing: a valid partition (every token once, no sequence split, chunks within their
budget), equal chunk counts per shard, bucketed counts, pack/unpack round trips, per-sequence
reductions and every aggregation mode equal to the padded layout, and a packed forward through
the tiny model equal to the padded forward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import objectives as obj
from r1jax import packing
from r1jax.config import ModelConfig
from r1jax.logprobs import completion_logprobs
from r1jax.models import create

# LLVM's optimisation passes dominate these tiny programs' compile time; results are unaffected.
FAST = {"xla_backend_optimization_level": 0}


def rollout_masks(seed, n=24, tp=6, tc=10, long_tail=True):
    """Left-padded prompt masks and prefix completion masks with long-tailed lengths."""
    rng = np.random.default_rng(seed)
    p_len = rng.integers(1, tp + 1, n)
    c_len = np.minimum(rng.geometric(0.3, n), tc) if long_tail else rng.integers(0, tc + 1, n)
    c_len[0] = tc
    pm = (np.arange(tp)[None] >= tp - p_len[:, None]).astype(np.int32)
    cm = (np.arange(tc)[None] < c_len[:, None]).astype(np.int32)
    return pm, cm


def test_bucket_count_bound_and_fixed_point():
    for n in range(1, 5000):
        b = packing.bucket_count(n)
        assert n <= b < 1.25 * n or (n <= 8 and b == n)
        assert packing.bucket_count(b) == b
    for u in (2, 7, 64, 1000, 4096):
        distinct = {packing.bucket_count(n) for n in range(1, u + 1)}
        assert len(distinct) <= 4 * math.ceil(math.log2(u))
    assert [packing.bucket_count(n) for n in (8, 9, 11, 13, 17, 33)] == [8, 10, 12, 14, 20, 40]


@pytest.mark.parametrize("shards,micro,chunk_tokens", [(1, None, None), (4, None, None),
                                                      (2, 2, None), (4, 1, 20)])
def test_plan_is_a_valid_partition_with_equal_shards(shards, micro, chunk_tokens):
    pm, cm = rollout_masks(shards + 10 * (micro or 0))
    n, tp = pm.shape
    tc = cm.shape[1]
    plan = packing.plan(pm, cm, chunk_tokens=chunk_tokens, num_shards=shards,
                        chunks_per_micro=micro)
    L = plan.chunk_tokens
    assert L == (chunk_tokens or tp + tc)
    lengths = pm.sum(1) + cm.sum(1)
    # Every token of every sequence exactly once, each sequence whole inside one chunk.
    owner = np.full(plan.shape, -1)
    for i in range(n):
        c, a = plan.chunk_N[i], plan.offset_N[i]
        assert 0 <= c < plan.num_chunks and a + lengths[i] <= L
        assert (owner[c, a: a + lengths[i]] == -1).all()
        owner[c, a: a + lengths[i]] = i
    assert (owner >= 0).sum() == lengths.sum()
    arrays = plan.layout_arrays()
    np.testing.assert_array_equal(arrays["seq_index"], np.where(owner >= 0, owner, n))
    assert (arrays["completion_src"] < cm.size).sum() == cm.sum()
    # Equal chunk counts per shard, micro-batches of whole chunk groups, a bucketed count.
    assert plan.num_chunks % shards == 0
    m = micro or plan.num_chunks // shards
    groups = plan.num_chunks // (shards * m)
    assert groups * shards * m == plan.num_chunks and plan.num_micro == (groups if micro else 1)
    assert packing.bucket_count(groups if micro else m) == (groups if micro else m)
    # Best-fit decreasing: within 11/9 OPT + 1 (Johnson's bound), OPT >= total / L.
    assert plan.num_real_chunks <= 11 / 9 * math.ceil(lengths.sum() / L) + 1
    # Tokens spread evenly: every shard holds a like share.
    per_shard = (owner >= 0).reshape(shards, -1).sum(1)
    assert per_shard.max() - per_shard.min() <= L * max(1, m // 2 + 1)


def test_long_tailed_rollout_packs_into_far_fewer_chunks():
    pm, cm = rollout_masks(7, n=64, tp=4, tc=32)
    plan = packing.plan(pm, cm, num_shards=2)
    assert plan.num_chunks <= 64 // 3  # mean completion ~3 of 32 tokens: most rows were padding


def test_pack_unpack_round_trip_numpy_and_jax_with_trailing_dims():
    pm, cm = rollout_masks(3)
    n, tp = pm.shape
    tc = cm.shape[1]
    plan = packing.plan(pm, cm, num_shards=2, chunks_per_micro=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, tc)).astype(np.float32)
    routes = rng.integers(0, 8, (n, tc, 2)).astype(np.int32)  # e.g. top-2 routing indices
    for arr in (x, routes):
        back = plan.unpack_completion(plan.pack_completion(arr))
        np.testing.assert_array_equal(back[cm > 0], arr[cm > 0])
        assert (back[cm == 0] == 0).all()
        back_j = plan.unpack_completion(plan.pack_completion(jnp.asarray(arr)))
        assert isinstance(back_j, jax.Array)
        np.testing.assert_array_equal(np.asarray(back_j), back)
        # One jitted packer serves every plan of this shape: the indices are arguments.
        arrays = plan.layout_arrays()
        jitted = jax.jit(lambda a, idx: packing.gather_tokens(a, idx))(jnp.asarray(arr),
                                                                        arrays["completion_src"])
        np.testing.assert_array_equal(np.asarray(jitted), plan.pack_completion(arr))
    ids = rng.integers(1, 50, (n, tp))
    comp = rng.integers(1, 50, (n, tc))
    tokens = plan.pack_tokens(ids, comp, pad_id=0)
    arrays = plan.layout_arrays()
    for i in range(n):
        c, a = plan.chunk_N[i], plan.offset_N[i]
        want = np.concatenate([ids[i, pm[i] > 0], comp[i, cm[i] > 0]])
        np.testing.assert_array_equal(tokens[c, a: a + len(want)], want)
        np.testing.assert_array_equal(arrays["positions"][c, a: a + len(want)], np.arange(len(want)))
        assert len(set(arrays["segment_ids"][c, a: a + len(want)])) == 1
    assert (tokens[arrays["seq_index"] == n] == 0).all()
    assert (arrays["segment_ids"][arrays["seq_index"] == n] == 0).all()


def test_bad_inputs_are_named():
    pm, cm = rollout_masks(0, n=4)
    with pytest.raises(ValueError, match="sequence 0 has 16 tokens, more than the chunk's 12"):
        packing.plan(pm, cm, chunk_tokens=12)
    bad = cm.copy()
    bad[2, 0] = 0
    bad[2, 1] = 1
    with pytest.raises(ValueError, match="completion_mask row 2 is not a prefix mask"):
        packing.plan(pm, bad)
    empty = pm.copy()
    empty[3] = 0
    with pytest.raises(ValueError, match="prompt 3 has no tokens"):
        packing.plan(empty, cm)
    plan = packing.plan(pm, cm)
    with pytest.raises(ValueError, match=r"a completion-side array has shape \(4, 3\), expected \[4, 10, \.\.\.\]"):
        plan.pack_completion(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"logp_old has shape \(4, 3\)"):
        plan.pack_batch({"logp_old": np.zeros((4, 3))})
    with pytest.raises(ValueError, match="count must be >= 1"):
        packing.bucket_count(0)


@pytest.mark.parametrize("agg", obj.AGG_MODES)
@pytest.mark.parametrize("level,correction", [("token", "none"), ("sequence", "tis"),
                                              ("token", "mis")])
def test_objectives_on_the_packed_layout_equal_the_padded(agg, level, correction):
    """Loss and gradient (w.r.t. the per-token log-probs) of every aggregation mode, packed vs
    padded, with the whole batch and summed over micro-batches (the chunk axis split strided,
    each micro-batch divided by the whole batch's normaliser)."""
    pm, cm = rollout_masks(5)
    n, tc = cm.shape
    rng = np.random.default_rng(1)
    logp = np.where(cm > 0, -rng.uniform(0.1, 3, (n, tc)), 0).astype(np.float32)
    old = (logp + rng.normal(0, 0.2, logp.shape) * cm).astype(np.float32)
    samp = (old + rng.normal(0, 0.3, logp.shape) * cm).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    loss_mask = cm.astype(np.float32)
    loss_mask[1] = 0  # e.g. a truncated completion under mask_truncated
    kw = dict(level=level, correction=correction)
    plan = packing.plan(pm, cm, num_shards=2, chunks_per_micro=1)
    layout = plan.layout()

    def loss(logp_tok, old_tok, samp_tok, mask_tok, lay, den=None):
        w, m = obj.mismatch_correction(old_tok, samp_tok, mask_tok, kind=kw["correction"],
                                       mis_band=(0.6, 1.8), layout=lay)
        pg, _ = obj.policy_gradient_loss(logp_tok, old_tok, lay.to_tokens(adv), m, eps_low=0.1,
                                         eps_high=0.1, level=kw["level"], is_weights_tok=w,
                                         layout=lay)
        return obj.aggregate(pg, m, agg, max_len=tc, layout=lay, denominator=den)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=4, compiler_options=FAST)
    padded, g_pad = grad(logp, old, samp, loss_mask, obj.ROWS)
    pk = [plan.pack_completion(x) for x in (logp, old, samp, loss_mask)]
    packed, g_packed = jax.jit(jax.value_and_grad(loss), compiler_options=FAST)(*pk, layout)
    np.testing.assert_allclose(float(packed), float(padded), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(plan.unpack_completion(np.asarray(g_packed)), np.asarray(g_pad),
                               rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(g_pad)).max() > 1e-3

    # Micro-batches: the strided split of the chunk axis, one normaliser for the whole batch
    # (MIS's dropped sequences leave it, as in the whole-batch loss).
    _, kept = obj.mismatch_correction(pk[1], pk[2], pk[3], kind=correction, mis_band=(0.6, 1.8),
                                      layout=layout)
    den = obj.normaliser(kept, agg, layout=layout)
    k = plan.num_micro
    assert k > 1
    total = 0.0
    for j in range(k):
        rows = slice(j, None, k)
        sub = packing.Packed(seq_index=layout.seq_index[rows], num_seqs=n)
        total += float(loss(*(x[rows] for x in pk), sub, den))
    np.testing.assert_allclose(total, float(padded), rtol=1e-6, atol=1e-7)


def test_per_sequence_reductions_match_rows():
    pm, cm = rollout_masks(6)
    plan = packing.plan(pm, cm, num_shards=4)
    x = np.random.default_rng(2).normal(size=cm.shape).astype(np.float32) * cm
    layout = plan.layout()
    np.testing.assert_allclose(np.asarray(layout.seq_sum(jnp.asarray(plan.pack_completion(x)))),
                               x.sum(1), rtol=1e-6, atol=1e-6)
    v = np.arange(cm.shape[0], dtype=np.float32) + 1
    spread = np.asarray(layout.to_tokens(jnp.asarray(v)))
    idx = plan.layout_arrays()["seq_index"]
    np.testing.assert_array_equal(spread, np.where(idx < len(v), v[np.minimum(idx, len(v) - 1)], 0))


def test_packed_forward_equals_padded_forward():
    cfg = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    model = create(cfg, seed=0)
    pm, cm = rollout_masks(8, n=10, tp=5, tc=7)
    rng = np.random.default_rng(3)
    prompt = np.where(pm > 0, rng.integers(1, 48, pm.shape), 0).astype(np.int32)
    comp = np.where(cm > 0, rng.integers(1, 48, cm.shape), 0).astype(np.int32)
    plan = packing.plan(pm, cm, chunk_tokens=16, num_shards=2)
    arrays = plan.layout_arrays()
    assert plan.num_real_chunks < len(pm)  # several sequences share a chunk
    tokens = plan.pack_tokens(prompt, comp)
    lp_pk, ent_pk = jax.jit(lambda t, s, p: packing.packed_logprobs(model, t, s, p, temperature=0.8),
                            compiler_options=FAST)(tokens, arrays["segment_ids"], arrays["positions"])
    lp_pad, ent_pad = jax.jit(lambda p, m, c: completion_logprobs(model, p, m, c, temperature=0.8),
                              compiler_options=FAST)(prompt, pm, comp)
    got = plan.unpack_completion(np.asarray(lp_pk))
    np.testing.assert_allclose(got[cm > 0], np.asarray(lp_pad)[cm > 0], atol=1e-5)
    np.testing.assert_allclose(plan.unpack_completion(np.asarray(ent_pk))[cm > 0],
                               np.asarray(ent_pad)[cm > 0], atol=1e-5)


def test_pack_batch_packs_completion_side_keys_and_keeps_sequence_keys():
    pm, cm = rollout_masks(9, n=8)
    n, tp = pm.shape
    tc = cm.shape[1]
    rng = np.random.default_rng(4)
    batch = {"prompt_ids": rng.integers(1, 30, (n, tp)), "prompt_mask": pm,
             "completion_ids": rng.integers(1, 30, (n, tc)), "completion_mask": cm,
             "logp_old": rng.normal(size=(n, tc)).astype(np.float32),
             "advantages": rng.normal(size=n).astype(np.float32), "truncated": np.zeros(n, np.int32)}
    plan = packing.plan(pm, cm, num_shards=2)
    for convert in (np.asarray, jnp.asarray):
        out = plan.pack_batch({k: convert(v) for k, v in batch.items()})
        assert set(out) == set(packing.LAYOUT_KEYS) | {"completion_mask", "logp_old", "advantages",
                                                        "truncated"}
        for k in ("tokens", "completion_mask", "logp_old"):
            assert out[k].shape == plan.shape, k
        np.testing.assert_array_equal(np.asarray(out["tokens"]),
                                      plan.pack_tokens(batch["prompt_ids"], batch["completion_ids"]))
        np.testing.assert_array_equal(plan.unpack_completion(np.asarray(out["logp_old"]))[cm > 0],
                                      batch["logp_old"][cm > 0])
        np.testing.assert_array_equal(np.asarray(out["advantages"]), batch["advantages"])
    with pytest.raises(ValueError, match=r"unknown batch keys \['rewards'\]"):
        plan.pack_batch({**batch, "rewards": batch["advantages"]})


# ---------------------------------------------------------------------------------------------
# The packed update: the same step as the padded one (every aggregation mode, micro-batches,
# GSPO, TIS, MIS, the KL term, mask_truncated), and the packed reference pass.
# ---------------------------------------------------------------------------------------------
import optax  # noqa: E402

from r1jax import grpo  # noqa: E402
from r1jax.config import GRPOConfig  # noqa: E402

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2)
N, TP, TC = 16, 5, 6


@pytest.fixture(scope="module")
def tiny_rollout():
    """(graphdef, params, batch): a random model and a rollout-like padded batch whose
    logp_old / logp_ref / logp_sampler are the model's log-probs plus noise."""
    from flax import nnx

    model = create(TINY, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    p_len = rng.integers(2, TP + 1, N)
    prompt_mask = (np.arange(TP)[None] >= TP - p_len[:, None]).astype(np.int32)
    prompt_ids = np.where(prompt_mask > 0, rng.integers(1, 64, (N, TP)), 0).astype(np.int32)
    c_len = np.minimum(rng.geometric(0.35, N), TC)
    c_len[:3] = TC
    completion_mask = (np.arange(TC)[None] < c_len[:, None]).astype(np.int32)
    completion_ids = np.where(completion_mask > 0, rng.integers(1, 64, (N, TC)), 0).astype(np.int32)
    truncated = np.zeros(N, np.int32)
    truncated[:2] = 1
    logp = np.asarray(grpo.reference_logprobs_fn(graphdef, compiler_options=FAST)(
        params, prompt_ids, prompt_mask, completion_ids))
    noise = lambda s: rng.normal(0, s, logp.shape) * completion_mask  # noqa: E731
    old = (logp + noise(0.3)).astype(np.float32)
    rewards = rng.integers(0, 2, (N // 4, 4)).astype(np.float32)
    rewards[0] = [1, 0, 0, 0]
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, truncated=truncated,
                 advantages=np.asarray(grpo.group_advantages(rewards)).reshape(-1),
                 logp_old=old, logp_ref=(logp + noise(0.1)).astype(np.float32),
                 logp_sampler=(old + noise(0.4)).astype(np.float32))
    return graphdef, params, batch


def _geo(micro_batches=1):
    return grpo.Geometry(prompts_per_rollout=N // 4, group_size=4, num_minibatches=1,
                         inner_epochs=1, micro_batches=micro_batches, minibatch_size=N,
                         prompt_len=TP, completion_len=TC, temperature=1.0)


@pytest.mark.parametrize("agg,level,correction", [("seq_mean_token_mean", "token", "mis"),
                                                  ("token_mean", "sequence", "tis"),
                                                  ("seq_mean_token_sum_norm", "token", "none")])
def test_packed_update_equals_padded_update(tiny_rollout, agg, level, correction):
    graphdef, params, batch = tiny_rollout
    optimizer = optax.sgd(1.0)  # the parameter change is the gradient
    kw = dict(beta=0.04, eps_low=0.2, eps_high=0.28, loss_agg=agg, mask_truncated=True,
              importance_sampling_level=level, rollout_correction=correction, mis_low=0.67,
              mis_high=1.5)
    fresh = lambda: grpo.TrainState.create(jax.tree.map(jnp.array, params), optimizer)  # noqa: E731
    padded = grpo.make_update_step(graphdef, optimizer, GRPOConfig(micro_batches=2, **kw), _geo(2),
                                   compiler_options=FAST)
    s_pad, m_pad = padded(fresh(), None, batch)
    L = TP + TC
    plan = packing.plan(batch["prompt_mask"], batch["completion_mask"], chunks_per_micro=2)
    assert plan.num_micro >= 2 and plan.num_real_chunks < N
    packed = grpo.make_update_step(graphdef, optimizer,
                                   GRPOConfig(packing=True, micro_batch_tokens=2 * L, **kw), _geo(),
                                   compiler_options=FAST)
    s_pk, m_pk = packed(fresh(), None, plan.pack_batch(batch))
    delta = max(np.abs(np.asarray(a) - np.asarray(b)).max()
                for a, b in zip(jax.tree.leaves(s_pad.params), jax.tree.leaves(params)))
    assert delta > 1e-3
    for a, b in zip(jax.tree.leaves(s_pk.params), jax.tree.leaves(s_pad.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)
    assert set(m_pk) == set(m_pad) and "mismatch/kl_k3" in m_pad
    for key in m_pad:
        np.testing.assert_allclose(float(m_pk[key]), float(m_pad[key]), rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    if correction == "mis":  # the band really dropped sequences, in both layouts alike
        assert float(m_pad["mismatch/seq_out_of_band"]) > 0
        assert float(m_pad["num_seqs"]) < N - 2


def test_packed_reference_pass_equals_padded(tiny_rollout):
    graphdef, params, batch = tiny_rollout
    plan = packing.plan(batch["prompt_mask"], batch["completion_mask"], num_shards=2)
    pb = plan.pack_batch(batch)
    lp = grpo.reference_logprobs_fn(graphdef, packed=True, compiler_options=FAST)(
        params, pb["tokens"], pb["segment_ids"], pb["positions"])
    want = grpo.reference_logprobs_fn(graphdef, compiler_options=FAST)(
        params, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"])
    m = batch["completion_mask"] > 0
    np.testing.assert_allclose(plan.unpack_completion(np.asarray(lp))[m], np.asarray(want)[m],
                               atol=1e-5)


def test_packed_update_rejects_a_padded_batch_and_row_micro_batches(tiny_rollout):
    graphdef, params, batch = tiny_rollout
    optimizer = optax.sgd(1.0)
    with pytest.raises(ValueError, match="grpo.micro_batches=2 with grpo.packing"):
        grpo.make_update_step(graphdef, optimizer, GRPOConfig(packing=True, micro_batches=2),
                              _geo(2))
    update = grpo.make_update_step(graphdef, optimizer, GRPOConfig(packing=True, beta=0.0), _geo())
    state = grpo.TrainState.create(jax.tree.map(jnp.array, params), optimizer)
    with pytest.raises(ValueError, match=r"batch lacks \['tokens', 'segment_ids', 'positions', "
                                         r"'seq_index'\] \(grpo.packing"):
        update(state, None, {k: v for k, v in batch.items() if k != "logp_ref"})


def test_packer_packs_sharded_batches_and_runs_the_reference_pass(tiny_rollout, devices):
    """On a 4-way data mesh: equal chunks per shard, the packed update batch sharded, and the
    packed reference pass (in fixed-shape groups of chunks) equal to the padded forward."""
    from r1jax import mesh as mesh_lib

    graphdef, params, batch = tiny_rollout
    mesh = jax.sharding.Mesh(np.asarray(devices[:4]), ("data",))
    rules = {**dict(mesh_lib.TRAIN_RULES), "batch": ("data",)}
    geo = _geo()
    cfg = GRPOConfig(packing=True, micro_batch_tokens=4 * (TP + TC))
    packer = packing.Packer(geo, cfg, mesh=mesh, rules=rules)
    assert packer.shards == 4 and packer.chunks_per_micro == 1
    dev = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, rules, np.ndim(v)))
           for k, v in batch.items()}
    pb = packer.pack(dev)
    c = pb["tokens"].shape[0]
    assert c % 4 == 0 and pb["tokens"].sharding.shard_shape(pb["tokens"].shape)[0] == c // 4
    want_plan = packing.plan(batch["prompt_mask"], batch["completion_mask"], num_shards=4,
                             chunks_per_micro=1)
    np.testing.assert_array_equal(np.asarray(pb["tokens"]),
                                  want_plan.pack_tokens(batch["prompt_ids"], batch["completion_ids"]))
    fn = grpo.reference_logprobs_fn(graphdef, packed=True, compiler_options=FAST)
    lp = packer.logprobs(fn, params, dev, rows_per_call=4)
    want = grpo.reference_logprobs_fn(graphdef, compiler_options=FAST)(
        params, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"])
    m = batch["completion_mask"] > 0
    assert lp.shape == (N, TC)
    np.testing.assert_allclose(np.asarray(lp)[m], np.asarray(want)[m], atol=1e-5)
    assert (np.asarray(lp)[~m] == 0).all()


@pytest.mark.slow
def test_a_packed_training_run_equals_the_padded_one(tmp_path):
    """Two updates of the real loop (sampler with top-p, rewards, reference pass, GSPO, MIS)
    with and without grpo.packing: the same metrics, so the packed update, the packed reference
    pass and the trainer's wiring change nothing but the layout."""
    import json

    from test_trainer import TINY as TINY_RUN  # the loop tests' tiny run

    from r1jax import trainer as trainer_lib
    from r1jax.config import load_config

    common = [*TINY_RUN, "train.steps=2", "checkpoint.every=0", "sampler.top_p=0.8",
              "grpo.importance_sampling_level=sequence", "grpo.eps_low=0.01", "grpo.eps_high=0.01",
              "grpo.rollout_correction=mis", "grpo.mis_low=0.1", "grpo.mis_high=1.5"]
    rows = {}
    for name, extra in (("padded", ["grpo.micro_batches=2"]),
                        ("packed", ["grpo.packing=true", "grpo.micro_batch_tokens=48"])):
        run = str(tmp_path / name)
        trainer_lib.train(load_config(None, [*common, *extra, f"run.dir={run}"]))
        with open(f"{run}/metrics.jsonl") as f:
            rows[name] = [json.loads(line) for line in f]
    assert len(rows["packed"]) == 2
    for pad, pk in zip(rows["padded"], rows["packed"]):
        assert pad["update/mismatch/ratio_max"] <= 1.0 + 1e-6  # top-p: q >= pi_old on its support
        assert pad["update/mismatch/kl_k3"] > 0
        for key in ("loss/policy", "kl", "entropy", "grad_norm", "update/ratio_mean",
                    "update/num_seqs", "update/mismatch/kl_k3", "update/mismatch/seq_out_of_band",
                    "reward/mean"):
            np.testing.assert_allclose(pk[key], pad[key], rtol=2e-4, atol=1e-6, err_msg=key)


def test_compile_command_lowers_the_packed_update():
    """`r1jax compile` with grpo.packing lowers the packed update at the largest chunk count."""
    import dataclasses

    from r1jax import aot
    from r1jax.config import MeshConfig, load_config

    cfg = load_config("configs/model/tiny.yaml", [
        "grpo.packing=true", "grpo.micro_batch_tokens=64", "train.prompts_per_rollout=4",
        "grpo.group_size=4", "grpo.num_minibatches=1", "sampler.max_new_tokens=8",
        "data.max_prompt_len=8", "sampler.prompt_buckets=[8]"])
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(ici={"fsdp": 4}, dcn={}))
    rep = aot.compile_update(cfg, devices=jax.devices()[:4], compiler_options=FAST, reference=False)
    assert rep["batch"]["chunk_tokens"] == 16
    assert rep["batch"]["packed_chunks"] % 4 == 0 and rep["batch"]["packed_chunks"] >= 16
    assert rep["update"]["flops"] > 0


def test_packed_reference_pass_runs_only_the_chunks_a_short_rollout_needs(tiny_rollout):
    """A rollout whose packed chunks fit one call runs as one call of its bucketed chunk count
    (not padded up to rows_per_call rows' worth of chunks), and still equals the padded forward."""
    graphdef, params, batch = tiny_rollout
    packer = packing.Packer(_geo(), GRPOConfig(packing=True))
    inner = grpo.reference_logprobs_fn(graphdef, packed=True, compiler_options=FAST)
    calls = []

    def fn(p, tokens, *rest):
        calls.append(tokens.shape)
        return inner(p, tokens, *rest)

    lp = packer.logprobs(fn, params, batch)  # rows_per_call: the mini-batch, all N rows
    need = packing.plan(batch["prompt_mask"], batch["completion_mask"]).num_chunks
    assert calls == [(need, TP + TC)] and need < N, (calls, need)
    want = grpo.reference_logprobs_fn(graphdef, compiler_options=FAST)(
        params, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"])
    m = batch["completion_mask"] > 0
    np.testing.assert_allclose(np.asarray(lp)[m], np.asarray(want)[m], atol=1e-5)
    assert (np.asarray(lp)[~m] == 0).all()
