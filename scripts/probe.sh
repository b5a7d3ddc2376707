#!/usr/bin/env bash
# Replays the README's "What survives a failure" table end to end and prints OK or NOT OK per
# row (scripts/probe.py says how). Sets up .venv first if it is missing. Arguments pick rows by
# a word of their name: `bash scripts/probe.sh sigterm`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python scripts/probe.py "$@"
