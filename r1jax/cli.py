"""`r1jax` command line: argument parsing only, then one call into the library.

    r1jax [--devices N] train   [CONFIG] [key=value ...]
    r1jax [--devices N] eval    [CONFIG] [key=value ...] [--checkpoint RUN_DIR] [--step N]
    r1jax [--devices N] sample  --model HF_DIR --prompt TEXT [-G 4] [--max-new-tokens 64] ...
    r1jax [--devices N] mesh    [CONFIG] [key=value ...]
    r1jax [--devices N] compile [CONFIG] [key=value ...] [--topology v5p:2x2x2 [--slices 2]]
    r1jax               ckpt inspect DIR [--step N] [--array PATH] [--index "0, :4"]
    r1jax               ckpt export-hf DIR --step N OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

# No jax here: --devices must be applied before jax starts. config imports no jax.
from r1jax.config import arg

DEMO = os.path.join(os.path.dirname(__file__), "recipes", "demo.yaml")

_EPILOG = """\
configs: a YAML file states only what it changes from the dataclass defaults
(r1jax/config.py); `base: other.yaml` chains files; key=value overrides win, e.g.
  r1jax train configs/r1_zero.yaml model.path=/models/qwen2.5-math-1.5b train.steps=100
Frequent overrides: run.dir=PATH (re-running with the same dir resumes), train.steps=N,
model.path=HF_DIR, data.path=FILE, checkpoint.every=K, mesh.ici.fsdp=8.
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (default: the built-in demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _split_config(args) -> tuple:
    """argparse cannot tell 'CONFIG' from a first 'key=value': sort them here."""
    items = ([args.config] if args.config else []) + list(args.overrides)
    config = None
    if items and "=" not in items[0]:
        config = items.pop(0)
    return config, items


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


def _ckpt_dir(path: str) -> str:
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


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
    from r1jax import config as config_lib
    from r1jax import distributed

    if args.command == "train":
        from r1jax.trainer import train

        path, overrides = _split_config(args)
        cfg = config_lib.load_config(path or DEMO, overrides)
        summary = train(cfg)
        return 0 if summary is not None else 1

    if args.command == "eval":
        from r1jax.evaluation import evaluate_command

        path, overrides = _split_config(args)
        out = evaluate_command(path, overrides, checkpoint=args.checkpoint and _ckpt_dir(args.checkpoint),
                               step=args.step, default_config=DEMO)
        print(json.dumps(out))
        return 0

    if args.command == "sample":
        from r1jax.sampler import sample_text
        from r1jax.tokenizer import apply_template, load_tokenizer

        prompts = list(args.prompt)
        if args.prompt_file:
            with open(args.prompt_file) as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError("no prompt: give --prompt TEXT or --prompt-file FILE")
        if args.template != "none":
            tok = load_tokenizer(args.model)
            prompts = [apply_template(p, args.template, tok) for p in prompts]
        rows = sample_text(args.model, prompts, num_samples=args.num_samples, seed=args.seed, dtype=args.dtype,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k, stop_strings=list(args.stop))
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        return 0

    if args.command == "mesh":
        from r1jax.layout_report import describe_mesh

        path, overrides = _split_config(args)
        report = describe_mesh(config_lib.load_config(path, overrides))
        if distributed.is_main_process():  # every process builds the mesh; one prints it
            print(report)
        return 0

    if args.command == "compile":
        from r1jax.aot import compile_command

        path, overrides = _split_config(args)
        print(compile_command(config_lib.load_config(path, overrides), topology=args.topology,
                              slices=args.slices, batch_sequences=args.batch, prompt_len=args.prompt_len,
                              completion_len=args.completion_len))
        return 0

    if args.command == "ckpt":
        from r1jax import checkpoint as ckpt_lib

        if args.ckpt_command == "inspect":
            d = _ckpt_dir(args.dir)
            if args.array:
                step = args.step if args.step is not None else ckpt_lib.latest_listed_step(d)
                arr = ckpt_lib.read_array(d, step, args.array, args.index)
                print(json.dumps({"step": step, "array": args.array, "shape": list(arr.shape),
                                  "dtype": str(arr.dtype), "values": arr.tolist()}))
            else:
                steps = ckpt_lib.list_steps(d)
                if not steps:
                    raise ckpt_lib.CheckpointError(ckpt_lib.not_a_checkpoint(d))
                print(ckpt_lib.describe(d, None))
                print(ckpt_lib.describe(d, args.step if args.step is not None else steps[-1]))
            return 0
        if args.ckpt_command == "export-hf":
            from r1jax.evaluation import export_run

            print(export_run(args.dir, args.out, step=args.step))
            return 0
        raise ValueError("ckpt needs an action: inspect or export-hf")
    raise ValueError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
