# B micro-batch (sequences), T block (tokens), A gradient accumulation steps
"""Choose training settings that fit a memory budget, by the estimate (train/memory/estimate.py); no CLI here.

Settings are tried from the least to the most costly in speed (`levels`). On CUDA the chunked loss and bf16
autocast come first (both save memory and neither slows a GPU step: autocast speeds it up), then gradient
checkpointing (about a third more compute), then, when one micro-batch is the whole step, the optimizer step
in the backward. On a card without bf16 (`gpu`, train/gpus.py) fp16 autocast with a gradient scaler takes
its place, and the optimizer step in the backward is never tried (the scaler unscales and checks every
gradient at once). On the CPU: the full-logits fp32 loss, the chunked loss, checkpointing, optimizer in
backward. At each, the largest micro-batch B that divides the requested batch and fits is found
(A = batch / B keeps the tokens per step); the first settings reaching `min_micro_tokens` tokens per
micro-batch (or the whole batch) win, else those with the largest B.

Peak memory is close to affine in B for fixed settings, so the two smallest divisors are traced and the line
is used to guess; the guess is then traced, and so is the next larger divisor to show that it would not fit.
"""

from dataclasses import asdict, dataclass, replace

from ..gpus import gpu_card
from ..model.architectures import HUB_IDS
from ..units import format_bytes
from .estimate import Estimate, StepConfig, estimate_step

_CHUNKED = {"loss_impl": "chunked"}
_CKPT = {"grad_checkpointing": True}
_OIB = {"grad_checkpointing": True, "optimizer_in_backward": True}


def _cuda_levels(autocast):
    amp = {"loss_impl": "chunked", "autocast": autocast}
    levels = [(f"chunked loss + {autocast} autocast", amp),
              (f"chunked loss + {autocast} autocast + grad checkpointing", {**amp, **_CKPT})]
    if autocast != "fp16":
        levels.append((f"chunked loss + {autocast} autocast + grad checkpointing + optimizer in backward",
                       {**amp, **_OIB}))
    return tuple(levels)


def _lora_levels(autocast, quantize: bool):
    """LoRA (and, on CUDA, QLoRA) settings, cheapest first: the base frozen in the autocast dtype (fp32 without)."""
    base = {"lora": True, "loss_impl": "chunked"}
    if autocast:
        base.update(autocast=autocast, dtype=autocast)
    amp = f" + {autocast} autocast" if autocast else ""
    kinds = [("LoRA", {})] + ([("QLoRA (NF4 base)", {"quantize": "nf4"})] if quantize else [])
    return tuple(level for name, extra in kinds for level in (
        (f"{name} + chunked loss{amp}", {**base, **extra}),
        (f"{name} + chunked loss{amp} + grad checkpointing", {**base, **extra, **_CKPT})))


LEVELS = {
    "cuda": _cuda_levels("bf16"),
    "cpu": (
        ("fp32 + full logits", {}),
        ("chunked loss", _CHUNKED),
        ("chunked loss + grad checkpointing", {**_CHUNKED, **_CKPT}),
        ("chunked loss + grad checkpointing + optimizer in backward", {**_CHUNKED, **_OIB}),
    ),
}


class NothingFits(ValueError):
    """No settings fit; `estimate` is the smallest configuration tried (micro-batch 1, every saving on)."""

    def __init__(self, estimate, budget_bytes):
        self.estimate, self.budget_bytes = estimate, budget_bytes
        super().__init__(
            f"nothing fits in {format_bytes(budget_bytes)}: the smallest configuration (micro-batch 1, "
            f"{_describe_cfg(estimate.config)}) needs {format_bytes(estimate.peak_bytes)}"
        )

    def to_dict(self):
        return {"fits": False, "smallest": self.estimate.to_dict(self.budget_bytes), "error": str(self)}


@dataclass
class Choice:
    """The chosen step: `estimate.config` (micro-batch, settings) and `grad_accum_steps`."""

    estimate: Estimate
    grad_accum_steps: int
    budget_bytes: int
    reason: str
    next_larger: dict | None = None  # {"batch_size", "peak_bytes"} of the next divisor, which does not fit

    @property
    def config(self):
        return self.estimate.config

    def to_dict(self):
        d = asdict(self)
        d["estimate"] = self.estimate.to_dict(self.budget_bytes)
        d["peak_bytes"], d["fits"] = self.estimate.peak_bytes, True
        d["breakdown"] = self.estimate.breakdown
        return d

    def describe(self):
        c = self.config
        lines = [
            f"chosen: micro-batch {c.batch_size} x {c.block_size} tokens, {self.grad_accum_steps} accumulation "
            f"step(s) = {c.batch_size * self.grad_accum_steps * c.block_size:,} tokens per optimizer step"
            + (f" per rank, {c.batch_size * self.grad_accum_steps * c.block_size * c.world_size:,} over "
               f"{c.world_size} ranks" if c.world_size > 1 else "") + f"; {_describe_cfg(c)}",
            f"why: {self.reason}",
            self.estimate.table(self.budget_bytes),
        ]
        return "\n".join(lines)


def _describe_cfg(c):
    parts = [f"{c.dtype}" + (f" + autocast {c.autocast}" if c.autocast else ""), f"{c.loss_impl} loss"]
    if c.lora:
        parts.insert(0, f"{'QLoRA (NF4 base)' if c.quantize else 'LoRA'} rank {c.lora_rank}")
    if c.grad_checkpointing:
        parts.append("grad checkpointing")
    if c.optimizer_in_backward:
        parts.append("optimizer in backward")
    return ", ".join(parts)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _largest_fitting(base, batch, budget, est, min_b=1):
    """Largest divisor of `batch` whose estimate fits; returns (estimate or None, next larger info or None)."""
    divs = [d for d in _divisors(batch) if d >= min_b]
    if not divs:
        return None, None
    e1 = est(replace(base, batch_size=divs[0]))
    if not e1.fits(budget):
        return None, {"batch_size": divs[0], "peak_bytes": e1.peak_bytes}
    if len(divs) == 1:
        return e1, None
    e2 = est(replace(base, batch_size=divs[1]))
    slope = max((e2.peak_bytes - e1.peak_bytes) / (divs[1] - divs[0]), 1)
    guess = max([d for d in divs if e1.peak_bytes + slope * (d - divs[0]) <= budget], default=divs[0])
    known = {divs[0]: e1, divs[1]: e2}
    i = divs.index(guess)
    while True:
        cur = known.get(divs[i]) or est(replace(base, batch_size=divs[i]))
        known[divs[i]] = cur
        if cur.fits(budget) or i == 0:
            break
        i -= 1
    while i + 1 < len(divs):
        nxt = known.get(divs[i + 1]) or est(replace(base, batch_size=divs[i + 1]))
        known[divs[i + 1]] = nxt
        if not nxt.fits(budget):
            return known[divs[i]], {"batch_size": divs[i + 1], "peak_bytes": nxt.peak_bytes}
        i += 1
    return known[divs[i]], None


def levels_for(device_kind, gpu=None, lora=None, allow_lora=False):
    """The settings `choose_config` tries on `device_kind`, or on the card `gpu` (bf16, else fp16 autocast).

    `lora` ("lora" or "qlora"): a run that asked for adapters tries only those settings; else `allow_lora` adds
    LoRA, then QLoRA (CUDA only), after every full fine-tuning setting.
    """
    autocast = None
    if gpu is not None or device_kind == "cuda":
        autocast = "bf16" if gpu is None or gpu_card(gpu).bf16 else "fp16"
    full = _cuda_levels(autocast) if autocast else LEVELS[device_kind]
    adapters = _lora_levels(autocast, quantize=autocast is not None)
    if lora == "qlora":
        return tuple(level for level in adapters if level[1].get("quantize"))
    if lora == "lora":
        return tuple(level for level in adapters if not level[1].get("quantize"))
    return full + adapters if allow_lora else full


def choose_config(model, target_tokens_per_step, block_size, budget_bytes, device_kind="cuda", *,
                  optimizer="adamw", dtype="fp32", allow_optimizer_in_backward=True, min_micro_tokens=4096,
                  estimate_kwargs=None, levels=None, gpu=None, lora=None, allow_lora=False, lora_options=None,
                  parallel="none", world_size=1):
    """Picks the settings and micro-batch that fit `budget_bytes`, keeping the tokens per optimizer step.

    Args:
        model: preset, local dir, cached hub id or config.
        target_tokens_per_step: tokens per optimizer step; a multiple of block_size.
        block_size: tokens per sequence.
        budget_bytes: memory the step may use on the device (see `units.parse_bytes`).
        device_kind: "cuda" or "cpu" (no autocast on the CPU).
        allow_optimizer_in_backward: whether the last resort may step in the backward (it forbids clipping).
        min_micro_tokens: tokens per micro-batch considered efficient enough to stop trying further savings.
        estimate_kwargs: passed to `estimate_step` (cuda_context_bytes, allocator_margin, ...).
        levels: ((name, StepConfig fields), ...) to try in order; default `levels_for(device_kind, gpu)`.
        gpu: a card of train/gpus.py (device_kind is then "cuda"): its dtypes and attention kernel.
        lora, allow_lora: "lora" or "qlora" to plan only adapters; else whether adapters may be chosen when no
            full fine-tune reaches `min_micro_tokens` (never without `allow_lora`).
        lora_options: StepConfig's lora_rank, lora_alpha, lora_dropout, lora_targets.
        parallel, world_size: the estimate is one rank's (`StepConfig`), and so is `target_tokens_per_step`.

    Returns:
        A `Choice`.

    Raises:
        ValueError on bad input; `NothingFits` (a ValueError) with the smallest configuration's estimate.

    Example:
        >>> choice = choose_config("gpt2", 24 * 1024, 1024, parse_bytes("15GiB"))
        >>> print(choice.describe())
    """
    if block_size < 2 or target_tokens_per_step < block_size or target_tokens_per_step % block_size:
        raise ValueError(f"expected tokens per step a positive multiple of block_size={block_size}, "
                         f"given {target_tokens_per_step}")
    if budget_bytes is None or budget_bytes <= 0:
        raise ValueError(f"expected a positive memory budget, given {budget_bytes}")
    batch = target_tokens_per_step // block_size
    kwargs = estimate_kwargs or {}
    cache = {}

    def est(spec):
        key = tuple((k, v if isinstance(v, (str, int, float, bool, type(None))) else id(v))
                    for k, v in sorted(vars(spec).items()))
        if key not in cache:
            cache[key] = estimate_step(spec, **kwargs)
        return cache[key]

    if gpu is not None:
        gpu, device_kind = gpu_card(gpu).name, "cuda"
    base = StepConfig(model=model, batch_size=1, block_size=block_size, dtype=dtype, optimizer=optimizer,
                      device_kind=device_kind, gpu=gpu, parallel=parallel, world_size=world_size,
                      **(lora_options or {})).validate()
    allow_optimizer_in_backward = allow_optimizer_in_backward and parallel == "none"
    results, smallest = [], None
    for name, settings in levels or levels_for(device_kind, gpu, lora, allow_lora):
        if settings.get("optimizer_in_backward") and not allow_optimizer_in_backward:
            continue
        spec = replace(base, **settings)
        min_b = batch if spec.optimizer_in_backward else 1
        found, nxt = _largest_fitting(spec, batch, budget_bytes, est, min_b)
        if found is None:
            if min_b == 1:
                smallest = est(replace(spec, batch_size=1))
            continue
        results.append((name, found, nxt))
        b = found.config.batch_size
        if b == batch or b * block_size >= min_micro_tokens:
            break
    if not results:
        raise NothingFits(smallest, budget_bytes)
    name, found, nxt = max(results, key=lambda r: r[1].config.batch_size)
    b = found.config.batch_size
    tried = "; ".join(f"{n}: micro-batch {r.config.batch_size}" for n, r, _ in results)
    reason = (f"{name} is the first setting, from the cheapest, whose largest fitting micro-batch ({b} x "
              f"{block_size} = {b * block_size:,} tokens) reaches {min_micro_tokens:,} tokens or the whole batch"
              if (b == batch or b * block_size >= min_micro_tokens) and results[-1][1] is found else
              f"{name} gives the largest micro-batch that fits ({tried})")
    if nxt:
        reason += (f"; micro-batch {nxt['batch_size']} would need {format_bytes(nxt['peak_bytes'])} "
                   f"> {format_bytes(budget_bytes)}")
    return Choice(found, batch // b, budget_bytes, reason, nxt)


def choose_for_train_config(config, budget_bytes, device_kind="cuda", world_size=1, **kwargs):
    """`choose_config` for a `TrainConfig`: keeps its batch_size * grad_accum sequences of block_size tokens per step
    (per rank, over `world_size` ranks with `config.parallel`).

    The optimizer step in the backward is allowed only when clipping is off (`config.clip == 0`); `config.gpu`
    names the card. `kwargs` go to `choose_config` (min_micro_tokens, estimate_kwargs, levels).
    """
    tokens = config.block_size
    lora = ("qlora" if config.qlora else "lora") if config.lora else None
    options = {k: getattr(config, k) for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
    return choose_config(config.model, config.batch_size * config.grad_accum * tokens, tokens, budget_bytes,
                         device_kind, optimizer=config.optimizer,
                         allow_optimizer_in_backward=not config.clip, gpu=config.gpu, lora=lora,
                         lora_options=options, parallel=config.parallel if world_size > 1 else "none",
                         world_size=world_size, **kwargs)


def train_config_changes(choice):
    """The TrainConfig fields that realize `choice` (optimizer_in_backward is a field finetune must add)."""
    c = choice.config
    changes = {"batch_size": c.batch_size, "grad_accum": choice.grad_accum_steps,
               "grad_checkpointing": c.grad_checkpointing, "optimizer_in_backward": c.optimizer_in_backward,
               "lora": c.lora, "qlora": c.quantize == "nf4"}
    if c.loss_impl == "chunked":
        changes["loss"] = "chunked"
    if c.autocast:
        changes["dtype"] = c.autocast
    return changes


def finetune_args(choice, gpu=None) -> list:
    """The `leanfit finetune` arguments that run `choice` (on the card `gpu`): model, block, micro-batch,
    accumulation, dtype, loss, checkpointing, optimizer (in the backward: with clipping off)."""
    c, changes = choice.config, train_config_changes(choice)
    model = HUB_IDS.get(c.model, c.model) if isinstance(c.model, str) else c.model
    args = ["--model", str(model)] + (["--gpu", gpu] if gpu else [])
    args += ["--block-size", str(c.block_size), "--batch-size", str(changes["batch_size"]),
             "--grad-accum", str(changes["grad_accum"]), "--dtype", changes.get("dtype", "fp32"),
             "--loss", changes.get("loss", c.loss_impl), "--optimizer", c.optimizer]
    if c.grad_checkpointing:
        args.append("--grad-checkpointing")
    if c.optimizer_in_backward:
        args += ["--optimizer-in-backward", "--clip", "0"]
    if c.lora:
        args += ["--qlora" if c.quantize else "--lora", "--lora-rank", str(c.lora_rank), "--lora-alpha",
                 f"{c.lora_alpha:g}", "--lora-targets", c.lora_targets]
        args += ["--lora-dropout", f"{c.lora_dropout:g}"] if c.lora_dropout else []
    if c.parallel != "none":
        args += ["--parallel", c.parallel]
    return args
