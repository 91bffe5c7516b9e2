#!/usr/bin/env bash
# One training process on this machine's devices. Usage:
#   launch/local.sh [CONFIG] [key=value ...]        e.g. launch/local.sh configs/r1_zero.yaml model.path=...
#   R1JAX_DEVICES=8 launch/local.sh                  the demo on 8 emulated CPU devices
set -euo pipefail
exec r1jax train "$@"
