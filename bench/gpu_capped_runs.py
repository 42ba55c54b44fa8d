"""Capped fine-tuning steps on CUDA with random-weight GPT-2 configs: measured peak against the estimate.

For each case it builds the model from its preset config (no hub), runs one warm-up step (creating the
optimizer state), resets the allocator's peak, runs `--steps` steps, and records
`torch.cuda.max_memory_allocated` next to the estimate's `allocated_peak_bytes` (traced on `meta` with the
same settings). "capped" cases first call `train.memory.apply_memory_cap` (the allocator gets the budget less
the CUDA context, via `torch.cuda.set_per_process_memory_fraction`), so a large card behaves like a 15 GiB
one; the "uncapped-bf16" cases are the throughput baseline.

Writes one JSON object per case to stdout and all of them to `--out` (default $OUT/gpu_capped_runs.json or
bench/gpu_capped_runs.json). Exits 1 on any error or OOM, and 3 when an estimate misses the measured peak by
more than `--tolerance` (default 5%).

    python bench/gpu_capped_runs.py            # all cases (about 5 minutes on an H100)
    python bench/gpu_capped_runs.py --quick    # GPT-2 small only
"""

import argparse
import gc
import json
import os
import sys
import time

import torch

from leanfit.train.checkpointing.atomic import atomic_write_json
from leanfit.train.dtypes import torch_dtype
from leanfit.train.lm_loss import causal_lm_loss
from leanfit.train.memory.budget import choose_config
from leanfit.train.memory.estimate import StepConfig, estimate_step
from leanfit.train.memory.profiler import apply_memory_cap
from leanfit.train.model.architectures import architecture_config
from leanfit.train.optim import make_optimizer
from leanfit.train.units import GiB, parse_bytes

AMP = {"loss_impl": "chunked", "autocast": "bf16"}
ACCURACY_CASES = [
    ("gpt2", 2, 1024, {}),
    ("gpt2", 4, 1024, AMP),
    ("gpt2", 8, 1024, AMP),
    ("gpt2", 8, 1024, {**AMP, "grad_checkpointing": True}),
    ("gpt2-medium", 1, 1024, AMP),
    ("gpt2-medium", 4, 1024, AMP),
    ("gpt2-medium", 4, 1024, {**AMP, "grad_checkpointing": True}),
]
BUDGET_CASES = [("gpt2", 24 * 1024), ("gpt2-large", 8 * 1024)]


def _free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_case(cfg, steps, accum=1, cap_bytes=None):
    """Measures `steps` optimizer steps of `cfg` (micro-batches of cfg.batch_size, `accum` per step)."""
    _free()
    torch.cuda.set_per_process_memory_fraction(1.0)
    fraction = apply_memory_cap(cap_bytes, "cuda") if cap_bytes else None
    from transformers import AutoModelForCausalLM

    config = architecture_config(cfg.model)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    model = model.to("cuda", dtype=torch_dtype(cfg.dtype)).train()
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = make_optimizer(model, cfg.optimizer, "cuda", in_backward=cfg.optimizer_in_backward)
    ids = torch.randint(0, config.vocab_size, (cfg.batch_size, cfg.block_size), device="cuda")
    amp = torch_dtype(cfg.autocast) if cfg.autocast else None

    def step():
        for _ in range(accum):
            with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                loss = causal_lm_loss(model, ids, impl=cfg.loss_impl)
            (loss / accum).backward()
            del loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    free, card = torch.cuda.mem_get_info()
    out = {"measured_allocated_peak": torch.cuda.max_memory_allocated(),
           "measured_reserved_peak": torch.cuda.max_memory_reserved(), "driver_used": card - free,
           "reserved_now": torch.cuda.memory_reserved(),
           "tokens_per_s": accum * cfg.batch_size * cfg.block_size / seconds, "memory_fraction": fraction}
    out["context_estimate"] = out["driver_used"] - out["reserved_now"]
    model = opt = ids = None
    torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def record(name, cfg, est, measured, results, tolerance, accum=1, cap=None):
    err = measured["measured_allocated_peak"] / est.allocated_peak_bytes - 1
    row = {"case": name, "config": {k: v for k, v in vars(cfg).items()}, "grad_accum_steps": accum,
           "cap_bytes": cap, "estimate_allocated_peak": est.allocated_peak_bytes,
           "estimate_peak_with_context": est.peak_bytes, "error": err, "within_tolerance": abs(err) <= tolerance,
           **measured}
    print(json.dumps(row), flush=True)
    results.append(row)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--budget", default="15GiB")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_capped_runs: expected a CUDA device, found none", file=sys.stderr)
        return 1
    budget = parse_bytes(args.budget)
    out = args.out or os.path.join(os.environ.get("OUT", os.path.dirname(os.path.abspath(__file__))),
                                   "gpu_capped_runs.json")
    results = []
    cases = [c for c in ACCURACY_CASES if not args.quick or c[0] == "gpt2"]
    for model, b, t, settings in cases:
        cfg = StepConfig(model=model, batch_size=b, block_size=t, **settings)
        record(f"accuracy {model} {b}x{t}", cfg, estimate_step(cfg), run_case(cfg, args.steps), results,
               args.tolerance)
    for model, tokens in BUDGET_CASES[: 1 if args.quick else None]:
        choice = choose_config(model, tokens, 1024, budget)
        cfg = choice.config
        record(f"capped {model} {tokens} tokens/step", cfg, choice.estimate,
               run_case(cfg, args.steps, choice.grad_accum_steps, cap_bytes=budget), results, args.tolerance,
               choice.grad_accum_steps, budget)
        base = StepConfig(model=model, batch_size=tokens // 1024, block_size=1024, loss_impl="naive",
                          autocast="bf16")
        record(f"uncapped-bf16 {model} {tokens} tokens/step", base, estimate_step(base),
               run_case(base, args.steps), results, args.tolerance)
        capped, uncapped = results[-2]["tokens_per_s"], results[-1]["tokens_per_s"]
        print(f"{model}: capped {capped:,.0f} tok/s vs uncapped bf16 {uncapped:,.0f} tok/s "
              f"= {capped / uncapped:.2f}x (target >= 0.7x); capped measured peak "
              f"{results[-2]['measured_allocated_peak'] / GiB:.2f} GiB", flush=True)
    atomic_write_json(out, results)
    bad = [r["case"] for r in results if not r["within_tolerance"]]
    print(f"wrote {out}; {len(results) - len(bad)}/{len(results)} estimates within {args.tolerance:.0%}")
    if bad:
        print("gpu_capped_runs: estimate off by more than the tolerance for: " + "; ".join(bad), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
