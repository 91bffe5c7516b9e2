"""Command bodies: what each `r1jax COMMAND` does once its arguments are parsed (r1jax/cli.py
parses, nothing else). Each module has `run(args) -> exit code`; `args` is the argparse
namespace, with `config_path` and `config_overrides` already split by the CLI. Library modules
below hold no command code."""

from __future__ import annotations

import importlib
import os

DEMO = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes", "demo.yaml")

# Command name -> module under r1jax.commands (a command not listed lives in the module of its
# own name).
MODULES = {"eval": "evaluate"}


def run(args) -> int:
    """Run the command `args.command`; returns its exit code."""
    name = MODULES.get(args.command, args.command)
    try:
        module = importlib.import_module(f"r1jax.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"r1jax.commands.{name}":
            raise
        raise ValueError(f"unknown command {args.command}") from None
    return module.run(args)


def ckpt_dir(path: str) -> str:
    """A run directory's checkpoints/ directory, or `path` itself when it is one."""
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def run_dir_of(path: str) -> str:
    """The run directory of a run or checkpoints/ directory."""
    path = os.path.abspath(path)
    return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def load_config(args, default=None):
    from r1jax.config import load_config as load

    return load(args.config_path or default, args.config_overrides)
