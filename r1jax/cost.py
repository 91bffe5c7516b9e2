"""What an RL run costs: R1's published table reproduced from its hours, and projections of
hours and dollars for a recipe from the per-part time model of `r1jax.study`.

The published table (DeepSeek-R1, Nature 2025 supplementary; R1_NOTES "The headline"), H800
at $2 per GPU-hour: R1-Zero 101K GPU-h ($202K), SFT data creation 5K ($10K), R1 41K ($82K),
147K GPU-h and $294K in all; 512 GPUs for about 198 h (R1-Zero) and about 80 h (R1).
`published_table()` rebuilds it from the hours: GPU-hours = GPUs x wall hours, rounded to the
table's thousands BEFORE pricing and summing (priced unrounded, R1-Zero's 101,376 GPU-h would
print as $203K and the total as $295K: the table's dollars are its rounded hours x $2).

A projection (`project`) walks a recipe's rollouts one by one. Each rollout of P x G outputs
at the length the recipe's length curve gives at that step costs

    prefill(P prompts) + decode steps x decode(one step of P x G tokens)
      + (P x G / minibatch) x reference(minibatch) + M x update(minibatch)

each part in seconds from `r1jax.hardware.project` on the analytic FLOPs and bytes of
`r1jax.study.analytic_part` (the floor: perfect split, no recomputation beyond the recipe's
remat), optionally scaled part by part by the ratio of a study's compiled projection to the
analytic one at the study's shapes (`calibration`: what the compiler adds, collectives
included). Decode steps per rollout: "continuous" (continuous batching, as vLLM serves R1's
rollouts: the mean length) or "synchronous" (one batch decodes until its longest output ends:
the maximum length, as r1jax's own sampler does). Every assumption is in the result's
"assumptions" and printed by `format_projection`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from r1jax import hardware
from r1jax import study

# ---------------------------------------------------------------------------------------------
# The published table
# ---------------------------------------------------------------------------------------------
PUBLISHED_RATE = 2.0  # $ per H800 GPU-hour
PUBLISHED_GPUS = 512  # 64 nodes x 8 H800
# (phase, wall-clock hours on the 512 GPUs or None, GPU-hours when published directly)
PUBLISHED_PHASES: Tuple[Tuple[str, Optional[float], Optional[float]], ...] = (
    ("DeepSeek-R1-Zero", 198.0, None),
    ("SFT data creation", None, 5000.0),
    ("DeepSeek-R1", 80.0, None),
)
# What the paper prints, for the check (thousands of GPU-hours, thousands of dollars).
PUBLISHED_PRINTED = {"DeepSeek-R1-Zero": ("101K", "$202K"), "SFT data creation": ("5K", "$10K"),
                     "DeepSeek-R1": ("41K", "$82K"), "total": ("147K", "$294K")}


def published_table(gpus: int = PUBLISHED_GPUS, rate: float = PUBLISHED_RATE,
                    phases=PUBLISHED_PHASES) -> Dict[str, Any]:
    """R1's cost table rebuilt from its hours, at the table's precision (see the module doc)."""
    rows = []
    for name, wall_h, gpu_h in phases:
        exact = gpu_h if gpu_h is not None else gpus * wall_h
        k = round(exact / 1000)
        rows.append({"phase": name, "wall_hours": wall_h, "gpu_hours_exact": exact,
                     "gpu_hours_k": k, "dollars_k": k * rate,
                     "gpu_hours": f"{k}K", "dollars": f"${k * rate:.0f}K"})
    tk = sum(r["gpu_hours_k"] for r in rows)
    rows.append({"phase": "total", "wall_hours": None,
                 "gpu_hours_exact": sum(r["gpu_hours_exact"] for r in rows),
                 "gpu_hours_k": tk, "dollars_k": tk * rate, "gpu_hours": f"{tk}K",
                 "dollars": f"${tk * rate:.0f}K"})
    return {"gpus": gpus, "rate_per_gpu_hour": rate, "rows": rows,
            "note": ("GPU-hours = GPUs x wall hours, rounded to thousands, then priced and "
                     "summed (the table's own arithmetic)")}


def format_table(t: Dict[str, Any]) -> str:
    lines = [f"{'phase':20s} {'wall h':>8s} {'GPU-h':>8s} {'cost':>8s}   "
             f"({t['gpus']} H800 at ${t['rate_per_gpu_hour']:.0f}/GPU-h)"]
    for r in t["rows"]:
        wall = f"{r['wall_hours']:.0f}" if r["wall_hours"] else "-"
        lines.append(f"{r['phase']:20s} {wall:>8s} {r['gpu_hours']:>8s} {r['dollars']:>8s}")
    lines.append(t["note"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    """One RL run to cost.

    length_curve: (policy update, mean response length in tokens) points, linear in between
    (one point: a constant). decode: "continuous" | "synchronous" (see the module doc).
    decode_model_parallel: devices that split the weights during decoding (tensor / expert
    parallelism); None: the fewest (a power of two) whose HBM holds the weights with
    `hbm_headroom` of it left for the KV cache."""

    name: str
    model: str  # a model config file (configs/model/...) or a name in MODELS
    updates: int
    prompts_per_rollout: int
    group_size: int
    num_minibatches: int
    prompt_len: int
    length_curve: Tuple[Tuple[float, float], ...]
    max_len: int
    profile: str = "h800"
    devices: int = 512
    decode: str = "continuous"
    decode_model_parallel: Optional[int] = None
    hbm_headroom: float = 0.4
    remat: str = "full"
    notes: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.decode not in ("continuous", "synchronous"):
            raise ValueError(f"recipe {self.name}: decode must be continuous or synchronous, "
                             f"got {self.decode!r}")
        for k in ("updates", "prompts_per_rollout", "group_size", "num_minibatches",
                  "devices", "max_len"):
            if getattr(self, k) < 1:
                raise ValueError(f"recipe {self.name}: {k} must be >= 1, got {getattr(self, k)}")
        if (self.prompts_per_rollout * self.group_size) % self.num_minibatches:
            raise ValueError(f"recipe {self.name}: num_minibatches={self.num_minibatches} does "
                             f"not divide the rollout's {self.prompts_per_rollout * self.group_size}")
        if not self.length_curve:
            raise ValueError(f"recipe {self.name}: length_curve needs at least one point")

    def mean_length(self, update: float) -> float:
        pts = sorted(self.length_curve)
        if update <= pts[0][0]:
            return min(pts[0][1], self.max_len)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if update <= x1:
                return min(y0 + (y1 - y0) * (update - x0) / max(x1 - x0, 1e-9), self.max_len)
        return min(pts[-1][1], self.max_len)


RECIPES: Dict[str, Recipe] = {
    # R1-Zero (R1_NOTES "Hyperparameters published for the RL stages"): 10,400 updates, 512
    # questions x 16 outputs per rollout in 16 mini-batches, 32,768 then 65,536 max tokens.
    "r1-zero": Recipe(
        "r1-zero", "deepseek-v3", updates=10400, prompts_per_rollout=512, group_size=16,
        num_minibatches=16, prompt_len=256,
        length_curve=((0, 500), (8200, 10000), (10400, 16000)), max_len=65536,
        notes=("prompt_len 256: assumed (maths questions plus the R1-Zero template)",
               "length curve: assumed, read approximately off R1's training-length figure "
               "(the mean rises to ~10K tokens by step 8.2K, then grows with the 65,536 cap)",
               "max_len 65,536 (32,768 before step 8.2K): the synchronous bound uses 65,536 "
               "throughout, an overestimate for the first 8.2K steps")),
    # The same recipe for a 7B dense model on one 8 x H200 node.
    "r1-zero-qwen7b-h200x8": Recipe(
        "r1-zero-qwen7b-h200x8", "qwen2.5-math-7b", updates=10400, prompts_per_rollout=512,
        group_size=16, num_minibatches=16, prompt_len=256,
        length_curve=((0, 500), (8200, 10000), (10400, 16000)), max_len=65536,
        profile="h200", devices=8,
        notes=("R1-Zero's recipe and assumed length curve on Qwen2.5-Math-7B's shapes",)),
}


def _deepseek_v3():
    from r1jax.config import MLAConfig, ModelConfig, MoEConfig

    return ModelConfig(
        architecture="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        num_layers=61, num_heads=128, num_kv_heads=128, qkv_bias=False, param_dtype="bfloat16",
        dtype="bfloat16", remat="full",
        mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128),
        moe=MoEConfig(num_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048,
                      num_shared_experts=1, scoring="sigmoid", router_bias=True,
                      dense_layers=[0, 1, 2]))


def _qwen_math_7b():
    from r1jax.config import ModelConfig

    # Qwen2.5-Math-7B's config.json shapes.
    return ModelConfig(architecture="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                       qkv_bias=True, param_dtype="bfloat16", dtype="bfloat16", remat="full")


MODELS = {"deepseek-v3": _deepseek_v3, "qwen2.5-math-7b": _qwen_math_7b}


def model_config(name_or_path: str):
    """A ModelConfig by name (MODELS) or from a model config YAML (configs/model/...)."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]()
    import os

    if not os.path.isfile(name_or_path):
        raise ValueError(f"model {name_or_path!r}: neither a config file nor one of "
                         f"{', '.join(MODELS)}")
    from r1jax.config import load_config

    return load_config(name_or_path, []).model


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------
DEFAULT_ASSUMPTIONS = hardware.DEFAULT_ASSUMPTIONS


def _decode_mp(recipe: Recipe, mcfg, profile: hardware.Profile) -> int:
    if recipe.decode_model_parallel:
        return int(recipe.decode_model_parallel)
    weights = study.param_counts(mcfg)["total"] * study._dtype_bytes(mcfg.param_dtype)  # noqa: SLF001
    need = weights / (profile.hbm_bytes * (1 - recipe.hbm_headroom))
    mp = 1
    while mp < need and mp < recipe.devices:
        mp *= 2
    return mp


def part_seconds(mcfg, recipe: Recipe, profile: hardware.Profile, mean_len: float,
                 assumptions: Mapping[str, hardware.Assumptions],
                 calibration: Optional[Mapping[str, float]] = None) -> Dict[str, Dict[str, Any]]:
    """Seconds of each part for ONE rollout at `mean_len`, with the analytic figures used."""
    B = recipe.prompts_per_rollout * recipe.group_size
    mb = B // recipe.num_minibatches
    mcfg = dataclasses.replace(mcfg, remat=recipe.remat)
    shape = study.Shape(recipe.prompts_per_rollout, recipe.group_size, mb, recipe.prompt_len,
                        max(1, int(round(mean_len))))
    mp = _decode_mp(recipe, mcfg, profile)
    train_mesh = {"data": 1, "fsdp": recipe.devices, "tensor": 1}
    sample_mesh = {"data": max(1, recipe.devices // mp), "fsdp": 1, "tensor": mp}
    steps = mean_len if recipe.decode == "continuous" else recipe.max_len
    calls = {"prefill": 1, "decode": steps, "reference": recipe.num_minibatches,
             "update": recipe.num_minibatches}
    out: Dict[str, Dict[str, Any]] = {}
    for part in study.PARTS:
        mesh = sample_mesh if part in ("prefill", "decode") else train_mesh
        kw = {}
        if part == "decode":
            # Continuous batching: sequences sit at every position; on average half-way.
            done = mean_len / 2 if recipe.decode == "continuous" else recipe.max_len / 2
            kw = {"context": recipe.prompt_len + done, "completion_len": 2 * done}
        a = study.analytic_part(part, mcfg, shape, mesh, **kw)
        t = hardware.project(a["flops"], a["bytes_accessed"], 0.0, 0.0, profile,
                             assumptions[part])
        scale = float((calibration or {}).get(part, 1.0))
        out[part] = {"calls": calls[part], "seconds_per_call": t["total_s"] * scale,
                     "seconds": t["total_s"] * scale * calls[part], "bound": t["bound"],
                     "flops_per_call": a["flops"], "bytes_per_call": a["bytes_accessed"],
                     "mesh": mesh}
    return out


def project(recipe: Recipe, *, mcfg=None, profile: Optional[hardware.Profile] = None,
            assumptions: Optional[Mapping[str, hardware.Assumptions]] = None,
            calibration: Optional[Mapping[str, float]] = None,
            rate: Optional[float] = None) -> Dict[str, Any]:
    """Hours and dollars of a recipe (see the module docstring); per part, per phase of the
    length curve, the model FLOPs and the utilisation they imply."""
    mcfg = mcfg if mcfg is not None else model_config(recipe.model)
    profile = profile or hardware.get(recipe.profile)
    assumptions = {**DEFAULT_ASSUMPTIONS, **(assumptions or {})}
    rate = rate if rate is not None else profile.price_per_hour
    rollouts = math.ceil(recipe.updates / recipe.num_minibatches)
    totals = {p: 0.0 for p in study.PARTS}
    flops = 0.0
    for r in range(rollouts):
        mean_len = recipe.mean_length((r + 0.5) * recipe.num_minibatches)
        parts = part_seconds(mcfg, recipe, profile, mean_len, assumptions, calibration)
        for p, v in parts.items():
            totals[p] += v["seconds"]
            mesh_devices = math.prod(v["mesh"].values())
            flops += v["flops_per_call"] * v["calls"] * mesh_devices
    wall_s = sum(totals.values())
    gpu_h = wall_s / 3600 * recipe.devices
    pc = study.param_counts(mcfg)
    mid = part_seconds(mcfg, recipe, profile, recipe.mean_length(recipe.updates / 2),
                       assumptions, calibration)
    out = {
        "recipe": dataclasses.asdict(recipe), "profile": hardware.profile_dict(profile),
        "params_total": pc["total"], "params_matmul": pc["matmul"], "rollouts": rollouts,
        "wall_hours": wall_s / 3600, "gpu_hours": gpu_h,
        "dollars": gpu_h * rate if rate else None, "rate_per_device_hour": rate,
        "part_hours": {p: s / 3600 for p, s in totals.items()},
        "model_flops": flops, "utilisation": flops / (wall_s * recipe.devices * profile.peak_flops)
        if wall_s else 0.0,
        "mid_training_rollout": mid,
        "decode_model_parallel": _decode_mp(recipe, dataclasses.replace(mcfg, remat=recipe.remat),
                                            profile),
        "assumptions": {p: a.to_dict() for p, a in assumptions.items()},
        "calibration": dict(calibration or {}),
        "notes": list(recipe.notes) + [
            "update and reference: fsdp over all devices (train rules); FLOPs split perfectly",
            "decode and prefill: weights split over decode_model_parallel devices, replicated "
            "over the rest (sample rules); MoE: the experts a step's tokens pick are read",
            "sequences packed (no padding) in the reference and the updates, as R1's trainer "
            "packs them",
            "no collective time unless a calibration from a compiled study includes it",
            "rewards, host work, model offloading and weight resharding between rollout and "
            "training: not modelled"],
    }
    return out


def implied_utilisation(recipe: Recipe, gpu_hours: float, *, mcfg=None,
                        profile: Optional[hardware.Profile] = None) -> Dict[str, float]:
    """The model-FLOPs utilisation a run of `gpu_hours` implies: the recipe's model FLOPs
    (prefill, decode, reference, updates; the same count as `project`) over the hours at the
    profile's dense peak."""
    p = project(recipe, mcfg=mcfg, profile=profile)
    cap = gpu_hours * 3600 * p["profile"]["peak_flops"]
    return {"model_flops": p["model_flops"], "gpu_hours": gpu_hours,
            "utilisation": p["model_flops"] / cap}


def format_projection(p: Dict[str, Any]) -> str:
    r = p["recipe"]
    lines = [f"recipe {r['name']}: model {r['model']} ({p['params_total'] / 1e9:.1f}B params, "
             f"{p['params_matmul'] / 1e9:.1f}B multiplied per token), {r['updates']} updates = "
             f"{p['rollouts']} rollouts of {r['prompts_per_rollout']} x {r['group_size']}, "
             f"{r['num_minibatches']} mini-batches, decode {r['decode']} "
             f"(weights over {p['decode_model_parallel']} devices)",
             f"on {r['devices']} x {p['profile']['name']}: {p['wall_hours']:.1f} h wall, "
             f"{p['gpu_hours'] / 1e3:.1f}K device-hours"
             + (f", ${p['dollars'] / 1e3:.0f}K at ${p['rate_per_device_hour']:.2f}/h"
                if p["dollars"] else "")
             + f"; model-FLOPs utilisation {100 * p['utilisation']:.1f}%"]
    lines.append("  hours by part: " + ", ".join(f"{k} {v:.1f}" for k, v in p["part_hours"].items()))
    mid = p["mid_training_rollout"]
    lines.append("  one rollout mid-training: " + ", ".join(
        f"{k} {v['calls']:.0f} x {v['seconds_per_call'] * 1e3:.1f} ms ({v['bound']})"
        for k, v in mid.items()))
    lines.append("  assumptions: " + "; ".join(
        f"{k}: matmul {a['matmul_efficiency']:.0%}, HBM {a['hbm_efficiency']:.0%}, overlap "
        f"{a['overlap']:.0%}" for k, a in p["assumptions"].items()))
    if p["calibration"]:
        lines.append("  calibration (compiled / analytic): " + ", ".join(
            f"{k} x{v:.2f}" for k, v in p["calibration"].items()))
    lines += [f"  - {n}" for n in p["notes"]]
    return "\n".join(lines)


__all__ = ["MODELS", "PUBLISHED_PRINTED", "RECIPES", "Recipe", "format_projection",
           "format_table", "implied_utilisation", "model_config", "part_seconds", "project",
           "published_table"]
