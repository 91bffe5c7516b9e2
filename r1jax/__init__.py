"""r1jax: DeepSeek-R1's GRPO reinforcement learning in JAX/Flax NNX."""

__version__ = "0.1.0"
