"""Parity with `transformers` on random-weight tiny checkpoints made in the test."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from r1jax import mesh as mesh_lib  # noqa: E402
from r1jax.config import MeshConfig  # noqa: E402
from r1jax.models import from_pretrained, save_pretrained  # noqa: E402
from r1jax.models.hf import HFFormatError  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# Varied on purpose: tied/untied, GQA ratios 1/2/4/MHA, bias, explicit head_dim, rope scaling.
CASES = {
    "qwen2_gqa2_untied": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_mqa_tied": ("qwen2", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=True,
                                      rope_theta=1e6)),
    "llama_gqa4_scaled": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5,
                                         rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama_mha_bias_headdim_tied": ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                                   attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-5)),
}


def _make_hf(kind, kw, path, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=96, max_position_embeddings=128)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, **kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **kw))
    with torch.no_grad():  # larger than the default init so that differences would show
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: (_make_hf(kind, kw, str(root / name)), str(root / name)) for name, (kind, kw) in CASES.items()}


def _tokens(b=3, t=11, seed=1):
    return np.random.RandomState(seed).randint(0, 96, (b, t))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(checkpoints, name):
    hf_model, path = checkpoints[name]
    ours = from_pretrained(path)
    toks = _tokens()
    ref = hf_model(torch.tensor(toks)).logits.detach().numpy()
    got = np.asarray(ours(jnp.asarray(toks)))
    assert np.abs(ref - got).max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2_gqa2_untied", "llama_gqa4_scaled"])
def test_left_padded_logits_match(checkpoints, name):
    hf_model, path = checkpoints[name]
    ours = from_pretrained(path)
    toks = _tokens()
    mask = np.ones_like(toks)
    mask[0, :5] = 0
    mask[2, :2] = 0
    ref = hf_model(torch.tensor(toks), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    got = np.asarray(ours(jnp.asarray(toks), segment_ids_BxT=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(ref[real] - got[real]).max() <= 1e-4
    # The same prompt unpadded gives the same logits as its left-padded row.
    alone = np.asarray(ours(jnp.asarray(toks[:1, 5:])))
    assert np.abs(alone[0] - got[0, 5:]).max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2_mqa_tied", "llama_mha_bias_headdim_tied", "qwen2_gqa2_untied"])
def test_export_round_trip(checkpoints, name, tmp_path):
    hf_model, path = checkpoints[name]
    ours = from_pretrained(path)
    out = save_pretrained(ours, None, str(tmp_path / "export"), max_shard_bytes=20_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))  # several shards
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    toks = _tokens()
    ref = hf_model(torch.tensor(toks)).logits.detach().numpy()
    np.testing.assert_allclose(back(torch.tensor(toks)).logits.detach().numpy(), ref, atol=1e-5)
    # and r1jax reads its own export (sharded index) back
    again = from_pretrained(out)
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(toks))), ref, atol=1e-4)


def test_sharded_load_equals_unsharded(checkpoints, devices):
    _, path = checkpoints["llama_gqa4_scaled"]
    toks = jnp.asarray(_tokens(b=8))
    ref = np.asarray(from_pretrained(path)(toks))
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 4, "tensor": 2}))
    sharded = from_pretrained(path, mesh=m)
    from flax import nnx

    q = nnx.to_pure_dict(nnx.state(sharded, nnx.Param))["layers"]["attn"]["q"]
    assert q.addressable_shards[0].data.shape == (2, 16, 4, 8)  # [L, D/4, N/2, H]
    with mesh_lib.layout(m, mesh_lib.TRAIN_RULES):
        got = np.asarray(jax.jit(lambda mdl, t: mdl(t))(sharded, toks))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def _edit_checkpoint(src, dst, fn):
    from safetensors.numpy import load_file, save_file
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    fn(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_bad_checkpoints_name_the_culprit(checkpoints, tmp_path):
    _, path = checkpoints["qwen2_gqa2_untied"]
    bad = _edit_checkpoint(path, str(tmp_path / "missing"),
                           lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(HFFormatError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        from_pretrained(bad)
    bad = _edit_checkpoint(path, str(tmp_path / "extra"),
                           lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight", np.ones(16, np.float32)))
    with pytest.raises(HFFormatError, match="unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"):
        from_pretrained(bad)

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]

    bad = _edit_checkpoint(path, str(tmp_path / "shape"), shrink)
    with pytest.raises(HFFormatError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\), expected \(32, 64\)"):
        from_pretrained(bad)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    os.makedirs(tmp_path / "arch")
    json.dump(cfg, open(tmp_path / "arch" / "config.json", "w"))
    with pytest.raises(HFFormatError, match="unsupported architecture.*GPT2LMHeadModel.*Qwen2ForCausalLM"):
        from_pretrained(str(tmp_path / "arch"))
    with pytest.raises(FileNotFoundError, match="nowhere: not a Hugging Face model directory"):
        from_pretrained(str(tmp_path / "nowhere"))


def test_bf16_checkpoint_loads(tmp_path):
    model = _make_hf("qwen2", CASES["qwen2_gqa2_untied"][1], str(tmp_path / "f32"))
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    ours = from_pretrained(str(tmp_path / "bf16"), dtype="float32")
    assert ours.cfg.param_dtype == "bfloat16"
    toks = _tokens()
    ref = model.float()(torch.tensor(toks)).logits.detach().numpy()
    got = np.asarray(ours(jnp.asarray(toks)))
    assert np.abs(ref - got).max() < 0.1  # bf16 weights: same model up to bf16 rounding
