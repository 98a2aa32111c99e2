#!/usr/bin/env bash
# Create .venv and install clear-adapters with its test dependencies, from nothing but Python.
# Idempotent: a second run only re-checks (a stamp of pyproject.toml and this script in .venv says
# what was installed; anything changed, or a broken venv, installs again). Torch goes first, chosen for
# the machine: a bare "torch" requirement would pull a multi-GB CUDA build onto CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.clear-adapters-bootstrap
wanted=$(cat pyproject.toml scripts/bootstrap.sh | "$PYTHON" -c "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
ready() {
  .venv/bin/python - <<'PY'
from importlib.metadata import version
import clear_adapters  # light: the package imports torch only when used
print(f"clear-adapters {clear_adapters.__version__} ready (torch {version('torch')})")
PY
}
if [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted" ] && ready 2>/dev/null; then
  exit 0
fi
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
# pip's output (setuptools' notice that an editable install of this layout uses an import finder, ...)
# goes to a log; it is shown only when the install fails
if ! .venv/bin/python -m pip install -q -e ".[dev]" >.venv/bootstrap-pip.log 2>&1; then
  cat .venv/bootstrap-pip.log >&2
  exit 1
fi
echo "$wanted" > "$STAMP"
ready
