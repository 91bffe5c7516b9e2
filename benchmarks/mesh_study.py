"""The mesh study (DESIGN.md): does putting fsdp inside the node and data across nodes really
move the heavy traffic onto NVLink? Compile one GRPO update for R1's 64 nodes x 8 H800s
(512 emulated CPU devices, consecutive ids = one node) under four 64x8 layouts and read the
per-device memory and the collectives out of the compiled HLO:

  a  ici fsdp=8   / dcn data=64    the shipped configs/mesh/h800x512.yaml
  b  ici data=8   / dcn fsdp=64    the "wrong" way round
  c  ici tensor=8 / dcn data=64    tensor parallelism inside the node
  d  ici fsdp=8   / dcn fsdp=64    ZeRO-3 across all 512 devices

Traffic is split into ici (every member of a replica group in one node) and dcn (a group
spanning nodes), and turned into time at R1_NOTES' achieved bandwidths (NVLink ~160 GB/s,
InfiniBand ~50 GB/s per GPU), without overlap.

Model: Qwen2.5-Math-1.5B's shapes (configs/model/qwen2.5-math-1.5b.yaml) with fewer layers
(default 4, --layers) so each compile takes seconds on 2 cores; per-layer traffic scales with
the layer count, embeddings do not. Batch: R1's mini-batch of 512 sequences (8,192 outputs /
16 mini-batches), shorter sequences than R1's 32K (--prompt-len/--completion-len), which
change activation memory, not parameter traffic.

    python benchmarks/mesh_study.py [--layers 4] [--layouts abcd] [--prompt-len 256]
        [--completion-len 1024] [--sequences 512] [--topology v5p:8x8x8]

The CPU compiler is not the GPU one: it does not form reduce-scatters (an all-reduce moves
twice the bytes) and upcasts bf16 collectives to f32; `--topology v5p:8x8x8` repeats the study
with the TPU compiler (same 512-way mesh, same emulated nodes of 8 chips) as a cross-check.
Both compilers keep the unembedding's gather and gradient reduction inside the per-token
logprob loop (r1jax.logprobs), so that loop's traffic is reported apart ("loop_*" vs "rest_*").

Prints one line per layout, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LAYOUTS = {
    "a": ({"fsdp": 8}, {"data": 64}, "ici fsdp=8 / dcn data=64 (shipped h800x512)"),
    "b": ({"data": 8}, {"fsdp": 64}, "ici data=8 / dcn fsdp=64 (wrong way round)"),
    "c": ({"tensor": 8}, {"data": 64}, "ici tensor=8 / dcn data=64"),
    "d": ({"fsdp": 8}, {"fsdp": 64}, "ici fsdp=8 / dcn fsdp=64 (ZeRO-3 across nodes)"),
}
NUM_DEVICES = 512
# The einsum of r1jax.logprobs.token_logprobs (hidden x unembedding, chunk by chunk along the
# completion inside lax.scan): collectives tagged with it belong to that loop. Some lose their
# op_name (TPU); they are told apart by running more often than the layer scans do.
LOGPROB_LOOP_OP = "bcd,dv->bcv"


def _split_logprob_loop(instrs, layers: int):
    """Traffic of the logprob chunk loop vs everything else (layers, embeddings, optimizer)."""
    from r1jax import aot

    def in_loop(r):
        return LOGPROB_LOOP_OP in r["op_name"] or r["runs"] > layers

    out = {}
    for name, keep in (("loop", in_loop), ("rest", lambda r: not in_loop(r))):
        ici = sum(r["traffic_bytes"] for r in instrs if keep(r) and r["where"] == "ici")
        dcn = sum(r["traffic_bytes"] for r in instrs if keep(r) and r["where"] != "ici")
        out[f"{name}_ici_MiB"] = round(ici / 2**20, 1)
        out[f"{name}_dcn_MiB"] = round(dcn / 2**20, 1)
        out[f"{name}_comm_ms"] = round((ici / aot.ICI_BYTES_PER_S + dcn / aot.DCN_BYTES_PER_S)
                                       * 1e3, 2)
    return out
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args) -> None:
    import dataclasses

    from r1jax import aot
    from r1jax.config import MeshConfig, load_config

    base = load_config(os.path.join(ROOT, "configs", "model", "qwen2.5-math-1.5b.yaml"), [
        f"model.num_layers={args.layers}", "model.remat=full", "grpo.beta=0.001",
        "grpo.micro_batches=1"])
    results = []
    for key in args.layouts:
        ici, dcn, label = LAYOUTS[key]
        cfg = dataclasses.replace(base, mesh=MeshConfig(ici=dict(ici), dcn=dict(dcn)))
        t0 = time.perf_counter()
        rep = aot.compile_update(cfg, batch_sequences=args.sequences, prompt_len=args.prompt_len,
                                 completion_len=args.completion_len, reference=False,
                                 topology=args.topology,
                                 compiler_options={"xla_backend_optimization_level": 0},
                                 detail=True)
        u = rep["update"]
        split = _split_logprob_loop(u["collectives"]["instructions"], args.layers)
        per_kind = {k: {"count": v["count"], "traffic_MiB": round(v["traffic_bytes"] / 2**20, 1),
                        "ici_MiB": round(v["ici_bytes"] / 2**20, 1),
                        "dcn_MiB": round(v["dcn_bytes"] / 2**20, 1),
                        "group_sizes": v["group_sizes"]}
                    for k, v in ((k, u["collectives"][k]) for k in aot.COLLECTIVES) if v["count"]}
        tot = u["collectives"]["total"]
        row = {
            "layout": key, "label": label, "mesh": rep["mesh"],
            "params_per_device_MiB": round(rep["params"]["per_device_bytes"] / 2**20, 1),
            "state_per_device_MiB": round(rep["params"]["state_per_device_bytes"] / 2**20, 1),
            "sharded_enough": rep["params"]["sharded_enough"],
            "argument_MiB": round(u["argument_bytes"] / 2**20, 1),
            "temp_MiB": round(u["temp_bytes"] / 2**20, 1),
            "peak_MiB": round(u["peak_bytes"] / 2**20, 1),
            "gflops_per_device": round(u.get("flops", 0) / 1e9, 1),
            "ici_MiB": round(tot["ici_bytes"] / 2**20, 1),
            "dcn_MiB": round((tot["dcn_bytes"] + tot["unknown_bytes"]) / 2**20, 1),
            "comm_ms": round(u["comm_estimate"]["total_s"] * 1e3, 2),
            "comm_ici_ms": round(u["comm_estimate"]["ici_s"] * 1e3, 2),
            "comm_dcn_ms": round(u["comm_estimate"]["dcn_s"] * 1e3, 2),
            **split,
            "collectives": per_kind,
            "top": [{"kind": t["kind"], "shape": t["shape"], "runs": t["runs"],
                     "where": t["where"], "MiB": round(t["traffic_bytes"] / 2**20, 1),
                     "op": t["op_name"][-70:]} for t in u["collectives"]["top"][:3]],
            "compile_s": round(time.perf_counter() - t0, 1),
        }
        results.append(row)
        print(f"[{key}] {label:48s} state/dev {row['state_per_device_MiB']:7.1f} MiB  "
              f"peak {row['peak_MiB']:7.1f} MiB | all: ici {row['ici_MiB']:9.0f} MiB dcn "
              f"{row['dcn_MiB']:9.0f} MiB ~{row['comm_ms'] / 1e3:6.1f} s | without the logprob "
              f"loop: ici {row['rest_ici_MiB']:7.0f} MiB dcn {row['rest_dcn_MiB']:7.0f} MiB "
              f"~{row['rest_comm_ms']:7.1f} ms  ({row['compile_s']} s)", flush=True)
    best = min(results, key=lambda r: r["comm_ms"])
    best_rest = min(results, key=lambda r: r["rest_comm_ms"])
    out = {"study": "mesh_study", "devices": NUM_DEVICES, "devices_per_node": 8,
           "compiled_for": args.topology or "cpu",
           "model": f"qwen2.5-math-1.5b shapes, {args.layers} layers, bf16, remat full",
           "batch": {"sequences": args.sequences, "prompt_len": args.prompt_len,
                     "completion_len": args.completion_len},
           "bandwidth_GBps": {"ici": 160, "dcn": 50}, "fastest_comm": best["layout"],
           "fastest_comm_without_logprob_loop": best_rest["layout"],
           "layouts": results}
    print(json.dumps(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="transformer layers (model has 28)")
    ap.add_argument("--layouts", default="abcd", help="which layouts, e.g. 'ab'")
    ap.add_argument("--sequences", type=int, default=512, help="sequences per mini-batch")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--completion-len", type=int, default=1024)
    ap.add_argument("--topology", default=None,
                    help="compile with the TPU compiler for this 512-chip topology (v5p:8x8x8; needs "
                         "libtpu; ~3 min per layout) instead of 512 CPU devices; nodes stay "
                         "8 consecutive chips")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = set(args.layouts) - set(LAYOUTS)
    if bad:
        ap.error(f"unknown layout(s) {sorted(bad)}; valid: {''.join(LAYOUTS)}")
    if args.worker:
        _worker(args)
        return 0
    # Fake devices must exist before jax starts: run the study in a fresh interpreter.
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={NUM_DEVICES}"])
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + list(argv if argv is not None
                                                                        else sys.argv[1:])
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
