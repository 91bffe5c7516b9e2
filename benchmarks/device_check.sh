#!/usr/bin/env bash
# The one-accelerator check (an H200; at most ~5 minutes, rerunnable within 15 minutes of device
# time). Results: JSON under $OUT when set, else ./bench-out (device_check.json sums them up).
#
#   bash benchmarks/device_check.sh          # on the GPU machine
#   bash benchmarks/device_check.sh --dry    # the same steps on CPU with a tiny model (CI)
#
# Steps (each with its own time limit; a failing step is recorded, the others still run):
#   0. dependencies the machine lacks (omegaconf, grain, math-verify, tensorboardX) from the
#      wheel folder ./bench-wheels made here by benchmarks/prepare_wheels.sh (no network there);
#      r1jax itself from this tree (PYTHONPATH), nothing built;
#   1. `r1jax env --json`: backend, devices, versions;
#   2. the backend-agnostic tests on the accelerator (R1JAX_TEST_BACKEND=gpu): golden numerics,
#      the decode step against the full forward, the time model;
#   3. benchmarks/device_bench.py: update MFU of a 1.5B-shaped bf16 model, decode tokens/s and
#      HBM-roofline share at batch 256, the study's H200 projection beside each measurement;
#   4. a checkpoint written on the CPU restored on the accelerator (bf16).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUTDIR="${OUT:-./bench-out}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if [ $DRY = 1 ]; then
  BACKEND=cpu; export JAX_PLATFORMS=cpu; BENCH=(--dry --reps 1)
  TESTS=(tests/test_study.py -k "time_model")
else
  BACKEND=gpu; unset JAX_PLATFORMS; BENCH=(--profile h200 --reps 3)
  TESTS=(tests/golden/test_golden.py tests/test_study.py -k "golden or decode_step or time_model or param_counts")
fi
declare -A RC

step() {  # step NAME SECONDS CMD... : run, keep stdout/stderr and the exit code
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUTDIR/$name.out" 2> "$OUTDIR/$name.err"
  RC[$name]=$?
  echo "[device_check] $name: exit ${RC[$name]} in $((SECONDS - t0)) s" >&2
}

# 0. dependencies
missing=()
for pair in omegaconf:omegaconf grain:grain math_verify:math-verify tensorboardX:tensorboardX; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ -d bench-wheels ]; then
    step deps 120 "$PY" -m pip install --no-index --find-links bench-wheels "${missing[@]}"
  else
    echo "[device_check] missing ${missing[*]} and no ./bench-wheels (run benchmarks/prepare_wheels.sh)" >&2
    RC[deps]=1
  fi
fi

# 1. environment
step env 60 "$PY" -m r1jax.cli env configs/mesh/h200x1.yaml --json
cp "$OUTDIR/env.out" "$OUTDIR/env.json" 2>/dev/null

# 2. backend-agnostic tests on the accelerator
R1JAX_TEST_BACKEND=$BACKEND step tests 150 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

# 3. MFU, decode roofline, projection beside measurement
step bench 200 "$PY" benchmarks/device_bench.py "${BENCH[@]}"
tail -n 1 "$OUTDIR/bench.out" > "$OUTDIR/bench.json" 2>/dev/null

# 4. a CPU checkpoint restored on the accelerator
CK="$(mktemp -d)"
JAX_PLATFORMS=cpu step ckpt_write 90 "$PY" tests/golden/ckpt_cross.py write "$CK"
step ckpt_restore 90 "$PY" tests/golden/ckpt_cross.py restore "$CK" --dtype bfloat16
rm -rf "$CK"

# Summary
"$PY" - "$OUTDIR" "$DRY" <<EOF
import json, os, sys
out, dry = sys.argv[1], sys.argv[2] == "1"
rc = {$(for k in "${!RC[@]}"; do printf '"%s": %s, ' "$k" "${RC[$k]}"; done)}
def last_json(name):
    try:
        lines = [l for l in open(os.path.join(out, name + ".out")) if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError):
        return None
def tail(name):
    try:
        return open(os.path.join(out, name + ".out")).read()[-600:]
    except OSError:
        return ""
summary = {"dry": dry, "exit_codes": rc, "ok": all(v == 0 for v in rc.values()),
           "env": last_json("env"), "tests_tail": tail("tests"), "bench": last_json("bench"),
           "ckpt_restore": last_json("ckpt_restore")}
with open(os.path.join(out, "device_check.json"), "w") as f:
    json.dump(summary, f, indent=1)
b = summary["bench"] or {}
print(json.dumps({"device_check": "ok" if summary["ok"] else "FAILED", "exit_codes": rc,
                  "update_mfu": b.get("update_mfu"), "decode_tokens_per_s": b.get("decode_tokens_per_s"),
                  "decode_hbm_roofline_fraction": b.get("decode_hbm_roofline_fraction"),
                  "out": os.path.join(out, "device_check.json")}))
sys.exit(0 if summary["ok"] else 1)
EOF
