#!/usr/bin/env bash
# README command 1: fine-tune the embedded SmolLM2-135M on the embedded Dracula, then sample from it.
# Sets up .venv as scripts/test.sh does; picks the cpu-demo preset (< 5 min on 2 cores) or, with CUDA, gpu-demo.
# Extra arguments go to `leanfit finetune` (e.g. --iters 100 --out runs/mine). A rerun replaces the previous
# demo run in runs/demo (--overwrite: only that run's own files; nothing else there is touched).
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

source scripts/setup_env.sh
PY=python

EXTRA=()
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    PRESET=gpu-demo
    EXTRA=(--dtype "$("$PY" -c "import torch; print('bf16' if torch.cuda.get_device_capability()[0] >= 8 else 'fp16')")")
else
    PRESET=cpu-demo
fi
echo "preset $PRESET (train/config.py):$(grep -B1 "\"$PRESET\"" train/config.py | head -1 | sed 's/^ *#//')"

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
"$PY" -m leanfit finetune --preset "$PRESET" --out runs/demo --overwrite ${EXTRA[@]+"${EXTRA[@]}"} "$@" | tee "$LOG"
OUT=$(sed -n 's|^outputs in \(.*\)/: .*|\1|p' "$LOG" | tail -n 1)

echo
echo "== a/an check with the fine-tuned checkpoint (leanfit generate) =="
"$PY" -m leanfit generate --model "$OUT/checkpoint" --prompt "You are a" --prompt "You are an" \
    --num-return-sequences 3 --seed 1

echo "== samples written after training ($OUT/samples.md, first lines) =="
head -n 16 "$OUT/samples.md"
echo
echo "outputs: $OUT/{report.md,report.html,eval_before.json,eval_after.json,memory_report.json,memory.png,"\
"metrics.jsonl,loss.png,checkpoints/,checkpoint,run.json,samples.md,samples.jsonl}"
grep "validation perplexity" "$LOG"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for name in ("before", "after"):
    r = json.loads((Path(sys.argv[1]) / f"eval_{name}.json").read_text())
    p = r["probe"]["builtin"]
    print(f"{name:>6}: perplexity {r['perplexity']:.2f}, a/an probe (built-in) balanced accuracy "
          f"{p['balanced_accuracy']:.3f}, mass on the correct class a {p['a']['mean_mass_correct']:.3f} "
          f"an {p['an']['mean_mass_correct']:.3f}")
EOF
