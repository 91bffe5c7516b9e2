"""`r1jax env [CONFIG] [key=value ...] [--json]`: the backend, devices, library versions and the mesh a config builds here."""

from __future__ import annotations

import json
from typing import List, Optional


def report(config: Optional[str] = None, overrides: Optional[List[str]] = None,
        as_json: bool = False) -> str:
    from r1jax import envinfo

    mesh_cfg = None
    if config or overrides:
        from r1jax.config import load_config

        mesh_cfg = load_config(config, list(overrides or [])).mesh
    info = envinfo.environment(mesh_cfg)
    return json.dumps(info) if as_json else envinfo.format_environment(info)


def run(args) -> int:
    print(report(args.config_path, args.config_overrides, as_json=args.json))
    return 0
