"""Models: the family registry, the dense Qwen2/Qwen3/Llama transformer, the DeepSeek-V3 and
Qwen3-MoE decoders (r1jax.models.moe_decoder), Hugging Face interop,
and the one module that resolves configs and builds models (r1jax.models.build)."""

from r1jax.models import registry
from r1jax.models.transformer import Transformer
from r1jax.models import hf  # registers the dense families
from r1jax.models import hf_moe  # registers deepseek_v3 and qwen3_moe
from r1jax.models.build import (abstract_model, build_model, create, from_pretrained, num_params,
                                resolve_model_config)
from r1jax.models.hf import HFFormatError, load_config as load_hf_config, save_pretrained

__all__ = ["Transformer", "registry", "hf", "hf_moe", "abstract_model", "build_model", "create",
           "from_pretrained", "num_params", "resolve_model_config", "save_pretrained",
           "load_hf_config", "HFFormatError"]
