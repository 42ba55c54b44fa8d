"""What one fine-tuning run carries from setup to its outputs (`RunContext`), its extension points (`Hooks`),
and the RNG state a resumed run restores."""

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import TrainConfig
from .data import BlockLoader
from .evaluate import finetune_eval_before
from .step import LossFn

__all__ = ["RunContext", "Hooks", "rng_state", "set_rng_state"]


def _eval_before(ctx):
    finetune_eval_before(ctx, heldout_per_article=ctx.config.eval_contexts, study=ctx.config.eval_study)


@dataclass
class Hooks:
    """Extension points of `finetune.run`. Each callable gets the `RunContext`."""

    on_setup: list = field(default_factory=lambda: [_eval_before])  # after setup; ctx.stop = True ends there
    wrap_step: Callable | None = None  # wrap_step(ctx) -> context manager around one optimizer step
    on_step: list = field(default_factory=list)  # after each step: fn(ctx, record)
    writers: dict | None = None  # {status: [writer(ctx), ...]} in place of `outputs.WRITERS[status]`


@dataclass
class RunContext:
    config: TrainConfig
    out: Path
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    loss_fn: LossFn
    train_blocks: torch.Tensor  # (N, T)
    val_blocks: torch.Tensor  # (M, T)
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
    profiler: object = None  # memory.MemoryProfiler while training

    @property
    def params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def evals(self):
        return [m for m in self.metrics if m.get("kind") == "eval"]


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
