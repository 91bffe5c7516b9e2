"""The accelerator figures of benchmarks/device_check.sh: one device, real executions.

A Qwen2.5-Math-1.5B-shaped dense model in bf16 (full rematerialisation): the study compiles
and times its four programs on the device, then reports
  * the update's MFU: compiled (loop-corrected) FLOPs / measured seconds / the profile's peak;
  * decode tokens/s at batch 256 (16 prompts x G 16) and the share of the HBM roofline the
    decode step reaches: its analytic bytes (weights + KV cache + activations) / measured
    seconds / HBM bandwidth;
  * each part's projection on the profile beside its measurement.
--dry: the tiny model on the CPU profile, so that the script is exercised in CI.

    python benchmarks/device_bench.py [--profile h200] [--dry]   # one JSON line
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="h200")
    ap.add_argument("--dry", action="store_true", help="tiny model, CPU profile (CI)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    import jax

    from r1jax import hardware, study
    from r1jax.config import load_config

    if args.dry:
        cfg = load_config(os.path.join(ROOT, "configs/model/tiny.yaml"), [
            "train.prompts_per_rollout=4", "grpo.group_size=4", "grpo.num_minibatches=2",
            "data.max_prompt_len=16", "sampler.prompt_buckets=[16]", "sampler.max_new_tokens=16",
            "grpo.beta=0.001", "mesh.ici={fsdp: 1}"])
        profile = hardware.get("cpu")
    else:
        cfg = load_config(os.path.join(ROOT, "configs/model/qwen2.5-math-1.5b.yaml"), [
            "model.remat=full", "train.prompts_per_rollout=16", "grpo.group_size=16",
            "grpo.num_minibatches=16", "data.max_prompt_len=256", "sampler.prompt_buckets=[256]",
            "sampler.max_new_tokens=1024", "sampler.kv_cache_dtype=bfloat16", "grpo.beta=0.001",
            "mesh.ici={fsdp: 1}"])
        profile = hardware.get(args.profile)
    t0 = time.perf_counter()
    row = study.study_mesh(cfg, jax.devices()[:1], profile=profile, measure_reps=args.reps)
    parts = row["parts"]
    u, d = parts["update"], parts["decode"]
    batch = row["shape"]["prompts"] * row["shape"]["group_size"]
    out = {
        "benchmark": "device_bench", "dry": args.dry, "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "profile": profile.name,
        "model_params": study.param_counts(cfg.model)["total"], "shape": row["shape"],
        "update_mfu": u["flops"] / u["measured_s"] / profile.peak_flops,
        "update_mfu_6nd": u["analytic"]["flops"] / u["measured_s"] / profile.peak_flops,
        "decode_batch": batch, "decode_tokens_per_s": batch / d["measured_s"],
        "decode_hbm_roofline_fraction": (d["analytic"]["bytes_accessed"] / d["measured_s"]
                                         / profile.hbm_bandwidth),
        "parts": {p: {"measured_s": v["measured_s"], "projected_s": v["projected"]["total_s"],
                      "projected_bound": v["projected"]["bound"],
                      "floor_projected_s": v["analytic_projected"]["total_s"],
                      "flops": v["flops"], "bytes_accessed": v["bytes_accessed"],
                      "peak_bytes": v.get("peak_bytes")} for p, v in parts.items()},
        "step": row["step"], "goals": {"update_mfu": 0.5, "decode_hbm_roofline_fraction": 0.6},
        "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
