"""Compile the GRPO update ahead of time for meshes and chips this machine does not have.

Everything is abstract (jax.ShapeDtypeStruct carrying a NamedSharding), so nothing is allocated:
a 7B model's update compiles on a laptop, for 512 emulated CPU devices (R1's 64 nodes x 8
H800s) or, with libtpu installed (`pip install 'jax[tpu]'`), for a TPU topology described by
name ("v5p:2x2x2") through jax.experimental.topologies. The compiled executable then answers
before anything runs (MaxText's train_compile habit):

  * per-device memory: arguments, outputs, temporaries, generated code, an estimated peak;
  * FLOPs and bytes accessed (XLA's cost analysis; a while-loop body, e.g. the scanned layers,
    is counted once);
  * the collectives in the optimised HLO: count and bytes per kind, each multiplied by the trip
    count of the while loops around it (recorded by XLA, or read off the loop condition), and
    split into traffic inside an (emulated) node and across nodes (or TPU slices), from the
    replica groups;
  * whether the parameters are sharded as far as the mesh allows.

Entry point: `compile_update(cfg, devices=... | topology=...)`; `format_report` renders it.
Caveats: the CPU compiler forms no reduce-scatters (it all-reduces, twice the bytes) and
upcasts bf16 collectives to f32, so CPU byte counts overstate a GPU's; the TPU compiler's
(`--topology`) are closer. Communication time assumes no overlap with compute.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from r1jax import grpo
from r1jax import mesh as mesh_lib
from r1jax import packing

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# Achieved bandwidth per device (R1_NOTES "The 512-H800 layout"): NVLink inside a node,
# InfiniBand across nodes.
ICI_BYTES_PER_S = 160e9
DCN_BYTES_PER_S = 50e9


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def tpu_available() -> Tuple[bool, str]:
    """(True, "") when libtpu can be loaded (TPU topologies can be compiled for: the `tpu`
    extra, or TPU_LIBRARY_PATH pointing at a libtpu.so), else (False, why)."""
    import importlib.util
    import os

    path = os.environ.get("TPU_LIBRARY_PATH")
    if path and os.path.isfile(path):
        return True, ""
    if importlib.util.find_spec("libtpu") is not None:
        return True, ""
    return False, ("libtpu is not installed (pip install 'jax[tpu]==<jax version>' pins the "
                   "matching libtpu, or set TPU_LIBRARY_PATH to a libtpu.so)")


def topology_devices(topology: str, slices: int = 1, **kwargs) -> List[Any]:
    """The compile-only devices of a TPU topology, e.g. "v5p:2x2x2" (8 chips) or "v5e:4x4",
    times `slices` slices joined by DCN (their devices carry slice_index). Needs libtpu; no
    TPU has to be attached."""
    if slices < 1:
        raise ValueError(f"--slices must be >= 1, got {slices}")
    if slices > 1:
        kwargs["num_slices"] = int(slices)
    ok, why = tpu_available()
    if not ok:
        raise RuntimeError(f"--topology {topology}: {why}")
    import os

    from jax.experimental import topologies

    # Compile-only use needs no exclusive hold on the (absent) chips: do not fight another
    # process that loaded libtpu over /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except (RuntimeError, ValueError) as e:  # XlaRuntimeError is a RuntimeError
        raise ValueError(f"--topology {topology!r} is not a TPU topology libtpu knows "
                         f"(e.g. v4:2x2x1, v5e:4x4, v5p:2x2x2): {str(e).splitlines()[0]}") from None
    return list(desc.devices)


# ---------------------------------------------------------------------------------------------
# HLO parsing: collectives, their replica groups, and the loops around them
# ---------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
                "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
                "f8e5m2fnuz": 1, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")


def _shape_bytes(type_str: str) -> int:
    total = 0.0
    for dt, dims in _ARRAY.findall(type_str):
        if dt not in _DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES[dt]
    return int(total)


def _split_type(rest: str) -> Tuple[str, str]:
    """'TYPE opcode(...)...' -> (TYPE, the rest from the opcode on); TYPE may be a tuple."""
    rest = rest.lstrip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:]
    parts = rest.split(" ", 1)
    return parts[0], (" " + parts[1]) if len(parts) > 1 else ""


def _iota_groups(spec: str) -> Optional[np.ndarray]:
    """'[G,S]<=[d0,d1,...]T(p...)' (XLA's iota replica groups) -> [G, S] partition ids."""
    m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    if not m:
        return None
    out = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(out[0], -1) if len(out) >= 1 else ids.reshape(1, -1)


def _mesh_groups(spec: str) -> Tuple[Optional[np.ndarray], int]:
    """XLA's mesh-axes replica groups, "mesh['a'=2,'b'=4] {'b'}" (optionally with
    ", device_ids=(...)" and sub-axes "'b':(pre)size") -> ([G, S] partition ids or None, S)."""
    m = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\((.*?)\))?\s*\{([^}]*)\}", spec)
    if not m:
        return None, 0
    axes = re.findall(r"'?([^'=,\s]+)'?=(\d+)", m.group(1))
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    n = math.prod(sizes) if sizes else 1
    ids: Optional[np.ndarray] = None
    if m.group(2):
        # Either an iota "[d0,d1]T(1,0)" (arange reshaped, transposed) or the ids themselves.
        iota = re.fullmatch(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", m.group(2))
        if iota:
            dims = [int(x) for x in iota.group(1).split(",")]
            ids = np.arange(math.prod(dims)).reshape(dims)
            if iota.group(2):
                ids = ids.transpose([int(x) for x in iota.group(2).split(",")])
            ids = ids.reshape(-1) if ids.size == n else None
        else:
            flat = [int(x) for x in re.findall(r"\d+", m.group(2))]
            ids = np.asarray(flat) if len(flat) == n else None
    else:
        ids = np.arange(n)
    refs = re.findall(r"'?([^':,\s]+)'?(?::\((\d+)\)(\d+))?", m.group(3))
    refs = [(name, int(pre) if pre else None, int(sz) if sz else None) for name, pre, sz in refs
            if name]
    group_size = math.prod(sz if sz else sizes[names.index(name)] for name, _, sz in refs
                           if name in names)
    if ids is None or any(name not in names for name, _, _ in refs):
        return None, group_size
    # Split every mesh axis into (major, sub, minor) factors so sub-axes are whole dimensions.
    split_dims: List[int] = []
    chosen: List[int] = []
    for i, (name, size) in enumerate(zip(names, sizes)):
        mine = [r for r in refs if r[0] == name]
        if len(mine) > 1:
            return None, group_size
        base = len(split_dims)
        if mine and mine[0][1] is not None:
            pre, sz = mine[0][1], mine[0][2]
            split_dims += [pre, sz, size // (pre * sz)]
            chosen.append(base + 1)
        else:
            split_dims += [1, size, 1]
            if mine:
                chosen.append(base + 1)
    arr = np.asarray(ids).reshape(split_dims)
    rest = [d for d in range(arr.ndim) if d not in chosen]
    arr = arr.transpose(rest + chosen)
    return arr.reshape(-1, group_size), group_size


def parse_replica_groups(text: str) -> Tuple[Optional[np.ndarray], Optional[int]]:
    """The replica groups of one HLO instruction line: ([G, S] partition ids or None when they
    cannot be recovered, group size S or None)."""
    m = re.search(r"replica_groups=", text)
    if m:
        spec = text[m.end():]
        if spec.startswith("{"):
            # {{0,1},{2,3}} (or {} = all devices in one group)
            depth, end = 0, 0
            for i, ch in enumerate(spec):
                depth += ch == "{"
                depth -= ch == "}"
                if depth == 0:
                    end = i
                    break
            inner = spec[1:end]
            groups = [[int(x) for x in g.split(",") if x.strip()]
                      for g in re.findall(r"\{([\d,\s]*)\}", inner)]
            groups = [g for g in groups if g]
            if not groups:
                return None, None
            if len({len(g) for g in groups}) != 1:
                return None, max(len(g) for g in groups)
            return np.asarray(groups), len(groups[0])
        if spec.startswith("["):
            g = _iota_groups(spec)
            return (g, g.shape[1]) if g is not None else (None, None)
        if spec.startswith("mesh"):
            g, size = _mesh_groups(spec)
            return g, size
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", text)
    if m:
        pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(0))
        if pairs:
            return np.asarray([[int(a), int(b)] for a, b in pairs]), 2
    return None, None


@dataclasses.dataclass
class _Instr:
    name: str
    type_str: str
    opcode: str
    line: str


def _parse_hlo(text: str) -> Tuple[Dict[str, List[_Instr]], Optional[str]]:
    comps: Dict[str, List[_Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        head = _COMP_HEAD.match(line)
        if head and not line.startswith(" "):
            current = head.group(2)
            comps[current] = []
            if head.group(1):
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        type_str, rest = _split_type(m.group(2))
        op = _OPCODE.match(rest)
        if not op:
            continue
        comps[current].append(_Instr(m.group(1), type_str, op.group(1), line))
    return comps, entry


def _trip_from_condition(comps: Dict[str, List[_Instr]], while_line: str) -> float:
    """Trip count of a while loop whose backend_config does not record it (TPU): jax's scans
    count an s32 from 0 while it is LT a constant, so a condition made of one `compare LT`
    against one integer constant runs that many times. Anything else: 1 (undercounts)."""
    cond = re.search(r"condition=%?([^\s,]+)", while_line)
    instrs = comps.get(cond.group(1), []) if cond else []
    consts = [int(m.group(1)) for i in instrs if i.opcode == "constant"
              for m in [re.search(r"constant\((-?\d+)\)", i.line)] if m and i.type_str[:1] in "su"]
    lt = [i for i in instrs if i.opcode == "compare" and "direction=LT" in i.line]
    return float(consts[0]) if len(consts) == 1 and len(lt) == 1 and consts[0] > 0 else 1.0


def _multipliers(comps: Dict[str, List[_Instr]], entry: Optional[str],
                 trips: bool = True) -> Dict[str, float]:
    """How many times each computation runs per call of the entry computation: a while body
    runs its known trip count (XLA records it in backend_config, else it is read off the loop
    condition) times its caller. `trips=False` counts every loop body once, as XLA's cost
    analysis does."""
    mult: Dict[str, float] = {}

    def visit(name: str, m: float, depth: int = 0) -> None:
        if name not in comps or depth > 64:
            return
        mult[name] = mult.get(name, 0.0) + m
        for ins in comps[name]:
            if ins.opcode == "while":
                n = 1.0
                if trips:
                    trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.line)
                    n = float(trip.group(1)) if trip else _trip_from_condition(comps, ins.line)
                body = re.search(r"body=%?([^\s,]+)", ins.line)
                if body:
                    visit(body.group(1), m * n, depth + 1)
                continue
            for ref in re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%?([^\s,]+)",
                                  ins.line):
                if ref != name:
                    visit(ref, m, depth + 1)
            branches = re.search(r"branch_computations=\{([^}]*)\}", ins.line)
            if branches:
                for ref in re.findall(r"%?([^\s,]+)", branches.group(1)):
                    visit(ref, m, depth + 1)

    if entry is not None:
        visit(entry, 1.0)
    return mult


def collectives_from_hlo(text: str, partition_to_node: Optional[Sequence[int]] = None,
                         detail: bool = False, slices: int = 1) -> Dict[str, Any]:
    """Count the collectives of an optimised HLO module and estimate the bytes each moves.

    Per instruction: `bytes` is the size of the full buffer (the gathered output of an
    all-gather, the input of a reduce-scatter, the operand of an all-reduce); the traffic per
    device follows the ring algorithms: (S-1)/S x bytes for all-gather, reduce-scatter and
    all-to-all, 2 (S-1)/S x bytes for all-reduce, bytes for collective-permute (S = group
    size). Instructions inside while loops count once per iteration (the scanned layers).

    With `partition_to_node` (the node of each SPMD partition id), a group whose members all
    sit in one node is "ici" traffic, one spanning nodes is "dcn" (a ring across nodes is
    paced by its slowest links). Compiled for several TPU slices, XLA expresses the collectives
    across slices as host-transfer sends for the megascale runtime
    (`_xla_megascale_transfer_type`); those count as dcn, over groups of `slices`.

    Returns {kind: {count, executions, bytes, traffic_bytes, ici_bytes, dcn_bytes,
    unknown_bytes, group_sizes}} plus "total" and "top" (the six instructions moving the
    most bytes, with their runs and jax op_name: where to look first); with `detail`, every
    instruction's record under "instructions".
    """
    comps, entry = _parse_hlo(text)
    mult = _multipliers(comps, entry)
    out: Dict[str, Dict[str, Any]] = {
        k: {"count": 0, "executions": 0.0, "bytes": 0.0, "traffic_bytes": 0.0, "ici_bytes": 0.0,
            "dcn_bytes": 0.0, "unknown_bytes": 0.0, "group_sizes": []} for k in COLLECTIVES}
    top: List[Dict[str, Any]] = []
    starts: Dict[str, _Instr] = {}
    for comp, instrs in comps.items():
        for ins in instrs:
            if ins.opcode.endswith("-start"):
                starts[ins.name] = ins
    for comp, instrs in comps.items():
        m = mult.get(comp, 0.0)
        if m == 0.0:
            continue  # unreachable (dead) or a reduction computation
        for ins in instrs:
            op = ins.opcode
            kind, line, type_str = None, ins.line, ins.type_str
            megascale = re.search(r'_xla_megascale_transfer_type="([A-Z_]+)"', line)
            if op in COLLECTIVES:
                kind = op
            elif op == "send" and megascale:
                kind = megascale.group(1).lower().replace("_", "-")
                kind = kind if kind in COLLECTIVES else "collective-permute"
                type_str = _ARRAY.search(type_str).group(0) if _ARRAY.search(type_str) else ""
            elif op.endswith("-done") and op[: -len("-done")] in COLLECTIVES:
                # Async pair: the done's type is the result; the groups live on the start.
                kind = op[: -len("-done")]
                operand = re.search(r"\(\s*%?([^\s,)]+)", line[line.index(op) + len(op):])
                start = starts.get(operand.group(1)) if operand else None
                line = start.line if start is not None else line
            if kind is None:
                continue
            groups, size = parse_replica_groups(line)
            if megascale:
                groups, size = None, max(int(slices), 2)
            elif kind == "collective-permute":
                size = 2
            size = size or 1
            result = _shape_bytes(type_str)
            full = result * size if kind == "reduce-scatter" else result
            if kind == "all-reduce":
                traffic = 2.0 * (size - 1) / size * full
            elif kind == "collective-permute":
                traffic = float(full)
            else:
                traffic = (size - 1) / size * full
            rec = out[kind]
            rec["count"] += 1
            rec["executions"] += m
            rec["bytes"] += full * m
            rec["traffic_bytes"] += traffic * m
            if size not in rec["group_sizes"]:
                rec["group_sizes"].append(size)
            where = "dcn" if megascale else "unknown"
            if partition_to_node is not None and groups is not None:
                try:
                    nodes = np.asarray(partition_to_node)[groups]
                    where = "dcn" if np.any(nodes != nodes[:, :1]) else "ici"
                except IndexError:
                    where = "unknown"
            rec[f"{where}_bytes"] += traffic * m
            op_name = re.search(r'op_name="([^"]*)"', line)
            shape = re.sub(r"\{[^}]*\}", "", type_str)[:160]  # tuples whole, layouts dropped
            top.append({"kind": kind, "shape": shape, "runs": m,
                        "group_size": size, "where": where, "traffic_bytes": traffic * m,
                        "op_name": op_name.group(1)[-120:] if op_name else ""})
    total = {key: sum(v[key] for v in out.values())
             for key in ("count", "executions", "bytes", "traffic_bytes", "ici_bytes", "dcn_bytes",
                         "unknown_bytes")}
    for v in out.values():
        v["group_sizes"].sort()
    out["total"] = total
    out["top"] = sorted(top, key=lambda r: -r["traffic_bytes"])[:6]  # where the bytes go
    if detail:
        out["instructions"] = top
    return out


def comm_seconds(collectives: Dict[str, Any], ici_bw: float = ICI_BYTES_PER_S,
                 dcn_bw: float = DCN_BYTES_PER_S) -> Dict[str, float]:
    """Communication time if no collective overlapped compute or each other: ici traffic at
    NVLink speed, dcn (and unattributed) traffic at InfiniBand speed."""
    t = collectives["total"]
    ici = t["ici_bytes"] / ici_bw
    dcn = (t["dcn_bytes"] + t["unknown_bytes"]) / dcn_bw
    return {"ici_s": ici, "dcn_s": dcn, "total_s": ici + dcn}


# ---------------------------------------------------------------------------------------------
# Loop-corrected FLOPs and bytes
# ---------------------------------------------------------------------------------------------
# Instructions that move no data of their own (views, tuples, control flow: their bodies count).
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
               "add-dependency", "domain"}


def _operand_names(ins: _Instr) -> List[str]:
    """The operand names of an instruction ("%a, %b" after the opcode; types may precede)."""
    line = ins.line
    i = line.find(f" {ins.opcode}(")
    if i < 0:
        return []
    j = i + len(ins.opcode) + 2
    depth, k = 1, j
    while k < len(line) and depth:
        depth += line[k] == "("
        depth -= line[k] == ")"
        k += 1
    return re.findall(r"%([^\s,()]+)", line[j:k - 1])


def _dims(type_str: str) -> List[int]:
    m = _ARRAY.search(type_str)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _instr_flops(ins: _Instr, types: Dict[str, str]) -> float:
    """Matrix-multiply FLOPs of one instruction: dot (2 x output x contraction), convolution
    (how the TPU compiler writes matmuls: 2 x output x kernel / output features), or a GPU
    cuBLAS/cuBLASLt GEMM custom call. Elementwise work is left to XLA's own count."""
    op = ins.opcode
    if op == "dot":
        ops = _operand_names(ins)
        lhs = _dims(types.get(ops[0], "")) if ops else []
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.line)
        k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
        return 2.0 * math.prod(_dims(ins.type_str)) * k
    if op == "convolution":
        ops = _operand_names(ins)
        rhs = _dims(types.get(ops[1], "")) if len(ops) > 1 else []
        labels = re.search(r"dim_labels=[^_]*_([^-]*)->", ins.line)
        if not rhs or not labels or "o" not in labels.group(1):
            return 0.0
        o = rhs[labels.group(1).index("o")]
        return 2.0 * math.prod(_dims(ins.type_str)) * math.prod(rhs) / max(o, 1)
    if op == "custom-call" and re.search(r'custom_call_target="__cublas(?:\$lt)?\$\w*[Gg]emm', ins.line):
        ops = _operand_names(ins)
        lhs = _dims(types.get(ops[0], "")) if ops else []
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.line)
        k = math.prod(lhs[int(d)] for d in re.findall(r"\d+", m.group(1))) if m and lhs else 1
        return 2.0 * math.prod(_dims(ins.type_str)) * k
    return 0.0


def _fusion_bytes(ins: _Instr, types: Dict[str, str], comps: Dict[str, List[_Instr]]) -> float:
    """Bytes a fusion reads and writes, following XLA's cost analysis where it matters in loops:
    an operand read only through dynamic-slices counts the slices (a scanned layer's weights),
    an output written by a dynamic-update-slice counts the update (a scan's stacked outputs)."""
    ops = _operand_names(ins)
    called = re.search(r"calls=%?([^\s,]+)", ins.line)
    body = comps.get(called.group(1), []) if called else []
    btypes = {i.name: i.type_str for i in body}
    params: Dict[int, str] = {}
    for i in body:
        if i.opcode == "parameter":
            idx = re.search(r"parameter\((\d+)\)", i.line)
            if idx:
                params[int(idx.group(1))] = i.name
    users: Dict[str, List[_Instr]] = {}
    for i in body:
        for o in _operand_names(i):
            users.setdefault(o, []).append(i)
    root = next((i for i in body if i.line.lstrip().startswith("ROOT")), None)
    in_place = None
    out = float(_shape_bytes(ins.type_str))
    if root is not None and root.opcode == "dynamic-update-slice":
        r_ops = _operand_names(root)
        if len(r_ops) > 1:
            in_place = r_ops[0]
            out = float(_shape_bytes(btypes.get(r_ops[1], "")))
    total = out
    for idx, name in enumerate(ops):
        pname = params.get(idx)
        if pname is not None and pname == in_place:
            continue  # the buffer updated in place is not read
        u = users.get(pname, []) if pname else []
        if u and all(x.opcode in ("dynamic-slice", "gather") and _operand_names(x)[:1] == [pname]
                     for x in u):
            total += sum(_shape_bytes(x.type_str) for x in u)
        else:
            total += _shape_bytes(types.get(name, ""))
    return total


def _instr_bytes(ins: _Instr, types: Dict[str, str], comps: Dict[str, List[_Instr]]) -> float:
    op = ins.opcode
    if op in _NO_TRAFFIC or op.endswith("-done"):
        return 0.0
    if op == "fusion":
        return _fusion_bytes(ins, types, comps)
    if op == "dynamic-slice":
        return 2.0 * _shape_bytes(ins.type_str)
    ops = _operand_names(ins)
    if op == "dynamic-update-slice":
        return 2.0 * _shape_bytes(types.get(ops[1], "")) if len(ops) > 1 else 0.0
    return float(_shape_bytes(ins.type_str) + sum(_shape_bytes(types.get(o, "")) for o in ops))


def loop_costs(text: str) -> Dict[str, Any]:
    """What XLA's cost analysis leaves out of an optimised HLO module: it counts a while loop's
    body once, whatever the trip count. Returns the extra matmul FLOPs and the extra bytes
    accessed that the loops' remaining iterations run (`extra_flops`, `extra_bytes`), the
    matmul FLOPs counted with and without trip counts, and the loops found ({trip, body,
    op_name}). Add the extras to the cost analysis' totals to get the executed figures."""
    comps, entry = _parse_hlo(text)
    mult = _multipliers(comps, entry, trips=True)
    once = _multipliers(comps, entry, trips=False)
    sequential = {entry} if entry else set()
    loops: List[Dict[str, Any]] = []
    for name, instrs in comps.items():
        for ins in instrs:
            if ins.opcode == "while":
                for key in ("body", "condition"):
                    ref = re.search(key + r"=%?([^\s,]+)", ins.line)
                    if ref:
                        sequential.add(ref.group(1))
                body = re.search(r"body=%?([^\s,]+)", ins.line)
                if body and name in mult:
                    b = body.group(1)
                    trip = mult.get(b, 0.0) / max(mult[name], 1e-30)
                    op_name = re.search(r'op_name="([^"]*)"', ins.line)
                    loops.append({"trip": trip, "body": b,
                                  "op_name": op_name.group(1)[-100:] if op_name else ""})
            elif ins.opcode in ("call", "conditional"):
                for ref in re.findall(r"(?:to_apply|calls|true_computation|false_computation)=%?([^\s,]+)",
                                      ins.line):
                    sequential.add(ref)
                branches = re.search(r"branch_computations=\{([^}]*)\}", ins.line)
                if branches:
                    sequential.update(re.findall(r"%?([^\s,]+)", branches.group(1)))
    flops = flops_once = extra_bytes = 0.0
    for name, instrs in comps.items():
        m, m1 = mult.get(name, 0.0), once.get(name, 0.0)
        if m == 0.0:
            continue
        types = {i.name: i.type_str for i in instrs}
        for ins in instrs:
            f = _instr_flops(ins, types)
            flops += f * m
            flops_once += f * m1
            if name in sequential and m > m1:
                extra_bytes += _instr_bytes(ins, types, comps) * (m - m1)
    return {"extra_flops": flops - flops_once, "extra_bytes": extra_bytes,
            "matmul_flops": flops, "matmul_flops_once": flops_once, "loops": loops}


# ---------------------------------------------------------------------------------------------
# The compiled-program report (one set of key names for the trainer, aot, the study, benchmarks)
# ---------------------------------------------------------------------------------------------
MEMORY_KEYS = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
               "generated_code_bytes", "peak_bytes")


def program_report(compiled, *, partition_to_node: Optional[Sequence[int]] = None,
                   slices: int = 1, detail: bool = False,
                   collectives: bool = True) -> Dict[str, Any]:
    """Per-device figures of one compiled program (a `jax.stages.Compiled`), before it runs.

    Keys (bytes and FLOPs are per device, one call of the program):
      argument_bytes, output_bytes, temp_bytes, alias_bytes, generated_code_bytes: XLA's
        memory analysis; peak_bytes = arguments + outputs + temporaries - aliased (donated
        outputs reuse their argument buffers; temporaries are already packed by liveness);
        xla_peak_bytes when the backend reports its own peak;
      flops, bytes_accessed: XLA's cost analysis corrected for while loops (the remaining
        iterations of each loop body added, see `loop_costs`); xla_flops and
        xla_bytes_accessed are the uncorrected figures; transcendentals (uncorrected);
      loops: the while loops and their trip counts;
      collectives (see `collectives_from_hlo`) and comm_estimate (`comm_seconds`), unless
        `collectives=False`.
    A backend without memory or cost analysis leaves those keys out.
    """
    rep: Dict[str, Any] = {}
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        mem = None
    if mem is not None:
        for attr, key in (("argument_size_in_bytes", "argument_bytes"),
                          ("output_size_in_bytes", "output_bytes"),
                          ("temp_size_in_bytes", "temp_bytes"),
                          ("generated_code_size_in_bytes", "generated_code_bytes"),
                          ("alias_size_in_bytes", "alias_bytes")):
            rep[key] = int(getattr(mem, attr, 0) or 0)
        rep["peak_bytes"] = (rep["argument_bytes"] + rep["output_bytes"] + rep["temp_bytes"]
                             - rep["alias_bytes"])
        peak = getattr(mem, "peak_memory_in_bytes", None)
        if peak:
            rep["xla_peak_bytes"] = int(peak)  # XLA's own figure (the CPU backend's runs low)
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        cost = None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    text = compiled.as_text()
    if cost:
        lc = loop_costs(text)
        rep["xla_flops"] = float(cost.get("flops", 0.0))
        rep["xla_bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
        rep["flops"] = rep["xla_flops"] + lc["extra_flops"]
        rep["bytes_accessed"] = rep["xla_bytes_accessed"] + lc["extra_bytes"]
        rep["transcendentals"] = float(cost.get("transcendentals", 0.0))
        rep["loops"] = lc["loops"]
    if collectives:
        rep["collectives"] = collectives_from_hlo(text, partition_to_node, detail, slices)
        rep["comm_estimate"] = comm_seconds(rep["collectives"])
    return rep


def _per_device_bytes(abstract_tree) -> Tuple[int, int]:
    """(total bytes, bytes on one device) of a tree of sharded ShapeDtypeStructs."""
    total = shard = 0
    for a in jax.tree.leaves(abstract_tree):
        itemsize = np.dtype(a.dtype).itemsize
        total += math.prod(a.shape) * itemsize
        shard += math.prod(a.sharding.shard_shape(a.shape)) * itemsize
    return total, shard


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------
def _model_config(cfg):
    m = cfg.model
    if m.path:
        from r1jax.models import hf

        return hf.load_config(m.path, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                              scan_layers=m.scan_layers)
    return m


def compile_update(cfg, *, devices: Optional[Sequence[Any]] = None, topology: Optional[str] = None,
                   slices: int = 1,
                   batch_sequences: Optional[int] = None, prompt_len: Optional[int] = None,
                   completion_len: Optional[int] = None, reference: Optional[bool] = None,
                   compiler_options: Optional[Dict[str, Any]] = None,
                   detail: bool = False,
                   programs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Lower and compile one GRPO update (and the reference log-prob forward) for `cfg.mesh`
    on `devices` (default: this process's) or on the chips of a TPU `topology` ("v5p:2x2x2";
    needs libtpu, not a TPU) times `slices` (the dcn axes then span slices), from abstract
    shapes only.

    The mini-batch defaults to the trainer's: prompts_per_rollout * group_size / num_minibatches
    sequences, prompts padded to data.max_prompt_len's bucket, sampler.max_new_tokens
    completion tokens. `reference` (default: grpo.beta > 0) also compiles the reference forward.
    `compiler_options` go to both jits (CPU only, e.g. {"xla_backend_optimization_level": 0});
    `detail` keeps every collective instruction's record (collectives["instructions"]).
    `programs`, a dict, receives {"update" | "reference": (compiled, abstract arguments)}
    (r1jax.study runs them where the devices exist).

    Returns a JSON-able dict: platform, devices, mesh, ici/dcn, model and batch sizes, params
    (total and per-device bytes of parameters and of the whole train state, the shard factor
    reached vs the mesh's fsdp x tensor, `sharded_enough`, the largest under-sharded leaves),
    and for "update" (and "reference"): argument/output/temp/generated-code/peak bytes per
    device, flops, bytes_accessed, collectives (see `collectives_from_hlo`), comm_estimate and
    compile_s.
    """
    from flax import nnx

    from r1jax.models import registry
    from r1jax.models.build import num_params

    if topology is not None and devices is not None:
        raise ValueError("compile_update: give devices or topology, not both")
    devs = topology_devices(topology, slices) if topology else list(devices if devices is not None
                                                           else jax.devices())
    platform = devs[0].platform
    if compiler_options and platform != "cpu":
        compiler_options = None  # CPU flags mean nothing (or fail) elsewhere
    mesh = mesh_lib.make_mesh(cfg.mesh, devs)
    ici, dcn = mesh_lib._axis_sizes(cfg.mesh, len(devs))  # noqa: SLF001 - sibling module
    per_node = cfg.mesh.devices_per_node or math.prod(ici.values())
    rules = mesh_lib.train_rules(cfg.mesh)

    c = cfg
    # One place for the shape rules (the trainer's): the overrides replace what the config implies.
    if batch_sequences is not None and int(batch_sequences) < 1:
        raise ValueError(f"compile_update: batch_sequences must be >= 1, got {batch_sequences}")
    geom = grpo.Geometry.from_config(c, minibatch_size=batch_sequences, prompt_len=prompt_len,
                                     completion_len=completion_len)
    n, tp, tc = geom.minibatch_size, geom.prompt_len, geom.completion_len
    beta = float(c.grpo.beta)
    reference = bool(beta) if reference is None else bool(reference)

    mcfg = _model_config(cfg)
    abstract_model = nnx.eval_shape(lambda: registry.get(mcfg.architecture).model(mcfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract_model, nnx.Param)
    params_sh = mesh_lib.params_shardings(abs_state, mesh, rules)
    params_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                 nnx.to_pure_dict(abs_state))
    params_abs = _abstract(params_shapes, params_sh)
    optimizer, schedule = grpo.make_optimizer(c.train)
    state_sh = grpo.train_state_shardings(params_sh, optimizer, params_shapes, mesh)
    state_shapes = jax.eval_shape(lambda p: grpo.TrainState.create(p, optimizer), params_shapes)
    state_abs = _abstract(state_shapes, state_sh)
    ref_abs = params_abs if beta else None

    def sd(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.batch_sharding(
            mesh, rules, len(shape), shape))

    batch = {"prompt_ids": sd((n, tp), jnp.int32), "prompt_mask": sd((n, tp), jnp.int32),
             "completion_ids": sd((n, tc), jnp.int32), "completion_mask": sd((n, tc), jnp.int32),
             "logp_old": sd((n, tc), jnp.float32), "advantages": sd((n,), jnp.float32)}
    if beta:
        batch["logp_ref"] = sd((n, tc), jnp.float32)
    if c.grpo.mask_truncated:
        batch["truncated"] = sd((n,), jnp.int32)
    if getattr(mcfg, "moe", None) is not None and mcfg.moe.routing_replay == "rollout":
        from r1jax.models import moe as moe_lib  # the sampler's recorded experts, replayed

        batch.update({k: sd(shape, dtype) for k, (shape, dtype)
                      in moe_lib.recorded_routes(mcfg, n, tp, tc).items()})
    batch_sh = {k: v.sharding for k, v in batch.items()}
    temp = geom.temperature

    partition_to_node = _partition_to_node(mesh, devs, per_node)

    report: Dict[str, Any] = {
        "platform": platform, "device_kind": getattr(devs[0], "device_kind", platform),
        "topology": topology, "slices": slices if topology else None, "devices": len(devs),
        "mesh": {a: int(s) for a, s in mesh.shape.items()}, "ici": ici, "dcn": dcn,
        "devices_per_node": per_node,
        "model": {"params": int(num_params(mcfg)), "layers": mcfg.num_layers,
                  "hidden": mcfg.hidden_size, "vocab": mcfg.vocab_size,
                  "param_dtype": str(mcfg.param_dtype), "remat": mcfg.remat},
        "batch": {"sequences": n, "prompt_len": tp, "completion_len": tc,
                  "micro_batches": int(c.grpo.micro_batches),
                  "sharded_over": _batch_axes(batch["completion_ids"].sharding)},
    }
    report["params"] = _params_report(params_abs, state_abs, mesh)

    up_batch = batch
    if c.grpo.packing:  # the packed layout, at the most chunks a mini-batch can need (the trainer's)
        up_batch = packing.Packer(geom, c.grpo, mesh=mesh, rules=rules).abstract(batch)
        report["batch"]["packed_chunks"] = int(up_batch["tokens"].shape[0])
        report["batch"]["chunk_tokens"] = int(up_batch["tokens"].shape[1])
    t0 = time.perf_counter()
    update = grpo.make_update_step(
        graphdef, optimizer, c.grpo, geom, schedule=schedule,
        state_shardings=state_sh, ref_shardings=params_sh if beta else None,
        batch_shardings={k: v.sharding for k, v in up_batch.items()}, mesh=mesh, rules=rules,
        compiler_options=compiler_options)
    compiled = update.lower(state_abs, ref_abs, up_batch).compile()
    if programs is not None:
        programs["update"] = (compiled, (state_abs, ref_abs, up_batch))
    report["update"] = program_report(compiled, partition_to_node=partition_to_node,
                                      slices=slices, detail=detail)
    report["update"]["compile_s"] = round(time.perf_counter() - t0, 2)

    if reference:
        t0 = time.perf_counter()
        fwd = grpo.reference_logprobs_fn(
            graphdef, temperature=temp, params_shardings=params_sh,
            batch_shardings=batch_sh["prompt_ids"], out_shardings=batch_sh["completion_ids"],
            mesh=mesh, rules=rules, compiler_options=compiler_options)
        ref_c = fwd.lower(params_abs, batch["prompt_ids"], batch["prompt_mask"],
                          batch["completion_ids"]).compile()
        if programs is not None:
            programs["reference"] = (ref_c, (params_abs, batch["prompt_ids"], batch["prompt_mask"],
                                             batch["completion_ids"]))
        report["reference"] = program_report(ref_c, partition_to_node=partition_to_node,
                                             slices=slices, detail=detail)
        report["reference"]["compile_s"] = round(time.perf_counter() - t0, 2)
    return report


def _partition_to_node(mesh, devices, per_node: int) -> List[int]:
    """The node of each SPMD partition (partition p runs on mesh.devices.flat[p]). Several TPU
    slices: the slice is the node (ICI inside, DCN between). Otherwise the nodes are emulated as
    make_mesh does: consecutive devices in (process, id) order, `per_node` to a node (a TPU
    slice's hosts share its ICI, so hosts are not nodes)."""
    slices = {getattr(d, "slice_index", 0) or 0 for d in devices}
    if len(slices) > 1:
        return [int(getattr(d, "slice_index", 0) or 0) for d in mesh.devices.flat]
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    rank = {id(d): i for i, d in enumerate(ordered)}
    return [rank[id(d)] // per_node for d in mesh.devices.flat]


def _batch_axes(sharding) -> List[str]:
    spec = sharding.spec[0] if len(sharding.spec) else None
    return [] if spec is None else ([spec] if isinstance(spec, str) else list(spec))


def _params_report(params_abs, state_abs, mesh) -> Dict[str, Any]:
    total, per_dev = _per_device_bytes(params_abs)
    st_total, st_dev = _per_device_bytes(state_abs)
    ideal = int(mesh.shape["fsdp"] * mesh.shape["tensor"])
    factor = total / max(per_dev, 1)
    under = []
    for path, a in traverse_util.flatten_dict(params_abs, sep="/").items():
        nbytes = math.prod(a.shape) * np.dtype(a.dtype).itemsize
        f = math.prod(a.shape) / max(math.prod(a.sharding.shard_shape(a.shape)), 1)
        if f < ideal and nbytes >= 0.01 * total:
            under.append({"name": path, "bytes": int(nbytes), "shard_factor": round(f, 2),
                          "spec": str(tuple(a.sharding.spec))})
    under.sort(key=lambda r: -r["bytes"])
    return {"total_bytes": int(total), "per_device_bytes": int(per_dev),
            "state_total_bytes": int(st_total), "state_per_device_bytes": int(st_dev),
            "shard_factor": round(factor, 3), "ideal_shard_factor": ideal,
            # >= 90% of what fsdp x tensor allows: small leaves (norms, biases) may replicate.
            "sharded_enough": bool(factor >= 0.9 * ideal),
            "under_sharded": under[:8]}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / 2**30:9.3f} GiB"


def format_report(rep: Dict[str, Any]) -> str:
    """A human-readable table of a `compile_update` report."""
    mesh = " x ".join(f"{a}={s}" for a, s in rep["mesh"].items())
    where = f" (topology {rep['topology']})" if rep.get("topology") else ""
    m, b = rep["model"], rep["batch"]
    lines = [
        (f"compiled for {rep['devices']} {rep['device_kind']} devices{where}; mesh {mesh} "
         f"(ici {rep['ici']}, dcn {rep['dcn']})"),
        (f"model {m['params'] / 1e6:.1f}M params ({m['param_dtype']}, {m['layers']} layers); "
         f"mini-batch {b['sequences']} sequences x ({b['prompt_len']} prompt + "
         f"{b['completion_len']} completion) tokens, {b['micro_batches']} micro-batch(es), "
         f"batch over {b['sharded_over'] or 'nothing (replicated)'}"),
    ]
    p = rep["params"]
    lines.append(
        f"parameters {_gib(p['total_bytes']).strip()} total, {_gib(p['per_device_bytes']).strip()}"
        f" per device (x{p['shard_factor']:.1f} of x{p['ideal_shard_factor']} possible: "
        f"{'sharded enough' if p['sharded_enough'] else 'UNDER-SHARDED'}); train state "
        f"{_gib(p['state_per_device_bytes']).strip()} per device")
    for u in p["under_sharded"][:4]:
        lines.append(f"  under-sharded: {u['name']} {u['bytes'] / 2**20:.1f} MiB spec {u['spec']}")
    for name in ("update", "reference"):
        r = rep.get(name)
        if not r:
            continue
        lines.append(f"[{name}] compiled in {r['compile_s']:.1f} s; per device:")
        for key in ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes",
                    "peak_bytes"):
            if key in r:
                lines.append(f"  {key:22s} {_gib(r[key])}")
        lines.append(f"  {'flops':22s} {r.get('flops', 0) / 1e12:9.3f} TFLOP"
                     f"   bytes accessed {r.get('bytes_accessed', 0) / 2**30:.3f} GiB")
        lines.append(f"  {'collective':20s} {'count':>6s} {'runs':>8s} {'traffic/dev':>12s} "
                     f"{'ici':>12s} {'dcn':>12s}  group sizes")
        for kind in COLLECTIVES + ("total",):
            c = r["collectives"][kind]
            if not c["count"]:
                continue
            lines.append(f"  {kind:20s} {c['count']:6d} {c['executions']:8.0f} "
                         f"{c['traffic_bytes'] / 2**20:9.1f} MiB {c['ici_bytes'] / 2**20:8.1f} MiB "
                         f"{c['dcn_bytes'] / 2**20:8.1f} MiB  {c.get('group_sizes', '')}")
        for t in r["collectives"]["top"][:3]:
            lines.append(f"  top: {t['kind']} {t['shape']} x{t['runs']:.0f} runs over "
                         f"{t['group_size']} ({t['where']}): {t['traffic_bytes'] / 2**20:.1f} MiB"
                         f"  [{t['op_name'][-60:]}]")
        e = r["comm_estimate"]
        lines.append(f"  comm estimate (no overlap; {ICI_BYTES_PER_S / 1e9:.0f} GB/s ici, "
                     f"{DCN_BYTES_PER_S / 1e9:.0f} GB/s dcn): {e['total_s'] * 1e3:.1f} ms "
                     f"(ici {e['ici_s'] * 1e3:.1f} ms, dcn {e['dcn_s'] * 1e3:.1f} ms)")
    return "\n".join(lines)




def compile_command(cfg, *, topology: Optional[str] = None, slices: int = 1,
                    batch_sequences: Optional[int] = None, prompt_len: Optional[int] = None,
                    completion_len: Optional[int] = None) -> str:
    """`r1jax compile`: the report as a table, then one JSON line."""
    import json

    if slices != 1 and topology is None:
        raise ValueError("--slices needs --topology (slices of a TPU topology)")
    rep = compile_update(cfg, topology=topology, slices=slices, batch_sequences=batch_sequences,
                         prompt_len=prompt_len, completion_len=completion_len)
    return format_report(rep) + "\n" + json.dumps(rep)


__all__ = ["COLLECTIVES", "MEMORY_KEYS", "compile_command", "compile_update",
           "collectives_from_hlo", "comm_seconds", "format_report", "loop_costs",
           "parse_replica_groups", "program_report", "topology_devices", "tpu_available"]
