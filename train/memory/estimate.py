# B batch, T block (tokens), V vocab, C hidden width
"""Pre-flight memory estimate: one whole training step traced on the `meta` device with MemTracker.

The model is built from its config under `torch.device("meta")` (no weights, no GPU). The optimizer state is
created first (a step on zero gradients), so the traced step is a steady-state one; then the forward, the loss
(`leanfit.train.lm_loss.causal_lm_loss`), the backward and the optimizer step run under
`torch.distributed._tools.mem_tracker.MemTracker`, whose peak snapshot splits the tensor memory into
parameters, gradients, optimizer state, activations and temporaries (train/memory/step_trace.py). See
train/memory/meta_trace.py for the stand-ins (fused attention, autocast, unpacked sequences) that make `meta`
allocate like the target device; `StepConfig.gpu` names the card (train/gpus.py) whose compute capability
decides the attention kernel (default sm_80). With `lora`, PEFT's adapters are put on the meta model as a run
puts them (the base frozen in `dtype`: no gradients, no optimizer state), and with `quantize="nf4"` the base's
linear layers are stand-ins of bitsandbytes' 4-bit layers (train/model/quant.py). On CUDA, what the allocator's
tensors do not show is added: the cuBLAS workspace, the CUDA context and an allocator margin (train/units.py says
where each figure comes from).
The `leanfit estimate` command is train/commands/estimate.py.
"""

import os
from dataclasses import asdict, dataclass, field

from ..dtypes import dtype_name
from ..gpus import gpu_card
from ..lm_loss import IMPLS
from ..optim import OPTIMIZERS
from ..units import ALLOCATOR_MARGIN, CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, format_bytes, parse_bytes
from .fsdp_trace import trace_fsdp_step
from .step_trace import trace_step

__all__ = ["StepConfig", "Estimate", "estimate_step", "LOSS_IMPLS", "DEVICE_KINDS", "ATTN_IMPLS"]

LOSS_IMPLS = (*IMPLS, "hf")  # traced as: naive and hf hold the full logits, the others the chunked loss's
DEVICE_KINDS = ("cuda", "cpu")
ATTN_IMPLS = ("sdpa", "eager")
QUANTIZE = (None, "nf4")
PARALLEL = ("none", "ddp", "fsdp2")  # ddp keeps a whole replica per rank: its estimate is the one-process one
KERNEL_NAMES = {"flash": "flash kernel", "efficient": "memory-efficient kernel", "cpu": "CPU fused kernel",
                "math": "math path (keeps the T² scores)"}


@dataclass
class StepConfig:
    """One training step to estimate. `batch_size` is the micro-batch; tokens per step = batch_size * block_size."""

    model: str = "gpt2"
    batch_size: int = 8
    block_size: int = 1024  # tokens per sequence, as the model sees them
    dtype: str = "fp32"  # parameter dtype
    autocast: str | None = None  # None, "bf16" or "fp16"
    grad_checkpointing: bool = False
    loss_impl: str = "naive"
    optimizer: str = "adamw"
    optimizer_in_backward: bool = False
    device_kind: str = "cuda"
    attn_implementation: str = "sdpa"
    gpu: str | None = None  # a card of train/gpus.py: its compute capability picks the attention kernel
    lora: bool = False  # LoRA adapters on the frozen base (held in `dtype`); train/model/lora.py
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    quantize: str | None = None  # "nf4": the base's linear layers in 4 bits (QLoRA, CUDA); train/model/quant.py
    parallel: str = "none"  # fsdp2: the peak of one of `world_size` ranks (train/memory/fsdp_trace.py)
    world_size: int = 1

    def validate(self):
        """Checks every field; spells the dtypes canonically. Returns self."""
        self.dtype = dtype_name(self.dtype)
        if self.autocast is not None:
            self.autocast = dtype_name(self.autocast)
            if self.autocast == "fp32":
                raise ValueError("autocast: expected None, 'bf16' or 'fp16', given 'fp32'")
        for name, allowed in (("loss_impl", LOSS_IMPLS), ("optimizer", OPTIMIZERS), ("device_kind", DEVICE_KINDS),
                              ("attn_implementation", ATTN_IMPLS), ("parallel", PARALLEL)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, given {getattr(self, name)!r}")
        for name in ("batch_size", "block_size", "world_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, given {getattr(self, name)!r}")
        if self.parallel == "none" and self.world_size != 1:
            raise ValueError(f"world_size: expected 1 without parallel (ddp or fsdp2), given {self.world_size}")
        if self.lora and (self.parallel == "fsdp2" or self.quantize and self.parallel != "none"):
            raise ValueError(f"parallel {self.parallel!r}: not with LoRA{' on a 4-bit base' if self.quantize else ''}; "
                             f"expected parallel 'ddp' with LoRA, or 'none'")
        if self.parallel != "none" and self.optimizer_in_backward:
            raise ValueError(f"optimizer_in_backward: expected False with parallel {self.parallel!r} (the ranks "
                             f"reduce the gradients after the backward)")
        if self.block_size < 2:
            raise ValueError(f"block_size: expected at least 2 tokens, given {self.block_size}")
        if self.gpu is not None:
            self._check_gpu()
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"lora_rank: expected a positive int, given {self.lora_rank!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize: expected one of {QUANTIZE}, given {self.quantize!r}")
        if self.quantize and not (self.lora and self.device_kind == "cuda"):
            raise ValueError(f"quantize {self.quantize}: a 4-bit base is trained with LoRA on CUDA, given "
                             f"lora={self.lora}, device_kind={self.device_kind!r}")
        return self

    def _check_gpu(self):
        card = gpu_card(self.gpu)
        self.gpu = card.name
        if self.device_kind != "cuda":
            raise ValueError(f"gpu {card.name}: expected device_kind 'cuda', given {self.device_kind!r}")
        for name in ("dtype", "autocast"):
            if getattr(self, name) == "bf16" and not card.bf16:
                cc = ".".join(map(str, card.capability))
                raise ValueError(f"{name} bf16: the {card.name} has no bf16 (compute capability {cc}); expected "
                                 f"fp16 or fp32")

    @property
    def traced_loss(self) -> str:
        """The loss the trace runs: the full logits (naive, hf), a Triton path's buffers (triton, hybrid, and
        auto on CUDA, which is hybrid: their kernels are recorded, not run, on `meta`) or the chunked loss
        (chunked, and auto elsewhere)."""
        if self.loss_impl in ("naive", "hf"):
            return "naive"
        if self.loss_impl in ("triton", "hybrid"):
            return self.loss_impl
        return "hybrid" if self.loss_impl == "auto" and self.device_kind == "cuda" else "chunked"


@dataclass
class Estimate:
    """A step's predicted peak. `breakdown` adds up to `peak_bytes`; `tensor_peak_bytes` is the tracked part."""

    config: StepConfig
    peak_bytes: int
    tensor_peak_bytes: int
    allocated_peak_bytes: int  # compare with torch.cuda.max_memory_allocated
    breakdown: dict
    top_modules: list = field(default_factory=list)
    n_params: int = 0
    n_trainable: int = 0
    attention: dict = field(default_factory=dict)  # SDPA calls by the kernel stood in for

    def fits(self, budget_bytes):
        return budget_bytes is None or self.peak_bytes <= budget_bytes

    def to_dict(self, budget_bytes=None):
        d = asdict(self)
        if not isinstance(self.config.model, str):
            d["config"]["model"] = type(self.config.model).__name__
        d["fits"] = self.fits(budget_bytes)
        d["budget_bytes"] = budget_bytes
        d["tokens_per_micro_batch"] = self.config.batch_size * self.config.block_size
        return d

    def table(self, budget_bytes=None):
        c = self.config
        lora = ""
        if c.lora:
            lora = (f" ({self.n_trainable / 1e6:.2f}M trainable: {'QLoRA, NF4 base' if c.quantize else 'LoRA'} "
                    f"rank {c.lora_rank} on {c.lora_targets})")
        lines = [
            f"model {c.model if isinstance(c.model, str) else type(c.model).__name__}: "
            f"{self.n_params / 1e6:.1f}M params{lora}, micro-batch {c.batch_size} x {c.block_size} "
            f"tokens, {c.dtype}" + (f" + autocast {c.autocast}" if c.autocast else "")
            + f", loss {c.loss_impl}, {c.optimizer}" + (" in backward" if c.optimizer_in_backward else "")
            + (", grad checkpointing" if c.grad_checkpointing else "") + f", {c.device_kind}"
            + (f" ({c.gpu})" if c.gpu else "")
            + (f", {c.parallel} over {c.world_size} ranks: per rank" if c.parallel != "none" else ""),
            f"  {'part':<18}{'bytes':>14}  share",
        ]
        for name, n in self.breakdown.items():
            lines.append(f"  {name:<18}{format_bytes(n):>14}  {100 * n / max(self.peak_bytes, 1):5.1f}%")
        lines.append(f"  {'predicted peak':<18}{format_bytes(self.peak_bytes):>14}")
        if self.top_modules:
            lines.append("  activations kept by module: " + ", ".join(
                f"{name} {format_bytes(n)}" for name, n in self.top_modules))
        if self.attention:
            lines.append("  attention (SDPA): " + ", ".join(
                f"{KERNEL_NAMES[k]} x{n}" for k, n in sorted(self.attention.items())))
        if budget_bytes is not None:
            lines.append("  " + self.verdict(budget_bytes))
        return "\n".join(lines)

    def verdict(self, budget_bytes):
        """Whether the step fits `budget_bytes`, and by how much it is over or under."""
        gap = self.peak_bytes - budget_bytes
        if gap <= 0:
            return f"fits in the budget of {format_bytes(budget_bytes)}, {format_bytes(-gap)} to spare"
        return (f"does NOT fit in the budget of {format_bytes(budget_bytes)}: {format_bytes(gap)} over "
                f"({self.peak_bytes / budget_bytes:.1f}x the budget)")


def _env_bytes(name, default):
    value = os.environ.get(name)
    return default if value is None else parse_bytes(value)


def _overheads(spec, tensor_peak, cuda_context_bytes, cublas_workspace_bytes, allocator_margin):
    if spec.device_kind != "cuda":
        return {}
    ctx = _env_bytes("LEANFIT_CUDA_CONTEXT", CUDA_CONTEXT_BYTES) if cuda_context_bytes is None else cuda_context_bytes
    margin = float(os.environ.get("LEANFIT_ALLOCATOR_MARGIN", ALLOCATOR_MARGIN)) if allocator_margin is None \
        else allocator_margin
    cublas = CUBLAS_WORKSPACE_BYTES if cublas_workspace_bytes is None else cublas_workspace_bytes
    return {"cublas_workspace": cublas, "allocator_margin": int(margin * tensor_peak), "cuda_context": ctx}


def estimate_step(spec=None, *, cuda_context_bytes=None, cublas_workspace_bytes=None, allocator_margin=None,
                  top=5, **kwargs):
    """Traces one training step of `spec` (a StepConfig, or its fields as keyword arguments) on `meta`.

    Args:
        spec: the step to estimate; `spec.model` is a built-in architecture, a local dir or a cached hub id (or a
            config object).
        cuda_context_bytes, cublas_workspace_bytes, allocator_margin: override the documented constants.
        top: how many modules to list by the activation memory they keep.

    Returns:
        An `Estimate`; `estimate.peak_bytes` is what must fit on the device.

    Example:
        >>> est = estimate_step(model="gpt2", batch_size=24, block_size=1024, loss_impl="chunked")
        >>> print(est.table(budget_bytes=parse_bytes("15GiB")))
    """
    spec = (spec or StepConfig(**kwargs)).validate()
    traced = trace_fsdp_step(spec) if spec.parallel == "fsdp2" else trace_step(spec, top=top)
    tensor_peak = sum(traced["breakdown"].values())
    extra = _overheads(spec, tensor_peak, cuda_context_bytes, cublas_workspace_bytes, allocator_margin)
    breakdown = {**traced["breakdown"], **extra}
    allocated = tensor_peak + extra.get("cublas_workspace", 0)
    return Estimate(spec, sum(breakdown.values()), tensor_peak, allocated, breakdown, traced["top_modules"],
                    traced["n_params"], traced["n_trainable"], traced["attention"])
