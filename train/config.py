# B batch (sequences per micro-batch), T block size (tokens per sequence), A grad-accum steps
"""One flat training configuration with visible defaults, and run presets that list only their differences."""

import math
import re
from dataclasses import asdict, dataclass, fields, replace

from .dtypes import DTYPES, dtype_name
from .gpus import gpu_card
from .lm_loss import IMPLS
from .optim import OPTIMIZERS
from .optim_backward import check_optimizer_in_backward
from .parallel import KINDS as PARALLEL
from .units import parse_bytes

__all__ = ["TrainConfig", "PRESETS", "CHOICES", "validate", "from_dict", "to_dict", "save_interval", "MAX_SEED"]


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    corpus: str | None = None  # None: the embedded corpus (train/data/dracula.txt)
    encoding: str = "utf-8"
    block_size: int = 128  # tokens per sequence, as the model sees them (T - 1 next-token targets)
    batch_size: int = 4
    grad_accum: int = 1
    iters: int = 200
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    optimizer: str = "adamw"
    dtype: str = "fp32"
    loss: str = "auto"  # the hybrid linear cross-entropy (kernels/lce/hybrid.py) on CUDA, the chunked one elsewhere
    grad_checkpointing: bool = False
    eval_every: int = 50
    eval_blocks: int = 0  # 0: every validation block
    val_fraction: float = 0.05
    seed: int = 0
    device: str = "auto"
    out: str = "runs/finetune"
    resume: str | None = None
    prompts: str | None = None  # None: the embedded prompts (train/data/prompts.txt)
    max_length: int = 30
    num_return_sequences: int = 10
    eval_contexts: int = 50  # a/an probe: held-out contexts per article (before and after), 0: built-in only
    eval_study: bool = True  # prompt study (distinct-n, log-likelihood, themes) before and after training
    memory_budget: int | None = None  # bytes ("15GiB" is parsed at validation): settings that fit, a CUDA cap
    memory_snapshot: bool = False  # CUDA: dump the allocator history (memory_snapshot.pickle)
    optimizer_in_backward: bool = False  # step each parameter from its gradient hook (no accumulation, no clip)
    save_every: str = "10min"  # a checkpoint unit every N steps ("500") or minutes ("10min"); and at the end
    keep_last: int = 2  # units kept in checkpoints/ (the newest ones)
    gpu: str | None = None  # a card of train/gpus.py: plan for it (budget, dtype, attention), refuse another one
    lora: bool = False  # train LoRA adapters (PEFT) on a frozen base held in `dtype`; train/model/lora.py
    lora_rank: int = 16
    lora_alpha: float = 32.0  # the adapter's output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # 0 keeps no dropped copy of each adapted layer's input for the backward
    lora_targets: str = "all-linear"  # module names, comma-separated, or all-linear: every linear layer but the head
    qlora: bool = False  # LoRA on a 4-bit NF4 base (bitsandbytes, CUDA only)
    parallel: str = "none"  # ddp or fsdp2 under torchrun (train/parallel.py); batch_size is then per rank


PRESETS = {
    # 2 seqs x 129 tokens = 256 targets/step x 16 steps = 4,096 targets (~2% of one epoch); val: 8 blocks
    # the a/an probe on 20 held-out contexts per article; no prompt study before training (generation is slow)
    "cpu-demo": dict(
        block_size=129, batch_size=2, iters=16, warmup=2, lr=1e-4, eval_every=8, eval_blocks=8,
        eval_contexts=20, eval_study=False,
    ),
    # 8 seqs x 256 tokens = 2,048 tokens/step x 200 steps = 409,600 tokens (~2 epochs of 210k train tokens)
    "gpu-demo": dict(
        block_size=256, batch_size=8, iters=200, warmup=20, lr=5e-5, eval_every=25, dtype="bf16",
    ),
}

CHOICES = {
    "schedule": ("cosine", "constant"),
    "optimizer": OPTIMIZERS,
    "dtype": tuple(DTYPES),
    "loss": (*IMPLS, "hf"),
    "parallel": PARALLEL,
}
POSITIVE_INT = ("batch_size", "grad_accum", "iters", "eval_every", "max_length", "num_return_sequences", "keep_last")
MAX_SEED = 2**63 - 1
NON_NEGATIVE_INT = ("warmup", "eval_blocks", "seed", "eval_contexts")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(config: TrainConfig) -> TrainConfig:
    """The config with its dtype spelled canonically; raises ValueError naming the field, what was expected and
    what was given."""
    if not _is_int(config.block_size) or config.block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2 (tokens per sequence), got {config.block_size!r}")
    for name in POSITIVE_INT:
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in NON_NEGATIVE_INT:
        value = getattr(config, name)
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if config.seed > MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {config.seed!r}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ValueError(f"lr must be a positive finite number, got {config.lr!r}")
    if not (config.clip >= 0 and math.isfinite(config.clip)):
        raise ValueError(f"clip must be >= 0 (0 turns clipping off), got {config.clip!r}")
    if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay!r}")
    if not 0 <= config.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {config.min_lr_ratio!r}")
    if not (0 <= config.beta1 < 1 and 0 <= config.beta2 < 1):
        raise ValueError(f"beta1 and beta2 must be in [0, 1), got {config.beta1!r}, {config.beta2!r}")
    if not 0 <= config.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {config.val_fraction!r}")
    try:
        config = replace(config, dtype=dtype_name(config.dtype))
    except ValueError as e:
        raise ValueError(f"dtype: {e}") from None
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    if config.memory_budget is not None:
        try:
            budget = parse_bytes(config.memory_budget)
        except ValueError:
            budget = 0
        if budget <= 0:
            raise ValueError(f"memory_budget must be a positive size like 15GiB, got {config.memory_budget!r}")
        config = replace(config, memory_budget=budget)
    if config.optimizer_in_backward:
        check_optimizer_in_backward(config.grad_accum, config.clip, config.dtype == "fp16")
        if config.parallel != "none":
            raise ValueError(f"optimizer_in_backward: not with --parallel {config.parallel} (the ranks reduce the "
                             f"gradients after the backward); expected --parallel none")
    save_interval(config.save_every)
    if config.gpu is not None:
        config = _check_gpu(config)
    return _check_lora(config)


def _check_lora(config: TrainConfig) -> TrainConfig:
    if config.qlora:
        config = replace(config, lora=True)
    if config.lora and (config.parallel == "fsdp2" or config.qlora and config.parallel != "none"):
        raise ValueError(f"--parallel {config.parallel}: not with {'--qlora' if config.qlora else '--lora'} (sharding "
                         f"a PEFT model is not supported here); expected --parallel ddp with --lora, or none")
    if not _is_int(config.lora_rank) or config.lora_rank < 1:
        raise ValueError(f"lora_rank must be a positive integer, got {config.lora_rank!r}")
    if not (config.lora_alpha > 0 and math.isfinite(config.lora_alpha)):
        raise ValueError(f"lora_alpha must be a positive finite number, got {config.lora_alpha!r}")
    if not 0 <= config.lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {config.lora_dropout!r}")
    names = [n.strip() for n in str(config.lora_targets).split(",")]
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", n) for n in names):
        raise ValueError(f"lora_targets: expected all-linear or module names separated by commas (e.g. "
                         f"q_proj,v_proj), got {config.lora_targets!r}")
    return replace(config, lora_targets=",".join(names))


def save_interval(text: str) -> tuple[str, float]:
    """("steps", N) or ("minutes", M) from a `save_every` value such as "500" or "10min"."""
    value = str(text).strip().lower()
    for unit in ("minutes", "minute", "min", "m"):
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            try:
                minutes = float(number)
            except ValueError:
                break
            if minutes > 0 and math.isfinite(minutes):
                return "minutes", minutes
            break
    else:
        if value.isdigit() and int(value) > 0:
            return "steps", int(value)
    raise ValueError(f"save_every: expected a number of steps (e.g. 500) or minutes (e.g. 10min), got {text!r}")


def _check_gpu(config: TrainConfig) -> TrainConfig:
    try:
        card = gpu_card(config.gpu)
    except ValueError as e:
        raise ValueError(f"gpu: {e}") from None
    if config.device == "cpu":
        raise ValueError(f"gpu {card.name}: a CUDA card, expected --device cuda, cuda:N or auto, given cpu")
    if config.dtype == "bf16" and not card.bf16:
        raise ValueError(f"dtype bf16: the {card.name} has no bf16 (compute capability "
                         f"{'.'.join(map(str, card.capability))}); expected --dtype fp16 or fp32")
    return replace(config, gpu=card.name)


def from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """A config from `base` (default: the defaults) with `values` applied; unknown keys are an error."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown} (expected some of {sorted(known)})")
    return replace(base or TrainConfig(), **values)


def to_dict(config: TrainConfig) -> dict:
    return asdict(config)
