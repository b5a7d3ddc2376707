#!/usr/bin/env bash
# Creates .venv in the project and installs the project with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, torchvision, mlflow, optuna, pipeline" \
  || { echo "setup: the install failed (see above)" >&2; exit 1; }
