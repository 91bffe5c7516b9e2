"""MoE routing, the token-drop rule, expert-parallel dispatch and balancing (r1jax.models.moe)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import mesh as mesh_lib
from r1jax.config import MeshConfig, MoEConfig
from r1jax.models import moe

E, D, F, K = 8, 16, 24, 2


def _weights(seed=0, e=E):
    r = np.random.RandomState(seed)
    return [jnp.asarray(r.normal(0, 0.3, s).astype(np.float32)) for s in ((e, D, F), (e, D, F), (e, F, D))]


def _route_numpy(m: MoEConfig, logits, bias):
    """A plain transcription of the V3 report's equations 12-16 (and Qwen3-MoE's softmax)."""
    s = 1 / (1 + np.exp(-logits)) if m.scoring == "sigmoid" else np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    out_w, out_i = [], []
    for t in range(len(s)):
        choice = s[t] + bias
        gsz = len(choice) // m.n_group
        gscore = [sorted(choice[g * gsz:(g + 1) * gsz])[-2:] for g in range(m.n_group)]
        groups = np.argsort([-sum(x) for x in gscore], kind="stable")[: m.topk_group]
        allowed = [e for g in groups for e in range(g * gsz, (g + 1) * gsz)]
        idx = sorted(allowed, key=lambda e: -choice[e])[: m.num_experts_per_tok]
        w = s[t, idx]
        if m.norm_topk_prob:
            w = w / w.sum()
        out_w.append(w * m.routed_scaling_factor)
        out_i.append(idx)
    return np.array(out_w), np.array(out_i)


@pytest.mark.parametrize("m", [
    MoEConfig(num_experts=16, num_experts_per_tok=3, scoring="sigmoid", n_group=4, topk_group=2,
              routed_scaling_factor=2.5, router_bias=True),
    MoEConfig(num_experts=16, num_experts_per_tok=4, scoring="softmax", norm_topk_prob=False),
])
def test_route_matches_transcription(m):
    r = np.random.RandomState(1)
    logits = r.normal(0, 2, (40, 16)).astype(np.float32)
    bias = r.normal(0, 0.5, 16).astype(np.float32) if m.router_bias else np.zeros(16, np.float32)
    w, idx, _ = moe.route(m, jnp.asarray(logits), jnp.asarray(bias) if m.router_bias else None)
    ref_w, ref_i = _route_numpy(m, logits, bias)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-5, atol=1e-6)


def test_forced_routes_use_current_weights():
    m = MoEConfig(num_experts=8, num_experts_per_tok=2, scoring="softmax")
    logits = jnp.asarray(np.random.RandomState(0).normal(size=(5, 8)).astype(np.float32))
    forced = jnp.asarray([[0, 1]] * 5, jnp.int32)
    w, idx, s = moe.route(m, logits, None, forced)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(forced))
    ref = np.asarray(s)[:, :2] / np.asarray(s)[:, :2].sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-6)


def test_queue_order_and_capacity_drop_rule():
    # Token t's choices: first choices queue before second choices, each in token order.
    idx = jnp.asarray([[0, 1], [0, 2], [1, 0], [0, 1]], jnp.int32)
    pos = np.asarray(moe.queue_positions(idx, 3))
    # expert 0: first choices of tokens 0, 1, 3 -> 0, 1, 2; token 2's second choice -> 3
    # expert 1: token 2's first choice -> 0; second choices of tokens 0, 3 -> 1, 2
    np.testing.assert_array_equal(pos, [[0, 1], [1, 0], [0, 3], [2, 2]])
    keep = np.asarray(moe.kept(idx, 3, 2, 1))
    np.testing.assert_array_equal(keep, pos < 2)
    # Padding tokens never take a slot.
    valid = jnp.asarray([False, True, True, True])
    pos = np.asarray(moe.queue_positions(idx, 3, valid))
    assert pos[1, 0] == 0 and pos[3, 0] == 1 and (pos[0] > 100).all()


def _tokens(n, seed=0, skew=0.0):
    r = np.random.RandomState(seed)
    x = r.normal(size=(n, D)).astype(np.float32)
    logits = r.normal(size=(n, E)).astype(np.float32)
    logits[:, 0] += skew
    return jnp.asarray(x), jnp.asarray(logits)


def test_local_dispatch_equals_dense_reference():
    m = MoEConfig(num_experts=E, num_experts_per_tok=K, capacity_factor=0.0)
    x, logits = _tokens(32)
    w, idx, _ = moe.route(m, logits)
    g, u, dn = _weights()
    got, keep = moe.moe_ffn(m, x, idx, w, g, u, dn, dt=jnp.float32)
    ref, ref_keep = moe.moe_dense_reference(m, x, idx, w, g, u, dn, dt=jnp.float32)
    assert np.asarray(keep).all() and np.asarray(ref_keep).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    # The every-token-every-expert sum written out.
    xs, ws, ids = np.asarray(x), np.asarray(w), np.asarray(idx)
    gn, un, dnn = (np.asarray(a) for a in (g, u, dn))
    silu = lambda z: z / (1 + np.exp(-z))
    manual = np.stack([sum(ws[t, j] * (silu(xs[t] @ gn[ids[t, j]]) * (xs[t] @ un[ids[t, j]])) @ dnn[ids[t, j]]
                           for j in range(K)) for t in range(len(xs))])
    np.testing.assert_allclose(np.asarray(got), manual, atol=1e-4)


@pytest.fixture(scope="module")
def ep_mesh(devices):
    return mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 4}), devices[:4])


@pytest.mark.parametrize("cf", [0.0, 1.0, 0.5])
def test_expert_parallel_equals_dense_reference(ep_mesh, cf):
    """Experts over 4 devices (2 each), tokens over the same 4: equal to the every-expert
    reference under the same drop rule (4 token groups), dropped assignments counted exactly."""
    m = MoEConfig(num_experts=E, num_experts_per_tok=K, capacity_factor=cf)
    n = 64
    x, logits = _tokens(n, seed=2, skew=1.5)  # expert 0 oversubscribed: drops at cf <= 1
    w, idx, _ = moe.route(m, logits)
    valid = jnp.asarray(np.random.RandomState(3).rand(n) > 0.1)
    g, u, dn = _weights(1)
    rules = mesh_lib.resolve_rules(mesh_lib.TRAIN_RULES, {"expert": "fsdp", "batch": "fsdp"})

    def run(*a):
        with mesh_lib.layout(ep_mesh, rules):
            return moe.moe_ffn(m, *a[:6], dt=jnp.float32, valid_N=a[6])

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    ex = NamedSharding(ep_mesh, P("fsdp", None, None))
    args = (x, idx, w, jax.device_put(g, ex), jax.device_put(u, ex), jax.device_put(dn, ex), valid)
    fn = jax.jit(run)
    got, keep = fn(*args)
    hlo = fn.lower(*args).compile().as_text()
    assert "all-to-all" in hlo
    ref, ref_keep = moe.moe_dense_reference(m, x, idx, w, g, u, dn, dt=jnp.float32, groups=4, valid_N=valid)
    np.testing.assert_array_equal(np.asarray(keep), np.asarray(ref_keep))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    dropped = int(np.sum(~np.asarray(keep) & np.asarray(valid)[:, None]))
    # Independent count: per token group and expert, assignments beyond capacity.
    cap = moe.capacity(m, n // 4)
    ids, v = np.asarray(idx), np.asarray(valid)
    expect = sum(max(0, int(np.sum((ids[s:s + n // 4] == e) & v[s:s + n // 4, None])) - cap)
                 for s in range(0, n, n // 4) for e in range(E))
    assert dropped == expect
    assert (dropped > 0) == (cf in (0.5, 1.0))


def test_expert_parallel_gradients_equal_local(ep_mesh):
    m = MoEConfig(num_experts=E, num_experts_per_tok=K, capacity_factor=0.0)
    x, logits = _tokens(32, seed=4)
    g, u, dn = _weights(2)
    rules = mesh_lib.resolve_rules(mesh_lib.TRAIN_RULES, {"expert": "fsdp", "batch": "fsdp"})

    def loss(x, logits, g, u, dn, ep):
        w, idx, _ = moe.route(m, logits)
        if ep:
            with mesh_lib.layout(ep_mesh, rules):
                y, _ = moe.moe_ffn(m, x, idx, w, g, u, dn, dt=jnp.float32)
        else:
            y, _ = moe.moe_ffn(m, x, idx, w, g, u, dn, dt=jnp.float32)
        return jnp.sum(jnp.sin(y))

    ga = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=5)(x, logits, g, u, dn, True)
    gb = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, logits, g, u, dn, False)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bias_update_moves_load_toward_balance():
    m = MoEConfig(num_experts=E, num_experts_per_tok=K, scoring="sigmoid", router_bias=True)
    _, logits = _tokens(512, seed=5, skew=2.0)
    bias = jnp.zeros((1, E))
    imbalance = []
    for _ in range(60):
        _, idx, _ = moe.route(m, logits, bias[0])
        load = moe.expert_load(idx, E)[None]
        imbalance.append(float(jnp.max(load) / jnp.mean(load)))
        bias = moe.update_router_bias(bias, load, gamma=0.02)
    assert imbalance[0] > 2.0
    assert imbalance[-1] < 1.3 and imbalance[-1] < imbalance[0] / 2
    assert float(bias[0, 0]) < 0  # the overloaded expert is pushed down


def test_sequence_balance_loss_matches_transcription():
    r = np.random.RandomState(6)
    b, t = 3, 7
    s = r.rand(b, t, E).astype(np.float32)
    idx = np.stack([[r.choice(E, K, replace=False) for _ in range(t)] for _ in range(b)])
    valid = r.rand(b, t) > 0.2
    got = float(moe.sequence_balance_loss(jnp.asarray(s), jnp.asarray(idx), jnp.asarray(valid), E, K))
    total = 0.0
    for i in range(b):
        tt = [j for j in range(t) if valid[i, j]]
        f = [E / (K * len(tt)) * sum(e in idx[i, j] for j in tt) for e in range(E)]
        p = [np.mean([s[i, j, e] / s[i, j].sum() for j in tt]) for e in range(E)]
        total += sum(fi * pi for fi, pi in zip(f, p))
    np.testing.assert_allclose(got, total / b, rtol=1e-5)


def test_bad_config_is_one_line():
    from r1jax.config import ModelConfig

    cfg = ModelConfig(moe=MoEConfig(num_experts=8, n_group=3))
    with pytest.raises(ValueError, match="n_group 3 must divide num_experts 8"):
        moe.check_config(cfg)
    cfg = dataclasses.replace(cfg, moe=MoEConfig(num_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3))
    with pytest.raises(ValueError, match="cannot hold num_experts_per_tok 3"):
        moe.check_config(cfg)
    cfg = dataclasses.replace(cfg, moe=MoEConfig(num_experts=8, routing_replay="sampler"))
    with pytest.raises(ValueError, match="routing_replay 'sampler' is not one of none, rollout"):
        moe.check_config(cfg)


def test_forced_rows_with_unrecorded_tokens_fall_back_to_the_router():
    m = MoEConfig(num_experts=8, num_experts_per_tok=2, scoring="softmax")
    logits = jnp.asarray(np.random.RandomState(2).normal(size=(3, 8)).astype(np.float32))
    _, free, _ = moe.route(m, logits)
    forced = jnp.asarray([[6, 7], [-1, -1], [0, 3]], jnp.int32)
    _, idx, _ = moe.route(m, logits, None, forced)
    np.testing.assert_array_equal(np.asarray(idx), [[6, 7], np.asarray(free)[1], [0, 3]])
    for e in (8, 300):
        r = jnp.asarray([[1, e - 1], [-1, -1]], jnp.int32)  # the largest id and a never-routed token
        c = moe.compact_routes(r, e)
        assert c.dtype == (jnp.uint8 if e <= 255 else jnp.int16)
        np.testing.assert_array_equal(np.asarray(moe.expand_routes(c)), np.asarray(r))


def test_routing_replay_reproduces_recorded_experts():
    """Record routes, perturb the router so its choices change: without replay the experts
    differ; with replay they are the recorded ones exactly (the gate weights come from the
    perturbed router); replaying a model's own routes changes nothing."""
    from flax import nnx
    from helpers_moe import random_model

    from r1jax.config import load_config

    cfg = dataclasses.replace(load_config("configs/model/deepseek-v3-tiny.yaml").model, num_mtp_layers=0,
                              num_layers=2)
    model = random_model(cfg, seed=4)
    toks = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)))

    @jax.jit
    def run(m, routes):
        h, _, aux = m.hidden_and_aux(toks, routes_LxBxTxK=routes)
        return h, aux["routes"]

    h0, recorded = run(model, None)
    h_self, again = run(model, recorded)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(recorded))
    np.testing.assert_allclose(np.asarray(h_self), np.asarray(h0), atol=1e-6)
    state = nnx.state(model, nnx.Param)
    r = np.random.RandomState(1)
    state["moe"]["router"].set_value(state["moe"]["router"].get_value()
                                     + jnp.asarray(r.normal(0, 0.5, state["moe"]["router"].shape), jnp.float32))
    nnx.update(model, state)
    h_free, free = run(model, None)
    h_replay, replayed = run(model, recorded)
    assert float(moe.routing_disagreement(free, recorded)) > 0.1
    np.testing.assert_array_equal(np.asarray(replayed), np.asarray(recorded))
    assert float(moe.routing_disagreement(replayed, recorded)) == 0.0
    assert not np.allclose(np.asarray(h_free), np.asarray(h_replay))
