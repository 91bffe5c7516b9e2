"""Named hardware profiles and the time model that turns a compiled program into seconds.

A profile is what the vendor publishes for one chip (dense bf16 peak, HBM size and bandwidth)
plus the links a collective rides: inside a node (NVLink, a TPU slice's ICI) and across nodes
(InfiniBand, DCN), as bandwidth ACHIEVED per device by ring collectives, not the link's
nominal figure. Where a figure is not published it is an assumption and its `sources` entry
says so; `describe()` prints every figure with its source.

The time model (`project`), for one call of a program on one device:

    compute = flops / (peak * matmul_efficiency)
    memory  = bytes_accessed / (hbm_bandwidth * hbm_efficiency)
    core    = max(compute, memory)                       # roofline: the slower one binds
    comm    = ici_bytes / ici_bandwidth + dcn_bytes / dcn_bandwidth
    total   = core + comm - overlap * min(core, comm)    # overlap 0: serial, 1: fully hidden

`Assumptions` holds the efficiencies and the overlap; every projection carries the ones it used.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, Mapping, Optional

GB = 1e9
TERA = 1e12


@dataclasses.dataclass(frozen=True)
class Profile:
    """One accelerator (per-device figures, SI units: FLOP/s, bytes, bytes/s)."""

    name: str
    peak_flops: float  # dense bf16 matmul peak (fp32 for the CPU profile)
    hbm_bytes: float
    hbm_bandwidth: float
    ici_bandwidth: float  # achieved per device by collectives inside a node / slice
    dcn_bandwidth: float  # achieved per device by collectives across nodes / slices
    devices_per_node: int
    price_per_hour: Optional[float] = None  # $ per device-hour (None: not assumed)
    platform: str = "gpu"  # the jax platform it compiles for: gpu | tpu | cpu
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        rows = [f"{self.name}: {self.peak_flops / TERA:.0f} TFLOP/s peak, "
                f"{self.hbm_bytes / GB:.0f} GB at {self.hbm_bandwidth / GB:.0f} GB/s, "
                f"ici {self.ici_bandwidth / GB:.1f} GB/s, dcn {self.dcn_bandwidth / GB:.2f} GB/s "
                f"per device, {self.devices_per_node} per node"
                + (f", ${self.price_per_hour:.2f}/device-h" if self.price_per_hour else "")]
        rows += [f"  {k}: {v}" for k, v in self.sources.items()]
        return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """Efficiencies of the time model (fractions of the profile's peaks) and overlap."""

    matmul_efficiency: float = 0.5  # share of dense peak reached by compute-bound programs
    hbm_efficiency: float = 0.7  # share of HBM bandwidth reached by memory-bound programs
    overlap: float = 0.0  # share of the shorter of (core, comm) hidden under the other

    def __post_init__(self):
        for name in ("matmul_efficiency", "hbm_efficiency"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"overlap must be in [0, 1], got {self.overlap}")

    def to_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)


# Per program kind (r1jax.study.PARTS): the update runs below the forward passes' efficiency
# (backward matmuls with transposed operands, optimizer traffic); decode is bandwidth bound.
DEFAULT_ASSUMPTIONS: Dict[str, Assumptions] = {
    "update": Assumptions(matmul_efficiency=0.4, hbm_efficiency=0.7, overlap=0.0),
    "reference": Assumptions(matmul_efficiency=0.5, hbm_efficiency=0.7, overlap=0.0),
    "prefill": Assumptions(matmul_efficiency=0.5, hbm_efficiency=0.7, overlap=0.0),
    "decode": Assumptions(matmul_efficiency=0.5, hbm_efficiency=0.6, overlap=0.0),
}

_NVIDIA = "NVIDIA datasheet (SXM, dense bf16 without sparsity)"
_IB = "8 x 400 Gb/s InfiniBand NICs per node = 50 GB/s per GPU (R1's cluster)"


def _nvlink(nominal: float) -> str:
    return (f"assumed: 40% of the {nominal:.0f} GB/s NVLink (the share R1's H800 cluster achieved: "
            f"160 of 400 GB/s)")


PROFILES: Dict[str, Profile] = {
    "h800": Profile("h800", 989 * TERA, 80 * GB, 3.35e12, 160 * GB, 50 * GB, 8, 2.0, "gpu", {
        "peak_flops, hbm": _NVIDIA + " (the H800 keeps the H100's compute and memory)",
        "ici_bandwidth": "about 160 GB/s achieved over the H800's 400 GB/s NVLink (R1's report)",
        "dcn_bandwidth": _IB,
        "price_per_hour": "$2 per GPU-hour, the rate of R1's cost table"}),
    "h100": Profile("h100", 989 * TERA, 80 * GB, 3.35e12, 360 * GB, 50 * GB, 8, None, "gpu", {
        "peak_flops, hbm": _NVIDIA, "ici_bandwidth": _nvlink(900), "dcn_bandwidth": _IB}),
    "h200": Profile("h200", 989 * TERA, 141 * GB, 4.8e12, 360 * GB, 50 * GB, 8, None, "gpu", {
        "peak_flops, hbm": _NVIDIA + " (the H100's compute, HBM3e 141 GB at 4.8 TB/s)",
        "ici_bandwidth": _nvlink(900), "dcn_bandwidth": _IB}),
    "tpu-v5p": Profile("tpu-v5p", 459 * TERA, 95 * GB, 2765 * GB, 240 * GB, 12.5 * GB, 4, None,
                       "tpu", {
        "peak_flops, hbm": "Cloud TPU v5p documentation (459 TFLOP/s bf16, 95 GB, 2,765 GB/s)",
        "ici_bandwidth": "assumed: 40% of the 600 GB/s (4,800 Gb/s) inter-chip interconnect",
        "dcn_bandwidth": "assumed: 100 Gb/s of data-centre network per chip (not published per chip)",
        "devices_per_node": "a slice is the ICI domain; 4 chips per host"}),
    "tpu-v5e": Profile("tpu-v5e", 197 * TERA, 16 * GB, 819 * GB, 80 * GB, 3.125 * GB, 8, None,
                       "tpu", {
        "peak_flops, hbm": "Cloud TPU v5e documentation (197 TFLOP/s bf16, 16 GB, 819 GB/s)",
        "ici_bandwidth": "assumed: 40% of the 200 GB/s each way (400 GB/s bidirectional) ICI",
        "dcn_bandwidth": "2 x 100 Gb/s NICs per 8-chip host (documentation) = 3.1 GB/s per chip"}),
    "tpu-v6e": Profile("tpu-v6e", 918 * TERA, 32 * GB, 1638 * GB, 160 * GB, 12.5 * GB, 8, None,
                       "tpu", {
        "peak_flops, hbm": "Cloud TPU v6e documentation (918 TFLOP/s bf16, 32 GB, 1,638 GB/s)",
        "ici_bandwidth": "assumed: 40% of the 400 GB/s each way (800 GB/s bidirectional) ICI",
        "dcn_bandwidth": "assumed: 4 x 200 Gb/s NICs per 8-chip host = 12.5 GB/s per chip"}),
}
ALIASES = {"h800": "h800", "h100": "h100", "h200": "h200", "v5p": "tpu-v5p", "v5e": "tpu-v5e",
           "v6e": "tpu-v6e", "tpu-v5p": "tpu-v5p", "tpu-v5e": "tpu-v5e", "tpu-v6e": "tpu-v6e",
           "cpu": "cpu"}


def measure_cpu(n: int = 1024, reps: int = 5, copy_mib: int = 256) -> Dict[str, float]:
    """This machine's jit fp32 matmul FLOP/s and copy bandwidth (bytes/s, read + write), best
    of `reps` after a warm-up: the peaks of the "cpu" profile."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(jnp.dot)
    x = jnp.ones((copy_mib * 2**20 // 4,), jnp.float32)
    cp = jax.jit(lambda v: v * 1.0001)

    def best(fn, *args):
        fn(*args).block_until_ready()
        t_best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn(*args).block_until_ready()
            t_best = min(t_best, time.perf_counter() - t)
        return t_best

    return {"peak_flops": 2 * n ** 3 / best(mm, a, a),
            "hbm_bandwidth": 2 * x.size * 4 / best(cp, x)}


def cpu_profile(measured: Optional[Mapping[str, float]] = None) -> Profile:
    """The "cpu" profile: peaks measured on this machine now (`measure_cpu`) unless given.
    Fake devices share the cores, so the peaks are those of the whole process."""
    import os

    m = dict(measured) if measured is not None else measure_cpu()
    cores = os.cpu_count() or 1
    return Profile("cpu", float(m["peak_flops"]), 0.0, float(m["hbm_bandwidth"]),
                   float(m["hbm_bandwidth"]), float(m["hbm_bandwidth"]), 1, None, "cpu", {
        "peak_flops": f"measured: jit fp32 matmul on this machine ({cores} cores)",
        "hbm_bandwidth": "measured: jit elementwise copy (read + write)",
        "ici/dcn": "collectives between fake devices are memory copies: the copy bandwidth"})


def get(name: str, measured_cpu: Optional[Mapping[str, float]] = None) -> Profile:
    """A profile by name (h800, h100, h200, tpu-v5p, tpu-v5e, tpu-v6e, cpu; v5p/v5e/v6e too)."""
    key = ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown hardware profile {name!r}; valid: "
                         f"{', '.join(list(PROFILES) + ['cpu'])}")
    return cpu_profile(measured_cpu) if key == "cpu" else PROFILES[key]


def project(flops: float, bytes_accessed: float, ici_bytes: float, dcn_bytes: float,
            profile: Profile, assumptions: Assumptions = Assumptions()) -> Dict[str, float]:
    """Seconds for one call of a program on `profile` (see the module docstring), with its
    parts: compute_s, memory_s, comm_s (ici_s + dcn_s), bound ("compute" | "memory")."""
    a = assumptions
    compute = flops / (profile.peak_flops * a.matmul_efficiency)
    memory = bytes_accessed / (profile.hbm_bandwidth * a.hbm_efficiency)
    ici = ici_bytes / profile.ici_bandwidth if ici_bytes else 0.0
    dcn = dcn_bytes / profile.dcn_bandwidth if dcn_bytes else 0.0
    core, comm = max(compute, memory), ici + dcn
    total = core + comm - a.overlap * min(core, comm)
    return {"total_s": total, "compute_s": compute, "memory_s": memory, "comm_s": comm,
            "ici_s": ici, "dcn_s": dcn, "bound": "compute" if compute >= memory else "memory"}


def parse_assumptions(items) -> Dict[str, Assumptions]:
    """["update=0.4", "decode.hbm=0.6", "overlap=0.5"] -> per-part Assumptions over
    DEFAULT_ASSUMPTIONS. PART=X sets the matmul efficiency, PART.hbm=X the HBM efficiency,
    PART.overlap=X the overlap; matmul=X / hbm=X / overlap=X apply to every part."""
    out = dict(DEFAULT_ASSUMPTIONS)
    fields = {"matmul": "matmul_efficiency", "hbm": "hbm_efficiency", "overlap": "overlap"}
    for item in items or []:
        key, eq, val = str(item).partition("=")
        part, _, field = key.partition(".")
        if part in fields and not field:
            part, field = "", part
        field = field or "matmul"
        if not eq or field not in fields or (part and part not in DEFAULT_ASSUMPTIONS):
            raise ValueError(f"--efficiency {item!r}: expected PART[.matmul|.hbm|.overlap]=X with "
                             f"PART one of {', '.join(DEFAULT_ASSUMPTIONS)}, or matmul|hbm|overlap=X")
        try:
            x = float(val)
        except ValueError:
            raise ValueError(f"--efficiency {item!r}: {val!r} is not a number") from None
        for p in ([part] if part else list(DEFAULT_ASSUMPTIONS)):
            out[p] = dataclasses.replace(out[p], **{fields[field]: x})
    return out


def profile_dict(p: Profile) -> Dict[str, Any]:
    d = dataclasses.asdict(p)
    d["sources"] = dict(p.sources)
    return d


__all__ = ["ALIASES", "Assumptions", "DEFAULT_ASSUMPTIONS", "PROFILES", "Profile", "cpu_profile", "get",
           "measure_cpu", "parse_assumptions", "profile_dict", "project"]
