#!/usr/bin/env bash
# Creates .venv in the project and installs the project with its test tools. Idempotent. Says
# one line per step; pip's own output goes to .venv/setup.log and is shown only on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
log=.venv/setup.log
: > "$log"
fail() { echo "setup: $1 failed; the last lines of $log:" >&2; tail -n 25 "$log" >&2; exit 1; }
echo "setup: installing the project and its test tools into .venv (details in $log)"
.venv/bin/python -m pip install -q --upgrade pip >>"$log" 2>&1 || fail "upgrading pip"
.venv/bin/python -m pip install -q -e '.[dev]' >>"$log" 2>&1 || fail "installing the project"
.venv/bin/python -c "import torch, torchvision, mlflow, optuna, pipeline" >>"$log" 2>&1 \
  || fail "importing the installed packages"
echo "setup: ready ($(.venv/bin/python -c 'import torch, mlflow; print(f"torch {torch.__version__}, mlflow {mlflow.__version__}")'))"
