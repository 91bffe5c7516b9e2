#!/usr/bin/env bash
# Compile the GRPO update for a TPU topology on a machine without a TPU (pip install -e ".[tpu]").
#   launch/tpu_compile.sh v5p:4x4x8 [CONFIG] [key=value ...]
set -euo pipefail
topology=${1:?usage: launch/tpu_compile.sh TOPOLOGY [CONFIG] [key=value ...]}
shift
r1jax compile "$@" --topology "$topology"
