import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax.config import ModelConfig
from r1jax.logprobs import completion_logprobs, token_logprobs
from r1jax.models import create


def test_chunked_logprobs_and_grads_equal_full_softmax():
    rng = np.random.RandomState(0)
    h = jnp.asarray(rng.randn(3, 13, 8), jnp.float32)
    w = jnp.asarray(rng.randn(8, 50), jnp.float32)
    y = jnp.asarray(rng.randint(0, 50, (3, 13)))

    def full(h, w, temp):
        logp = jax.nn.log_softmax(h @ w / temp, axis=-1)
        picked = jnp.take_along_axis(logp, y[..., None], -1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp) * logp, -1)
        return picked, ent

    for temp in (1.0, 0.7):
        ref_lp, ref_ent = full(h, w, temp)
        lp, ent = token_logprobs(h, w, y, temperature=temp, chunk_len=4)  # 13 is not a multiple of 4
        np.testing.assert_allclose(np.asarray(lp), np.asarray(ref_lp), atol=1e-5)
        np.testing.assert_allclose(np.asarray(ent), np.asarray(ref_ent), atol=1e-5, rtol=1e-5)
    g_ref = jax.grad(lambda h, w: full(h, w, 1.0)[0].sum(), argnums=(0, 1))(h, w)
    g = jax.grad(lambda h, w: token_logprobs(h, w, y, chunk_len=4)[0].sum(), argnums=(0, 1))(h, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_logprob_gradient_is_elementwise_and_copies_no_logits():
    """The backward pass of a chunk: no scatter (take_along_axis's gradient) and no transposed
    [V, rows] copy of the logits gradient (what the 3-D einsum's two contracting axes cost on
    XLA:CPU): both made the tiny GRPO update's log-prob backward 4x slower."""
    h = jnp.ones((4, 6, 8), jnp.float32)
    e = jnp.ones((50, 8), jnp.float32)  # a tied embedding: the unembedding is its transpose
    y = jnp.zeros((4, 6), jnp.int32)

    def loss(h, e):
        lp, ent = token_logprobs(h, e.T, y)
        return lp.sum() + ent.sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, e).compile().as_text()
    assert "scatter" not in hlo
    assert "f32[50,24]" not in hlo


def test_completion_logprobs_match_full_forward():
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    model = create(cfg, seed=0)
    rng = np.random.RandomState(1)
    prompt = jnp.asarray(rng.randint(0, 40, (2, 5)))
    pmask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    comp = jnp.asarray(rng.randint(0, 40, (2, 4)))
    lp, _ = completion_logprobs(model, prompt, pmask, comp, temperature=0.9)
    # The reference forward jitted (op by op, the model takes half a minute of dispatches).
    full_logp = nnx.jit(lambda m, seq: jax.nn.log_softmax(m(seq)[0] / 0.9, -1))
    for row, start in ((0, 2), (1, 0)):
        seq = jnp.concatenate([prompt[row, start:], comp[row]])[None]
        logp = np.asarray(full_logp(model, seq))
        n = seq.shape[1] - 4
        ref = [logp[n - 1 + i, int(comp[row, i])] for i in range(4)]
        np.testing.assert_allclose(np.asarray(lp[row]), ref, atol=1e-5)


def test_unembedding_gradient_reduces_once_inside_nodes_then_one_shard_across(devices):
    # 4 emulated nodes of 2 (ici fsdp=2, dcn data=4), 4 chunks: the unembedding's gradient must
    # not be all-reduced whole over all 8 devices at every chunk (the partitioner's plan for a
    # weight gathered before the loop), but summed per device over the loop, reduce-scattered
    # over fsdp inside the node and one shard all-reduced over data, once.
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from r1jax import aot
    from r1jax import mesh as mesh_lib
    from r1jax.config import MeshConfig

    cfg = MeshConfig(ici={"fsdp": 2}, dcn={"data": 4})
    mesh = mesh_lib.make_mesh(cfg, devices)
    rules = mesh_lib.train_rules(cfg)
    V, D, B, T = 64, 32, 16, 8
    rng = np.random.RandomState(0)
    w = jax.device_put(rng.randn(D, V).astype(np.float32),
                       mesh_lib.named_sharding(mesh, ("embed", "vocab"), rules, (D, V)))
    h = jax.device_put(rng.randn(B, T, D).astype(np.float32), NamedSharding(mesh, P(("data", "fsdp"))))
    y = jax.device_put(rng.randint(0, V, (B, T)), NamedSharding(mesh, P(("data", "fsdp"))))

    def loss(w, h, y, sharded):
        if not sharded:
            lp, ent = token_logprobs(h, w, y, chunk_len=2)
            return lp.sum() + 0.1 * ent.sum()
        with mesh_lib.layout(mesh, rules):
            lp, ent = token_logprobs(h, w, y, chunk_len=2)
        return lp.sum() + 0.1 * ent.sum()

    g = jax.jit(jax.grad(loss), static_argnums=3, out_shardings=w.sharding)
    ref = jax.grad(loss)(np.asarray(w), np.asarray(h), np.asarray(y), False)
    np.testing.assert_allclose(np.asarray(g(w, h, y, True)), np.asarray(ref), rtol=1e-4, atol=1e-5)
    node = aot._partition_to_node(mesh, list(devices), 2)
    c = aot.collectives_from_hlo(g.lower(w, h, y, True).compile().as_text(), node)
    shard = V * D * 4 / 2
    assert c["total"]["dcn_bytes"] == pytest.approx(2 * 3 / 4 * shard)  # one shard over data=4, once
    assert c["reduce-scatter"]["ici_bytes"] == pytest.approx(shard)  # (2 - 1) / 2 of the whole, fsdp=2
