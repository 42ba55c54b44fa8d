# B batch (sequences per micro-batch), T block size (tokens per sequence), A grad-accum steps
"""The training step's primitives, free of any CLI or run folder: loss, accumulation, optimizer step, schedule.

One optimizer step sees A micro-batches of B blocks of T tokens; each block gives T - 1 next-token targets.
Each micro-batch's loss is its summed token loss divided by the step's global count of target tokens, so the
accumulated gradient is the gradient of the step's mean loss whatever A is.
"""

import contextlib
import math
import signal
import sys
import threading
from typing import Callable

import torch

from .lm_loss import causal_lm_loss

__all__ = ["LossFn", "make_loss_fn", "target_count", "accumulate_gradients", "optimizer_step", "validation_loss",
           "lr_factor", "make_scheduler", "stop_signals", "no_interrupt"]

LossFn = Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]  # (model, blocks (B, T), num_items)


def make_loss_fn(impl: str = "chunked") -> LossFn:
    """The summed next-token loss of blocks (B, T), divided by `num_items`.

    `impl` is a `causal_lm_loss` impl (naive, chunked, triton, auto), or "hf" for the model's own loss,
    `model(blocks, labels=blocks, num_items_in_batch=num_items).loss`.
    """
    if impl == "hf":
        return lambda model, blocks, num_items: model(
            input_ids=blocks, labels=blocks, num_items_in_batch=num_items, use_cache=False
        ).loss
    return lambda model, blocks, num_items: causal_lm_loss(
        model, blocks, impl=impl, reduction="sum", num_items=num_items
    )


def target_count(micro_batches) -> int:
    return sum(int((b[:, 1:] != -100).sum()) for b in micro_batches)


def _no_phase(name):
    return contextlib.nullcontext()


def accumulate_gradients(model, micro_batches, loss_fn: LossFn, autocast=None, scaler=None,
                         phase=_no_phase, num_items=None, no_sync=None) -> torch.Tensor:
    """Backpropagates each micro-batch (B, T) with the loss normalized by the global target count.

    `phase(name)` is a context manager around each "forward" and "backward" (e.g. `MemoryProfiler.phase`).
    `num_items` is what each summed loss is divided by (default: the micro-batches' target count; over several
    ranks `parallel.Parallel.loss_divisor`). `no_sync()`, when given, is a context that holds the gradient
    reduction of data parallelism off: every micro-batch but the last runs inside it.

    Returns:
        the step's mean token loss (0-dim, detached); over several ranks this rank's share of it, times W.
    """
    num_items = target_count(micro_batches) if num_items is None else num_items
    total = torch.zeros((), device=micro_batches[0].device)
    for i, blocks in enumerate(micro_batches):
        held = no_sync() if no_sync is not None and i < len(micro_batches) - 1 else contextlib.nullcontext()
        with held:
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
def validation_loss(model, blocks, batch_size: int, loss_fn: LossFn, autocast=None, device="cpu") -> float:
    """Mean token loss over validation blocks (N, T)."""
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


class _PerParamLR:
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


def make_scheduler(optimizer, config):
    """The learning-rate schedule of `config` (warmup, then cosine or constant) for `optimizer`."""
    if config.optimizer_in_backward:
        return _PerParamLR(optimizer, config)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))


@contextlib.contextmanager
def stop_signals(ctx):
    """The first Ctrl-C (or a SIGTERM) asks the loop to stop after the current step (`ctx.stop_requested`); a second
    Ctrl-C aborts, but never inside a save (`no_interrupt`). `ctx` has `stop_requested`, `saving` and
    `abort_after_save`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if ctx.stop_requested and signum == signal.SIGINT:
            if ctx.saving:
                ctx.abort_after_save = True
                return
            raise KeyboardInterrupt
        ctx.stop_requested = True
        print("\ninterrupt: saving a checkpoint and the reports after this step (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def no_interrupt(ctx):
    """Holds a second Ctrl-C off until the block (a save) is done, then aborts."""
    ctx.saving = True
    try:
        yield
    finally:
        ctx.saving = False
    if ctx.abort_after_save:
        raise KeyboardInterrupt
