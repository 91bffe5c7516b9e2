"""Hugging Face interop for the MoE families: DeepseekV3ForCausalLM and Qwen3MoeForCausalLM.

Registered into r1jax.models.registry, so the generic loader and exporter (r1jax.models.hf)
read and write them lazily and sharded. Experts are stacked into one array per weight kind and
layer ([MoE layers, experts, ...]) for the `expert` axis. Two on-disk expert layouts are read:
one tensor per expert (`mlp.experts.{e}.gate_proj.weight`, as the released checkpoints and
transformers' save_pretrained write them) and fused tensors (`mlp.experts.gate_up_proj`
[E, 2F, D] and `mlp.experts.down_proj` [E, D, F], transformers' in-memory layout); export
writes the per-expert layout.

DeepSeek-V3's multi-token-prediction module is layer `num_hidden_layers` of the checkpoint
(its embedding and output head are copies of the main model's). config.json always announces
`num_nextn_predict_layers`, but transformers neither builds nor saves that layer, so parsing
sets `num_mtp_layers` to 0; override `num_mtp_layers=1` to load it from a checkpoint that has it.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from r1jax.config import MLAConfig, ModelConfig, MoEConfig, RopeScalingConfig
from r1jax.models import moe as moe_lib
from r1jax.models import registry
from r1jax.models.hf import (
    HFFormatError,
    HFTensor,
    _get,
    _hf_shape,
    _read_block,
    _to_hf,
)
from r1jax.models.moe_decoder import MoEDecoder
from r1jax.models.transformer import head_dim

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LayerTensor:
    """A parameter stacked over the HF layers `layers` (any increasing indices, e.g. the MoE
    layers only), optionally also over experts (`{e}` in the template)."""

    template: str
    layout: str
    layers: tuple[int, ...]
    experts: bool = False

    def _k(self) -> int:
        return 2 if self.experts else 1

    def _name(self, pos) -> str:
        return self.template.format(i=self.layers[pos[0]], e=pos[1] if self.experts else 0)

    def expected(self, shape: Shape, available: Collection[str] = ()) -> dict[str, Shape]:
        per = _hf_shape(self.layout, shape[self._k():])
        return {self._name(pos): per for pos in itertools.product(*(range(n) for n in shape[:self._k()]))}

    def read(self, tensor, shape: Shape, idx, available=()) -> np.ndarray:
        k = self._k()
        ranges = [range(*s.indices(n)) for s, n in zip(idx[:k], shape[:k])]
        blocks = [_read_block(tensor(self._name(pos)), self.layout, shape[k:], idx[k:])
                  for pos in itertools.product(*ranges)]
        out = np.stack(blocks)
        return out.reshape(tuple(len(r) for r in ranges) + out.shape[1:])

    def export(self, array: np.ndarray) -> dict[str, np.ndarray]:
        k = self._k()
        return {self._name(pos): np.ascontiguousarray(_to_hf(self.layout, array[pos]))
                for pos in itertools.product(*(range(n) for n in array.shape[:k]))}


@dataclasses.dataclass(frozen=True)
class ExpertTensor:
    """Routed-expert weights [layers, E, D, F] (gate/up) or [layers, E, F, D] (down), read from
    per-expert tensors or, when the checkpoint has them, fused ones."""

    prefix: str  # "model.layers.{i}.mlp.experts."
    kind: str  # gate | up | down
    layers: tuple[int, ...]

    def _per_expert(self) -> LayerTensor:
        return LayerTensor(self.prefix + "{e}." + f"{self.kind}_proj.weight", "linear", self.layers, True)

    def _fused_name(self, i: int) -> str:
        return self.prefix.format(i=i) + ("down_proj" if self.kind == "down" else "gate_up_proj")

    def _fused(self, available) -> bool:
        return bool(self.layers) and self._fused_name(self.layers[0]) in available

    def expected(self, shape: Shape, available: Collection[str] = ()) -> dict[str, Shape]:
        if not self._fused(available):
            return self._per_expert().expected(shape, available)
        _, e, a, b = shape  # ours: gate/up [L, E, D, F], down [L, E, F, D]
        fused = (e, b, a) if self.kind == "down" else (e, 2 * b, a)  # down [E, D, F]; gate_up [E, 2F, D]
        return {self._fused_name(i): fused for i in self.layers}

    def read(self, tensor, shape: Shape, idx, available=()) -> np.ndarray:
        if not self._fused(available):
            return self._per_expert().read(tensor, shape, idx, available)
        sl, se, sa, sb = idx
        blocks = []
        for j in range(*sl.indices(shape[0])):
            t = tensor(self._fused_name(self.layers[j]))
            if self.kind == "down":  # ours [E, F, D] <- [E, D, F]
                blocks.append(np.asarray(t[se, sb, sa]).transpose(0, 2, 1))
            else:  # ours [E, D, F] <- gate rows [0, F), up rows [F, 2F) of [E, 2F, D]
                off = 0 if self.kind == "gate" else shape[3]
                rows = slice(sb.start + off, sb.stop + off)
                blocks.append(np.asarray(t[se, rows, sa]).transpose(0, 2, 1))
        return np.stack(blocks)

    def export(self, array: np.ndarray) -> dict[str, np.ndarray]:
        return self._per_expert().export(array)


def _moe_entries(prefix: tuple[str, ...], cfg: ModelConfig, layers: tuple[int, ...],
                 shared_name: str) -> dict[tuple[str, ...], Any]:
    p = "model.layers.{i}.mlp."
    m = cfg.moe
    out = {
        prefix + ("router",): LayerTensor(p + "gate.weight", "linear", layers),
        prefix + ("gate",): ExpertTensor(p + "experts.", "gate", layers),
        prefix + ("up",): ExpertTensor(p + "experts.", "up", layers),
        prefix + ("down",): ExpertTensor(p + "experts.", "down", layers),
    }
    if m.router_bias:
        out[prefix + ("router_bias",)] = LayerTensor(p + "gate.e_score_correction_bias", "copy", layers)
    if m.num_shared_experts:
        for w in ("gate", "up", "down"):
            out[prefix + (f"shared_{w}",)] = LayerTensor(p + f"{shared_name}.{w}_proj.weight", "linear", layers)
    return out


def _attn_entries(prefix: tuple[str, ...], cfg: ModelConfig, layers: tuple[int, ...]) -> dict[tuple[str, ...], Any]:
    p = "model.layers.{i}."
    a = prefix + ("attn",)
    out = {
        prefix + ("attn_norm", "scale"): LayerTensor(p + "input_layernorm.weight", "copy", layers),
        prefix + ("mlp_norm", "scale"): LayerTensor(p + "post_attention_layernorm.weight", "copy", layers),
        a + ("o",): LayerTensor(p + "self_attn.o_proj.weight", "out_heads", layers),
    }
    s = p + "self_attn."
    if cfg.mla is not None:
        if cfg.mla.q_lora_rank is None:
            out[a + ("q",)] = LayerTensor(s + "q_proj.weight", "in_heads", layers)
        else:
            out[a + ("q_a",)] = LayerTensor(s + "q_a_proj.weight", "linear", layers)
            out[a + ("q_a_norm",)] = LayerTensor(s + "q_a_layernorm.weight", "copy", layers)
            out[a + ("q_b",)] = LayerTensor(s + "q_b_proj.weight", "in_heads", layers)
            if cfg.o_bias:
                out[a + ("q_a_bias",)] = LayerTensor(s + "q_a_proj.bias", "copy", layers)
        out[a + ("kv_a",)] = LayerTensor(s + "kv_a_proj_with_mqa.weight", "linear", layers)
        out[a + ("kv_a_norm",)] = LayerTensor(s + "kv_a_layernorm.weight", "copy", layers)
        out[a + ("kv_b",)] = LayerTensor(s + "kv_b_proj.weight", "in_heads", layers)
        if cfg.o_bias:
            out[a + ("kv_a_bias",)] = LayerTensor(s + "kv_a_proj_with_mqa.bias", "copy", layers)
            out[a + ("o_bias",)] = LayerTensor(s + "o_proj.bias", "copy", layers)
        return out
    for x in "qkv":
        out[a + (x,)] = LayerTensor(s + f"{x}_proj.weight", "in_heads", layers)
    if cfg.qkv_bias:
        for x in "qkv":
            out[a + (f"{x}_bias",)] = LayerTensor(s + f"{x}_proj.bias", "bias_heads", layers)
    if cfg.o_bias:
        out[a + ("o_bias",)] = LayerTensor(s + "o_proj.bias", "copy", layers)
    if cfg.qk_norm:
        for x in "qk":
            out[a + (f"{x}_norm", "scale")] = LayerTensor(s + f"{x}_norm.weight", "copy", layers)
    return out


@dataclasses.dataclass(frozen=True)
class _Copies:
    """A parameter also written as copies under other names (the MTP layer's embedding and
    head); only the first name is read."""

    main: HFTensor
    copies: tuple[tuple[str, str], ...]  # (name, layout)

    def expected(self, shape, available=()):
        out = self.main.expected(shape, available)
        per = next(iter(out.values()))
        for name, layout in self.copies:
            if name in available:  # written by the release and by our export, never read
                out[name] = per if layout == self.main.layout else _hf_shape(layout, shape)
        return out

    def read(self, tensor, shape, idx, available=()):
        return self.main.read(tensor, shape, idx, available)

    def export(self, array):
        out = self.main.export(array)
        for name, layout in self.copies:
            out[name] = np.ascontiguousarray(_to_hf(layout, array))
        return out


def weight_map(cfg: ModelConfig) -> dict[tuple[str, ...], Any]:
    """Our pure-dict path -> HF tensor(s), for r1jax.models.moe_decoder.MoEDecoder."""
    L = cfg.num_layers
    all_layers = tuple(range(L))
    dense, moe = moe_lib.dense_layer_ids(cfg), moe_lib.moe_layer_ids(cfg)
    mtp = tuple(range(L, L + cfg.num_mtp_layers))
    shared = "shared_experts"
    m: dict[tuple[str, ...], Any] = {
        ("final_norm", "scale"): HFTensor("model.norm.weight"),
    }
    embed = HFTensor("model.embed_tokens.weight")
    head = HFTensor("lm_head.weight", "linear")
    if mtp:
        embed = _Copies(embed, tuple((f"model.layers.{i}.embed_tokens.weight", "copy") for i in mtp))
        head = _Copies(head, tuple((f"model.layers.{i}.shared_head.head.weight", "linear") for i in mtp))
    m[("embed",)] = embed
    if not cfg.tie_embeddings:
        m[("lm_head",)] = head
    m.update(_attn_entries(("layers",), cfg, all_layers))
    p = "model.layers.{i}.mlp."
    if dense:
        for w in ("gate", "up", "down"):
            m[("dense_mlp", w)] = LayerTensor(p + f"{w}_proj.weight", "linear", dense)
    if moe:
        m.update(_moe_entries(("moe",), cfg, moe, shared))
    if mtp:
        m.update(_attn_entries(("mtp", "block"), cfg, mtp))
        m.update(_moe_entries(("mtp", "moe"), cfg, mtp, shared))
        q = "model.layers.{i}."
        m[("mtp", "enorm", "scale")] = LayerTensor(q + "enorm.weight", "copy", mtp)
        m[("mtp", "hnorm", "scale")] = LayerTensor(q + "hnorm.weight", "copy", mtp)
        m[("mtp", "eh_proj")] = LayerTensor(q + "eh_proj.weight", "linear", mtp)
        m[("mtp", "final_norm", "scale")] = LayerTensor(q + "shared_head.norm.weight", "copy", mtp)
    return m


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScalingConfig | None]:
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise HFFormatError(f"'rope_scaling' must be an object, got {rope!r}")
    theta = _get({"rope_theta": hf.get("rope_theta", rope.get("rope_theta", 10000.0))}, "rope_theta", float)
    rtype = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if rtype in ("default", None):
        return theta, None
    if rtype == "llama3":
        return theta, RopeScalingConfig(
            rope_type="llama3", factor=_get(rope, "factor", float),
            low_freq_factor=_get(rope, "low_freq_factor", float),
            high_freq_factor=_get(rope, "high_freq_factor", float),
            original_max_position_embeddings=_get(rope, "original_max_position_embeddings", int))
    if rtype != "yarn":
        raise HFFormatError(f"unsupported rope scaling type '{rtype}' (supported: default, llama3, yarn)")
    orig = _get(rope, "original_max_position_embeddings", int)
    factor = rope.get("factor")
    if factor is None:  # transformers: the ratio of the context lengths
        factor = _get(hf, "max_position_embeddings", int) / orig
    opt = lambda k: None if rope.get(k) is None else _get(rope, k, float, positive=False)
    return theta, RopeScalingConfig(
        rope_type="yarn", factor=float(factor), original_max_position_embeddings=orig,
        beta_fast=float(rope.get("beta_fast") or 32.0), beta_slow=float(rope.get("beta_slow") or 1.0),
        mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"), truncate=bool(rope.get("truncate", True)))


def _common(hf: Mapping[str, Any], kind: str) -> dict[str, Any]:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFFormatError(f"unsupported architecture option for {kind}: hidden_act={act!r} (only silu)")
    theta, scaling = _rope(hf)
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")
    eos = hf.get("eos_token_id")
    heads = _get(hf, "num_attention_heads", int)
    return {
        "architecture": kind,
        "vocab_size": _get(hf, "vocab_size", int),
        "hidden_size": _get(hf, "hidden_size", int),
        "intermediate_size": _get(hf, "intermediate_size", int),
        "num_layers": _get(hf, "num_hidden_layers", int),
        "num_heads": heads,
        "num_kv_heads": _get(hf, "num_key_value_heads", int, heads),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rms_norm_eps": _get(hf, "rms_norm_eps", float, 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_position_embeddings": _get(hf, "max_position_embeddings", int, 4096),
        "param_dtype": dtype,
        "dtype": dtype,
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_id": eos[0] if isinstance(eos, list) and eos else eos,
        "pad_token_id": hf.get("pad_token_id"),
    }


def deepseek_v3_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    c = _common(hf, "deepseek_v3")
    freq = hf.get("moe_layer_freq", 1)
    if freq != 1:
        raise HFFormatError(f"unsupported architecture option for DeepseekV3ForCausalLM: moe_layer_freq={freq!r}")
    scoring = hf.get("scoring_func", "sigmoid")
    if scoring not in moe_lib.SCORINGS:
        raise HFFormatError(f"unsupported scoring_func {scoring!r} (supported: {', '.join(moe_lib.SCORINGS)})")
    q_lora = hf.get("q_lora_rank")
    mla = MLAConfig(
        q_lora_rank=None if q_lora is None else _get(hf, "q_lora_rank", int),
        kv_lora_rank=_get(hf, "kv_lora_rank", int), qk_nope_head_dim=_get(hf, "qk_nope_head_dim", int),
        qk_rope_head_dim=_get(hf, "qk_rope_head_dim", int), v_head_dim=_get(hf, "v_head_dim", int),
        rope_interleave=bool(hf.get("rope_interleave", True)))
    k_dense = _get(hf, "first_k_dense_replace", int, 0, positive=False)
    moe = MoEConfig(
        num_experts=_get(hf, "n_routed_experts" if "n_routed_experts" in hf else "num_local_experts", int),
        num_experts_per_tok=_get(hf, "num_experts_per_tok", int),
        moe_intermediate_size=_get(hf, "moe_intermediate_size", int),
        num_shared_experts=_get(hf, "n_shared_experts", int, 0, positive=False), scoring=scoring,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=_get(hf, "routed_scaling_factor", float, 1.0),
        n_group=_get(hf, "n_group", int, 1), topk_group=_get(hf, "topk_group", int, 1), router_bias=True,
        dense_layers=list(range(min(k_dense, c["num_layers"]))))
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**c, qkv_bias=False, o_bias=bias, mla=mla, moe=moe, num_mtp_layers=0)


def deepseek_v3_config_to_hf(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    m, a = cfg.moe, cfg.mla
    if a is None or m is None:
        raise HFFormatError("DeepseekV3ForCausalLM needs model.mla and model.moe")
    k = len(m.dense_layers)
    if sorted(m.dense_layers) != list(range(k)):
        raise HFFormatError(f"DeepseekV3ForCausalLM's dense layers are the first k: model.moe.dense_layers "
                            f"{m.dense_layers} is not 0..k-1")
    if not m.router_bias:
        raise HFFormatError("DeepseekV3ForCausalLM always has the router correction bias: set model.moe.router_bias=true")
    out = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": m.moe_intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads, "n_shared_experts": m.num_shared_experts,
        "n_routed_experts": m.num_experts, "routed_scaling_factor": m.routed_scaling_factor,
        "kv_lora_rank": a.kv_lora_rank, "q_lora_rank": a.q_lora_rank,
        "qk_rope_head_dim": a.qk_rope_head_dim, "qk_nope_head_dim": a.qk_nope_head_dim,
        "v_head_dim": a.v_head_dim, "n_group": m.n_group, "topk_group": m.topk_group,
        "num_experts_per_tok": m.num_experts_per_tok, "first_k_dense_replace": k,
        "norm_topk_prob": m.norm_topk_prob, "scoring_func": m.scoring, "topk_method": "noaux_tc",
        "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_interleave": a.rope_interleave, "attention_bias": cfg.o_bias,
        "num_nextn_predict_layers": cfg.num_mtp_layers, "torch_dtype": dtype, "use_cache": True,
        "attention_dropout": 0.0,
    }
    if m.scoring != "sigmoid":
        raise HFFormatError("transformers' DeepseekV3 router is sigmoid-scored: set model.moe.scoring=sigmoid")
    out.update(_rope_to_hf(cfg))
    return _tokens(cfg, out)


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rs = cfg.rope_scaling
    params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if rs is not None and rs.rope_type == "llama3":
        params.update(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                      high_freq_factor=rs.high_freq_factor,
                      original_max_position_embeddings=rs.original_max_position_embeddings)
    elif rs is not None and rs.rope_type == "yarn":
        params.update(rope_type="yarn", factor=rs.factor, beta_fast=rs.beta_fast, beta_slow=rs.beta_slow,
                      original_max_position_embeddings=rs.original_max_position_embeddings,
                      truncate=rs.truncate)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(rs, key) is not None:
                params[key] = getattr(rs, key)
    return {"rope_theta": cfg.rope_theta, "rope_scaling": params}


def _tokens(cfg: ModelConfig, out: dict[str, Any]) -> dict[str, Any]:
    for key, value in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                       ("pad_token_id", cfg.pad_token_id)):
        if value is not None:
            out[key] = value
    return out


def qwen3_moe_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    c = _common(hf, "qwen3_moe")
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise HFFormatError("unsupported architecture option for Qwen3MoeForCausalLM: use_sliding_window=true")
    hd = _get(hf, "head_dim", int, None)
    # Released configs say num_experts; transformers 5 writes num_local_experts.
    e = _get(hf, "num_experts" if "num_experts" in hf else "num_local_experts", int)
    step = _get(hf, "decoder_sparse_step", int, 1)
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise HFFormatError(f"'mlp_only_layers' must be a list of layer indices, got {only!r}")
    dense = sorted({i for i in range(c["num_layers"]) if i in only or (i + 1) % step})
    moe = MoEConfig(
        num_experts=e, num_experts_per_tok=_get(hf, "num_experts_per_tok", int),
        moe_intermediate_size=_get(hf, "moe_intermediate_size", int), num_shared_experts=0,
        scoring="softmax", norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        dense_layers=dense)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**c, head_dim=hd if hd and hd * c["num_heads"] != c["hidden_size"] else None,
                       qkv_bias=bias, o_bias=bias, qk_norm=True, moe=moe)


def qwen3_moe_config_to_hf(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    m = cfg.moe
    if m is None or cfg.mla is not None:
        raise HFFormatError("Qwen3MoeForCausalLM needs model.moe and no model.mla")
    if (m.scoring, m.num_shared_experts, m.router_bias, m.n_group, m.routed_scaling_factor) != ("softmax", 0, False, 1, 1.0):
        raise HFFormatError("Qwen3MoeForCausalLM routes by softmax top-k only: set model.moe.scoring=softmax, "
                            "num_shared_experts=0, router_bias=false, n_group=1, routed_scaling_factor=1")
    if not cfg.qk_norm or cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError("Qwen3MoeForCausalLM has q/k norm and one attention_bias: set model.qk_norm=true, "
                            "qkv_bias == o_bias")
    out = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": m.moe_intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": head_dim(cfg), "num_experts": m.num_experts,
        "num_experts_per_tok": m.num_experts_per_tok, "norm_topk_prob": m.norm_topk_prob,
        "decoder_sparse_step": 1, "mlp_only_layers": sorted(m.dense_layers), "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.qkv_bias,
        "use_sliding_window": False, "sliding_window": None, "torch_dtype": dtype, "use_cache": True,
        "attention_dropout": 0.0,
    }
    out.update(_rope_to_hf(cfg))
    return _tokens(cfg, out)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _unread_mtp_layer(cfg: ModelConfig, name: str) -> bool:
    """The checkpoint's MTP layers past the ones this config loads."""
    m = _LAYER.match(name)
    return m is not None and int(m.group(1)) >= cfg.num_layers + cfg.num_mtp_layers


registry.register(registry.Family(
    name="deepseek_v3", hf_architecture="DeepseekV3ForCausalLM", model=MoEDecoder,
    config_from_hf=deepseek_v3_config_from_hf, config_to_hf=deepseek_v3_config_to_hf, weight_map=weight_map,
    ignored=_unread_mtp_layer))
registry.register(registry.Family(
    name="qwen3_moe", hf_architecture="Qwen3MoeForCausalLM", model=MoEDecoder,
    config_from_hf=qwen3_moe_config_from_hf, config_to_hf=qwen3_moe_config_to_hf, weight_map=weight_map))
