"""Qwen3 (per-head q/k RMSNorm before RoPE, explicit head_dim): logits parity with
`transformers` on tiny random checkpoints, export round trip, and the real 8B shapes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from r1jax import mesh as mesh_lib  # noqa: E402
from r1jax.config import MeshConfig, load_config  # noqa: E402
from r1jax.models import from_pretrained, hf, num_params, save_pretrained  # noqa: E402

VOCAB = 96
# head_dim differs from hidden/heads on purpose (Qwen3-0.6B has 1024 / 16 heads but head_dim 128).
CASES = {
    "gqa2_untied_headdim": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                tie_word_embeddings=False, rope_theta=1e6),
    "mqa_tied": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                     tie_word_embeddings=True, rms_norm_eps=1e-5),
    "mha_bias_untied": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, head_dim=24,
                            attention_bias=True, tie_word_embeddings=False),
    # Qwen3's long-context recipe: YaRN over the pre-training length (scaled frequencies and
    # the attention factor on cos/sin)
    "gqa4_yarn": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                      tie_word_embeddings=False, rope_theta=1e4,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 32}),
}


def _make(kw, path, seed=0):
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, max_position_embeddings=128, **kw))
    with torch.no_grad():  # larger than the default init (norm weights too) so differences show
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.15)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {name: (_make(kw, str(root / name)), str(root / name)) for name, kw in CASES.items()}


def _tokens(b=3, t=11, seed=1):
    return np.random.RandomState(seed).randint(0, VOCAB, (b, t))


def _logits(model, toks, mask=None):
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    with torch.no_grad():
        return model(torch.tensor(toks), **kw).logits.numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(checkpoints, name):
    hf_model, path = checkpoints[name]
    ours = from_pretrained(path)
    assert ours.cfg.architecture == "qwen3" and ours.cfg.qk_norm
    assert ours.cfg.qkv_bias == ours.cfg.o_bias == bool(CASES[name].get("attention_bias", False))
    assert (ours.cfg.rope_scaling is not None) == ("rope_scaling" in CASES[name])
    toks = _tokens()
    assert np.abs(_logits(hf_model, toks) - np.asarray(ours(jnp.asarray(toks)))).max() <= 1e-4


def test_left_padded_logits_match(checkpoints):
    hf_model, path = checkpoints["gqa2_untied_headdim"]
    ours = from_pretrained(path)
    toks = _tokens()
    mask = np.ones_like(toks)
    mask[0, :4] = 0
    got = np.asarray(ours(jnp.asarray(toks), segment_ids_BxT=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(_logits(hf_model, toks, mask)[real] - got[real]).max() <= 1e-4


def test_q_k_norm_matters(checkpoints):
    """The parity above is not satisfied by a model that skips the q/k norms."""
    hf_model, path = checkpoints["mqa_tied"]
    ours = from_pretrained(path)
    toks = jnp.asarray(_tokens())
    ref = np.asarray(ours(toks))
    state = ours.layers.attn.q_norm.scale
    state.set_value(jnp.ones_like(state.get_value()))
    assert np.abs(np.asarray(ours(toks)) - ref).max() > 1e-2


@pytest.mark.parametrize("name", ["mqa_tied", "mha_bias_untied", "gqa4_yarn"])
def test_export_round_trip(checkpoints, name, tmp_path):
    hf_model, path = checkpoints[name]
    ours = from_pretrained(path)
    out = save_pretrained(ours, None, str(tmp_path / "export"), max_shard_bytes=30_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back).__name__ == "Qwen3ForCausalLM"
    toks = _tokens()
    ref = _logits(hf_model, toks)
    np.testing.assert_allclose(_logits(back, toks), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(from_pretrained(out)(jnp.asarray(toks))), ref, atol=1e-4)


def test_sharded_load_equals_unsharded(checkpoints, devices):
    _, path = checkpoints["gqa2_untied_headdim"]
    toks = jnp.asarray(_tokens(b=8))
    ref = np.asarray(from_pretrained(path)(toks))
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 4, "tensor": 2}))
    sharded = from_pretrained(path, mesh=m)
    with mesh_lib.layout(m, mesh_lib.TRAIN_RULES):
        got = np.asarray(jax.jit(lambda mdl, t: mdl(t))(sharded, toks))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_qwen3_8b_config_has_the_real_shapes():
    """configs/model/qwen3-8b.yaml, counted by transformers on the meta device (no memory)."""
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model",
                                   "qwen3-8b.yaml")).model
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in hf.dense_config_to_hf(cfg, "bfloat16").items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("meta"):
        ref = sum(p.numel() for p in transformers.Qwen3ForCausalLM(hf_cfg).parameters())
    assert num_params(cfg) == ref
    assert 8.1e9 < ref < 8.3e9  # "Qwen3-8B: 8.2B parameters"


def test_kv_cache_greedy_decode_matches_transformers_generate(checkpoints):
    """The sampler's cached decode runs the q/k norms too (prompts of different lengths, so
    left padding and per-row positions are exercised)."""
    from r1jax import sampler

    hf_model, path = checkpoints["gqa2_untied_headdim"]
    prompts = [[5, 17, 3, 60, 2], [9, 41]]
    out = sampler.sample(from_pretrained(path), prompts, key=jax.random.key(0), max_new_tokens=6,
                         temperature=0.0, stop_at_eos=False)
    for r, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
        assert np.asarray(out.tokens)[r].tolist() == ref[0, len(p):].tolist(), r
