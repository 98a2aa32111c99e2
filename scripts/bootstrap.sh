#!/usr/bin/env bash
# Create .venv and install clear-adapters with its test dependencies, from nothing but Python.
# Idempotent: a second run only re-checks. Torch goes first, chosen for the machine: a bare "torch"
# requirement would pull a multi-GB CUDA build onto CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch>=2.5"
  else
    # the CPU build: 2.13.0 is the release this project is tested with on CPU machines
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
fi
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import clear_adapters, torch; print(f'clear-adapters {clear_adapters.__version__} ready (torch {torch.__version__})')"
