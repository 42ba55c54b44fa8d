#!/usr/bin/env bash
# Runs the benchmarks for real (the test suite only smoke-runs them) and saves pytest-benchmark JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
mkdir -p .benchmarks
LEANFIT_BENCH_FULL=1 python -m pytest bench -q --benchmark-only --benchmark-json=.benchmarks/bench.json \
  --benchmark-columns=mean,stddev,rounds "$@"
