"""Models: the dense Qwen2/Llama transformer and Hugging Face interop."""

from r1jax.models.transformer import Transformer, create, num_params
from r1jax.models.hf import from_pretrained, load_config as load_hf_config, save_pretrained

__all__ = ["Transformer", "create", "num_params", "from_pretrained", "save_pretrained", "load_hf_config"]
