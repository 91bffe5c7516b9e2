"""r1jax.models.build (config resolution, abstract / sharded / HF builds), the family
registry, and the generic HF tensor mapping."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from r1jax import mesh as mesh_lib
from r1jax.config import MeshConfig, ModelConfig, load_config
from r1jax.layout_report import describe_mesh
from r1jax.models import build, hf, registry
from r1jax.tokenizer import load_tokenizer

CFG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2)


def _count(cfg: ModelConfig) -> int:
    """The dense transformer's parameter count, written out by hand."""
    d, f, n, k, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                        cfg.num_layers, cfg.vocab_size)
    h = cfg.head_dim or d // n
    per_layer = d * h * (n + 2 * k) + n * h * d + 3 * d * f + 2 * d
    per_layer += h * (n + 2 * k) * cfg.qkv_bias + d * cfg.o_bias + 2 * h * cfg.qk_norm
    return V * d * (1 if cfg.tie_embeddings else 2) + L * per_layer + d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small checkpoint written by r1jax itself (bfloat16 on disk, Qwen3 layout)."""
    cfg = dataclasses.replace(CFG, architecture="qwen3", qkv_bias=False, qk_norm=True,
                              head_dim=16, vocab_size=120, eos_token_id=7)
    out = str(tmp_path_factory.mktemp("build") / "qwen3")
    hf.save_pretrained(build.create(cfg, seed=5), None, out, dtype="bfloat16")
    return out


@pytest.mark.parametrize("change", [
    {}, dict(tie_embeddings=True, qkv_bias=False), dict(architecture="llama", qkv_bias=True, o_bias=True),
    dict(architecture="qwen3", qkv_bias=False, qk_norm=True, head_dim=24)])
def test_num_params_matches_the_formula(change):
    cfg = dataclasses.replace(CFG, **change)
    assert build.num_params(cfg) == _count(cfg)


def test_resolve_dataclass_sizes_vocab_to_the_tokenizer():
    tok = load_tokenizer(None)
    got = build.resolve_model_config(CFG, tok)
    assert got.vocab_size == max(CFG.vocab_size, tok.vocab_size) > CFG.vocab_size
    assert (got.eos_token_id, got.pad_token_id, got.bos_token_id) == (tok.eos_id, tok.pad_id, tok.bos_id)
    big = dataclasses.replace(CFG, vocab_size=4096, bos_token_id=3)
    got = build.resolve_model_config(big, tok)
    assert got.vocab_size == 4096 and got.bos_token_id == 3
    assert build.resolve_model_config(CFG) == CFG
    with pytest.raises(ValueError, match="model.architecture 'gpt2' is not supported; supported: .*llama.*qwen2.*qwen3"):
        build.resolve_model_config(dataclasses.replace(CFG, architecture="gpt2"))


def test_resolve_hf_dir_takes_its_shapes_and_the_runs_dtypes(hf_dir):
    run = dataclasses.replace(CFG, path=hf_dir, dtype="float32", param_dtype="float32",
                              remat="full", scan_layers=True)
    got = build.resolve_model_config(run)
    assert (got.architecture, got.vocab_size, got.head_dim, got.qk_norm, got.qkv_bias) == ("qwen3", 120, 16, True, False)
    assert (got.dtype, got.param_dtype, got.remat, got.scan_layers, got.path) == ("float32", "float32", "full", True, hf_dir)
    tok = load_tokenizer(None)
    with_tok = build.resolve_model_config(run, tok)
    assert with_tok.vocab_size == 120 and with_tok.eos_token_id == 7  # the checkpoint's own eos stays
    assert with_tok.pad_token_id == tok.pad_id
    small = dataclasses.replace(run, path=None, vocab_size=50)
    small_dir = os.path.join(os.path.dirname(hf_dir), "small_vocab")
    hf.save_pretrained(build.create(small), small, small_dir)
    with pytest.raises(ValueError, match="small_vocab: the tokenizer has 104 tokens but the checkpoint's embedding only 50"):
        build.resolve_model_config(dataclasses.replace(run, path=small_dir), tok)


def test_abstract_model_allocates_nothing_and_carries_the_rules(devices):
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model",
                                   "qwen3-8b.yaml")).model
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 4, "tensor": 2}))
    for rules, embed_axis in ((mesh_lib.TRAIN_RULES, "fsdp"), (mesh_lib.SAMPLE_RULES, None)):
        _, abstract = build.abstract_model(cfg, m, rules)
        leaves = jax.tree.leaves(abstract)
        assert all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves)
        assert abstract["layers"]["attn"]["q"].shape == (36, 4096, 32, 128)
        assert abstract["layers"]["attn"]["q"].sharding.spec == P(None, embed_axis, "tensor", None)
        assert abstract["layers"]["attn"]["q_norm"]["scale"].shape == (36, 128)
        assert abstract["layers"]["mlp"]["down"].sharding.spec == P(None, "tensor", embed_axis)
        assert build.shardings(abstract)["embed"] == abstract["embed"].sharding
    _, plain = build.abstract_model(cfg)
    assert all(getattr(a, "sharding", None) is None for a in jax.tree.leaves(plain))


def test_build_model_sharded_init_equals_unsharded(devices):
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 4, "tensor": 2}))
    _, ref = build.build_model(CFG, seed=3)
    graphdef, params = build.build_model(CFG, m, mesh_lib.TRAIN_RULES, seed=3)
    _, abstract = build.abstract_model(CFG, m, mesh_lib.TRAIN_RULES)
    flat, flat_ref, flat_abs = (traverse_util.flatten_dict(t) for t in (params, ref, abstract))
    assert set(flat) == set(flat_ref) == set(flat_abs)
    for k, a in flat.items():
        assert a.sharding == flat_abs[k].sharding, k
        # jit and eager round the 0.02 * normal scaling differently in the last bit
        np.testing.assert_allclose(np.asarray(a), np.asarray(flat_ref[k]), rtol=1e-6, atol=1e-8)
    assert flat[("layers", "mlp", "gate")].addressable_shards[0].data.shape == (2, 8, 24)
    _, other = build.build_model(CFG, seed=4)
    assert not np.allclose(np.asarray(other["embed"]), np.asarray(ref["embed"]))


def test_build_model_reads_hf_weights_into_shards(hf_dir, devices):
    cfg = build.resolve_model_config(dataclasses.replace(CFG, path=hf_dir))
    m = mesh_lib.make_mesh(MeshConfig(ici={"fsdp": 2, "tensor": 4}))
    _, params = build.build_model(cfg, m, mesh_lib.TRAIN_RULES)
    _, again = build.build_model(cfg)
    q = params["layers"]["attn"]["q"]
    assert q.dtype == np.float32 and q.addressable_shards[0].data.shape == (2, 16, 1, 16)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(again["layers"]["attn"]["q"]))
    # the weights are the saved model's (random init from seed 5, rounded to bfloat16 on disk)
    saved = build.build_model(dataclasses.replace(cfg, path=None), seed=5)[1]["layers"]["attn"]["q"]
    np.testing.assert_allclose(np.asarray(q), np.asarray(saved), rtol=1e-2, atol=1e-3)


def test_mesh_report_uses_the_checkpoints_shapes(hf_dir, devices):
    out = describe_mesh(load_config(None, [f"model.path={hf_dir}", "mesh.ici.fsdp=8"]))
    assert f"model: qwen3 from {hf_dir}" in out
    assert "embed                        (120, 32)" in out  # the checkpoint's vocabulary, not 256
    assert "layers/attn/q_norm/scale" in out


def test_registry_plugs_in_a_family_and_rejects_clashes(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))  # noqa: SLF001 - test isolation
    dense = registry.get("llama")

    def renamed_map(cfg):
        return {k: dataclasses.replace(t, template="r1jax_test." + t.template)
                for k, t in hf.dense_weight_map(cfg).items()}

    def to_hf(cfg, dtype):
        return {**hf.dense_config_to_hf(dataclasses.replace(cfg, architecture="llama"), dtype),
                "architectures": ["R1jaxTestForCausalLM"]}

    registry.register(registry.Family(
        name="r1jax_test", hf_architecture="R1jaxTestForCausalLM", model=dense.model,
        config_from_hf=lambda d: dataclasses.replace(hf.dense_config_from_hf(d, "llama"), architecture="r1jax_test"),
        config_to_hf=to_hf, weight_map=renamed_map))
    cfg = dataclasses.replace(CFG, architecture="r1jax_test", qkv_bias=False)
    model = build.create(cfg, seed=2)
    out = hf.save_pretrained(model, None, str(tmp_path / "t"))
    from safetensors import safe_open

    names = set(safe_open(os.path.join(out, "model.safetensors"), "numpy").keys())
    assert "r1jax_test.model.layers.1.mlp.up_proj.weight" in names
    back = build.from_pretrained(out)
    assert back.cfg.architecture == "r1jax_test"
    np.testing.assert_array_equal(np.asarray(back.layers.mlp.up.get_value()),
                                  np.asarray(model.layers.mlp.up.get_value()))
    with pytest.raises(ValueError, match="reuses HF architecture 'LlamaForCausalLM' of 'llama'"):
        registry.register(dataclasses.replace(dense, name="llama2"))
    with pytest.raises(ValueError, match="'qwen2' is already registered for 'Qwen2ForCausalLM'"):
        registry.register(dataclasses.replace(dense, name="qwen2", hf_architecture="Other"))


def test_hf_tensor_stacks_read_what_export_wrote():
    """Per-layer and per-(layer, expert) tensors: any block read equals the same block of the
    array that was exported, with the layer offset applied to the names."""
    rng = np.random.RandomState(0)
    for tm, shape in ((hf.HFTensor("l.{i}.w", "linear", ("i",)), (3, 4, 6)),
                      (hf.HFTensor("l.{i}.e.{e}.w", "in_heads", ("i", "e"), start=2), (2, 3, 5, 2, 4)),
                      (hf.HFTensor("w", "out_heads"), (2, 3, 5))):
        a = rng.randn(*shape).astype(np.float32)
        tensors = tm.export(a)
        assert tm.expected(shape, set(tensors)) == {n: t.shape for n, t in tensors.items()}
        if tm.start:
            assert min(tensors) == "l.2.e.0.w" and "l.3.e.2.w" in tensors
        for _ in range(5):
            idx = tuple(slice(lo, rng.randint(lo + 1, n + 1)) for n in shape for lo in [rng.randint(0, n)])
            np.testing.assert_array_equal(tm.read(tensors.__getitem__, shape, idx, set(tensors)), a[idx])


CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")))
def test_every_model_config_builds_abstractly(name):
    """Each shipped model config names a registered family and builds from shapes alone."""
    cfg = build.resolve_model_config(load_config(os.path.join(CONFIG_DIR, name)).model)
    _, abstract = build.abstract_model(cfg)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))
    assert abstract["embed"].shape == (cfg.vocab_size, cfg.hidden_size)
    assert build.num_params(cfg) > cfg.vocab_size * cfg.hidden_size
