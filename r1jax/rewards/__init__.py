"""Rule-based rewards (R1): maths accuracy, format, language consistency, code, length.

Each built-in is ``fn(completions=[str, ...], **columns) -> [float | None, ...]`` (TRL's
convention: dataset columns arrive as keyword lists, unknown ones are ignored). The trainer
scores a rollout with ``RewardRunner(cfg.rewards).score(...)``.
"""

from r1jax.rewards.accuracy import accuracy, extract_answer, is_equivalent
from r1jax.rewards.code import code, extract_program
from r1jax.rewards.format import format  # noqa: A004 - the documented public name
from r1jax.rewards.language import language_consistency
from r1jax.rewards.length import cosine_scaled, length, overlong_penalty
from r1jax.rewards.registry import BUILTINS, RewardResult, RewardRunner, resolve
from r1jax.rewards.sandbox import Limits, RunResult, Sandbox

__all__ = [
    "accuracy", "format", "language_consistency", "code", "length", "overlong_penalty",
    "cosine_scaled", "extract_answer", "extract_program", "is_equivalent", "RewardRunner",
    "RewardResult", "resolve", "BUILTINS", "Sandbox", "Limits", "RunResult",
]
