"""`r1jax train [CONFIG] [key=value ...]`: GRPO training (the built-in demo without a CONFIG)."""

from __future__ import annotations

from r1jax.commands import DEMO, load_config


def run(args) -> int:
    from r1jax.trainer import train

    summary = train(load_config(args, DEMO))
    return 0 if summary is not None else 1
