#!/usr/bin/env bash
# Sets up .venv if needed and runs the whole test suite, one pytest worker per core (each on a
# core of its own: tests/conftest.py). Contributors' loop: .venv/bin/python -m pytest -m fast
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "$(nproc)" --dist worksteal "$@"
