import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax import mesh as mesh_lib
from r1jax.config import MeshConfig, ModelConfig
from r1jax.models import create

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=3,
                  num_heads=4, num_kv_heads=2, qkv_bias=True)


def _toks(b=8, t=10, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 64, (b, t)))


# Forwards and gradients jitted: run op by op, one model call dispatches (and, in a fresh
# process, compiles) hundreds of small programs, most of these tests' time on 2 cores.
_fwd = nnx.jit(lambda model, *args, **kw: model(*args, **kw))


@functools.lru_cache(maxsize=None)
def _unsharded_logits(seed):
    return np.asarray(_fwd(create(CFG, seed=seed), _toks()))


@pytest.mark.parametrize("mesh_kw", [
    dict(ici={"fsdp": 8}),
    dict(ici={"fsdp": 4, "tensor": 2}),
    dict(ici={"data": 2, "tensor": 4}),
    dict(ici={"fsdp": 2, "tensor": 2}, dcn={"data": 2}),
])
def test_sharded_forward_equals_unsharded(devices, mesh_kw):
    ref = _unsharded_logits(3)
    m = mesh_lib.make_mesh(MeshConfig(**mesh_kw))
    model = create(CFG, mesh=m, seed=3)
    with mesh_lib.layout(m, mesh_lib.TRAIN_RULES):
        got = jax.jit(lambda mdl, t: mdl(t))(model, _toks())
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


def test_scan_and_unrolled_layers_agree_and_remat_grads_match():
    toks = _toks(4, 9)
    scan = create(dataclasses.replace(CFG, scan_layers=True), seed=1)
    unrolled = create(dataclasses.replace(CFG, scan_layers=False), seed=1)
    np.testing.assert_allclose(np.asarray(_fwd(scan, toks)), np.asarray(_fwd(unrolled, toks)), atol=1e-5)

    def loss(model):
        return jnp.mean(model(toks) ** 2)

    grad = nnx.jit(nnx.grad(loss))
    g1 = grad(scan)
    g2 = grad(create(dataclasses.replace(CFG, remat="full"), seed=1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_left_padding_and_packing():
    model = create(CFG, seed=2)
    a, b = _toks(1, 6, 1), _toks(1, 4, 2)
    padded = jnp.concatenate([jnp.zeros((1, 2), jnp.int32), b], axis=1)
    seg = jnp.asarray([[0, 0, 1, 1, 1, 1]])
    got = _fwd(model, padded, segment_ids_BxT=seg)
    np.testing.assert_allclose(np.asarray(got[0, 2:]), np.asarray(_fwd(model, b)[0]), atol=1e-5)
    # Two sequences packed in one row (segments 1 and 2, positions restarting) equal separate runs.
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.asarray([[1] * 6 + [2] * 4])
    pos = jnp.asarray([list(range(6)) + list(range(4))])
    out = _fwd(model, packed, segment_ids_BxT=seg, positions_BxT=pos)
    np.testing.assert_allclose(np.asarray(out[0, :6]), np.asarray(_fwd(model, a)[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[0, 6:]), np.asarray(_fwd(model, b)[0]), atol=1e-5)


def test_bf16_compute_close_to_fp32():
    toks = _toks(2, 8)
    f32 = _fwd(create(CFG, seed=4), toks)
    bf16 = _fwd(create(dataclasses.replace(CFG, dtype="bfloat16"), seed=4), toks)
    assert bf16.dtype == jnp.float32  # logits are always float32
    assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.05


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        create(dataclasses.replace(CFG, num_kv_heads=3))


@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_is_the_einsum_and_its_weight_gradient_needs_no_transposed_copy(n_in):
    from r1jax.models.transformer import dense

    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(4, 6, 2, 8), jnp.float32)  # [B, T, *in]: n_in=1 -> in = (8,)
    w = jnp.asarray(rs.randn(*((2, 8) if n_in == 2 else (8,)), 16), jnp.float32)
    spec = "btnh,nhf->btf" if n_in == 2 else "btnh,hf->btnf"
    np.testing.assert_allclose(dense(x, w, n_in), jnp.einsum(spec, x, w), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

    got = jax.grad(loss(lambda x, w: dense(x, w, n_in)), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: jnp.einsum(spec, x, w)), argnums=(0, 1))(x, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    # The point of dense: the weight gradient is one matmul of the [rows, out] activation
    # gradient as it is, never a transposed [out, rows] copy of it (XLA:CPU made one for the
    # einsum's two contracting axes).
    rows = 4 * 6 * (1 if n_in == 2 else 2)
    hlo = jax.jit(jax.grad(loss(lambda x, w: dense(x, w, n_in)), argnums=1)).lower(x, w).compile().as_text()
    assert f"f32[16,{rows}]" not in hlo
