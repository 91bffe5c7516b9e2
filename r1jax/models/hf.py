"""Hugging Face interop: config.json <-> ModelConfig, safetensors <-> sharded parameters.

Loading is lazy and sharded: every parameter is built with `jax.make_array_from_callback`, and
each device's callback reads only its own slice of the tensor from the safetensors file (memory
mapped), so a 7B model never needs a second full copy in host memory. Stacked layers are read
layer by layer. Nothing is half loaded: the file's tensor names and shapes are checked against
the model before any array is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from r1jax.config import ModelConfig, RopeScalingConfig
from r1jax.models.transformer import Transformer, head_dim

SUPPORTED = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
_ARCH_NAME = {v: k for k, v in SUPPORTED.items()}
_MODEL_TYPE = {"qwen2": "qwen2", "llama": "llama"}


class HFFormatError(ValueError):
    """A checkpoint that does not match the model: names the tensor or architecture."""


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
def config_from_hf(hf: Dict[str, Any], **overrides) -> ModelConfig:
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise HFFormatError(
            f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {', '.join(SUPPORTED)}")
    kind = SUPPORTED[arch]
    if hf.get("mlp_bias"):
        raise HFFormatError(f"unsupported architecture option for {arch}: mlp_bias=true")
    if hf.get("use_sliding_window") and hf.get("sliding_window") and kind == "qwen2":
        # Qwen2 only slides above max_window_layers; all shipped Qwen2.5 configs disable it.
        raise HFFormatError(f"unsupported architecture option for {arch}: use_sliding_window=true")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    scaling = None
    if rtype not in ("default", None):
        if rtype != "llama3":
            raise HFFormatError(f"unsupported rope scaling type '{rtype}' (supported: default, llama3)")
        scaling = RopeScalingConfig(
            rope_type="llama3", factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    heads = hf["num_attention_heads"]
    hd = hf.get("head_dim")
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    eos = hf.get("eos_token_id")
    cfg = ModelConfig(
        architecture=kind,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hd if hd and hd != hf["hidden_size"] // heads else None,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=True if kind == "qwen2" else bool(hf.get("attention_bias", False)),
        o_bias=False if kind == "qwen2" else bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        param_dtype=str(dtype).replace("torch.", ""),
        dtype=str(dtype).replace("torch.", ""),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    return dataclasses.replace(cfg, **overrides)


def load_config(path: str, **overrides) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in Hugging Face directory {path}")
    with open(cfg_path) as f:
        return dataclasses.replace(config_from_hf(json.load(f), **overrides), path=path)


def config_to_hf(cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
    out = {
        "architectures": [_ARCH_NAME[cfg.architecture]],
        "model_type": _MODEL_TYPE[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": head_dim(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    if cfg.architecture == "llama":
        if cfg.qkv_bias != cfg.o_bias:
            raise HFFormatError("Llama's attention_bias covers q/k/v and o together: set qkv_bias == o_bias")
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3":
        rs = cfg.rope_scaling
        out["rope_scaling"] = {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings}
    for key, value in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                       ("pad_token_id", cfg.pad_token_id)):
        if value is not None:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Name and layout mapping. Each entry: our pure-dict path -> (HF name template, layout).
# Layouts (ours <- HF):
#   copy         same shape
#   linear       [in, out] <- [out, in]
#   in_heads     [D, N, H] <- [N*H, D]     (q/k/v projections)
#   out_heads    [N, H, D] <- [D, N*H]     (o projection)
#   bias_heads   [N, H]    <- [N*H]
# ---------------------------------------------------------------------------------------------
def weight_map(cfg: ModelConfig) -> Dict[Tuple[str, ...], Tuple[str, str, bool]]:
    """(our path) -> (HF tensor name, possibly with {i} for the layer, layout, stacked)."""
    p = "model.layers.{i}."
    m = {
        ("embed",): ("model.embed_tokens.weight", "copy", False),
        ("final_norm", "scale"): ("model.norm.weight", "copy", False),
        ("layers", "attn_norm", "scale"): (p + "input_layernorm.weight", "copy", True),
        ("layers", "mlp_norm", "scale"): (p + "post_attention_layernorm.weight", "copy", True),
        ("layers", "attn", "q"): (p + "self_attn.q_proj.weight", "in_heads", True),
        ("layers", "attn", "k"): (p + "self_attn.k_proj.weight", "in_heads", True),
        ("layers", "attn", "v"): (p + "self_attn.v_proj.weight", "in_heads", True),
        ("layers", "attn", "o"): (p + "self_attn.o_proj.weight", "out_heads", True),
        ("layers", "mlp", "gate"): (p + "mlp.gate_proj.weight", "linear", True),
        ("layers", "mlp", "up"): (p + "mlp.up_proj.weight", "linear", True),
        ("layers", "mlp", "down"): (p + "mlp.down_proj.weight", "linear", True),
    }
    if cfg.qkv_bias:
        for x in "qkv":
            m[("layers", "attn", f"{x}_bias")] = (p + f"self_attn.{x}_proj.bias", "bias_heads", True)
    if cfg.o_bias:
        m[("layers", "attn", "o_bias")] = (p + "self_attn.o_proj.bias", "copy", True)
    if not cfg.tie_embeddings:
        m[("lm_head",)] = ("lm_head.weight", "linear", False)
    return m


def _hf_shape(layout: str, ours: Tuple[int, ...]) -> Tuple[int, ...]:
    if layout == "copy":
        return ours
    if layout == "linear":
        return (ours[1], ours[0])
    if layout == "in_heads":
        return (ours[1] * ours[2], ours[0])
    if layout == "out_heads":
        return (ours[2], ours[0] * ours[1])
    if layout == "bias_heads":
        return (ours[0] * ours[1],)
    raise AssertionError(layout)


def _read(sl, layout: str, ours_shape, idx: Tuple[slice, ...]) -> np.ndarray:
    """Read exactly the block `idx` of our layout from an HF tensor slice handle."""
    idx = tuple(slice(*s.indices(n)) for s, n in zip(idx, ours_shape))
    if layout == "copy":
        return np.asarray(sl[idx])
    if layout == "linear":
        return np.asarray(sl[idx[1], idx[0]]).T
    if layout == "in_heads":
        sd, sn, sh = idx
        h = ours_shape[2]
        block = np.asarray(sl[sn.start * h: sn.stop * h, sd])  # [n*H, d]
        return block.T.reshape(block.shape[1], sn.stop - sn.start, h)[:, :, sh]
    if layout == "out_heads":
        sn, sh, sd = idx
        h = ours_shape[1]
        block = np.asarray(sl[sd, sn.start * h: sn.stop * h])  # [d, n*H]
        return block.T.reshape(sn.stop - sn.start, h, block.shape[0])[:, sh, :]
    if layout == "bias_heads":
        sn, sh = idx
        h = ours_shape[1]
        return np.asarray(sl[sn.start * h: sn.stop * h]).reshape(-1, h)[:, sh]
    raise AssertionError(layout)


def _to_hf(layout: str, a: np.ndarray) -> np.ndarray:
    if layout == "copy":
        return a
    if layout == "linear":
        return a.T
    if layout == "in_heads":
        return a.reshape(a.shape[0], -1).T
    if layout == "out_heads":
        return a.reshape(-1, a.shape[-1]).T
    if layout == "bias_heads":
        return a.reshape(-1)
    raise AssertionError(layout)


class _Files:
    """Tensor name -> open safetensors handle, over one file or an indexed set of shards."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        self.where: Dict[str, Any] = {}
        self.handles = []
        for name in files:
            fpath = os.path.join(path, name)
            if not os.path.isfile(fpath):
                raise FileNotFoundError(f"shard {name} listed in the index is missing from {path}")
            h = safe_open(fpath, framework="numpy")
            self.handles.append((fpath, h))
            for key in h.keys():
                self.where[key] = (fpath, h)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.where[name][1].get_slice(name).get_shape())

    def slice(self, name: str):
        fpath, h = self.where[name]
        sl = h.get_slice(name)
        if sl.get_dtype() in ("BF16", "F8_E4M3", "F8_E5M2"):
            # numpy has no bfloat16: read this tensor through the flax backend, on the host.
            from safetensors import safe_open

            with jax.default_device(jax.devices("cpu")[0]):
                return _HostSlice(safe_open(fpath, framework="flax").get_slice(name))
        return sl


class _HostSlice:
    def __init__(self, sl):
        self._sl = sl

    def __getitem__(self, idx):
        return np.asarray(self._sl[idx])


_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def _check(files: _Files, cfg: ModelConfig, shapes: Dict[Tuple[str, ...], Tuple[int, ...]]) -> None:
    expected: Dict[str, Tuple[int, ...]] = {}
    for path, (tmpl, layout, stacked) in weight_map(cfg).items():
        ours = shapes[path]
        per = ours[1:] if stacked else ours
        hf_shape = _hf_shape(layout, per)
        names = [tmpl.format(i=i) for i in range(cfg.num_layers)] if stacked else [tmpl]
        for n in names:
            expected[n] = hf_shape
    present = set(files.where)
    if cfg.tie_embeddings:
        present.discard("lm_head.weight")  # some exporters also write the tied copy
    missing = sorted(set(expected) - present)
    if missing:
        raise HFFormatError(f"checkpoint is missing tensor '{missing[0]}'"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(n for n in present - set(expected) if not _IGNORED.match(n))
    if unexpected:
        raise HFFormatError(f"checkpoint has unexpected tensor '{unexpected[0]}'"
                            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                            + f" for a {cfg.architecture} model with this config")
    for n, shape in expected.items():
        got = files.shape(n)
        if got != shape:
            raise HFFormatError(f"tensor '{n}' has shape {got}, expected {shape}")


def load_params(path: str, cfg: ModelConfig, shardings=None) -> Dict[str, Any]:
    """Pure-dict parameters of `cfg` read from an HF directory, placed with `shardings`
    (a pure dict of NamedSharding) or on the default device."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    abs_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    flat_abs = traverse_util.flatten_dict(abs_params)
    files = _Files(path)
    _check(files, cfg, {k: v.shape for k, v in flat_abs.items()})
    flat_sh = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = {}
    for key, (tmpl, layout, stacked) in weight_map(cfg).items():
        aval = flat_abs[key]
        dtype = np.dtype(aval.dtype)

        def cb(idx, tmpl=tmpl, layout=layout, stacked=stacked, shape=aval.shape, dtype=dtype):
            idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
            if not stacked:
                return _read(files.slice(tmpl), layout, shape, idx).astype(dtype)
            layers = range(*idx[0].indices(shape[0]))
            return np.stack([_read(files.slice(tmpl.format(i=i)), layout, shape[1:], idx[1:])
                             for i in layers]).astype(dtype)

        out[key] = jax.make_array_from_callback(aval.shape, flat_sh.get(key, default), cb)
    return traverse_util.unflatten_dict(out)


def from_pretrained(path: str, *, dtype: Optional[str] = None, param_dtype: Optional[str] = None,
                    mesh=None, rules=None, **overrides) -> Transformer:
    """An r1jax model from an HF directory, each tensor read lazily into its sharding.

    dtype: compute dtype (default: the checkpoint's); param_dtype: storage dtype (default: the
    checkpoint's). With a mesh, parameters are sharded by `rules` (default: training rules).
    """
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    cfg = load_config(path, **overrides)
    return load_model(path, cfg, mesh=mesh, rules=rules)


def load_model(path: str, cfg: ModelConfig, *, mesh=None, rules=None) -> Transformer:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        from r1jax import mesh as mesh_lib

        shardings = mesh_lib.params_shardings(abs_state, mesh, rules or mesh_lib.TRAIN_RULES)
    return nnx.merge(graphdef, load_params(path, cfg, shardings))


def _host(a) -> np.ndarray:
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))


def save_pretrained(model_or_params, cfg: Optional[ModelConfig], out_dir: str, *,
                    dtype: Optional[str] = None, max_shard_bytes: int = 4 << 30,
                    tokenizer_dir: Optional[str] = None) -> str:
    """Write an HF directory (config.json + safetensors, sharded with an index when large) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads. Every process must call it (the
    gather is collective); only process 0 writes."""
    from safetensors.numpy import save_file

    if isinstance(model_or_params, Transformer):
        cfg = cfg or model_or_params.cfg
        params = nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    else:
        params = model_or_params
    if cfg is None:
        raise ValueError("save_pretrained needs the ModelConfig when given bare parameters")
    flat = traverse_util.flatten_dict(params)
    dtype = dtype or cfg.param_dtype
    np_dtype = jnp.dtype(dtype)
    tensors: Dict[str, np.ndarray] = {}
    for key, (tmpl, layout, stacked) in weight_map(cfg).items():
        if key not in flat:
            raise HFFormatError(f"parameters lack '{'/'.join(key)}' needed for {tmpl}")
        a = _host(flat[key])
        if stacked:
            for i in range(cfg.num_layers):
                tensors[tmpl.format(i=i)] = np.ascontiguousarray(_to_hf(layout, a[i]).astype(np_dtype))
        else:
            tensors[tmpl] = np.ascontiguousarray(_to_hf(layout, a).astype(np_dtype))
    if jax.process_index() != 0:
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    shards: List[Dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
    else:
        weight_map_json = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata=meta)
            weight_map_json.update({n: fname for n in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map_json}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, str(np.dtype(np_dtype)) if np_dtype != jnp.bfloat16 else "bfloat16"), f, indent=2)
    if tokenizer_dir:
        import shutil

        for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json"):
            src = os.path.join(tokenizer_dir, fname)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(out_dir, fname))
    return out_dir
