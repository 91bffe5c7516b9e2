#!/usr/bin/env bash
# The wheels benchmarks/device_check.sh installs on a machine without network (Python 3.12,
# x86-64 Linux, jax already installed): the r1jax dependencies such a machine lacks, with their
# own dependencies, into ./bench-wheels (travels with the working tree; not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip download --quiet --dest bench-wheels --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  omegaconf grain math-verify tensorboardX
du -sh bench-wheels && ls bench-wheels
