"""Parity with `transformers` on random-weight tiny checkpoints made in the test."""

import json
import os
import re

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


# ---------------------------------------------------------------------------------------------
# Damaged and wrong-kind files: every file the loader reads, each way it can be broken, one
# line naming the file and what is wrong.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_dir(checkpoints, tmp_path_factory):
    """The untied Qwen2 checkpoint re-exported as several shards with an index."""
    _, path = checkpoints["qwen2_gqa2_untied"]
    out = str(tmp_path_factory.mktemp("sharded") / "ckpt")
    save_pretrained(from_pretrained(path), None, out, max_shard_bytes=20_000)
    return out


def _first_shard(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0]


def _truncate(p):
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])


def _garble_head(p):
    data = bytearray(open(p, "rb").read())
    data[8:40] = b"\xff\xfe" * 16  # a safetensors file's JSON header starts at byte 8
    open(p, "wb").write(bytes(data))


def _empty(p):
    open(p, "wb").close()


def _with_other(src_name):
    def fn(p):
        import shutil

        shutil.copy(os.path.join(os.path.dirname(p), src_name), p)
    return fn


def _json_edit(fn):
    def edit(p):
        data = json.load(open(p))
        fn(data)
        json.dump(data, open(p, "w"))
    return edit


def _drop_shard(p):
    os.remove(p)


def _int_tensor(p):
    from safetensors.numpy import load_file, save_file

    t = load_file(p)
    name = sorted(t)[0]
    t[name] = t[name].astype(np.int32)
    save_file(t, p)


# (file to damage: "config" | "index" | "shard", damage, regex the message must match after the path)
DAMAGE = {
    "config_truncated": ("config", _truncate, "not valid JSON .*truncated"),
    "config_garbled": ("config", _garble_head, "not JSON text"),
    "config_empty": ("config", _empty, "empty file"),
    "config_is_safetensors": ("config", _with_other("SHARD"), "not JSON text|not valid JSON"),
    "config_is_a_list": ("config", lambda p: open(p, "w").write("[1, 2]"), "expected a JSON object.*list"),
    "config_missing_key": ("config", _json_edit(lambda d: d.pop("hidden_size")), "missing required key 'hidden_size'"),
    "config_wrong_type": ("config", _json_edit(lambda d: d.update(num_hidden_layers="two")),
                          "'num_hidden_layers' must be a positive integer, got 'two'"),
    "config_arch": ("config", _json_edit(lambda d: d.update(architectures=["GPT2LMHeadModel"])),
                    "unsupported architecture.*GPT2LMHeadModel.*supported: .*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"),
    "index_truncated": ("index", _truncate, "not valid JSON"),
    "index_garbled": ("index", _garble_head, "not JSON text"),
    "index_empty": ("index", _empty, "empty file"),
    "index_is_config": ("index", _with_other("config.json"), "no 'weight_map' object"),
    "index_names_missing_shard": ("index", _json_edit(lambda d: d["weight_map"].update(
        {"model.norm.weight": "model-00099-of-00099.safetensors"})), "missing \\(shard named by .*index.json\\)"),
    "index_misplaces_tensor": ("index", _json_edit(lambda d: d["weight_map"].update(
        {"lm_head.weight": sorted(set(d["weight_map"].values()))[-1]
         if d["weight_map"]["lm_head.weight"] != sorted(set(d["weight_map"].values()))[-1]
         else sorted(set(d["weight_map"].values()))[0]})), "lacks tensor 'lm_head.weight' that .*index.json places there"),
    "shard_truncated": ("shard", _truncate, "truncated"),
    "shard_garbled": ("shard", _garble_head, "garbled header"),
    "shard_empty": ("shard", _empty, "empty file"),
    "shard_is_json": ("shard", _with_other("config.json"), "not a safetensors file"),
    "shard_deleted": ("shard", _drop_shard, "missing \\(shard named by"),
    "shard_int_tensor": ("shard", _int_tensor, "has dtype I32, expected a float type"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_files_are_named_in_one_line(sharded_dir, tmp_path, case):
    import shutil

    kind, damage, pattern = DAMAGE[case]
    d = str(tmp_path / "ckpt")
    shutil.copytree(sharded_dir, d)
    shard = _first_shard(d)
    target = {"config": "config.json", "index": "model.safetensors.index.json", "shard": shard}[kind]
    if damage.__name__ == "fn":  # _with_other: "SHARD" stands for a real shard of this checkpoint
        damage = _with_other(shard) if kind == "config" else damage
    target_path = os.path.join(d, target)
    damage(target_path)
    with pytest.raises((HFFormatError, FileNotFoundError)) as info:
        from_pretrained(d)
    msg = str(info.value)
    assert "\n" not in msg
    # A path of this checkpoint leads; the damaged file is named (a shard the index misnames
    # leads with the shard, the index in the text).
    assert msg.startswith(d) and target_path in msg, msg
    assert re.search(pattern, msg.split(": ", 1)[1]), msg


def test_directory_without_safetensors_says_what_it_found(checkpoints, tmp_path):
    _, path = checkpoints["qwen2_gqa2_untied"]
    d = tmp_path / "bin_only"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match=r"bin_only: no \*.safetensors files \(found pytorch_model.bin"):
        from_pretrained(str(d))
    with pytest.raises(FileNotFoundError, match="config.json.*not a Hugging Face model directory|not a Hugging Face"):
        from_pretrained(os.path.join(path, "config.json"))
