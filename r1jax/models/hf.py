"""Hugging Face interop: config.json <-> ModelConfig, safetensors <-> sharded parameters.

Loading is lazy and sharded: every parameter is built with `jax.make_array_from_callback`, and
each device's callback reads only its own slice of the tensor from the safetensors file (memory
mapped), so a 7B model never needs a second full copy in host memory. Stacked layers are read
layer by layer. Nothing is half loaded: every file is opened and checked (config.json, the shard
index, each shard's header, every tensor's name, shape and dtype against the model) before any
array is built, and a damaged or wrong-kind file is reported in one line naming its path.

What differs between architectures (which tensors exist, their names and layouts, the
config.json keys) comes from the family registry (r1jax.models.registry); this module holds the
generic machinery and the dense families (Qwen2, Qwen3, Llama), registered at the bottom.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Protocol, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from r1jax.config import ModelConfig, RopeScalingConfig
from r1jax.models import registry
from r1jax.models.transformer import Transformer, head_dim


class HFFormatError(ValueError):
    """A Hugging Face directory or file that cannot be read as the model: the message is one
    line naming the file (or tensor, or architecture) and what is wrong."""


Shape = Tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# Parameter <-> HF tensors
# ---------------------------------------------------------------------------------------------
class TensorMap(Protocol):
    """How one parameter leaf (our array, of shape `shape`) maps to HF tensors.

    `available` is the set of tensor names in the checkpoint, so that an entry can choose
    between on-disk layouts (for example one tensor per expert or one fused tensor).
    """

    def expected(self, shape: Shape, available: Collection[str]) -> Dict[str, Shape]:
        """The HF tensors this parameter is read from, with their shapes."""

    def read(self, tensor: Callable[[str], Any], shape: Shape, idx: Tuple[slice, ...],
             available: Collection[str]) -> np.ndarray:
        """Block `idx` (one slice per dimension, normalised) of our array; `tensor(name)` gives
        a handle whose `[...]` reads a block of an HF tensor."""

    def export(self, array: np.ndarray) -> Dict[str, np.ndarray]:
        """The HF tensors holding `array` (the whole parameter, on the host)."""


# Layouts (ours <- HF), for one tensor after the stacked axes:
#   copy         same shape
#   linear       [in, out] <- [out, in]
#   in_heads     [D, N, H] <- [N*H, D]     (q/k/v projections)
#   out_heads    [N, H, D] <- [D, N*H]     (o projection)
#   bias_heads   [N, H]    <- [N*H]
LAYOUTS = ("copy", "linear", "in_heads", "out_heads", "bias_heads")


def _hf_shape(layout: str, ours: Shape) -> Shape:
    if layout == "copy":
        return tuple(ours)
    if layout == "linear":
        return (ours[1], ours[0])
    if layout == "in_heads":
        return (ours[1] * ours[2], ours[0])
    if layout == "out_heads":
        return (ours[2], ours[0] * ours[1])
    if layout == "bias_heads":
        return (ours[0] * ours[1],)
    raise ValueError(f"unknown tensor layout '{layout}'; known: {', '.join(LAYOUTS)}")


def _read_block(sl, layout: str, ours_shape: Shape, idx: Tuple[slice, ...]) -> np.ndarray:
    """Read exactly the block `idx` of our layout from an HF tensor slice handle."""
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
    raise ValueError(f"unknown tensor layout '{layout}'; known: {', '.join(LAYOUTS)}")


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
    raise ValueError(f"unknown tensor layout '{layout}'; known: {', '.join(LAYOUTS)}")


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """A parameter stored as one HF tensor, or as one tensor per index of its leading `stack`
    axes: `template` names them with those fields, e.g. "model.layers.{i}.mlp.up_proj.weight"
    with stack=("i",), or "...experts.{e}..." with stack=("i", "e"). `start` offsets the first
    stacked index (a stack of layers that begins past layer 0)."""

    template: str
    layout: str = "copy"
    stack: Tuple[str, ...] = ()
    start: int = 0

    def _names(self, shape: Shape):
        k = len(self.stack)
        for pos in itertools.product(*(range(n) for n in shape[:k])):
            fields = dict(zip(self.stack, pos))
            if k:
                fields[self.stack[0]] += self.start
            yield pos, self.template.format(**fields)

    def expected(self, shape: Shape, available: Collection[str] = ()) -> Dict[str, Shape]:
        per = _hf_shape(self.layout, shape[len(self.stack):])
        return {name: per for _, name in self._names(shape)}

    def read(self, tensor, shape: Shape, idx: Tuple[slice, ...], available=()) -> np.ndarray:
        k = len(self.stack)
        inner_shape, inner_idx = shape[k:], idx[k:]
        if not k:
            return _read_block(tensor(self.template), self.layout, inner_shape, inner_idx)
        ranges = [range(*s.indices(n)) for s, n in zip(idx[:k], shape[:k])]
        blocks = []
        for pos in itertools.product(*ranges):
            fields = dict(zip(self.stack, pos))
            fields[self.stack[0]] += self.start
            blocks.append(_read_block(tensor(self.template.format(**fields)), self.layout,
                                      inner_shape, inner_idx))
        out = np.stack(blocks)
        return out.reshape(tuple(len(r) for r in ranges) + out.shape[1:])

    def export(self, array: np.ndarray) -> Dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(_to_hf(self.layout, array[pos]))
                for pos, name in self._names(array.shape)}


# ---------------------------------------------------------------------------------------------
# Files: config.json, the shard index, the shards
# ---------------------------------------------------------------------------------------------
def read_json(path: str, what: str) -> Dict[str, Any]:
    """A JSON object from `path`; an unreadable, empty or non-object file is an HFFormatError
    naming the path. `what` says which file it should have been ("config.json", ...)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (expected the {what})")
    if not os.path.isfile(path):
        raise HFFormatError(f"{path}: is not a file (expected the {what})")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise HFFormatError(f"{path}: cannot be read ({e.strerror})") from None
    if not raw.strip():
        raise HFFormatError(f"{path}: empty file (expected the {what})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise HFFormatError(f"{path}: not JSON text (binary content; expected the {what})") from None
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}; "
                            f"truncated or another format?)") from None
    if not isinstance(data, dict):
        raise HFFormatError(f"{path}: expected a JSON object (the {what}), got {type(data).__name__}")
    return data


def _shard_error(fpath: str, err: Exception) -> HFFormatError:
    """safetensors' header errors in words a user can act on."""
    msg = str(err)
    size = os.path.getsize(fpath) if os.path.isfile(fpath) else -1
    if size == 0:
        what = "empty file"
    elif "not fully covered" in msg or "incomplete metadata" in msg:
        what = "truncated: its header lists more tensor bytes than the file holds"
    elif "header too small" in msg or "invalid header length" in msg or "header too large" in msg:
        what = (f"not a safetensors file ({size} bytes; the leading header length is impossible: "
                "truncated, or another format)")
    elif "utf-8" in msg.lower() or "json" in msg.lower() or "deserializ" in msg.lower():
        what = f"garbled header ({msg.split(':', 1)[-1].strip()})"
    else:
        what = f"unreadable safetensors file ({msg})"
    return HFFormatError(f"{fpath}: {what}")


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class _Files:
    """Tensor name -> open safetensors handle, over one file or an indexed set of shards.
    Every file is opened (its header validated) here, before any tensor is read."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index_path = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        listed: Dict[str, str] = {}
        if os.path.exists(index_path):
            index = read_json(index_path, "safetensors shard index")
            wmap = index.get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise HFFormatError(f"{index_path}: no 'weight_map' object of tensor name -> shard file")
            for name, shard in wmap.items():
                if not isinstance(shard, str) or not shard.endswith(".safetensors"):
                    raise HFFormatError(f"{index_path}: weight_map['{name}'] = {shard!r} is not a "
                                        ".safetensors file name")
            listed = dict(wmap)
            files = sorted(set(wmap.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
        if not files:
            others = sorted(x for x in os.listdir(path) if x.endswith((".bin", ".pt", ".pth", ".gguf")))
            hint = f" (found {', '.join(others)}: only safetensors weights are read)" if others else ""
            raise FileNotFoundError(f"{path}: no *.safetensors files{hint}")
        self.path = path
        self.where: Dict[str, Tuple[str, Any]] = {}
        for name in files:
            fpath = os.path.join(path, name)
            if not os.path.isfile(fpath):
                raise HFFormatError(f"{fpath}: missing (shard named by {index_path})"
                                    if listed else f"{fpath}: not a file")
            try:
                h = safe_open(fpath, framework="numpy")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises its own SafetensorError (or OSError)
                raise _shard_error(fpath, e) from None
            for key in keys:
                if key in self.where:
                    raise HFFormatError(f"{fpath}: tensor '{key}' is also in {self.where[key][0]}")
                self.where[key] = (fpath, h)
        for key, shard in listed.items():
            if key not in self.where:
                raise HFFormatError(f"{os.path.join(path, shard)}: lacks tensor '{key}' that "
                                    f"{index_path} places there")

    def file_of(self, name: str) -> str:
        return self.where[name][0]

    def shape(self, name: str) -> Shape:
        return tuple(self.where[name][1].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self.where[name][1].get_slice(name).get_dtype()

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


# Tensors some exporters write that no model here reads (recomputed buffers).
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def _more(items: List[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _check(files: _Files, cfg: ModelConfig, wmap: Mapping[Tuple[str, ...], TensorMap],
           shapes: Mapping[Tuple[str, ...], Shape]) -> None:
    available = set(files.where)
    expected: Dict[str, Shape] = {}
    for key, tm in wmap.items():
        expected.update(tm.expected(shapes[key], available))
    present = set(available)
    if cfg.tie_embeddings:
        present.discard("lm_head.weight")  # some exporters also write the tied copy
    missing = sorted(set(expected) - present)
    if missing:
        raise HFFormatError(f"{files.path}: checkpoint is missing tensor '{missing[0]}'{_more(missing)} "
                            f"for a {cfg.architecture} model with this config")
    skip = registry.get(cfg.architecture).ignored or (lambda _cfg, _name: False)
    unexpected = sorted(n for n in present - set(expected) if not _IGNORED.match(n) and not skip(cfg, n))
    if unexpected:
        raise HFFormatError(f"{files.file_of(unexpected[0])}: unexpected tensor '{unexpected[0]}'"
                            f"{_more(unexpected)} for a {cfg.architecture} model with this config")
    for n, shape in expected.items():
        got = files.shape(n)
        if got != tuple(shape):
            raise HFFormatError(f"{files.file_of(n)}: tensor '{n}' has shape {got}, expected {tuple(shape)}")
        dt = files.dtype(n)
        if dt not in _FLOAT_DTYPES:
            raise HFFormatError(f"{files.file_of(n)}: tensor '{n}' has dtype {dt}, expected a "
                                f"float type ({', '.join(_FLOAT_DTYPES)})")


def load_params(path: str, cfg: ModelConfig, abstract: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Pure-dict parameters of `cfg` read from the HF directory `path`.

    abstract: the model's pure dict of jax.ShapeDtypeStruct (r1jax.models.build.abstract_model;
    default: unsharded); each leaf's `.sharding` places it (None: the default device), and each
    device reads only its own block of each tensor.
    """
    if abstract is None:
        from r1jax.models.build import abstract_model  # build sits above this module

        abstract = abstract_model(cfg)[1]
    family = registry.get(cfg.architecture)
    wmap = family.weight_map(cfg)
    flat_abs = traverse_util.flatten_dict(abstract)
    unmapped = sorted("/".join(k) for k in set(flat_abs) - set(wmap))
    if unmapped:
        raise ValueError(f"model family '{family.name}' maps no HF tensor to parameter "
                         f"'{unmapped[0]}'{_more(unmapped)}")
    files = _Files(path)
    _check(files, cfg, wmap, {k: tuple(v.shape) for k, v in flat_abs.items()})
    available = frozenset(files.where)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = {}
    for key, aval in flat_abs.items():
        tm = wmap[key]
        dtype = np.dtype(aval.dtype)
        shape = tuple(aval.shape)

        def cb(idx, tm=tm, shape=shape, dtype=dtype):
            idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
            idx = tuple(slice(*s.indices(n)) for s, n in zip(idx, shape))
            return np.asarray(tm.read(files.slice, shape, idx, available)).astype(dtype)

        sharding = getattr(aval, "sharding", None) or default
        out[key] = jax.make_array_from_callback(shape, sharding, cb)
    return traverse_util.unflatten_dict(out)


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
def family_of(hf: Mapping[str, Any]) -> registry.Family:
    """The registered family of a parsed config.json (by its "architectures" list)."""
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    for a in archs:
        fam = registry.by_hf_architecture(a) if isinstance(a, str) else None
        if fam is not None:
            return fam
    raise HFFormatError(f"unsupported architecture {archs or hf.get('model_type')!r}; supported: "
                        f"{', '.join(registry.hf_architectures())}")


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """ModelConfig of a parsed config.json, by its family, with `overrides` applied."""
    try:
        cfg = family_of(hf).config_from_hf(hf)
    except KeyError as e:
        raise HFFormatError(f"missing required key {e}") from None
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"unknown ModelConfig field '{unknown[0]}' in overrides")
    return dataclasses.replace(cfg, **overrides)


def load_config(path: str, **overrides) -> ModelConfig:
    """ModelConfig of the HF directory `path` (its config.json), with `overrides` applied and
    `path` recorded. Any problem names the file."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no such directory)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json in this Hugging Face directory")
    hf = read_json(cfg_path, "model's config.json")
    try:
        cfg = config_from_hf(hf, **overrides)
    except HFFormatError as e:
        raise HFFormatError(f"{cfg_path}: {e}") from None
    return dataclasses.replace(cfg, path=path)


def _get(hf: Mapping[str, Any], key: str, kind, default: Any = KeyError, *, positive=True):
    """hf[key] checked to be a `kind` (int or float); bools and strings are rejected."""
    if key not in hf or hf[key] is None:
        if default is KeyError:
            raise HFFormatError(f"missing required key '{key}'")
        return default
    v = hf[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
    if not ok or (positive and v <= 0):
        raise HFFormatError(f"'{key}' must be a {'positive ' if positive else ''}"
                            f"{'integer' if kind is int else 'number'}, got {v!r}")
    return kind(v)


def rope_from_hf(hf: Mapping[str, Any]) -> Tuple[float, Optional[RopeScalingConfig]]:
    """(rope_theta, scaling) of a config.json: "rope_scaling" (transformers 4) or
    "rope_parameters" (5); default, llama3 or yarn (missing yarn factor: the ratio of the
    context lengths, as transformers derives it)."""
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
    if factor is None:
        factor = _get(hf, "max_position_embeddings", int) / orig
    factor = _get({"factor": factor}, "factor", float)

    def opt(k):
        return None if rope.get(k) is None else _get(rope, k, float, positive=False)

    return theta, RopeScalingConfig(
        rope_type="yarn", factor=factor, original_max_position_embeddings=orig,
        beta_fast=float(rope.get("beta_fast") or 32.0), beta_slow=float(rope.get("beta_slow") or 1.0),
        mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"), truncate=bool(rope.get("truncate", True)))


def rope_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
    """config.json's rope keys for `cfg` (rope_theta, and rope_scaling when scaled)."""
    rs = cfg.rope_scaling
    out: Dict[str, Any] = {"rope_theta": cfg.rope_theta}
    if rs is None or rs.rope_type in ("default", None):
        return out
    if rs.rope_type == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings}
    elif rs.rope_type == "yarn":
        params = {"rope_type": "yarn", "factor": rs.factor, "beta_fast": rs.beta_fast,
                  "beta_slow": rs.beta_slow, "truncate": rs.truncate,
                  "original_max_position_embeddings": rs.original_max_position_embeddings}
        params.update({k: getattr(rs, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                       if getattr(rs, k) is not None})
        out["rope_scaling"] = params
    else:
        raise HFFormatError(f"rope scaling type '{rs.rope_type}' has no config.json form")
    return out


def dense_config_from_hf(hf: Mapping[str, Any], kind: str) -> ModelConfig:
    """The config.json keys shared by the dense families (Qwen2, Qwen3, Llama)."""
    arch = registry.get(kind).hf_architecture
    if hf.get("mlp_bias"):
        raise HFFormatError(f"unsupported architecture option for {arch}: mlp_bias=true")
    if hf.get("use_sliding_window") and hf.get("sliding_window") and kind in ("qwen2", "qwen3"):
        # Qwen2/3 only slide above max_window_layers; all shipped configs disable it.
        raise HFFormatError(f"unsupported architecture option for {arch}: use_sliding_window=true")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFFormatError(f"unsupported architecture option for {arch}: hidden_act={act!r} (only silu)")
    theta, scaling = rope_from_hf(hf)
    hidden = _get(hf, "hidden_size", int)
    heads = _get(hf, "num_attention_heads", int)
    hd = _get(hf, "head_dim", int, None)
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")
    eos = hf.get("eos_token_id")
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        architecture=kind,
        vocab_size=_get(hf, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_get(hf, "intermediate_size", int),
        num_layers=_get(hf, "num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=_get(hf, "num_key_value_heads", int, heads),
        head_dim=hd if hd and hd * heads != hidden else None,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=_get(hf, "rms_norm_eps", float, 1e-6),
        qkv_bias=True if kind == "qwen2" else bias,
        o_bias=False if kind == "qwen2" else bias,
        qk_norm=kind == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=_get(hf, "max_position_embeddings", int, 4096),
        param_dtype=dtype,
        dtype=dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def dense_config_to_hf(cfg: ModelConfig, dtype: str) -> Dict[str, Any]:
    kind = cfg.architecture
    fam = registry.get(kind)
    if kind == "qwen2" and (not cfg.qkv_bias or cfg.o_bias or cfg.qk_norm):
        raise HFFormatError("Qwen2ForCausalLM has q/k/v biases, no o bias and no q/k norm: set "
                            "model.qkv_bias=true, o_bias=false, qk_norm=false (or another architecture)")
    if kind in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError(f"{fam.hf_architecture}'s attention_bias covers q/k/v and o together: "
                            "set model.qkv_bias == model.o_bias")
    if cfg.qk_norm != (kind == "qwen3"):
        raise HFFormatError(f"{fam.hf_architecture} {'needs' if kind == 'qwen3' else 'has no'} q/k norm: "
                            f"set model.qk_norm={'true' if kind == 'qwen3' else 'false'}")
    out = {
        "architectures": [fam.hf_architecture],
        "model_type": kind,
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
        **rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    if kind == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
        if kind == "qwen3":
            out["attention_bias"] = cfg.qkv_bias
    for key, value in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                       ("pad_token_id", cfg.pad_token_id)):
        if value is not None:
            out[key] = value
    return out


def dense_weight_map(cfg: ModelConfig) -> Dict[Tuple[str, ...], HFTensor]:
    """Our pure-dict path -> HF tensor(s), for r1jax.models.transformer.Transformer."""
    p = "model.layers.{i}."
    L = ("i",)
    m = {
        ("embed",): HFTensor("model.embed_tokens.weight"),
        ("final_norm", "scale"): HFTensor("model.norm.weight"),
        ("layers", "attn_norm", "scale"): HFTensor(p + "input_layernorm.weight", stack=L),
        ("layers", "mlp_norm", "scale"): HFTensor(p + "post_attention_layernorm.weight", stack=L),
        ("layers", "attn", "q"): HFTensor(p + "self_attn.q_proj.weight", "in_heads", L),
        ("layers", "attn", "k"): HFTensor(p + "self_attn.k_proj.weight", "in_heads", L),
        ("layers", "attn", "v"): HFTensor(p + "self_attn.v_proj.weight", "in_heads", L),
        ("layers", "attn", "o"): HFTensor(p + "self_attn.o_proj.weight", "out_heads", L),
        ("layers", "mlp", "gate"): HFTensor(p + "mlp.gate_proj.weight", "linear", L),
        ("layers", "mlp", "up"): HFTensor(p + "mlp.up_proj.weight", "linear", L),
        ("layers", "mlp", "down"): HFTensor(p + "mlp.down_proj.weight", "linear", L),
    }
    if cfg.qkv_bias:
        for x in "qkv":
            m[("layers", "attn", f"{x}_bias")] = HFTensor(p + f"self_attn.{x}_proj.bias", "bias_heads", L)
    if cfg.o_bias:
        m[("layers", "attn", "o_bias")] = HFTensor(p + "self_attn.o_proj.bias", "copy", L)
    if cfg.qk_norm:
        for x in "qk":
            m[("layers", "attn", f"{x}_norm", "scale")] = HFTensor(p + f"self_attn.{x}_norm.weight", "copy", L)
    if not cfg.tie_embeddings:
        m[("lm_head",)] = HFTensor("lm_head.weight", "linear")
    return m


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _host(a) -> np.ndarray:
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))


def save_pretrained(model_or_params, cfg: Optional[ModelConfig], out_dir: str, *,
                    dtype: Optional[str] = None, max_shard_bytes: int = 4 << 30,
                    tokenizer_dir: Optional[str] = None) -> str:
    """Write an HF directory (config.json + safetensors, sharded with an index when large) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads. `model_or_params`: an nnx Module
    (its `.cfg` is used when `cfg` is None) or a pure dict of parameters. Every process must call
    it (the gather is collective); only process 0 writes."""
    from safetensors.numpy import save_file

    if isinstance(model_or_params, nnx.Module):
        cfg = cfg or getattr(model_or_params, "cfg", None)
        params = nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    else:
        params = model_or_params
    if cfg is None:
        raise ValueError("save_pretrained needs the ModelConfig when given bare parameters")
    family = registry.get(cfg.architecture)
    flat = traverse_util.flatten_dict(params)
    dtype = dtype or cfg.param_dtype
    np_dtype = jnp.dtype(dtype)
    dtype_name = "bfloat16" if np_dtype == jnp.bfloat16 else str(np.dtype(np_dtype))
    hf_config = family.config_to_hf(cfg, dtype_name)  # fails before any gather on a bad cfg
    tensors: Dict[str, np.ndarray] = {}
    for key, tm in family.weight_map(cfg).items():
        if key not in flat:
            raise HFFormatError(f"parameters lack '{'/'.join(key)}' needed by a {family.name} model")
        for name, t in tm.export(_host(flat[key])).items():
            tensors[name] = np.ascontiguousarray(t.astype(np_dtype))
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
        json.dump(hf_config, f, indent=2)
    if tokenizer_dir:
        import shutil

        for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json"):
            src = os.path.join(tokenizer_dir, fname)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(out_dir, fname))
    return out_dir


# ---------------------------------------------------------------------------------------------
# The dense families
# ---------------------------------------------------------------------------------------------
for _name, _hf_name in (("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
                        ("llama", "LlamaForCausalLM")):
    registry.register(registry.Family(
        name=_name, hf_architecture=_hf_name, model=Transformer,
        config_from_hf=lambda hf, _kind=_name: dense_config_from_hf(hf, _kind),
        config_to_hf=dense_config_to_hf, weight_map=dense_weight_map))
