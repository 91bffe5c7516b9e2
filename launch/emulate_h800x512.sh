#!/usr/bin/env bash
# R1's cluster (64 nodes x 8 H800) on 512 fake CPU devices: the device grid per node and every
# parameter's sharding, then the compiled GRPO update's per-device memory and its collectives
# split into NVLink (inside a node) and InfiniBand (across nodes) traffic. Usage:
#   launch/emulate_h800x512.sh [MODEL_CONFIG] [key=value ...]   (default: Qwen2.5-Math-1.5B shapes)
set -euo pipefail
model=${1:-configs/model/qwen2.5-math-1.5b.yaml}
shift || true
export JAX_PLATFORMS=cpu
r1jax --devices 512 mesh "$model" 'mesh.ici={fsdp: 8}' 'mesh.dcn={data: 64}' "$@"
r1jax --devices 512 compile "$model" 'mesh.ici={fsdp: 8}' 'mesh.dcn={data: 64}' model.remat=full "$@"
