# B batch (sequences per micro-batch), T block size (tokens per sequence), A grad-accum steps
"""`leanfit finetune`, the recipe: fine-tune a causal LM on a text corpus, then sample from it.

It only orchestrates; the pieces are libraries beside it:
- `run(config)`: every check that needs no weights first (recipe/preflight.py), then the memory plan
  (memory/planning.py: `--memory-budget`, `--dry-run`), setup, the loop under a memory profiler
  (memory/profiler.py), and the run folder's files (recipe/outputs.py). A CUDA out-of-memory error saves the
  last step and the memory report and suggests what would fit;
- `setup(config, checked)`: model, data, optimizer, schedule and, when resuming, the newest complete
  checkpoint unit's state (nothing written);
- `train_loop(ctx)`: `train_step` (step.py: loss, accumulation, optimizer step), validation every
  `eval_every` steps, a checkpoint unit every `save_every` (checkpointing/checkpoint.py). Ctrl-C or SIGTERM
  stops after the current step; no signal interrupts a save.
`Hooks` (recipe/context.py) extend it; the command line is commands/finetune.py.
"""

import contextlib
import math
import random
import sys
import time
import uuid
import warnings
from pathlib import Path

import torch

from .. import config as cfg
from ..checkpointing.checkpoint import load_unit
from ..checkpointing.lock import lock_run
from ..data import BlockLoader, make_blocks, split_blocks, text_sha256
from ..devices import indexed_device
from ..dtypes import torch_dtype
from ..memory.planning import oom_advice, plan_memory
from ..memory.profiler import MemoryProfiler, apply_memory_cap, rss_peak_bytes
from ..model.lora import load_for_training
from ..optim import make_optimizer
from ..step import (
    LossFn,
    accumulate_gradients,
    make_loss_fn,
    make_scheduler,
    no_interrupt,
    optimizer_step,
    stop_signals,
    target_count,
    validation_loss,
)
from .context import Hooks, RunContext, restore_train_state
from .distributed import start_parallel
from .outputs import summary, write_metrics, write_outputs, write_run_json, write_unit
from .preflight import Checked, claim_out, preflight
from .settings import ResumePoint, resume_changes

__all__ = ["setup", "train_step", "train_loop", "run", "OutOfMemory", "HIGH_LR"]

HIGH_LR = 1e-3


class OutOfMemory(RuntimeError):
    """The device ran out of memory during training; the checkpoint and memory report were saved."""


def _resume(ctx: RunContext, point: ResumePoint):
    for reason in point.warnings:
        print(f"warning: {reason}", file=sys.stderr, flush=True)
    for reason in point.skipped:
        print(f"warning: passing over a damaged checkpoint: {reason}", file=sys.stderr, flush=True)
    restore_train_state(ctx, load_unit(point.unit, point.run_id), point.unit)
    changed = resume_changes(point.config, ctx.config, corpus_sha256=point.corpus_sha256)
    ctx.resumes = list(point.run.get("resumes", [])) + [{"step": ctx.step, "changed": changed}]
    print(f"resuming {point.folder} from {point.unit.name}" + (f", changed: {changed}" if changed else ""),
          flush=True)


def setup(config: cfg.TrainConfig, checked: Checked, loss_fn: LossFn | None = None) -> RunContext:
    """Loads model and corpus blocks, builds the optimizer; restores the newest unit's state when resuming.

    `checked` is what `preflight.preflight(config)` found. Nothing is written here.
    """
    device, par = indexed_device(checked.device), checked.parallel
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if config.memory_budget and device.type == "cuda":
        apply_memory_cap(config.memory_budget, device)
    if config.memory_snapshot and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    model, tokenizer = load_for_training(config, checked.model_ref, device)
    blocks = checked.blocks if checked.blocks is not None else make_blocks(checked.text, tokenizer, config.block_size)
    train_blocks, val_blocks = split_blocks(blocks, config.val_fraction)
    if config.eval_blocks:
        val_blocks = val_blocks[: config.eval_blocks]
    loader = BlockLoader(train_blocks, config.batch_size, seed=config.seed, rank=par.rank, world_size=par.world_size)
    if config.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    model, loss_fn = par.wrap(model, loss_fn or make_loss_fn(config.loss), config)
    optimizer = make_optimizer(model, config.optimizer, device.type, lr=config.lr, weight_decay=config.weight_decay,
                               betas=(config.beta1, config.beta2), in_backward=config.optimizer_in_backward)
    ctx = RunContext(
        config=config, out=Path(config.out), device=device, model=model, tokenizer=tokenizer,
        loss_fn=loss_fn, train_blocks=train_blocks, val_blocks=val_blocks,
        loader=loader, optimizer=optimizer, scheduler=make_scheduler(optimizer, config),
        scaler=par.grad_scaler(device) if config.dtype == "fp16" else None,
        autocast=torch.autocast(device.type, dtype=torch_dtype(config.dtype), enabled=config.dtype != "fp32"),
        corpus_info={"path": str(checked.corpus_path), "characters": len(checked.text), "blocks": blocks.shape[0],
                     "train_blocks": train_blocks.shape[0], "val_blocks": val_blocks.shape[0],
                     "tokens": blocks.numel(), "sha256": text_sha256(checked.text)},
        run_id=par.broadcast(uuid.uuid4().hex), parallel=par,
    )
    if checked.resume is not None:
        ctx.run_id = checked.resume.run_id
        _resume(ctx, checked.resume)
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
    lr, par, tokens = ctx.optimizer.param_groups[0]["lr"], ctx.parallel, ctx.parallel.global_count(target_count(micro))
    phase = ctx.profiler.phase if ctx.profiler is not None else (lambda name: contextlib.nullcontext())
    loss = accumulate_gradients(ctx.model, micro, ctx.loss_fn, ctx.autocast, ctx.scaler, phase,
                                par.loss_divisor(tokens), par.no_sync(ctx.model))
    norm = None
    if not c.optimizer_in_backward:  # else each parameter was stepped in the backward
        with phase("optimizer_step"):
            norm = float(optimizer_step(ctx.optimizer, ctx.params, c.clip, ctx.scaler))
    ctx.scheduler.step()
    loss = par.mean(loss)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    dt = time.perf_counter() - t0
    ctx.step += 1
    return {"kind": "train", "step": ctx.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": tokens,
            "tokens_per_s": tokens / dt, "step_s": dt, "peak_mem_mb": _peak_memory_mb(ctx.device),
            "epoch": ctx.loader.epoch}


def _save_due(ctx: RunContext) -> bool:
    kind, every = cfg.save_interval(ctx.config.save_every)
    if kind == "steps":
        return ctx.step % every == 0
    return time.time() - ctx.last_save >= 60 * every


def train_loop(ctx: RunContext, hooks: Hooks):
    from tqdm.auto import tqdm

    c = ctx.config
    if not ctx.evals():
        record = _eval_record(ctx)
        ctx.metrics.append(record)
        tqdm.write(f"step {ctx.step}: val loss {record['val_loss']:.4f}, val ppl {record['val_ppl']:.2f}")
    bar = tqdm(total=c.iters, initial=ctx.step, desc="finetune", unit="step", dynamic_ncols=True,
               disable=None if ctx.parallel.is_main else True)
    with bar:
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
            ctx.parallel.call(write_metrics, ctx)
            ctx.stop_requested, due = ctx.parallel.agree(ctx.stop_requested, _save_due(ctx))
            if ctx.step < c.iters and not ctx.stop_requested and due:
                with no_interrupt(ctx):
                    ctx.parallel.call(write_unit, ctx)


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
    with no_interrupt(ctx):
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
        dry_run: bool = False, overwrite: bool = False, resume: ResumePoint | None = None) -> dict:
    """Fine-tunes `config.model` on `config.corpus` and writes every output to `config.out`.

    Args:
        config: the run's settings (`config.TrainConfig`); `config.resume` continues a run folder.
        loss_fn: the step's loss (default `step.make_loss_fn(config.loss)`).
        hooks: extension points (`context.Hooks`).
        dry_run: print the memory plan (`planning.plan_memory`) and return before loading weights or writing.
        overwrite: a fresh run may replace the outputs of whatever run `config.out` holds (else it refuses a
            folder that is not empty).
        resume: the `settings.ResumePoint` of `config.resume` when the caller has read it (else it is read here).
    Returns:
        the summary written to run.json: status, out, steps, val_ppl_start, val_ppl_end, ...;
        for a dry run {"status": "dry-run", "config", "plan"}.
    Raises:
        ValueError on bad input (nothing written), OutOfMemory after saving the last step on a CUDA OOM,
        SaveError when a checkpoint cannot be written (the previous one is intact).
    Example:
        >>> run(TrainConfig(iters=40, out="runs/demo"))["val_ppl_end"]
    """
    hooks = hooks or Hooks()
    config = cfg.validate(config)
    if config.corpus and not config.resume:
        config = cfg.from_dict({"corpus": str(Path(config.corpus).expanduser().resolve())}, config)
    checked = preflight(config, overwrite=overwrite, dry_run=dry_run, resume=resume)
    par = start_parallel(config, checked)
    if dry_run or config.memory_budget or config.gpu:
        config, plan = par.broadcast(plan_memory(config, checked.model_ref, par.world_size) if par.is_main else None)
        print(plan, flush=True)
        if dry_run:
            return {"status": "dry-run", "config": cfg.to_dict(config), "plan": plan}
    lock = _lock_out(Path(config.out), par)
    try:
        return _run_locked(config, checked, par, loss_fn, hooks, overwrite)
    finally:
        if lock is not None:
            lock.release()


def _lock_out(out: Path, par):
    """Rank 0 takes the run folder's lock; every rank raises the same ValueError when another run holds it."""
    lock, busy = None, None
    if par.is_main:
        try:
            lock = lock_run(out)
        except ValueError as e:
            busy = str(e)
    busy = par.broadcast(busy)
    if busy:
        raise ValueError(busy)
    return lock


def _run_locked(config: cfg.TrainConfig, checked: Checked, par, loss_fn, hooks: Hooks, overwrite: bool) -> dict:
    ctx = setup(config, checked, loss_fn)
    if config.lr >= HIGH_LR:
        warnings.warn(f"lr {config.lr:g} is high for fine-tuning a pretrained model (>= {HIGH_LR:g}); "
                      f"1e-5 to 2e-4 is the usual range", stacklevel=2)
    removed = claim_out(ctx.out, overwrite, fresh=not config.resume) if par.is_main else []
    if removed:
        print(f"removed from {ctx.out}: {', '.join(removed)}", flush=True)
    for fn in hooks.on_setup:
        par.call(fn, ctx, main_only=False)
    if ctx.stop:
        ctx.status = "stopped"
        return summary(ctx)
    ctx.out.mkdir(parents=True, exist_ok=True)
    par.call(write_run_json, ctx)
    ctx.profiler = MemoryProfiler(ctx.model, ctx.optimizer, device=ctx.device, out_dir=str(ctx.out),
                                  snapshot=config.memory_snapshot)
    oom = None
    try:
        with stop_signals(ctx):
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
    with stop_signals(ctx), no_interrupt(ctx):
        write_outputs(ctx, "interrupted" if ctx.stop_requested else "complete", hooks.writers)
    return summary(ctx)
