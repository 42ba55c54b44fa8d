#!/usr/bin/env bash
# The README's test command: sets up .venv on a fresh machine, then runs the whole suite.
# `--fast` is the fast lane: everything not marked slow (`-m "not slow"`); other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
args=()
for a in "$@"; do
  if [ "$a" = "--fast" ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
python -m pytest tests bench --benchmark-disable -q ${args[@]+"${args[@]}"}
