#!/usr/bin/env bash
# The learning-rate pitfall, shown: the same short fine-tune of the embedded SmolLM2-135M on the embedded
# corpus at lr 5e-5 and at lr 1e-2, then one report with perplexity, the a/an probe and samples of both.
#
#   scripts/lr_pitfall.sh            # CPU-sized: 2 seqs x 65 tokens = 128 next-token targets/step, 12 steps per run
#   ITERS=100 BLOCK=256 BATCH=8 scripts/lr_pitfall.sh   # longer, e.g. on a GPU
#
# Outputs: $OUT/lr-5e-5/ and $OUT/lr-1e-2/ (each a finetune run folder with report.md/.html) and
# $OUT/report.md, $OUT/report.html (the comparison). $OUT defaults to runs/lr-pitfall.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-runs/lr-pitfall}
ITERS=${ITERS:-12}
BLOCK=${BLOCK:-65}
BATCH=${BATCH:-2}
EVAL_BLOCKS=${EVAL_BLOCKS:-8}
SAMPLES=${SAMPLES:-3}
export TOKENIZERS_PARALLELISM=false

echo "lr pitfall: $BATCH seqs x $BLOCK tokens = $((BATCH * (BLOCK - 1))) targets/step, $ITERS steps per run"
EVAL=(--block-size "$BLOCK" --eval-blocks "$EVAL_BLOCKS" --heldout-contexts 20 --prompts train/data/prompt_study.txt
      --num-return-sequences "$SAMPLES" --seed 0)
for lr in 5e-5 1e-2; do
  run="$OUT/lr-$lr"
  "$PY" -m leanfit finetune --model smollm2-135m --block-size "$BLOCK" --batch-size "$BATCH" --iters "$ITERS" \
    --warmup 2 --eval-every "$ITERS" --eval-blocks "$EVAL_BLOCKS" --num-return-sequences "$SAMPLES" --seed 0 \
    --lr "$lr" --out "$run" --overwrite
  if [ ! -f "$run/eval_after.json" ]; then
    # this finetune does not call train.evaluate itself: evaluate the model before (once) and after
    if [ ! -f "$OUT/eval_before.json" ]; then
      "$PY" -m leanfit evaluate --model smollm2-135m "${EVAL[@]}" --json "$OUT/eval_before.json" > /dev/null
    fi
    cp "$OUT/eval_before.json" "$run/eval_before.json"
    "$PY" -m leanfit evaluate --model "$run/checkpoint" "${EVAL[@]}" --json "$run/eval_after.json" --overwrite > /dev/null
    "$PY" -m leanfit report "$run" > /dev/null
  fi
done
"$PY" -m leanfit report --compare "$OUT" "lr 5e-5=$OUT/lr-5e-5" "lr 1e-2=$OUT/lr-1e-2"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
first = json.loads((out / "lr-5e-5" / "eval_before.json").read_text())
rows = [("before", first)] + [(f"after, lr {lr}", json.loads((out / f"lr-{lr}" / "eval_after.json").read_text()))
                              for lr in ("5e-5", "1e-2")]
print(f"{'model':<16}{'perplexity':>12}{'a/an balanced acc.':>20}{'acc. a':>8}{'acc. an':>9}")
for name, r in rows:
    p = r["probe"]["builtin"]
    print(f"{name:<16}{r['perplexity']:>12.2f}{p['balanced_accuracy']:>20.3f}{p['a']['accuracy']:>8.3f}"
          f"{p['an']['accuracy']:>9.3f}")
PYEOF
echo "comparison report: $OUT/report.md and $OUT/report.html"
