"""Two ranks against one process: DDP and FSDP2 loss curves, and each rank's measured peak against the estimate.

It builds a random-weight model folder (GPT-2 small's config from the presets, or a tiny one with --quick, and
a small local tokenizer), then runs the same fine-tuning steps three times on the embedded corpus: one process
with micro-batch 2B, and `leanfit launch --nproc-per-node 2 finetune --parallel ddp|fsdp2` with B per rank.
Per run it records the loss curve's largest difference from the one-process run, and per rank the measured
peak (`memory_report.json`: `torch.cuda.max_memory_allocated` per phase on CUDA, the tracked tensors on the
CPU) next to the estimate (`allocated_peak_bytes` on CUDA, `tensor_peak_bytes` on the CPU).

    python bench/gpu_two_ranks.py                        # 2 GPUs (nccl), GPT-2 small, bf16 where the card has it
    python bench/gpu_two_ranks.py --device cpu --quick   # 2 CPU processes (gloo), a tiny model: the logic only

Writes one JSON object per run to stdout and all of them to --out (default $OUT/gpu_two_ranks.json). Exits 1
when a run fails, 3 when a curve differs by more than --loss-tolerance or (on CUDA) an estimate misses by more
than --tolerance. On the CPU the memory figures are printed only: a run's tracked peak there also holds what
the run keeps between steps, a few MiB that outweigh a tiny model.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leanfit.train.checkpointing.atomic import atomic_write_json  # noqa: E402
from leanfit.train.memory.estimate import StepConfig, estimate_step  # noqa: E402
from leanfit.train.model.architectures import architecture_config  # noqa: E402
from tests.tiny_lm import tiny_config, tiny_tokenizer  # noqa: E402


def model_folder(folder: Path, quick: bool) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config("gpt2", len(tokenizer)) if quick else architecture_config("gpt2")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def finetune(out: Path, model: Path, args, batch: int, parallel: str | None) -> subprocess.CompletedProcess:
    flags = ["--model", str(model), "--out", str(out), "--device", args.device, "--dtype", args.dtype,
             "--block-size", str(args.block_size), "--batch-size", str(batch), "--iters", str(args.iters),
             "--warmup", "1", "--lr", "1e-4", "--loss", "chunked", "--eval-every", str(args.iters), "--eval-blocks",
             "4", "--save-every", str(args.iters), "--no-eval-study", "--eval-contexts", "0",
             "--num-return-sequences", "1", "--max-length", "30"]
    if parallel is None:
        command = [sys.executable, "-m", "leanfit.train.commands.finetune", *flags]
    else:
        command = [sys.executable, "-m", "leanfit", "launch", "--nproc-per-node", "2", "finetune", *flags,
                   "--parallel", parallel]
    return subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})


def train_losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in rows if m["kind"] == "train"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="a tiny model instead of GPT-2 small")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch per rank; one process takes twice it")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--loss-tolerance", type=float, default=None, help="default 1e-4 in fp32, 3e-2 in bf16/fp16")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(f"needs 2 GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 1
    if args.quick:
        args.block_size = min(args.block_size, 16)
    cuda = args.device == "cuda"
    args.dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    tolerance = args.loss_tolerance or (1e-4 if args.dtype == "fp32" else 3e-2)
    out_path = Path(args.out or os.path.join(os.environ.get("OUT", "bench"), "gpu_two_ranks.json"))
    results, status = [], 0
    with tempfile.TemporaryDirectory(prefix="two-ranks-") as tmp:
        tmp = Path(tmp)
        model = model_folder(tmp / "model", args.quick)
        b = args.batch_size
        runs = {"one": (2 * b, None), "ddp": (b, "ddp"), "fsdp2": (b, "fsdp2")}
        for name, (batch, parallel) in runs.items():
            done = finetune(tmp / name, model, args, batch, parallel)
            if done.returncode != 0:
                results.append({"run": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
                status = 1
                continue
            ref, losses = train_losses(tmp / "one"), train_losses(tmp / name)
            worst = max(abs(ref[s] - losses[s]) for s in ref)
            report = json.loads((tmp / name / "memory_report.json").read_text())
            est = estimate_step(StepConfig(model=str(model), batch_size=batch, block_size=args.block_size,
                                           autocast=None if args.dtype == "fp32" else args.dtype, loss_impl="chunked",
                                           device_kind=args.device, parallel=parallel or "none",
                                           world_size=2 if parallel else 1))
            predicted = est.allocated_peak_bytes if cuda else est.tensor_peak_bytes
            ranks = report.get("ranks") or [{"rank": 0, "peak_bytes": report["peak"]["bytes"]}]
            rows = [{"rank": r["rank"], "measured_bytes": r["peak_bytes"], "estimate_bytes": predicted,
                     "error": predicted / r["peak_bytes"] - 1} for r in ranks]
            result = {"run": name, "dtype": args.dtype, "device": args.device, "batch_per_rank": batch,
                      "block_size": args.block_size, "max_loss_difference": worst, "ranks": rows}
            if worst > tolerance or cuda and any(abs(r["error"]) > args.tolerance for r in rows):
                status = max(status, 3)
            results.append(result)
            print(json.dumps(result), flush=True)
    atomic_write_json(out_path, {"results": results, "loss_tolerance": tolerance, "tolerance": args.tolerance})
    return status


if __name__ == "__main__":
    sys.exit(main())
