"""Model families: what `ModelConfig.architecture` names, in one table.

A family bundles everything that differs between architectures: the NNX module to build, how
its `config.json` reads and writes, and how its parameters map to Hugging Face tensor names.
Everything else (resolving the config, abstract and sharded building, lazy safetensors
loading, export, damaged-file checks) is generic and lives in r1jax.models.build and
r1jax.models.hf. A new architecture plugs in with one `register(Family(...))` call in its own
module, imported from r1jax/models/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

if TYPE_CHECKING:  # annotations only: registry sits below every family module
    from flax import nnx

    from r1jax.config import ModelConfig
    from r1jax.models.hf import TensorMap

ParamPath = Tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """One architecture.

    name: the `ModelConfig.architecture` value ("qwen2", "qwen3", ...).
    hf_architecture: the transformers class named in config.json's "architectures"
        ("Qwen3ForCausalLM").
    model: `model(cfg, rngs=nnx.Rngs(seed))` builds the module. Every nnx.Param must carry
        `logical_axes` metadata (names from r1jax.mesh's rules tables).
    config_from_hf: config.json's dict -> ModelConfig (architecture=name). Raise
        r1jax.models.hf.HFFormatError for options the module does not implement; a missing
        required key may raise KeyError (the loader names the key and the file).
    config_to_hf: (cfg, torch dtype name) -> config.json dict that transformers loads.
    weight_map: cfg -> {parameter path in the pure dict: TensorMap}; one entry per parameter
        leaf, saying which HF tensors it is read from and written to (r1jax.models.hf.TensorMap).
    """

    name: str
    hf_architecture: str
    model: Callable[..., "nnx.Module"]
    config_from_hf: Callable[[Mapping[str, Any]], "ModelConfig"]
    config_to_hf: Callable[["ModelConfig", str], Dict[str, Any]]
    weight_map: Callable[["ModelConfig"], Mapping[ParamPath, "TensorMap"]]
    # (cfg, tensor name) -> True for checkpoint tensors this config deliberately does not read
    # (DeepSeek-V3's multi-token-prediction layer when num_mtp_layers is 0).
    ignored: Optional[Callable[["ModelConfig", str], bool]] = None


_FAMILIES: Dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; registering a second family under a taken name or HF class is an error."""
    for other in _FAMILIES.values():
        if other.name != family.name and other.hf_architecture == family.hf_architecture:
            raise ValueError(f"model family '{family.name}' reuses HF architecture "
                             f"'{family.hf_architecture}' of '{other.name}'")
    prev = _FAMILIES.get(family.name)
    if prev is not None and prev.hf_architecture != family.hf_architecture:
        raise ValueError(f"model family '{family.name}' is already registered for "
                         f"'{prev.hf_architecture}'")
    _FAMILIES[family.name] = family
    return family


def names() -> List[str]:
    return sorted(_FAMILIES)


def get(name: str) -> Family:
    """The family of a `model.architecture` value; an unknown one names the valid set."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.architecture '{name}' is not supported; supported: "
                         f"{', '.join(names())}") from None


def by_hf_architecture(hf_name: str):
    """The family whose transformers class is `hf_name`, or None."""
    return next((f for f in _FAMILIES.values() if f.hf_architecture == hf_name), None)


def hf_architectures() -> List[str]:
    return sorted(f.hf_architecture for f in _FAMILIES.values())
