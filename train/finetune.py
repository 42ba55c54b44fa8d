# B batch (sequences per micro-batch), T block size (tokens per sequence), A grad-accum steps
"""`leanfit finetune`, the recipe: fine-tune a causal LM on a text corpus, then sample from it.

It only orchestrates; the pieces are libraries beside it:
- `setup(config)`: model, data, optimizer, schedule and, when resuming, the saved state (nothing written);
- `train_loop(ctx)`: `train_step` (train/step.py: loss, accumulation, optimizer step), validation every
  `eval_every` steps, Ctrl-C stops after the current step;
- `run(config)`: the memory plan first (train/planning.py: `--memory-budget`, `--dry-run`), then setup, the
  loop under a memory profiler (train/memory.py), and the run folder's files (train/outputs.py). A CUDA
  out-of-memory error saves the last step and the memory report and suggests what would fit.
`Hooks` (train/context.py) extend it; `main` is the command line (flags in train/cli_finetune.py).
"""

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from . import config as cfg
from .cli_common import fail
from .cli_finetune import parse_args, print_dry_run, print_summary
from .context import Hooks, RunContext, set_rng_state
from .data import DEFAULT_CORPUS, BlockLoader, make_blocks, read_corpus, split_blocks
from .dtypes import torch_dtype
from .generate import resolve_device
from .memory import MemoryProfiler, apply_memory_cap, rss_peak_bytes
from .models import load_model
from .optim import make_optimizer
from .outputs import summary, write_metrics, write_outputs, write_run_json
from .planning import check_gpu, check_positions, oom_advice, plan_memory
from .step import (
    LossFn,
    accumulate_gradients,
    make_loss_fn,
    make_scheduler,
    optimizer_step,
    target_count,
    validation_loss,
)
from .units import parse_bytes

__all__ = ["setup", "train_step", "train_loop", "run", "main", "OutOfMemory", "HIGH_LR"]

HIGH_LR = 1e-3


class OutOfMemory(RuntimeError):
    """The device ran out of memory during training; the checkpoint and memory report were saved."""


def _check_dtype(dtype: str, device: torch.device):
    if dtype == "bf16" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ValueError(f"--dtype bf16 needs a GPU of compute capability >= 8.0, this one is {major}.{minor} "
                             f"(expected --dtype fp16 or fp32)")


def _read_metrics(path: Path, up_to_step: int) -> list:
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


def _load_train_state(ctx: RunContext, resume: Path):
    state = torch.load(resume / "train_state.pt", map_location="cpu", weights_only=False)
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.scheduler.load_state_dict(state["scheduler"])
    if ctx.scaler is not None and state.get("scaler"):
        ctx.scaler.load_state_dict(state["scaler"])
    ctx.loader.load_state_dict(state["loader"])
    ctx.step = int(state["step"])
    ctx.metrics = _read_metrics(resume / "metrics.jsonl", ctx.step)
    set_rng_state(state["rng"])


def setup(config: cfg.TrainConfig, loss_fn: LossFn | None = None) -> RunContext:
    """Validates the config, loads model and corpus, builds the optimizer; restores state when resuming.

    Nothing is written here, so a bad input leaves no output behind.
    """
    config = cfg.validate(config)
    device = resolve_device(config.device)
    _check_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    corpus_path = Path(config.corpus) if config.corpus else DEFAULT_CORPUS
    text = read_corpus(corpus_path, config.encoding)
    resume = Path(config.resume) if config.resume else None
    if resume is not None and not (resume / "train_state.pt").is_file():
        raise ValueError(f"--resume expects a run folder with train_state.pt and checkpoint/, got {resume}")
    if config.memory_budget and device.type == "cuda":
        apply_memory_cap(parse_bytes(config.memory_budget), device)
    if config.memory_snapshot and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    model, tokenizer = load_model(str(resume / "checkpoint") if resume else config.model, device=device)
    check_positions(config, model.config)
    blocks = make_blocks(text, tokenizer, config.block_size)
    train_blocks, val_blocks = split_blocks(blocks, config.val_fraction)
    if config.eval_blocks:
        val_blocks = val_blocks[: config.eval_blocks]
    loader = BlockLoader(train_blocks, config.batch_size, seed=config.seed)
    if config.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    optimizer = make_optimizer(model, config.optimizer, device.type, lr=config.lr, weight_decay=config.weight_decay,
                               betas=(config.beta1, config.beta2), in_backward=config.optimizer_in_backward)
    ctx = RunContext(
        config=config, out=Path(config.out), device=device, model=model, tokenizer=tokenizer,
        loss_fn=loss_fn or make_loss_fn(config.loss), train_blocks=train_blocks, val_blocks=val_blocks,
        loader=loader, optimizer=optimizer, scheduler=make_scheduler(optimizer, config),
        scaler=torch.amp.GradScaler(device.type) if config.dtype == "fp16" else None,
        autocast=torch.autocast(device.type, dtype=torch_dtype(config.dtype), enabled=config.dtype != "fp32"),
        corpus_info={"path": str(corpus_path), "characters": len(text), "blocks": blocks.shape[0],
                     "train_blocks": train_blocks.shape[0], "val_blocks": val_blocks.shape[0],
                     "tokens": blocks.numel()},
    )
    if resume is not None:
        _load_train_state(ctx, resume)
    return ctx


def _eval_record(ctx: RunContext) -> dict:
    loss = validation_loss(ctx.model, ctx.val_blocks, ctx.config.batch_size, ctx.loss_fn, ctx.autocast, ctx.device)
    return {"kind": "eval", "step": ctx.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def _peak_memory_mb(device: torch.device) -> float:
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_peak_bytes()) / 2**20


def train_step(ctx: RunContext) -> dict:
    """One optimizer step over `grad_accum` micro-batches; returns its metrics record."""
    c = ctx.config
    t0 = time.perf_counter()
    micro = [ctx.loader.next_batch().to(ctx.device, non_blocking=True) for _ in range(c.grad_accum)]
    lr = ctx.optimizer.param_groups[0]["lr"]
    phase = ctx.profiler.phase if ctx.profiler is not None else (lambda name: contextlib.nullcontext())
    loss = accumulate_gradients(ctx.model, micro, ctx.loss_fn, ctx.autocast, ctx.scaler, phase)
    norm = None
    if not c.optimizer_in_backward:  # else each parameter was stepped in the backward
        with phase("optimizer_step"):
            norm = float(optimizer_step(ctx.optimizer, ctx.params, c.clip, ctx.scaler))
    ctx.scheduler.step()
    loss = float(loss)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    dt = time.perf_counter() - t0
    ctx.step += 1
    tokens = target_count(micro)
    return {"kind": "train", "step": ctx.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": tokens,
            "tokens_per_s": tokens / dt, "step_s": dt, "peak_mem_mb": _peak_memory_mb(ctx.device),
            "epoch": ctx.loader.epoch}


@contextlib.contextmanager
def _sigint_stops(ctx: RunContext):
    """The first Ctrl-C asks the loop to stop after the current step; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if ctx.stop_requested:
            raise KeyboardInterrupt
        ctx.stop_requested = True
        print("\ninterrupt: saving a checkpoint and the reports after this step (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def train_loop(ctx: RunContext, hooks: Hooks):
    from tqdm.auto import tqdm

    c = ctx.config
    if not ctx.evals():
        record = _eval_record(ctx)
        ctx.metrics.append(record)
        tqdm.write(f"step {ctx.step}: val loss {record['val_loss']:.4f}, val ppl {record['val_ppl']:.2f}")
    bar = tqdm(total=c.iters, initial=ctx.step, desc="finetune", unit="step", dynamic_ncols=True, disable=None)
    with _sigint_stops(ctx), bar:
        while ctx.step < c.iters and not ctx.stop_requested:
            profiled = ctx.profiler.step(ctx.step + 1) if ctx.profiler is not None else contextlib.nullcontext()
            with profiled, hooks.wrap_step(ctx) if hooks.wrap_step else contextlib.nullcontext():
                record = train_step(ctx)
            ctx.metrics.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            peak_mb=f"{record['peak_mem_mb']:.0f}")
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {ctx.step}; try a lower --lr")
            if ctx.step % c.eval_every == 0 or ctx.step == c.iters:
                ev = _eval_record(ctx)
                ctx.metrics.append(ev)
                bar.write(f"step {ctx.step}: val loss {ev['val_loss']:.4f}, val ppl {ev['val_ppl']:.2f}")
            for fn in hooks.on_step:
                fn(ctx, record)
            write_metrics(ctx)


def _handle_oom(ctx: RunContext, message: str, hooks: Hooks):
    """Frees what it can, saves the last completed step and the memory report, suggests what would fit."""
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.model.zero_grad(set_to_none=True)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    paths = {}
    if ctx.profiler is not None:
        paths = ctx.profiler.on_oom(message, str(ctx.out))
        ctx.profiler.close()
        ctx.profiler.stop_snapshot()
        print(ctx.profiler.table())
    write_outputs(ctx, "out of memory", hooks.writers)
    advice = oom_advice(ctx.config, ctx.device)
    if advice:
        print(advice)
    first = message.splitlines()[0] if message else "out of memory"
    raise OutOfMemory(
        f"out of memory in step {ctx.step + 1}: {first}; saved step {ctx.step} in {ctx.out}/checkpoint, the memory "
        f"report {paths.get('report')}" + (f" and the snapshot {paths['snapshot']}" if "snapshot" in paths else "")
    )


def run(config: cfg.TrainConfig, loss_fn: LossFn | None = None, hooks: Hooks | None = None,
        dry_run: bool = False) -> dict:
    """Fine-tunes `config.model` on `config.corpus` and writes every output to `config.out`.

    Args:
        config: the run's settings (`config.TrainConfig`).
        loss_fn: the step's loss (default `step.make_loss_fn(config.loss)`).
        hooks: extension points (`context.Hooks`).
        dry_run: print the memory plan (`planning.plan_memory`) and return before loading weights or writing.
    Returns:
        the summary written to run.json: status, out, steps, val_ppl_start, val_ppl_end, ...;
        for a dry run {"status": "dry-run", "config", "plan"}.
    Raises:
        ValueError on bad input (nothing written), OutOfMemory after saving the last step on a CUDA OOM.
    Example:
        >>> run(TrainConfig(iters=40, out="runs/demo"))["val_ppl_end"]
    """
    hooks = hooks or Hooks()
    config = cfg.validate(config)
    if config.gpu and not dry_run:
        check_gpu(config, resolve_device(config.device))
    if dry_run or config.memory_budget or config.gpu:
        config, plan = plan_memory(config)
        print(plan, flush=True)
        if dry_run:
            return {"status": "dry-run", "config": cfg.to_dict(config), "plan": plan}
    ctx = setup(config, loss_fn)
    if config.lr >= HIGH_LR:
        warnings.warn(f"lr {config.lr:g} is high for fine-tuning a pretrained model (>= {HIGH_LR:g}); "
                      f"1e-5 to 2e-4 is the usual range", stacklevel=2)
    for fn in hooks.on_setup:
        fn(ctx)
    if ctx.stop:
        ctx.status = "stopped"
        return summary(ctx)
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_run_json(ctx)
    ctx.profiler = MemoryProfiler(ctx.model, ctx.optimizer, device=ctx.device, out_dir=str(ctx.out),
                                  snapshot=config.memory_snapshot)
    oom = None
    try:
        train_loop(ctx, hooks)
    except KeyboardInterrupt:
        ctx.stop_requested = True
    except torch.OutOfMemoryError as e:
        oom = str(e)
    finally:
        ctx.profiler.close()
    if oom is not None:
        _handle_oom(ctx, oom, hooks)
    print(ctx.profiler.table(), flush=True)
    write_outputs(ctx, "interrupted" if ctx.stop_requested else "complete", hooks.writers)
    return summary(ctx)


def main(argv=None) -> int:
    prog = "leanfit finetune"
    try:
        config, dry_run = parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
            s = run(config, dry_run=dry_run)
    except ValueError as e:
        return fail(prog, e)
    except (FloatingPointError, OutOfMemory) as e:
        fail(prog, e)
        return 1
    if s["status"] == "dry-run":
        print_dry_run(s)
        return 0
    print_summary(s)
    return 130 if s["status"] == "interrupted" else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
