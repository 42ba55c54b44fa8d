"""What one fine-tuning run carries from setup to its outputs (`RunContext`), its extension points (`Hooks`),
and the train state a checkpoint unit holds for an exact resume (`train_state`, `restore_train_state`)."""

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import config as cfg
from ..config import TrainConfig
from ..data import BlockLoader
from ..evaluation.evaluate import finetune_eval_before
from ..parallel import Parallel
from ..step import LossFn

__all__ = ["RunContext", "Hooks", "rng_state", "set_rng_state", "train_state", "restore_train_state"]


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
    run_id: str = ""
    step: int = 0
    metrics: list = field(default_factory=list)
    samples: list | None = None
    status: str = "running"
    stop: bool = False
    stop_requested: bool = False
    saving: bool = False  # a checkpoint is being written: a second Ctrl-C waits for it
    abort_after_save: bool = False
    started: float = field(default_factory=time.time)
    profiler: object = None  # memory.MemoryProfiler while training
    last_save: float = field(default_factory=time.time)
    resumes: list = field(default_factory=list)  # [{"step", "changed": {field: [before, after]}}] per resume
    parallel: Parallel = field(default_factory=Parallel)  # the ranks (train/parallel.py); one process by default

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


def train_state(ctx: RunContext) -> dict:
    """Everything besides the weights that an exact resume needs, as `state_files.save_state` takes it.

    Over several ranks the optimizer entry is None here: the ranks save it sharded (train/recipe/distributed.py).
    """
    return {
        "step": ctx.step,
        "run_id": ctx.run_id,
        "optimizer": None if ctx.parallel.active else ctx.optimizer.state_dict(),
        "scheduler": ctx.scheduler.state_dict(),
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        "loader": ctx.loader.state_dict(),
        "rng": rng_state(ctx.device),
        "config": cfg.to_dict(ctx.config),
        "corpus_sha256": ctx.corpus_info["sha256"],
        "metrics": [m for m in ctx.metrics if m["step"] <= ctx.step],
    }


def restore_train_state(ctx: RunContext, state: dict, unit=None):
    """Puts the train state (`train_state`) of the unit folder `unit` back into a freshly set-up context."""
    if state["corpus_sha256"] != ctx.corpus_info["sha256"]:
        raise ValueError(f"the corpus {ctx.corpus_info['path']} is not the one this run trained on (its content "
                         f"changed since step {state['step']}): resume with the original corpus")
    ctx.parallel.load_optimizer(ctx.model, ctx.optimizer, state["optimizer"], unit)
    ctx.scheduler.load_state_dict(state["scheduler"])
    if ctx.scaler is not None and state.get("scaler"):
        ctx.scaler.load_state_dict(state["scaler"])
    ctx.loader.load_state_dict(state["loader"])
    ctx.step = int(state["step"])
    ctx.run_id = state["run_id"]
    ctx.metrics = list(state["metrics"])
    rng = ctx.parallel.rank_rng(state)
    if rng is not None:
        set_rng_state(rng)
