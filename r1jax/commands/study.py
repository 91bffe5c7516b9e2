"""`r1jax study [CONFIG] [key=value ...] [--mesh FILE ...] [--sweep ici.fsdp=1,2,4,8]
[--profile h800] [--out DIR]`: compile a GRPO step's programs (update, reference, prefill, one
decode step) for several meshes and project their time on a hardware profile."""

from __future__ import annotations

import dataclasses
import json
from typing import List, Optional


def meshes_for(cfg, mesh_files: Optional[List[str]] = None,
               sweep: Optional[List[str]] = None) -> list:
    """The meshes to study: each --mesh file's mesh section, or the config's mesh; each then
    edited by every combination of --sweep values."""
    from r1jax import study
    from r1jax.config import load_config

    bases = [load_config(f, []).mesh for f in mesh_files] if mesh_files else [cfg.mesh]
    edits = study.parse_sweep(sweep) if sweep else [None]
    out = []
    for base in bases:
        for e in edits:
            if e is None:
                out.append(base)
                continue
            ici = {**(base.ici or {}), **e["ici"]}
            dcn = {**(base.dcn or {}), **e["dcn"]}
            if e["ici"]:  # a swept ici axis replaces a -1 fill on another one
                ici = {a: (1 if s == -1 and a not in e["ici"] else s) for a, s in ici.items()}
            out.append(dataclasses.replace(base, ici=ici, dcn=dcn))
    return out


def report(config: Optional[str], overrides: List[str], *, mesh_files=None, sweep=None,
        profile: str = "h800", efficiency=None, topology: Optional[str] = None, slices: int = 1,
        prompts: Optional[int] = None, prompt_len: Optional[int] = None,
        completion_len: Optional[int] = None, decode_steps: Optional[int] = None,
        measure: int = 0, bytes_source: str = "compiled", out: Optional[str] = None,
        as_json: bool = False) -> str:
    from r1jax import hardware, study
    from r1jax.config import load_config

    if slices != 1 and topology is None:
        raise ValueError("--slices needs --topology (slices of a TPU topology)")
    if measure < 0:
        raise ValueError(f"--measure must be >= 0, got {measure}")
    cfg = load_config(config, overrides)
    prof = hardware.get(profile)
    res = study.run_study(cfg, meshes_for(cfg, mesh_files, sweep), profile=prof,
                          assumptions=hardware.parse_assumptions(efficiency), topology=topology,
                          slices=slices, prompts=prompts, prompt_len=prompt_len,
                          completion_len=completion_len, decode_steps=decode_steps,
                          measure_reps=measure, bytes_source=bytes_source)
    text = json.dumps(res, default=float) if as_json else study.format_study(res)
    if out:
        paths = study.write_outputs(res, out)
        if not as_json:
            text += "\nwrote " + ", ".join(paths.values())
    return text


def run(args) -> int:
    print(report(args.config_path, args.config_overrides, mesh_files=args.mesh, sweep=args.sweep,
                 profile=args.profile, efficiency=args.efficiency, topology=args.topology,
                 slices=args.slices, prompts=args.prompts, prompt_len=args.prompt_len,
                 completion_len=args.completion_len, decode_steps=args.decode_steps,
                 measure=args.measure, bytes_source=args.bytes_source, out=args.out,
                 as_json=args.json))
    return 0
