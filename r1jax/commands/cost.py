"""`r1jax cost [--recipe r1-zero] [--model M] [--profile h800] [--devices-total N] ...`: R1's
published cost table rebuilt from its hours, the utilisation DeepSeek's run implies, then a
recipe's projected hours and dollars with every assumption."""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, List, Optional

from r1jax import cost, hardware


def parse_length_curve(text: str):
    """"6000" (a constant mean length) or "0:500,8200:10000" (update:length points)."""
    pts = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            if ":" in item:
                x, y = item.split(":", 1)
                pts.append((float(x), float(y)))
            else:
                pts.append((0.0, float(item)))
        except ValueError:
            raise ValueError(f"--length {text!r}: expected N or update:N[,update:N...], "
                             f"got {item!r}") from None
    if any(y <= 0 for _, y in pts):
        raise ValueError(f"--length {text!r}: lengths must be positive")
    return tuple(pts)


def calibration_from_study(path: str) -> Dict[str, float]:
    """Per-part compiled / analytic projected-time ratios from a `r1jax study --json` file
    (the first mesh that has both)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--study {path}: cannot read a study JSON ({e})") from None
    for row in data.get("meshes", []):
        ratios = {p: v["projected"]["total_s"] / v["analytic_projected"]["total_s"]
                  for p, v in row.get("parts", {}).items()
                  if v.get("projected") and v.get("analytic_projected", {}).get("total_s")}
        if ratios:
            return ratios
    raise ValueError(f"--study {path}: no mesh with compiled and analytic projections")


def report(*, recipe: str = "r1-zero", model: Optional[str] = None, profile: Optional[str] = None,
        devices: Optional[int] = None, decode: Optional[str] = None,
        updates: Optional[int] = None, length: Optional[str] = None,
        efficiency: Optional[List[str]] = None, study: Optional[str] = None,
        rate: Optional[float] = None, as_json: bool = False) -> str:
    if recipe not in cost.RECIPES:
        raise ValueError(f"--recipe {recipe!r}: valid: {', '.join(cost.RECIPES)}")
    r = cost.RECIPES[recipe]
    changes = {k: v for k, v in (("model", model), ("profile", profile), ("devices", devices),
                                 ("decode", decode), ("updates", updates)) if v is not None}
    if length is not None:
        changes["length_curve"] = parse_length_curve(length)
    if changes:
        r = dataclasses.replace(r, name=f"{r.name} (modified)", **changes)
    prof = hardware.get(r.profile)
    table = cost.published_table()
    proj = cost.project(r, profile=prof, assumptions=hardware.parse_assumptions(efficiency),
                        calibration=calibration_from_study(study) if study else None, rate=rate)
    implied = cost.implied_utilisation(cost.RECIPES["r1-zero"], 101000)
    if as_json:
        return json.dumps({"published": table, "projection": proj,
                           "implied_by_r1_zero": implied})
    lines = ["R1's published cost table, rebuilt from its hours:", cost.format_table(table), "",
             f"DeepSeek's R1-Zero run (101K H800 GPU-hours) implies a model-FLOPs utilisation of "
             f"{100 * implied['utilisation']:.1f}% ({implied['model_flops']:.3g} FLOPs for the "
             f"r1-zero recipe's prefill, decode, reference and updates over 101K h at "
             f"{hardware.PROFILES['h800'].peak_flops / 1e12:.0f} TFLOP/s)", "",
             "Projection:", cost.format_projection(proj), "", "Profile:", prof.describe()]
    return "\n".join(lines)


def run(args) -> int:
    print(report(recipe=args.recipe, model=args.model, profile=args.profile,
                 devices=args.devices_total, decode=args.decode, updates=args.updates,
                 length=args.length, efficiency=args.efficiency, study=args.study,
                 rate=args.rate, as_json=args.json))
    return 0
