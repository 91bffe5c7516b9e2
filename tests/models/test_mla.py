"""Multi-head Latent Attention: YaRN tables against transformers, DeepSeek's interleaved rope
against a complex-number transcription, cached token-by-token decode through the attention hook
equal to the full forward, the shipped MoE configs' parameter counts, and the decoder sharded
with experts over 4 devices equal to unsharded."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from helpers_moe import random_model

from r1jax import mesh as mesh_lib
from r1jax.config import MeshConfig, RopeScalingConfig, load_config
from r1jax.models import build, mla, moe_decoder

TINY = load_config("configs/model/deepseek-v3-tiny.yaml").model


@pytest.mark.parametrize("rope", [
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 1.0,
     "beta_fast": 16, "beta_slow": 2},
    {"factor": 8.0, "original_max_position_embeddings": 128, "truncate": False},
])
def test_yarn_tables_match_transformers(rope):
    hf = transformers.DeepseekV3Config(qk_rope_head_dim=64, rope_scaling={"rope_type": "yarn", **rope},
                                       max_position_embeddings=rope["original_max_position_embeddings"] * 4)
    inv_ref, factor_ref = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](hf)
    rs = RopeScalingConfig(rope_type="yarn", **rope)
    cfg = dataclasses.replace(TINY, rope_scaling=rs)
    inv, factor = mla.rope_tables(cfg, 64)
    np.testing.assert_allclose(np.asarray(inv), inv_ref.numpy(), rtol=1e-6)
    assert math.isclose(factor, factor_ref, rel_tol=1e-9)


def test_interleaved_rope_matches_complex_rotation():
    """DeepSeek's reference rotates consecutive pairs as complex numbers x_{2j} + i x_{2j+1}."""
    r = np.random.RandomState(0)
    x = r.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = np.tile(np.arange(5), (2, 1))
    inv = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[..., None, None] * inv)
    got = np.asarray(mla.apply_rope(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(inv, jnp.float32), 1.0, True))
    # Output pairs come de-interleaved: real parts, then imaginary parts.
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-5)


def _cached_attn(mask_fn):
    """A minimal KV-cache attention hook: write this step's k/v at `pos`, attend to <= pos."""

    def attn_fn(q, k, v, layer_cache):
        kc, vc, pos = layer_cache
        kc = jax.lax.dynamic_update_slice_in_dim(kc, k, pos, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(vc, v, pos, axis=1)
        s = jnp.arange(kc.shape[1])
        mask = (s[None, :] <= pos + jnp.arange(q.shape[1])[:, None])[None, None]
        return jax.nn.dot_product_attention(q, kc, vc, mask=mask), (kc, vc, pos)

    return attn_fn


@pytest.mark.parametrize("family,latent", [("deepseek-v3-tiny", False), ("deepseek-v3-tiny", True),
                                           ("qwen3-moe-tiny", False)])
def test_cached_decode_equals_full_forward(family, latent):
    """Token-by-token decode through the attention hook with a cache equals the full forward;
    with MLA's latent the cache holds one kv_lora_rank + qk_rope_head_dim row per token."""
    cfg = dataclasses.replace(load_config(f"configs/model/{family}.yaml").model, num_mtp_layers=0, num_layers=2)
    model = random_model(cfg, seed=1)
    t, b = 9, 2
    toks = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (b, t)))
    full = jax.jit(lambda m, x: m(x))(model, toks)
    if latent:
        n, w = 1, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
        assert w * 4 == mla.kv_cache_bytes_per_token(cfg, 4)[0]
    elif cfg.mla is not None:  # the hook sees per-head keys padded to one width
        n, w = cfg.num_heads, max(cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim)
    else:
        n, w = cfg.num_kv_heads, cfg.head_dim
    L = cfg.num_layers
    cache = (jnp.zeros((L, b, t, n, w)), jnp.zeros((L, b, t, n, w)), jnp.zeros((L,), jnp.int32))

    @jax.jit
    def step(m, tok, pos, cache):
        cache = (cache[0], cache[1], jnp.full((L,), pos, jnp.int32))
        h, cache = m.hidden(tok, positions_BxT=jnp.full(tok.shape, pos), cache=cache,
                            attn_fn=_cached_attn(None), mla_latent=latent)
        return h @ m.unembed_matrix(), cache

    outs = []
    for i in range(t):
        logits, cache = step(model, toks[:, i:i + 1], i, cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=2e-5)


def test_latent_cache_is_smaller():
    cfg = load_config("configs/model/deepseek-v3-671b.yaml").model
    latent, full = mla.kv_cache_bytes_per_token(cfg, 2)
    assert latent == (512 + 64) * 2 and full == 128 * (128 + 64 + 128) * 2


@pytest.mark.parametrize("name,total,active", [
    ("deepseek-v3-671b", 671.0e9, 37.5e9),  # V3 report: 671B total, 37B activated
    ("qwen3-30b-a3b", 30.5e9, 3.35e9),  # Qwen3 report: 30.5B total, 3.3B activated
])
def test_real_shapes_parameter_counts(name, total, active):
    cfg = dataclasses.replace(load_config(f"configs/model/{name}.yaml").model, num_mtp_layers=0)
    n = moe_decoder.num_params(cfg)
    assert n == build.num_params(cfg)  # the formula equals the abstract model's shapes
    assert abs(n - total) / total < 0.005
    assert abs(moe_decoder.active_params(cfg) - active) / active < 0.02


@pytest.mark.slow
def test_expert_parallel_decoder_equals_unsharded(devices):
    """A dense + an MoE layer of the tiny V3 with experts over 2 x 2 devices (two mesh axes,
    so the all-to-all spans both): logits and gradients equal the single-device model's (no
    drops at capacity_factor 0)."""
    ici = {"fsdp": 2, "tensor": 2}
    cfg = dataclasses.replace(TINY, num_mtp_layers=0, num_layers=2)
    model = random_model(cfg, seed=2)
    toks = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (4, 8)))

    def loss(m, x):
        logits = m(x)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    grad_fn = jax.grad(loss, has_aux=True)
    ref_grad, ref_logits = jax.jit(grad_fn)(model, toks)
    mesh = mesh_lib.make_mesh(MeshConfig(ici=ici), devices[:4])
    rules = mesh_lib.resolve_rules(mesh_lib.TRAIN_RULES, {"expert": list(ici), "batch": list(ici)})
    from flax import nnx

    graphdef, params = nnx.split(model)
    shardings = mesh_lib.params_shardings(nnx.state(model), mesh, rules)
    sharded = nnx.merge(graphdef, jax.device_put(nnx.to_pure_dict(params), shardings))
    assert sharded.moe.gate.get_value().sharding.spec[1] == ("fsdp", "tensor")

    def under(f):
        def g(m, x):
            with mesh_lib.layout(mesh, rules):
                return f(m, x)
        return jax.jit(g)

    got_grad, got_logits = under(grad_fn)(sharded, toks)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(ref_logits), atol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(got_grad)), jax.tree.leaves(nnx.state(ref_grad))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.slow
def test_sampler_logprobs_equal_full_forward():
    """The rollout engine on DeepSeek-V3 (MLA decoding through its latent cache, MoE layers):
    the sampled tokens' log-probs equal a full forward's (expanded keys and values, no cache).
    Qwen3-MoE's decode differs from it only by the dense GQA attention the sampler tests cover."""
    family = "deepseek-v3-tiny"
    from r1jax.logprobs import completion_logprobs
    from r1jax.sampler import sample

    cfg = dataclasses.replace(load_config(f"configs/model/{family}.yaml").model, num_mtp_layers=0, num_layers=2)
    model = random_model(cfg, seed=3)
    prompts = [[5, 7, 9], [1, 2, 3, 4, 5, 6, 7], [30]]
    out = sample(model, prompts, key=jax.random.key(0), num_samples=2, max_new_tokens=6, temperature=1.0,
                 stop_at_eos=False)
    pt, pm = out.row_prompts()
    ref, _ = completion_logprobs(model, pt, pm, out.tokens, temperature=1.0)
    mask = np.asarray(out.mask)
    assert mask.all()
    np.testing.assert_allclose(np.asarray(out.logp_policy) * mask, np.asarray(ref) * mask, atol=2e-5)
    assert out.routes is None and out.prompt_routes is None  # routing replay off: nothing recorded
