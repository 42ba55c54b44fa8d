# B batch (sequences per micro-batch), T block size (input tokens per sequence), A grad-accum steps
"""`leanfit finetune`: fine-tune a causal LM on a text corpus, then sample from it.

One optimizer step sees A micro-batches of B blocks; each block gives T inputs and T targets. Each
micro-batch's loss is its summed token loss divided by the step's global count of target tokens
(A * B * T here), so the accumulated gradient is the gradient of the step's mean loss whatever A is.

`run(config)` does the job in phases a caller can extend through `Hooks`:
- setup: model, data, optimizer, schedule, and the resumed state (`on_setup` hooks run after it;
  a dry run can stop there);
- the loop: `train_step` (the loss is a pluggable `LossFn`, `wrap_step` can wrap each step, e.g. in a
  memory profiler), validation every `eval_every` steps;
- the outputs: `OUTPUT_WRITERS`, a list of `writer(ctx)` calls, each writing one file atomically.

Around them (issue 6 and 7): `plan_memory` applies `--memory-budget` from the estimate before any weight is
loaded (and `--dry-run` stops there); a `train.memory.MemoryProfiler` records every step by phase and writes
memory_report.json and memory.png; a CUDA out-of-memory error saves a checkpoint and the report and suggests a
configuration that fits; the model is evaluated before (eval_before.json) and after (eval_after.json) training
and report.md / report.html gather everything.
"""

import contextlib
import json
import math
import os
import random
import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import config as cfg
from .checkpoint import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text
from .cli_common import OneLineParser, fail, non_negative_float, non_negative_int, positive_float, positive_int
from .data import DEFAULT_CORPUS, BlockLoader, make_blocks, read_corpus, split_blocks
from .generate import DEFAULT_PROMPTS, format_samples, generate_texts, read_prompts, resolve_device

__all__ = [
    "LossFn", "Hooks", "RunContext", "make_loss_fn", "accumulate_gradients", "optimizer_step", "evaluate",
    "lr_factor", "check_positions", "plan_memory", "OutOfMemory", "OUTPUT_WRITERS", "INTERRUPT_WRITERS", "run",
    "main",
]

LossFn = Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]  # (model, blocks (B, T+1), num_items)
HIGH_LR = 1e-3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_loss_fn(impl: str = "chunked") -> LossFn:
    """The summed next-token loss of blocks (B, T+1), divided by `num_items`.

    `impl` is a `train.lm_loss.causal_lm_loss` impl (naive, chunked, triton, auto), or "hf" for the
    model's own loss, `model(blocks, labels=blocks, num_items_in_batch=num_items).loss`.
    """
    if impl == "hf":
        return lambda model, blocks, num_items: model(
            input_ids=blocks, labels=blocks, num_items_in_batch=num_items, use_cache=False
        ).loss
    from .lm_loss import causal_lm_loss

    return lambda model, blocks, num_items: causal_lm_loss(
        model, blocks, impl=impl, reduction="sum", num_items=num_items
    )


def target_count(micro_batches) -> int:
    return sum(int((b[:, 1:] != -100).sum()) for b in micro_batches)


def _no_phase(name):
    return contextlib.nullcontext()


def accumulate_gradients(model, micro_batches, loss_fn: LossFn, autocast=None, scaler=None,
                         phase=_no_phase) -> torch.Tensor:
    """Backpropagates each micro-batch (B, T+1) with the loss normalized by the global target count.

    `phase(name)` is a context manager around each "forward" and "backward" (e.g. `MemoryProfiler.phase`).

    Returns:
        the step's mean token loss (0-dim, detached).
    """
    num_items = target_count(micro_batches)
    total = torch.zeros((), device=micro_batches[0].device)
    for blocks in micro_batches:
        with phase("forward"), autocast or contextlib.nullcontext():
            loss = loss_fn(model, blocks, num_items)
        with phase("backward"):
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float()
        del loss
    return total


def optimizer_step(optimizer, params, clip: float, scaler=None) -> torch.Tensor:
    """Unscales (fp16), clips the global gradient norm (clip > 0), steps and zeroes the gradients.

    Returns:
        the gradient norm before clipping.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def evaluate(model, blocks, batch_size: int, loss_fn: LossFn, autocast=None, device="cpu") -> float:
    """Mean token loss over validation blocks (N, T+1)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i: i + batch_size].to(device)
        with autocast or contextlib.nullcontext():
            total += float(loss_fn(model, batch, 1))
        count += target_count([batch])
    model.train(was_training)
    return total / count


def lr_factor(step: int, config) -> float:
    """Multiplier of `config.lr` for optimizer step `step` (0-based): linear warmup, then cosine or constant."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup) / max(1, config.iters - config.warmup))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class PerParamLR:
    """`LambdaLR(optimizer, lambda s: lr_factor(s, config))` for an `OptimizerInBackward` (not a torch optimizer)."""

    def __init__(self, optimizer, config):
        self.optimizer, self.config, self.last_epoch = optimizer, config, 0
        self._apply()

    def _apply(self):
        self.optimizer.set_lr(self.config.lr * lr_factor(self.last_epoch, self.config))

    def step(self):
        self.last_epoch += 1
        self._apply()

    def state_dict(self):
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state):
        self.last_epoch = int(state["last_epoch"])
        self._apply()


def _eval_before(ctx):
    from .evaluate import finetune_eval_before

    finetune_eval_before(ctx, heldout_per_article=ctx.config.eval_contexts, study=ctx.config.eval_study)


@dataclass
class Hooks:
    """Extension points of `run`. Each callable gets the `RunContext`."""

    on_setup: list = field(default_factory=lambda: [_eval_before])  # after setup; ctx.stop = True ends there
    wrap_step: Callable | None = None  # wrap_step(ctx) -> context manager around one optimizer step
    on_step: list = field(default_factory=list)  # after each step: fn(ctx, record)
    writers: list | None = None  # default OUTPUT_WRITERS
    interrupt_writers: list | None = None  # default INTERRUPT_WRITERS


@dataclass
class RunContext:
    config: cfg.TrainConfig
    out: Path
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    loss_fn: LossFn
    train_blocks: torch.Tensor
    val_blocks: torch.Tensor
    loader: BlockLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: object
    autocast: object
    corpus_info: dict
    step: int = 0
    metrics: list = field(default_factory=list)
    samples: list | None = None
    status: str = "running"
    stop: bool = False
    stop_requested: bool = False
    started: float = field(default_factory=time.time)
    profiler: object = None  # train.memory.MemoryProfiler while training

    @property
    def params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def evals(self):
        return [m for m in self.metrics if m.get("kind") == "eval"]


def _check_dtype(dtype: str, device: torch.device):
    if dtype == "bf16" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ValueError(
                f"--dtype bf16 needs a GPU of compute capability >= 8.0, this one is {major}.{minor} "
                f"(expected --dtype fp16 or fp32)"
            )


def _make_optimizer(model, config, device):
    if config.optimizer_in_backward:
        from .optim_backward import OptimizerInBackward

        def make(params):
            decay = config.weight_decay if params[0].dim() >= 2 else 0.0
            cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
            kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
            return cls(params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=decay, **kind)

        return OptimizerInBackward(model, make)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, betas=(config.beta1, config.beta2), **kind)


def _rng_state(device):
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _read_metrics(path: Path, up_to_step: int) -> list:
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


def setup(config: cfg.TrainConfig, loss_fn: LossFn | None = None) -> RunContext:
    """Validates the config, loads model and corpus, builds the optimizer; restores state when resuming.

    Nothing is written here, so a bad input leaves no output behind.
    """
    from .models import load_model

    cfg.validate(config)
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
        from .estimate import parse_bytes
        from .memory import apply_memory_cap

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
    optimizer = _make_optimizer(model, config, device)
    if config.optimizer_in_backward:
        scheduler = PerParamLR(optimizer, config)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    scaler = torch.amp.GradScaler(device.type) if config.dtype == "fp16" else None
    autocast = torch.autocast(device.type, dtype=DTYPES[config.dtype], enabled=config.dtype != "fp32")
    ctx = RunContext(
        config=config, out=Path(config.out), device=device, model=model, tokenizer=tokenizer,
        loss_fn=loss_fn or make_loss_fn(config.loss), train_blocks=train_blocks, val_blocks=val_blocks,
        loader=loader, optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast=autocast,
        corpus_info={"path": str(corpus_path), "characters": len(text), "blocks": blocks.shape[0],
                     "train_blocks": train_blocks.shape[0], "val_blocks": val_blocks.shape[0],
                     "tokens": blocks.numel()},
    )
    if resume is not None:
        _load_train_state(ctx, resume)
    return ctx


def _load_train_state(ctx: RunContext, resume: Path):
    state = torch.load(resume / "train_state.pt", map_location="cpu", weights_only=False)
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.scheduler.load_state_dict(state["scheduler"])
    if ctx.scaler is not None and state.get("scaler"):
        ctx.scaler.load_state_dict(state["scaler"])
    ctx.loader.load_state_dict(state["loader"])
    ctx.step = int(state["step"])
    ctx.metrics = _read_metrics(resume / "metrics.jsonl", ctx.step)
    _set_rng_state(state["rng"])


def _eval_record(ctx: RunContext) -> dict:
    loss = evaluate(ctx.model, ctx.val_blocks, ctx.config.batch_size, ctx.loss_fn, ctx.autocast, ctx.device)
    return {"kind": "eval", "step": ctx.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def train_step(ctx: RunContext) -> dict:
    """One optimizer step over `grad_accum` micro-batches; returns its metrics record."""
    c = ctx.config
    t0 = time.perf_counter()
    micro = [ctx.loader.next_batch().to(ctx.device, non_blocking=True) for _ in range(c.grad_accum)]
    lr = ctx.optimizer.param_groups[0]["lr"]
    phase = ctx.profiler.phase if ctx.profiler is not None else _no_phase
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
            "tokens_per_s": tokens / dt, "step_s": dt, "peak_mem_mb": peak_memory_mb(ctx.device),
            "epoch": ctx.loader.epoch}


@contextlib.contextmanager
def _sigint_stops(ctx: RunContext):
    """The first Ctrl-C asks the loop to stop after the current step; a second one aborts."""
    import threading

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


def write_metrics(ctx: RunContext):
    atomic_write_text(ctx.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in ctx.metrics))


def write_loss_plot(ctx: RunContext):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in ctx.metrics if m["kind"] == "train"]
    evals = ctx.evals()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss", lw=1)
    ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean token cross-entropy (nats)")
    ax.set_title(f"{ctx.config.model} on {Path(ctx.corpus_info['path']).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(ctx.out / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_checkpoint(ctx: RunContext):
    from .models import save_checkpoint

    save_checkpoint(ctx.model, ctx.tokenizer, ctx.out / "checkpoint")


def write_train_state(ctx: RunContext):
    state = {
        "step": ctx.step,
        "optimizer": ctx.optimizer.state_dict(),
        "scheduler": ctx.scheduler.state_dict(),
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        "loader": ctx.loader.state_dict(),
        "rng": _rng_state(ctx.device),
        "config": cfg.to_dict(ctx.config),
    }
    atomic_torch_save(state, ctx.out / "train_state.pt")


def write_samples(ctx: RunContext):
    c = ctx.config
    prompts = read_prompts(c.prompts or DEFAULT_PROMPTS)
    results = generate_texts(ctx.model, ctx.tokenizer, prompts, max_length=c.max_length,
                             num_return_sequences=c.num_return_sequences, seed=c.seed)
    ctx.samples = [{"prompt": p, "samples": r} for p, r in zip(prompts, results, strict=True)]
    atomic_write_text(ctx.out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n"
                                                         for s in ctx.samples))
    header = f"# Samples after {ctx.step} steps of {c.model}\n\nmax_length {c.max_length}, seed {c.seed}\n\n"
    atomic_write_text(ctx.out / "samples.md", header + format_samples(prompts, results))


def summary(ctx: RunContext) -> dict:
    evals = ctx.evals()
    return {
        "status": ctx.status,
        "out": str(ctx.out),
        "steps": ctx.step,
        "val_ppl_start": evals[0]["val_ppl"] if evals else None,
        "val_ppl_end": evals[-1]["val_ppl"] if evals else None,
        "val_loss_start": evals[0]["val_loss"] if evals else None,
        "val_loss_end": evals[-1]["val_loss"] if evals else None,
        "tokens_per_step": ctx.config.batch_size * ctx.config.block_size * ctx.config.grad_accum,
        "device": str(ctx.device),
        "corpus": ctx.corpus_info,
        "seconds": time.time() - ctx.started,
    }


def write_run_json(ctx: RunContext):
    atomic_write_json(ctx.out / "run.json", {"config": cfg.to_dict(ctx.config), "summary": summary(ctx)})


def write_memory_report(ctx: RunContext):
    """memory_report.json and memory.png (and, with --memory-snapshot on CUDA, memory_snapshot.pickle)."""
    if ctx.profiler is not None:
        ctx.profiler.save(str(ctx.out))
        ctx.profiler.stop_snapshot()


def write_eval_after(ctx: RunContext):
    """eval_after.json (and perplexity into eval_before.json), then report.md and report.html."""
    from .evaluate import finetune_eval_after

    finetune_eval_after(ctx, heldout_per_article=ctx.config.eval_contexts, study=ctx.config.eval_study)


def write_reports(ctx: RunContext):
    from .report import write_report

    write_report(ctx.out)


OUTPUT_WRITERS = [write_metrics, write_loss_plot, write_checkpoint, write_train_state, write_samples, write_run_json,
                  write_memory_report, write_eval_after]  # write_eval_after last: it writes the report
INTERRUPT_WRITERS = [write_metrics, write_loss_plot, write_checkpoint, write_train_state, write_run_json,
                     write_memory_report, write_reports]


class OutOfMemory(RuntimeError):
    """The device ran out of memory during training; the checkpoint and memory report were saved."""


def max_positions(model_config) -> int | None:
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(config: cfg.TrainConfig, model_config):
    """Raises ValueError when a block of block_size + 1 tokens (T inputs, T targets) exceeds the positions."""
    limit = max_positions(model_config)
    if limit is not None and config.block_size + 1 > limit:
        raise ValueError(
            f"--block-size {config.block_size} makes blocks of {config.block_size + 1} tokens (T inputs and the "
            f"next-token targets), more than the model's {limit} positions: expected --block-size {limit - 1} or less"
        )


def _device_kind(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def _step_config(config: cfg.TrainConfig, device_kind: str):
    from .estimate import StepConfig

    return StepConfig(
        model=config.model, batch_size=config.batch_size, block_size=config.block_size + 1,
        autocast={"bf16": "bfloat16", "fp16": "float16"}.get(config.dtype),
        loss_impl="naive" if config.loss in ("naive", "hf") else "chunked",
        grad_checkpointing=bool(config.grad_checkpointing), optimizer=config.optimizer,
        optimizer_in_backward=config.optimizer_in_backward, device_kind=device_kind,
    )


@contextlib.contextmanager
def _no_padding_warning_check():
    """transformers' padding warning reads a token id (`.item()`), which a `meta` trace cannot; it only warns."""
    from transformers import PreTrainedModel

    saved = PreTrainedModel.warn_if_padding_and_no_attention_mask
    PreTrainedModel.warn_if_padding_and_no_attention_mask = lambda self, input_ids, attention_mask: None
    try:
        yield
    finally:
        PreTrainedModel.warn_if_padding_and_no_attention_mask = saved


def plan_memory(config: cfg.TrainConfig) -> tuple[cfg.TrainConfig, str]:
    """The estimate's view of `config`, from the model's config alone (no weights, no GPU).

    With `config.memory_budget`, the settings are those `train.budget.choose_for_train_config` picks to fit
    (batch_size * grad_accum sequences per step kept); without, the config is kept and its estimate shown.
    The device kind follows `config.device` (cuda or cuda:N plans for CUDA even on a machine without one).

    Returns:
        (the config to run, the printable plan).
    Raises:
        ValueError: bad input, the block over the model's positions, or `NothingFits` (with the smallest
        configuration's breakdown printed first).
    """
    from .presets import load_config

    model_ref = str(Path(config.resume) / "checkpoint") if config.resume else config.model
    check_positions(config, load_config(model_ref))
    kind = _device_kind(config.device)
    if config.memory_budget is None:
        from .estimate import estimate_step

        step = replace(_step_config(config, kind), model=model_ref)
        with _no_padding_warning_check():
            return config, estimate_step(step).table()
    from .budget import NothingFits, choose_for_train_config, train_config_changes
    from .estimate import parse_bytes

    budget = parse_bytes(config.memory_budget)
    try:
        with _no_padding_warning_check():
            choice = choose_for_train_config(replace(config, model=model_ref), budget, kind)
    except NothingFits as e:
        print(e.estimate.table(budget))
        raise
    planned = cfg.validate(replace(config, **train_config_changes(choice)))
    return planned, f"memory budget {config.memory_budget} on {kind}:\n{choice.describe()}"


def _handle_oom(ctx: RunContext, message: str):
    """Frees what it can, saves the last completed step and the memory report, suggests what would fit."""
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.model.zero_grad(set_to_none=True)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    ctx.status = "out of memory"
    paths = {}
    if ctx.profiler is not None:
        paths = ctx.profiler.on_oom(message, str(ctx.out))
        ctx.profiler.close()
        ctx.profiler.stop_snapshot()
        print(ctx.profiler.table())
    for writer in (write_metrics, write_loss_plot, write_checkpoint, write_train_state, write_run_json):
        writer(ctx)
    budget = None
    if ctx.config.memory_budget:
        from .estimate import parse_bytes

        budget = parse_bytes(ctx.config.memory_budget)
    elif ctx.device.type == "cuda":
        budget = torch.cuda.get_device_properties(ctx.device).total_memory
    if budget is not None:
        from .budget import choose_for_train_config

        try:
            with _no_padding_warning_check():
                choice = choose_for_train_config(ctx.config, budget, ctx.device.type)
            print("a configuration the estimate says fits:\n" + choice.describe())
        except ValueError as e:
            print(f"the estimate finds nothing that fits: {e}")
    first = message.splitlines()[0] if message else "out of memory"
    raise OutOfMemory(
        f"out of memory in step {ctx.step + 1}: {first}; saved step {ctx.step} in {ctx.out}/checkpoint, the memory "
        f"report {paths.get('report')}" + (f" and the snapshot {paths['snapshot']}" if "snapshot" in paths else "")
    )


def run(config: cfg.TrainConfig, loss_fn: LossFn | None = None, hooks: Hooks | None = None,
        dry_run: bool = False) -> dict:
    """Fine-tunes `config.model` on `config.corpus` and writes every output to `config.out`.

    Args:
        config: the run's settings (`train.config.TrainConfig`).
        loss_fn: the step's loss (default `make_loss_fn(config.loss)`).
        hooks: extension points (`Hooks`).
        dry_run: print the memory plan (`plan_memory`) and return before loading weights or writing anything.
    Returns:
        the summary written to run.json: status, out, steps, val_ppl_start, val_ppl_end, ...;
        for a dry run {"status": "dry-run", "config", "plan"}.
    Raises:
        ValueError on bad input (nothing written), OutOfMemory after saving the last step on a CUDA OOM.
    Example:
        >>> run(TrainConfig(iters=40, out="runs/demo"))["val_ppl_end"]
    """
    hooks = hooks or Hooks()
    cfg.validate(config)
    if dry_run or config.memory_budget:
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
    from .memory import MemoryProfiler

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
        _handle_oom(ctx, oom)
    print(ctx.profiler.table(), flush=True)
    ctx.status = "interrupted" if ctx.stop_requested else "complete"
    if ctx.stop_requested:
        writers = hooks.interrupt_writers or INTERRUPT_WRITERS
    else:
        writers = hooks.writers or OUTPUT_WRITERS
    for writer in writers:
        writer(ctx)
    return summary(ctx)


def build_parser() -> OneLineParser:
    d = cfg.TrainConfig()
    p = OneLineParser(prog="leanfit finetune",
                      description="Fine-tune a causal LM on a text corpus, then sample from it.")
    add = p.add_argument

    def opt(flag, help_, **kw):
        name = flag.lstrip("-").replace("-", "_")
        default = getattr(d, name)
        shown = kw.pop("none", "none") if default is None else default
        add(flag, default=None, help=f"{help_} (default: {shown})", **kw)

    opt("--model", "hub id, checkpoint folder, or smollm2-135m (the embedded SmolLM2-135M-Instruct)")
    opt("--corpus", "a .txt file or a folder of them", none="the embedded Dracula")
    opt("--encoding", "the corpus encoding")
    add("--preset", choices=sorted(cfg.PRESETS),
        help="start from a preset of train/config.py; other flags override it (default: none)")
    opt("--block-size", "input tokens per sequence", type=positive_int)
    opt("--batch-size", "sequences per micro-batch", type=positive_int)
    opt("--grad-accum", "micro-batches per optimizer step", type=positive_int)
    opt("--iters", "optimizer steps in all", type=positive_int)
    opt("--lr", "peak learning rate", type=positive_float)
    opt("--warmup", "linear warmup steps", type=non_negative_int)
    opt("--schedule", "learning-rate schedule after warmup", choices=cfg.CHOICES["schedule"])
    opt("--min-lr-ratio", "cosine floor as a fraction of --lr", type=non_negative_float)
    opt("--weight-decay", "decoupled weight decay on matrices", type=non_negative_float)
    opt("--clip", "clip the global gradient norm to this, 0: off", type=non_negative_float)
    opt("--optimizer", "adamw or adam", choices=cfg.CHOICES["optimizer"])
    opt("--dtype", "autocast dtype; fp16 adds a gradient scaler, bf16 needs compute capability >= 8.0",
        choices=cfg.CHOICES["dtype"])
    opt("--loss", "loss: chunked/triton/auto (linear cross-entropy), naive (full logits), hf (the model's own)",
        choices=cfg.CHOICES["loss"])
    add("--grad-checkpointing", action="store_true", default=None,
        help="recompute activations in the backward (default: off)")
    opt("--eval-every", "validate every this many steps", type=positive_int)
    opt("--eval-blocks", "validate on the first this many held-out blocks, 0: all", type=non_negative_int)
    opt("--val-fraction", "fraction of blocks held out, last ones, for validation", type=non_negative_float)
    opt("--seed", "seed of the initial RNG, the data order and sampling", type=non_negative_int)
    opt("--device", "cpu, cuda, cuda:N or auto")
    opt("--out", "output folder")
    opt("--resume", "continue the run in this folder (its run.json gives the settings not passed here)")
    opt("--prompts", "after training, sample continuations of these prompts, one per line",
        none="the embedded prompts")
    opt("--max-length", "tokens per sample, prompt included", type=positive_int)
    opt("--num-return-sequences", "samples per prompt", type=positive_int)
    opt("--eval-contexts", "a/an probe before and after training: held-out contexts per article, 0: built-in only",
        type=non_negative_int)
    add("--no-eval-study", dest="eval_study", action="store_false", default=None,
        help="skip the prompt study (distinct-n, log-likelihood, theme share) before and after training")
    opt("--memory-budget", "fit this size (e.g. 15GiB): the estimate picks the micro-batch, accumulation "
        "(same tokens per step), chunked loss, checkpointing, autocast; on CUDA it also caps the allocator")
    add("--dry-run", action="store_true", default=None,
        help="print the memory plan (estimate, or the --memory-budget choice) and stop: no weights, no output")
    add("--memory-snapshot", action="store_true", default=None,
        help="CUDA: record the allocator history into memory_snapshot.pickle (pytorch.org/memory_viz)")
    add("--optimizer-in-backward", action="store_true", default=None,
        help="step each parameter in the backward and free its gradient; needs --grad-accum 1 and --clip 0")
    return p


def config_from_args(argv) -> cfg.TrainConfig:
    return _parse(argv)[0]


def _parse(argv) -> tuple[cfg.TrainConfig, bool]:
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    preset = args.pop("preset", None)
    dry_run = bool(args.pop("dry_run", False))
    base = cfg.TrainConfig()
    resume = args.get("resume")
    if resume:
        saved = Path(resume) / "run.json"
        if not saved.is_file():
            raise ValueError(f"--resume expects a run folder with run.json, got {resume}")
        base = cfg.from_dict({k: v for k, v in json.loads(saved.read_text())["config"].items() if k != "resume"})
        args.setdefault("out", resume)
    if preset:
        base = cfg.from_dict(cfg.PRESETS[preset], base)
    return cfg.from_dict(args, base), dry_run


def _print_summary(s: dict):
    out = Path(s["out"])
    print(f"\n{s['status']}: {s['steps']} steps on {s['device']}, {s['seconds']:.0f} s")
    if s["val_ppl_start"] is not None:
        print(f"validation perplexity: {s['val_ppl_start']:.2f} at the start -> {s['val_ppl_end']:.2f} at the end")
    print(f"outputs in {out}/: metrics.jsonl loss.png checkpoint/ train_state.pt run.json memory_report.json "
          "memory.png report.md report.html"
          + (" samples.md samples.jsonl eval_before.json eval_after.json" if s["status"] == "complete" else ""))


def main(argv=None) -> int:
    prog = "leanfit finetune"
    try:
        config, dry_run = _parse(argv)
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
            s = run(config, dry_run=dry_run)
    except ValueError as e:
        return fail(prog, e)
    except (FloatingPointError, OutOfMemory) as e:
        fail(prog, e)
        return 1
    if s["status"] == "dry-run":
        c = s["config"]
        print(f"dry run: nothing loaded or written; the run would use micro-batch {c['batch_size']} x "
              f"{c['block_size']} + 1 tokens, grad-accum {c['grad_accum']}, loss {c['loss']}, dtype {c['dtype']}, "
              f"grad checkpointing {'on' if c['grad_checkpointing'] else 'off'}, optimizer in backward "
              f"{'on' if c['optimizer_in_backward'] else 'off'}")
        return 0
    _print_summary(s)
    return 130 if s["status"] == "interrupted" else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
