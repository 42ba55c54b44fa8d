#!/usr/bin/env bash
# The README's test command: sets up .venv on a fresh machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m pytest tests bench --benchmark-disable -q "$@"
