"""`r1jax` command line: argument parsing only, then one call into r1jax.commands.

    r1jax [--devices N] train   [CONFIG ...] [key=value ...]
    r1jax [--devices N] eval    [CONFIG ...] [key=value ...] [--checkpoint RUN_DIR] [--step N]
    r1jax [--devices N] sample  --model HF_DIR --prompt TEXT [-G 4] [--max-new-tokens 64] ...
    r1jax [--devices N] mesh    [CONFIG ...] [key=value ...]
    r1jax [--devices N] compile [CONFIG ...] [key=value ...] [--topology v5p:2x2x2 [--slices 2]]
    r1jax               ckpt inspect DIR [--step N] [--array PATH] [--index "0, :4"]
    r1jax               ckpt export-hf DIR OUT [--step N]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

# No jax here: --devices must be applied before jax starts. config imports no jax.
from r1jax.config import arg

_EPILOG = """\
configs: a YAML file states only what it changes from the dataclass defaults
(r1jax/config.py); `base: other.yaml` chains files; key=value overrides win, e.g.
  r1jax train configs/r1_zero.yaml model.path=/models/qwen2.5-math-1.5b train.steps=100
Frequent overrides: run.dir=PATH (re-running with the same dir resumes), train.steps=N,
model.path=HF_DIR, data.path=FILE, checkpoint.every=K, mesh.ici.fsdp=8.
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="YAML config file(s), merged in order (train and eval default: the built-in demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _split_config(args) -> tuple:
    """argparse cannot tell 'CONFIG' from a first 'key=value': sort them here. The leading
    items without '=' are config files (merged in order); the rest are overrides."""
    items = ([args.config] if args.config else []) + list(args.overrides)
    configs = []
    while items and "=" not in items[0]:
        configs.append(items.pop(0))
    return configs, items


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="r1jax", description="DeepSeek-R1's GRPO reinforcement learning in JAX/Flax NNX.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    ap.add_argument("--devices", type=arg(int, "[1, inf)"), default=None,
                    help="emulate N CPU devices (sets XLA_FLAGS before jax starts; also R1JAX_DEVICES)")
    # Several processes (r1jax/distributed.py; README "Multi-host"). Without these, SLURM and
    # TPU pods are detected from their environment; elsewhere one process runs.
    mp = ap.add_argument_group("multi-process")
    mp.add_argument("--processes", type=int, default=None, metavar="N",
                    help="start N local processes on 127.0.0.1 (with --devices D CPU devices each)")
    mp.add_argument("--coordinator", metavar="HOST[:PORT]", help="process 0's address (also R1JAX_COORDINATOR)")
    mp.add_argument("--num-processes", type=int, metavar="N", help="processes in the job (also R1JAX_NUM_PROCESSES)")
    mp.add_argument("--process-id", type=int, metavar="I",
                    help="this process's id (also R1JAX_PROCESS_ID or an indexed Job's JOB_COMPLETION_INDEX)")
    mp.add_argument("--local-device-ids", metavar="IDS",
                    help="local devices this process drives, e.g. 0-7 (also R1JAX_LOCAL_DEVICE_IDS)")
    mp.add_argument("--heartbeat-timeout", type=int, metavar="S",
                    help="seconds until a silent process is declared dead and the job ends (default 60; "
                         "also R1JAX_HEARTBEAT_TIMEOUT)")
    mp.add_argument("--shutdown-timeout", type=int, metavar="S",
                    help="seconds a finished process waits for the others (default 120; also R1JAX_SHUTDOWN_TIMEOUT)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="run GRPO (with the optional cold-start SFT); no config: the CPU demo",
                       description="Train with GRPO. Without a CONFIG runs the built-in demo: a tiny model "
                                   "learns arithmetic on CPU (cold-start SFT, then GRPO), printing held-out "
                                   "accuracy before and after RL. Re-running with the same run.dir resumes.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    _config_args(p)

    p = sub.add_parser("eval", help="pass@1 over k samples and cons@k on the held-out split",
                       description="Evaluate as R1 reports: pass@1 averaged over eval.k samples (temperature "
                                   "eval.temperature, top-p eval.top_p) and cons@k (majority vote). The model "
                                   "comes from model.path (an HF dir) or --checkpoint RUN_DIR (its latest or "
                                   "--step checkpoint; the run's config is used as the base).",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    _config_args(p)
    p.add_argument("--checkpoint", help="a run directory (or its checkpoints/ dir) to evaluate")
    p.add_argument("--step", type=arg(int, "[0, inf)"), help="checkpoint step (default: latest usable)")

    p = sub.add_parser("sample", help="sample completions from an HF model directory",
                       description="Sample G completions per prompt with r1jax's sampler (KV cache, shared "
                                   "prompt prefill). Prints one JSON line per sample.")
    p.add_argument("--model", required=True, help="HF directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--template", default="none", help="r1_zero | chat | none (default) | a string with {prompt}")
    p.add_argument("-G", "--num-samples", type=arg(int, "[1, inf)"), default=1, help="samples per prompt (G)")
    p.add_argument("--max-new-tokens", type=arg(int, "[1, inf)"), default=64)
    p.add_argument("--temperature", type=arg(float, "[0, inf)"), default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=arg(float, "(0, 1]"), default=1.0)
    p.add_argument("--top-k", type=arg(int, "[0, inf)"), default=0, help="0 = off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=arg(int, "[0, inf)"), default=0)
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")

    p = sub.add_parser("mesh", help="build a config's mesh and print its shape and parameter shardings",
                       description="Build the mesh of a config on the available (or --devices emulated) devices "
                                   "and print the device grid per node and every parameter's sharding under the "
                                   "training and sampling rules, with per-device bytes.")
    _config_args(p)

    p = sub.add_parser("compile", help="AOT-compile the GRPO update: per-device memory, FLOPs, collectives",
                       description="Compile one GRPO update (and the reference forward) from abstract shapes, "
                                   "nothing allocated, for the config's mesh on the available (or --devices "
                                   "emulated) devices or, with --topology, for a TPU slice this machine does not "
                                   "have (needs libtpu: pip install 'jax[tpu]'). Prints per-device memory, FLOPs, "
                                   "the collectives with their bytes inside/across nodes, then one JSON line.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    _config_args(p)
    p.add_argument("--topology", help="TPU topology to compile for, e.g. v5p:2x2x2, v5e:4x4, v4:2x2x1")
    p.add_argument("--slices", type=arg(int, "[1, inf)"), default=1, help="TPU slices of --topology joined by DCN (the dcn axes)")
    p.add_argument("--batch", type=arg(int, "[1, inf)"), help="sequences per update (default: the config's mini-batch)")
    p.add_argument("--prompt-len", type=arg(int, "[1, inf)"), help="prompt tokens (default: data.max_prompt_len's bucket)")
    p.add_argument("--completion-len", type=arg(int, "[1, inf)"), help="completion tokens (default: sampler.max_new_tokens)")

    p = sub.add_parser("study", help="mesh scaling study: compile a GRPO step's programs per mesh, project time",
                       description="For each mesh (the config's, each --mesh file's, every --sweep combination) "
                                   "compile from abstract shapes the policy update, the reference forward, the "
                                   "prefill and one sampler decode step; report per-device memory (params, "
                                   "optimizer, reference, KV cache, activations) beside an analytic floor, "
                                   "loop-corrected FLOPs and bytes, every collective inside/across nodes, and the "
                                   "projected time of each part and of the whole GRPO step on --profile; with "
                                   "--measure N also the measured time where the devices exist.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    _config_args(p)
    p.add_argument("--mesh", action="append", default=[], help="a mesh config file (repeatable)")
    p.add_argument("--sweep", action="append", default=[], help="axis sizes to sweep, e.g. ici.fsdp=1,2,4,8 (repeatable: product)")
    p.add_argument("--profile", default="h800", help="hardware profile: h800 h100 h200 tpu-v5p tpu-v5e tpu-v6e cpu")
    p.add_argument("--efficiency", action="append", default=[], help="PART[.matmul|.hbm|.overlap]=X (repeatable)")
    p.add_argument("--topology", help="compile for a TPU topology, e.g. v5p:2x2x2 (needs libtpu)")
    p.add_argument("--slices", type=arg(int, "[1, inf)"), default=1, help="TPU slices of --topology")
    p.add_argument("--prompts", type=arg(int, "[1, inf)"), help="prompts per rollout P (default: train.prompts_per_rollout)")
    p.add_argument("--prompt-len", type=arg(int, "[1, inf)"), help="prompt tokens (default: data.max_prompt_len's bucket)")
    p.add_argument("--completion-len", type=arg(int, "[1, inf)"), help="completion tokens (default: sampler.max_new_tokens)")
    p.add_argument("--decode-steps", type=arg(int, "[1, inf)"), help="decode steps per rollout (default: completion length)")
    p.add_argument("--measure", type=arg(int, "[0, inf)"), default=0, help="time each program N times where the devices exist")
    p.add_argument("--bytes-source", choices=("compiled", "analytic"), default="compiled",
                   help="HBM bytes of the projection: the compiler's or the analytic floor's")
    p.add_argument("--out", help="write study.json, study.csv, memory.png, time.png here")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")

    p = sub.add_parser("cost", help="R1's cost table from its hours; hours and dollars projected for a recipe",
                       description="Rebuild DeepSeek-R1's published cost table from its hours, print the "
                                   "utilisation DeepSeek's run implies, and project hours and dollars of a recipe "
                                   "(r1jax/cost.py RECIPES) on a hardware profile, every assumption printed.")
    p.add_argument("--recipe", default="r1-zero", help="r1-zero | r1-zero-qwen7b-h200x8")
    p.add_argument("--model", help="a model config file or deepseek-v3 | qwen2.5-math-7b")
    p.add_argument("--profile", help="hardware profile (default: the recipe's)")
    p.add_argument("--devices-total", type=arg(int, "[1, inf)"), help="devices of the run (default: the recipe's)")
    p.add_argument("--decode", choices=("continuous", "synchronous"), help="decode steps: mean or max length")
    p.add_argument("--updates", type=arg(int, "[1, inf)"), help="policy updates")
    p.add_argument("--length", help='mean response length: N or "update:N,update:N" (a curve)')
    p.add_argument("--efficiency", action="append", default=[], help="PART[.matmul|.hbm|.overlap]=X (repeatable)")
    p.add_argument("--study", help="a `r1jax study --out` study.json: scale each part by compiled / analytic")
    p.add_argument("--rate", type=arg(float, "[0, inf)"), help="$ per device-hour (default: the profile's)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("env", help="backend, devices, library versions, libtpu/CUDA, the mesh a config builds here")
    _config_args(p)
    p.add_argument("--json", action="store_true")

    ck = sub.add_parser("ckpt", help="inspect checkpoints or export one to Hugging Face format")
    cks = ck.add_subparsers(dest="ckpt_command", metavar="ACTION")
    p = cks.add_parser("inspect", help="list steps, arrays (path, shape, dtype, stored size), or read one array",
                       description="From metadata only: the steps, and for a step every array's path, shape, "
                                   "dtype and stored bytes. --array reads one array (or --index a slice of it) "
                                   "lazily through TensorStore.")
    p.add_argument("dir", help="a run directory or its checkpoints/ directory")
    p.add_argument("--step", type=arg(int, "[0, inf)"))
    p.add_argument("--array", help="array path, e.g. params/layers/mlp/up")
    p.add_argument("--index", help='numpy-style index, e.g. "0, :4, 2:8"')
    p = cks.add_parser("export-hf", help="write a checkpoint's policy as an HF safetensors directory",
                       description="Restore the policy parameters of a step onto the CPU (no optimizer state) "
                                   "and write config.json + safetensors (+ the run's tokenizer) that "
                                   "transformers loads.")
    p.add_argument("dir", help="a run directory or its checkpoints/ directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--step", type=arg(int, "[0, inf)"), help="default: the latest usable step")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    devices = args.devices
    if devices is None and os.environ.get("R1JAX_DEVICES"):
        try:
            devices = arg(int, "[1, inf)")(os.environ["R1JAX_DEVICES"])
        except argparse.ArgumentTypeError as e:
            build_parser().error(f"R1JAX_DEVICES: {e}")
    if devices:
        from r1jax.mesh import set_host_device_count

        set_host_device_count(devices)
    from r1jax.config import ConfigError
    from r1jax import distributed

    try:
        timeouts = distributed.timeouts_from(heartbeat_s=args.heartbeat_timeout, shutdown_s=args.shutdown_timeout)
        if args.processes is not None:
            return distributed.launch_local(args.processes, devices, distributed.strip_flag(argv, "--processes"),
                                            timeouts=timeouts)
        if args.command in ("train", "mesh") or (args.command == "compile" and not args.topology):
            distributed.initialize(distributed.detect(
                coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                local_device_ids=args.local_device_ids), timeouts)
        return _dispatch(args)
    except (ConfigError, ValueError, OSError, KeyError, RuntimeError) as e:
        # One line naming the culprit; the traceback only with R1JAX_DEBUG=1.
        if os.environ.get("R1JAX_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"r1jax {args.command}: error: {msg}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    from r1jax import commands

    if hasattr(args, "config"):
        args.config_path, args.config_overrides = _split_config(args)
    return commands.run(args)


if __name__ == "__main__":
    sys.exit(main())
