"""Qwen3-MoE: logits and routing parity with transformers' Qwen3MoeForCausalLM (softmax top-k,
optional renormalisation, dense layers by decoder_sparse_step and mlp_only_layers, q/k norm),
both on-disk expert layouts, export round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers_moe import forward, fuse_experts
from safetensors.numpy import load_file

from r1jax.models import build, hf

HF_CONFIGS = {
    "sparse_step": {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3], "norm_topk_prob": True,
                        "head_dim": 12, "num_key_value_heads": 2},
    "all_moe": {"num_hidden_layers": 2, "norm_topk_prob": False, "num_key_value_heads": 1, "attention_bias": True,
                    "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16},
                    "max_position_embeddings": 64},
}


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def ckpt(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      num_attention_heads=4, num_experts=8, num_experts_per_tok=2,
                                      **HF_CONFIGS[request.param])
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.5)
            layer.self_attn.q_norm.weight.normal_(1, 0.2)
            layer.self_attn.k_norm.weight.normal_(1, 0.2)
            for name, p in layer.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    path = str(tmp_path_factory.mktemp(f"q3moe_{request.param}"))
    model.save_pretrained(path)
    return model, path


def test_logits_and_routing_match_transformers(ckpt):
    ref_model, path = ckpt
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out: chosen.append(out[2].numpy()))
             for layer in ref_model.model.layers if hasattr(layer.mlp, "gate")]
    toks = np.random.RandomState(0).randint(0, 64, (2, 20))
    with torch.no_grad():
        ref = ref_model(torch.tensor(toks)).logits.numpy()
    for h in hooks:
        h.remove()
    model = build.from_pretrained(path)
    dense = [i for i, layer in enumerate(ref_model.model.layers) if not hasattr(layer.mlp, "gate")]
    assert model.cfg.moe.dense_layers == dense
    got, aux = forward(model, jnp.asarray(toks))
    assert np.abs(np.asarray(got) - ref).max() <= 1e-4
    routes = np.asarray(aux["routes"])
    assert routes.shape[0] == len(chosen)
    for ours, theirs in zip(routes, chosen):
        np.testing.assert_array_equal(np.sort(ours.reshape(-1, ours.shape[-1]), -1), np.sort(theirs, -1))


def test_fused_expert_layout_loads_the_same(ckpt, tmp_path):
    _, path = ckpt
    fuse_experts(path, str(tmp_path))
    a = build.from_pretrained(path).params()
    b = build.from_pretrained(str(tmp_path)).params()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_round_trip(ckpt, tmp_path):
    _, path = ckpt
    model = build.from_pretrained(path)
    out = hf.save_pretrained(model, None, str(tmp_path / "out"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen3MoeForCausalLM"]
    assert any(".mlp.experts.0.down_proj.weight" in n for n in load_file(os.path.join(out, "model.safetensors")))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    toks = np.random.RandomState(2).randint(0, 64, (2, 20))
    with torch.no_grad():
        ref = back(torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(toks))[0]), ref, atol=1e-4)


def test_unsupported_option_is_one_line(ckpt, tmp_path):
    _, path = ckpt
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(use_sliding_window=True, sliding_window=8)
    os.makedirs(tmp_path / "bad")
    with open(tmp_path / "bad" / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(hf.HFFormatError, match="use_sliding_window=true"):
        hf.load_config(str(tmp_path / "bad"))
