"""`MemoryReportCallback`: leanfit's memory estimate before a `transformers.Trainer` run and its report after.

Before training it traces one step of the Trainer's micro-batch (train/memory/estimate.py: the model's config, the
batch size, `block_size`, the parameter dtype and autocast, gradient checkpointing, the optimizer, LoRA, the loss a
patched model uses) and prints the table, with one warning line when the peak is over the budget (the callback's,
else the CUDA card's memory). During training `MemoryProfiler` records each step in two phases,
forward_backward and optimizer_step; at the end memory_report.json and memory.png go into `args.output_dir`.
"""

import contextlib

import torch
from transformers import TrainerCallback

from ..memory.estimate import StepConfig, estimate_step
from ..memory.profiler import MemoryProfiler
from ..units import format_bytes, parse_bytes
from .patch import is_patched

__all__ = ["MemoryReportCallback", "trainer_step_config"]

_OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "sgd": "sgd",
               "adamw_bnb_8bit": "adamw8bit", "adamw_8bit": "adamw8bit"}
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _optimizer_name(args):
    name = str(getattr(args.optim, "value", args.optim))
    if name not in _OPTIMIZERS:
        raise ValueError(f"MemoryReportCallback: expected an optimizer in {sorted(_OPTIMIZERS)}, given {name!r}")
    return _OPTIMIZERS[name]


def _lora_fields(model):
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return {}
    targets = config.target_modules
    targets = targets if isinstance(targets, str) else ",".join(sorted(targets))
    return {"lora": True, "lora_rank": int(config.r), "lora_alpha": float(config.lora_alpha), "lora_targets": targets}


def trainer_step_config(model, args, block_size) -> StepConfig:
    """The `StepConfig` of one micro-batch of a Trainer run of `model` with `args` and `block_size` tokens."""
    param = next(model.parameters())
    return StepConfig(
        model=model.config, batch_size=int(args.per_device_train_batch_size), block_size=int(block_size),
        dtype=_DTYPES.get(param.dtype, "fp32"), autocast="bf16" if args.bf16 else "fp16" if args.fp16 else None,
        grad_checkpointing=bool(args.gradient_checkpointing), optimizer=_optimizer_name(args),
        loss_impl="chunked" if is_patched(model) else "hf", device_kind="cuda" if param.is_cuda else "cpu",
        **_lora_fields(model),
    )


class MemoryReportCallback(TrainerCallback):
    """Prints leanfit's memory estimate before training and writes the memory report into `args.output_dir`.

    Args:
        block_size: tokens per sequence the Trainer feeds (default: `args.max_length`, as `SFTConfig` has it).
        budget: bytes (or "6GiB") the step must fit; default: the CUDA card's memory (none on the CPU).
        estimate: trace the step before training.
        track_tensors: on the CPU, follow every tensor for the breakdown (slower).

    Example:
        >>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[MemoryReportCallback(block_size=1024)])
    """

    def __init__(self, block_size: int | None = None, budget: int | str | None = None, estimate: bool = True,
                 track_tensors: bool = True):
        self.block_size, self.estimate, self.track_tensors = block_size, estimate, track_tensors
        self.budget = parse_bytes(budget) if isinstance(budget, str) else budget
        self.profiler, self.estimated, self.warning = None, None, None
        self._phase = contextlib.ExitStack()

    def _budget(self, model):
        param = next(model.parameters())
        if self.budget is not None or not param.is_cuda:
            return self.budget
        return torch.cuda.get_device_properties(param.device).total_memory

    def _print_estimate(self, model, args):
        block = self.block_size or getattr(args, "max_length", None)
        if block is None:
            raise ValueError("MemoryReportCallback: expected block_size (the Trainer's sequence length), given None")
        self.estimated = estimate_step(trainer_step_config(model, args, block))
        budget = self._budget(model)
        print(self.estimated.table(budget_bytes=budget), flush=True)
        if not self.estimated.fits(budget):
            self.warning = (f"leanfit: WARNING: the estimated peak {format_bytes(self.estimated.peak_bytes)} "
                            f"does not fit {format_bytes(budget)}")
            print(self.warning, flush=True)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.estimate and state.is_world_process_zero:
            self._print_estimate(model, args)
        self.profiler = MemoryProfiler(model, optimizer, out_dir=args.output_dir, track_tensors=self.track_tensors)

    def _enter(self, name):
        self._phase.close()
        self._phase.enter_context(self.profiler.phase(name))

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = contextlib.ExitStack()
        self._step.enter_context(self.profiler.step(state.global_step))
        self._enter("forward_backward")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._enter("optimizer_step")

    def on_step_end(self, args, state, control, **kwargs):
        self._phase.close()
        self._step.close()

    def on_train_end(self, args, state, control, **kwargs):
        self._phase.close()
        self.profiler.close()
        if state.is_world_process_zero:
            self.profiler.save()
