"""What this machine gives r1jax: backend, devices, processes, library versions, whether
libtpu or CUDA is present, and the mesh a config would build here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any, Dict, Optional

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "numpy",
            "libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_present() -> Dict[str, Any]:
    """Whether a CUDA plugin for jax is installed and a driver library is loadable (without
    starting a GPU backend)."""
    import ctypes.util

    plugins = [d for d in ("jax-cuda12-plugin", "jax-cuda13-plugin") if _version(d)]
    driver = ctypes.util.find_library("cuda")
    return {"jax_plugin": plugins, "driver_library": driver,
            "present": bool(plugins) and driver is not None}


def environment(mesh_cfg=None) -> Dict[str, Any]:
    """A JSON-able description of the environment; with a MeshConfig, the mesh it builds here
    (or the one-line reason it cannot)."""
    import jax

    from r1jax import aot

    devs = jax.devices()
    tpu_ok, tpu_why = aot.tpu_available()
    info: Dict[str, Any] = {
        "backend": jax.default_backend(),
        "device_kind": getattr(devs[0], "device_kind", devs[0].platform),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(), "process_index": jax.process_index(),
        "versions": {p: _version(p) for p in PACKAGES if _version(p) is not None},
        "libtpu": {"installed": bool(importlib.util.find_spec("libtpu")) or tpu_ok,
                   "why_not": "" if tpu_ok else tpu_why},
        "cuda": cuda_present(),
        "env": {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "R1JAX_DEVICES",
                                           "CUDA_VISIBLE_DEVICES", "TPU_LIBRARY_PATH")
                if k in os.environ},
    }
    if mesh_cfg is not None:
        from r1jax import mesh as mesh_lib

        try:
            m = mesh_lib.make_mesh(mesh_cfg, devs)
            ici, dcn = mesh_lib._axis_sizes(mesh_cfg, len(devs))  # noqa: SLF001 - sibling module
            info["mesh"] = {"shape": {a: int(s) for a, s in m.shape.items()}, "ici": ici,
                            "dcn": dcn, "devices": int(m.devices.size)}
        except ValueError as e:
            info["mesh"] = {"error": str(e)}
    return info


def format_environment(info: Dict[str, Any]) -> str:
    v = info["versions"]
    lines = [f"backend {info['backend']} ({info['device_kind']}): {info['device_count']} devices, "
             f"{info['local_device_count']} local, process {info['process_index']} of "
             f"{info['process_count']}",
             "versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
             f"libtpu: {'yes' if info['libtpu']['installed'] else 'no'}"
             + (f" ({info['libtpu']['why_not']})" if info["libtpu"]["why_not"] else ""),
             f"CUDA: {'yes' if info['cuda']['present'] else 'no'} (jax plugin: "
             f"{', '.join(info['cuda']['jax_plugin']) or 'none'}; driver library: "
             f"{info['cuda']['driver_library'] or 'not found'})"]
    if info["env"]:
        lines.append("environment: " + ", ".join(f"{k}={x}" for k, x in info["env"].items()))
    if "mesh" in info:
        m = info["mesh"]
        lines.append(f"mesh: {m['error']}" if "error" in m else
                     "mesh: " + " x ".join(f"{a}={s}" for a, s in m["shape"].items())
                     + f" on {m['devices']} devices (ici {m['ici']}, dcn {m['dcn']})")
    return "\n".join(lines)


__all__ = ["cuda_present", "environment", "format_environment"]
