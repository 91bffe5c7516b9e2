"""DeepSeek-V3 (MLA + DeepSeekMoE + MTP): logits and routing parity with transformers'
DeepseekV3ForCausalLM, both on-disk expert layouts, export round trip, the MTP module against a
transcription of the V3 report's equations 21-25."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers_moe import forward, fuse_experts, random_model
from safetensors.numpy import load_file

from r1jax.models import build, hf, moe_decoder

# Two tiny configs between them cover: q_lora_rank set / None, YaRN with mscale != mscale_all_dim
# / plain RoPE, group-limited routing / one group, interleaved / half-split rope layout,
# norm_topk_prob on / off, shared experts, attention biases, several dense layers.
HF_CONFIGS = {
    "yarn_groups": {
        "q_lora_rank": 24, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3, "first_k_dense_replace": 1,
        "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rope_interleave": True,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 1.1},
        "max_position_embeddings": 64},
    "plain": {
        "q_lora_rank": None, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 2,
        "n_shared_experts": 2, "routed_scaling_factor": 1.0, "norm_topk_prob": False, "rope_interleave": False,
        "attention_bias": True, "num_hidden_layers": 4},
}


def _hf_config(**kw):
    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
                "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
                "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 12, "v_head_dim": 10}
    base.update(kw)
    return transformers.DeepseekV3Config(**base)


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def ckpt(request, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(_hf_config(**HF_CONFIGS[request.param])).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):  # routing that depends on the bias and the groups
                layer.mlp.gate.weight.normal_(0, 0.5)
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
            for name, p in layer.named_parameters():
                if name.endswith("bias") and "gate" not in name:
                    p.normal_(0, 0.1)
    path = str(tmp_path_factory.mktemp(f"ds_{request.param}"))
    model.save_pretrained(path)
    return model, path


def _tokens(b=2, t=20, seed=0):
    return np.random.RandomState(seed).randint(0, 64, (b, t))


def test_logits_and_routing_match_transformers(ckpt):
    ref_model, path = ckpt
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out: chosen.append(out[2].numpy()))
             for layer in ref_model.model.layers if hasattr(layer.mlp, "gate")]
    toks = _tokens()
    with torch.no_grad():
        ref = ref_model(torch.tensor(toks)).logits.numpy()
    for h in hooks:
        h.remove()
    model = build.from_pretrained(path)
    got, aux = forward(model, jnp.asarray(toks))
    assert np.abs(np.asarray(got) - ref).max() <= 1e-4
    routes = np.asarray(aux["routes"])  # [MoE layers, B, T, K]
    assert routes.shape[0] == len(chosen)
    for ours, theirs in zip(routes, chosen):
        np.testing.assert_array_equal(np.sort(ours.reshape(-1, ours.shape[-1]), -1), np.sort(theirs, -1))
    metrics = moe_decoder.moe_metrics(aux)
    assert float(metrics["moe/dropped"]) == 0 and float(metrics["moe/max_load_over_mean"]) >= 1


def test_fused_expert_layout_loads_the_same(ckpt, tmp_path):
    _, path = ckpt
    fuse_experts(path, str(tmp_path))
    a = build.from_pretrained(path).params()
    b = build.from_pretrained(str(tmp_path)).params()
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_round_trip(ckpt, tmp_path):
    _, path = ckpt
    model = build.from_pretrained(path)
    out = hf.save_pretrained(model, None, str(tmp_path / "out"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["DeepseekV3ForCausalLM"]
    names = load_file(os.path.join(out, "model.safetensors")).keys()
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in names)  # the released layout
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    toks = _tokens(seed=2)
    with torch.no_grad():
        ref = back(torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(toks))[0]), ref, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Multi-token prediction
# ---------------------------------------------------------------------------------------------
def test_mtp_matches_the_report_equations(ckpt, tmp_path):
    """Export a model with one MTP module (layer num_hidden_layers, as the released checkpoint
    stores it), reload it, and compare its depth-1 logits with the equations evaluated by hand:
    h'_i = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)], h = TRM(h'), P_{i+2} = OutHead(RMSNorm(h_i)),
    TRM being transformers' own DeepseekV3DecoderLayer loaded from the checkpoint's tensors."""
    _, path = ckpt
    cfg = dataclasses.replace(hf.load_config(path), num_mtp_layers=1, path=None)
    if cfg.mla.q_lora_rank is None:
        pytest.skip("one config is enough for the MTP module (it reuses the decoder layer)")
    src = random_model(cfg, seed=5)
    out = hf.save_pretrained(src, None, str(tmp_path / "mtp"))
    model = build.from_pretrained(out, num_mtp_layers=1)
    plain = build.from_pretrained(out)  # the MTP layer's tensors are skipped, not an error
    assert not hasattr(plain, "mtp")
    toks = _tokens(seed=3)
    h, mtp = jax.jit(lambda m, t: (m.hidden(t)[0], m.mtp_logits(t, m.hidden(t)[0])))(model, jnp.asarray(toks))
    got = np.asarray(mtp)[0]

    tensors = {k: torch.tensor(v) for k, v in load_file(os.path.join(out, "model.safetensors")).items()}
    L = cfg.num_layers
    pre = f"model.layers.{L}."
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    layer = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3DecoderLayer(hf_cfg, L).eval()
    state = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
    n_exp = cfg.moe.num_experts
    state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([state.pop(f"mlp.experts.{e}.gate_proj.weight"),
                                                                state.pop(f"mlp.experts.{e}.up_proj.weight")])
                                                     for e in range(n_exp)])
    state["mlp.experts.down_proj"] = torch.stack([state.pop(f"mlp.experts.{e}.down_proj.weight")
                                                  for e in range(n_exp)])
    extra = {k: state.pop(k) for k in list(state) if k.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens")}
    layer.load_state_dict(state, strict=True)
    torch.testing.assert_close(extra["embed_tokens.weight"], tensors["model.embed_tokens.weight"])

    def rms(x, w, eps=cfg.rms_norm_eps):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    t = toks.shape[1]
    h0 = torch.tensor(np.asarray(h))[:, : t - 1]
    emb = tensors["model.embed_tokens.weight"][torch.tensor(toks[:, 1:])]
    x = torch.cat([rms(emb, extra["enorm.weight"]), rms(h0, extra["hnorm.weight"])], -1) @ extra["eh_proj.weight"].T
    rotary = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RotaryEmbedding(hf_cfg)
    pos = torch.arange(t - 1)[None]
    mask = torch.full((t - 1, t - 1), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        y = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rotary(x, pos))
        logits = rms(y, extra["shared_head.norm.weight"]) @ extra["shared_head.head.weight"].T
    np.testing.assert_allclose(got[:, : t - 1], logits.numpy(), atol=1e-4)

    # L_MTP = lambda / D * CE over the positions whose target t_{i+2} exists.
    lp = jax.nn.log_softmax(jnp.asarray(got[:, : t - 2]), -1)
    ce = -np.mean(np.take_along_axis(np.asarray(lp), toks[:, 2:, None], -1))
    loss = moe_decoder.mtp_loss(mtp, jnp.asarray(toks), jnp.ones(toks.shape), weight=0.3)
    np.testing.assert_allclose(float(loss), 0.3 * ce, rtol=1e-5)
