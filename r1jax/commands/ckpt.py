"""`r1jax ckpt inspect DIR` and `r1jax ckpt export-hf DIR OUT`."""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from r1jax.commands import ckpt_dir, run_dir_of


def inspect(args) -> None:
    from r1jax import checkpoint as ckpt_lib

    d = ckpt_dir(args.dir)
    if args.array:
        step = args.step if args.step is not None else ckpt_lib.latest_listed_step(d)
        arr = ckpt_lib.read_array(d, step, args.array, args.index)
        print(json.dumps({"step": step, "array": args.array, "shape": list(arr.shape),
                          "dtype": str(arr.dtype), "values": arr.tolist()}))
        return
    steps = ckpt_lib.list_steps(d)
    if not steps:
        raise ckpt_lib.CheckpointError(ckpt_lib.not_a_checkpoint(d))
    print(ckpt_lib.describe(d, None))
    print(ckpt_lib.describe(d, args.step if args.step is not None else steps[-1]))


def export_run(run_or_ckpt_dir: str, out_dir: str, *, step: Optional[int] = None) -> str:
    """A run's checkpoint as an HF directory, with the run's tokenizer beside the weights."""
    from r1jax import checkpoint as ckpt_lib

    run_dir = run_dir_of(run_or_ckpt_dir)
    ckpt_lib.export_hf(ckpt_dir(run_dir), out_dir, step=step)
    tok_dir = os.path.join(run_dir, "tokenizer")
    if os.path.isdir(tok_dir):
        for name in os.listdir(tok_dir):
            shutil.copy(os.path.join(tok_dir, name), os.path.join(out_dir, name))
    return out_dir


def run(args) -> int:
    if args.ckpt_command == "inspect":
        inspect(args)
        return 0
    if args.ckpt_command == "export-hf":
        print(export_run(args.dir, args.out, step=args.step))
        return 0
    raise ValueError("ckpt needs an action: inspect or export-hf")
