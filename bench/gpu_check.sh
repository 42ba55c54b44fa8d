#!/usr/bin/env bash
# The one prepared GPU check, correctness first: the GPU lane (`pytest -m gpu tests`: every test marked `gpu`, the
# kernels against their references, causal_lm_loss, LoRA/QLoRA on CUDA), then LSTM benchmarks against cuDNN, loss
# benchmarks against naive / torch native / Liger / CCE, and capped fine-tuning runs against their estimates.
# Installs this tree as `leanfit` (editable, no network, no dependency changes) over what the GPU machine has
# (torch 2.11, triton 3.6, transformers 5.17, pytest-benchmark). Liger-Kernel, cut-cross-entropy, peft,
# bitsandbytes and pytest-xdist travel as wheels in .whl/ (bench/fetch_wheels.sh).
# Writes under $OUT at most 6 files (the device tool returns 8): gpu_check.log, machine.txt, gpu_lane.xml, the two
# pytest-benchmark JSONs and gpu_two_ranks.json; it prints the ratio tables last.
# The lane runs every width of the compile gate (LSTM H=32..1024, LCE heads 576/768/2304, fp32/bf16/fp16) on the
# card, so each per-architecture config in kernels/lstm/config.py and kernels/lce/fused.py is launched once, and the
# persistent LSTM (grid barrier, cooperative launch) at H=100..1024 in bf16 and fp16. With pytest-xdist it runs in
# 8 processes, so the cold Triton compiles of its kernels run side by side.
# The LSTM tables: variant="auto" against cuDNN at four shapes, and the persistent and tiled variants against cuDNN
# at B16 T1024 H768 and B64 T512 H1024.
# Usage (device tool, carry .whl): bash bench/fetch_wheels.sh here, then bash bench/gpu_check.sh there.
# Time: the steps run in order of value (the tests first) within GPU_CHECK_BUDGET_S seconds in all
# (default 480: one device call of at most 600 s, with room for the start); a step gets what is left of the
# budget up to its own limit, and a step with less than 30 s left is skipped and reported.
# On a machine with 2 GPUs a last step, two_ranks (DDP and FSDP2 over nccl against one GPU, up to 300 s), runs
# with what the budget has left (GPU_CHECK_BUDGET_S=780 gives it all); with one GPU it is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || { echo "cannot install leanfit"; exit 1; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
status=0
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
step() {  # step NAME TIMEOUT_S COMMAND...: runs one part within the budget, logs it, keeps going on failure
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then
    echo "== $name skipped: ${left}s of the ${BUDGET}s budget left" | tee -a "$OUT/gpu_check.log"
    status=1
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/gpu_check.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/gpu_check.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "== $name rc=$rc" | tee -a "$OUT/gpu_check.log"
  [ "$rc" = 0 ] || status=1
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'triton', triton.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  git rev-parse HEAD 2>/dev/null; date -u; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

XDIST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step gpu_lane 150 python3 -m pytest -q -m gpu tests ${XDIST[@]+"${XDIST[@]}"} --junitxml="$OUT/gpu_lane.xml"
step bench_lstm 150 python3 -m pytest -q bench/test_bench_lstm.py -k "not cpu" --benchmark-json="$OUT/bench_lstm.json"
step bench_loss 120 python3 -m pytest -q bench/test_bench_loss.py -k "not cpu" --benchmark-json="$OUT/bench_loss.json"
step capped_runs 60 python3 bench/gpu_capped_runs.py --quick
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$gpus" -ge 2 ]; then
  step two_ranks 300 python3 bench/gpu_two_ranks.py --out "$OUT/gpu_two_ranks.json"
else
  echo "== two_ranks skipped: $gpus GPU(s) here, it needs 2 (DDP and FSDP2 over nccl against one GPU)" \
    | tee -a "$OUT/gpu_check.log"
fi

echo "== tables"
[ -f "$OUT/bench_lstm.json" ] && python3 bench/lstm_gpu_table.py "$OUT/bench_lstm.json" | tee -a "$OUT/gpu_check.log"
[ -f "$OUT/bench_loss.json" ] && python3 bench/loss_gpu_table.py "$OUT/bench_loss.json" | tee -a "$OUT/gpu_check.log"
exit $status
