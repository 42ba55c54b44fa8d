"""Memory planning for a fine-tuning run, before any weight is loaded, and advice after an out-of-memory error.

Both read only the model's config (model/architectures.py) and trace the step on `meta` (estimate.py);
`--memory-budget` settings come from budget.py.
"""

from dataclasses import replace

import torch

from .. import config as cfg
from ..devices import device_kind, indexed_device
from ..gpus import GPUS
from ..model.architectures import check_positions, load_config
from ..units import format_bytes
from .budget import NothingFits, choose_for_train_config, train_config_changes
from .estimate import StepConfig, estimate_step

__all__ = ["step_config", "plan_memory", "oom_advice"]


def step_config(config: cfg.TrainConfig, kind: str, world_size: int = 1) -> StepConfig:
    """The estimate's `StepConfig` for one micro-batch of `config` on a `kind` device (LoRA: the base in
    `config.dtype`, as `lora.load_for_training` loads it), one of `world_size` ranks."""
    return StepConfig(
        model=config.model, batch_size=config.batch_size, block_size=config.block_size,
        dtype=config.dtype if config.lora else "fp32", autocast=None if config.dtype == "fp32" else config.dtype,
        loss_impl=config.loss, grad_checkpointing=bool(config.grad_checkpointing), optimizer=config.optimizer,
        optimizer_in_backward=config.optimizer_in_backward, device_kind=kind, gpu=config.gpu, lora=config.lora,
        lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        lora_targets=config.lora_targets, quantize="nf4" if config.qlora else None,
        parallel=config.parallel if world_size > 1 else "none", world_size=world_size,
    )


def plan_memory(config: cfg.TrainConfig, model_ref: str | None = None,
                world_size: int = 1) -> tuple[cfg.TrainConfig, str]:
    """The estimate's view of `config`, from the model's config alone (no weights, no GPU).

    With `config.memory_budget` (default with `config.gpu`: the card's usable memory), the settings are those
    `budget.choose_for_train_config` picks to fit (batch_size * grad_accum sequences per step kept); without,
    the config is kept and its estimate shown. The device kind follows `config.device` (cuda or cuda:N plans
    for CUDA even on a machine without one), and is CUDA with `config.gpu`. `model_ref` is where the model's
    config is read (default `config.model`; a resumed run's unit). Over `world_size` ranks the estimate and
    the budget are per rank.

    Returns:
        (the config to run, the printable plan).
    Raises:
        ValueError: bad input, the block over the model's positions, or `NothingFits` (with the smallest
        configuration's breakdown printed first).
    """
    model_ref = model_ref or config.model
    check_positions(config.block_size, load_config(model_ref))
    kind = "cuda" if config.gpu else device_kind(config.device)
    if config.memory_budget is None and config.gpu is None:
        return config, estimate_step(replace(step_config(config, kind, world_size), model=model_ref)).table()
    budget = config.memory_budget or GPUS[config.gpu].usable_bytes
    label = format_bytes(budget) + ("" if config.memory_budget else f" (the {config.gpu}'s usable memory)")
    try:
        choice = choose_for_train_config(replace(config, model=model_ref), budget, kind, world_size=world_size)
    except NothingFits as e:
        print(e.estimate.table(budget))
        raise
    planned = cfg.validate(replace(config, **train_config_changes(choice)))
    where = f"{kind} ({config.gpu})" if config.gpu else kind
    return planned, f"memory budget {label} on {where}:\n{choice.describe()}"


def oom_advice(config: cfg.TrainConfig, device: torch.device) -> str | None:
    """After a CUDA out-of-memory error: a configuration the estimate says fits the budget (or the card)."""
    if config.memory_budget:
        budget = config.memory_budget
    elif device.type == "cuda":
        budget = torch.cuda.get_device_properties(indexed_device(device)).total_memory
    else:
        return None
    try:
        choice = choose_for_train_config(config, budget, device.type)
    except ValueError as e:
        return f"the estimate finds nothing that fits: {e}"
    return "a configuration the estimate says fits:\n" + choice.describe()
