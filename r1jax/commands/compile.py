"""`r1jax compile [CONFIG ...] [key=value ...] [--topology v5p:2x2x2 [--slices 2]]`: compile
one GRPO update (and the reference forward) from abstract shapes; print the report as a table,
then one JSON line."""

from __future__ import annotations

import json

from r1jax.commands import load_config


def run(args) -> int:
    from r1jax import aot

    if args.slices != 1 and args.topology is None:
        raise ValueError("--slices needs --topology (slices of a TPU topology)")
    rep = aot.compile_update(load_config(args), topology=args.topology, slices=args.slices,
                             batch_sequences=args.batch, prompt_len=args.prompt_len,
                             completion_len=args.completion_len)
    print(aot.format_report(rep) + "\n" + json.dumps(rep))
    return 0
