# B batch, T block (tokens), V vocab, C hidden width
"""Pre-flight memory estimate: one whole training step traced on the `meta` device with MemTracker.

The model is built from its config under `torch.device("meta")` (no weights, no GPU). The optimizer state is
created first (a step on zero gradients), so the traced step is a steady-state one; then the forward, the loss
(`train.lm_loss.causal_lm_loss`), the backward and the optimizer step run under
`torch.distributed._tools.mem_tracker.MemTracker`, whose peak snapshot splits the tensor memory into
parameters, gradients, optimizer state, activations and temporaries. See `train/meta_trace.py` for the
stand-ins (fused attention, autocast, unpacked sequences) that make `meta` allocate like the target device.

Added on top, for CUDA, what the allocator's tensors do not show:
- `CUBLAS_WORKSPACE_BYTES`: PyTorch gives each cuBLAS handle a workspace from the caching allocator, 32 MiB
  on Hopper and newer, 4 MiB on large Ampere, 1 MiB otherwise (pytorch/pytorch#120925, CUBLASLT_WORKSPACE_SIZE
  and CUBLAS_WORKSPACE_CONFIG override it). Handles are per thread, and the backward runs on autograd's
  device thread, so two are counted. It is allocator memory: it shows in `max_memory_allocated`.
- `CUDA_CONTEXT_BYTES`: the driver context and loaded kernels, outside the allocator (visible only in
  `torch.cuda.mem_get_info`). 512 MiB is a typical figure with lazy module loading (CUDA_MODULE_LOADING=LAZY,
  the default since CUDA 11.7 per the CUDA C Programming Guide, "Lazy Loading"); bench/gpu_capped_runs.py
  measures it on the card. Override with `--cuda-context` or LEANFIT_CUDA_CONTEXT.
- `ALLOCATOR_MARGIN`: reserved-minus-allocated (block rounding and fragmentation), as a fraction of the
  tensor peak. Override with `--allocator-margin` or LEANFIT_ALLOCATOR_MARGIN.
"""

import argparse
import contextlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field

MiB = 1 << 20
GiB = 1 << 30
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB
CUDA_CONTEXT_BYTES = 512 * MiB
ALLOCATOR_MARGIN = 0.05

DTYPES = ("float32", "bfloat16", "float16")
LOSS_IMPLS = ("naive", "chunked")
OPTIMIZERS = ("adamw", "adam", "sgd")
DEVICE_KINDS = ("cuda", "cpu")
ATTN_IMPLS = ("sdpa", "eager")
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": MiB,
          "GIB": GiB, "TIB": 1 << 40}


def parse_bytes(text):
    """Parses a size such as "15GiB", "14.75GiB", "800MiB", "16GB" or "1024" (bytes) into an int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS and unit != "":
        raise ValueError(f"expected a size like 15GiB, 800MiB or 16GB, given {text!r}")
    return int(float(m.group(1)) * _UNITS.get(unit, 1))


def format_bytes(n):
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


@dataclass
class StepConfig:
    """One training step to estimate. `batch_size` is the micro-batch; tokens per step = batch_size * block_size."""

    model: str = "gpt2"
    batch_size: int = 8
    block_size: int = 1024
    dtype: str = "float32"  # parameter dtype
    autocast: str | None = None  # None, "bfloat16" or "float16"
    grad_checkpointing: bool = False
    loss_impl: str = "naive"
    optimizer: str = "adamw"
    optimizer_in_backward: bool = False
    device_kind: str = "cuda"
    attn_implementation: str = "sdpa"

    def validate(self):
        for name, allowed in (("dtype", DTYPES), ("loss_impl", LOSS_IMPLS), ("optimizer", OPTIMIZERS),
                              ("device_kind", DEVICE_KINDS), ("attn_implementation", ATTN_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, given {getattr(self, name)!r}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast: expected None, 'bfloat16' or 'float16', given {self.autocast!r}")
        for name in ("batch_size", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, given {getattr(self, name)!r}")
        if self.block_size < 2:
            raise ValueError(f"block_size: expected at least 2 tokens, given {self.block_size}")
        return self


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
        lines = [
            f"model {c.model}: {self.n_params / 1e6:.1f}M params, micro-batch {c.batch_size} x {c.block_size} "
            f"tokens, {c.dtype}" + (f" + autocast {c.autocast}" if c.autocast else "")
            + f", loss {c.loss_impl}, {c.optimizer}" + (" in backward" if c.optimizer_in_backward else "")
            + (", grad checkpointing" if c.grad_checkpointing else "") + f", {c.device_kind}",
            f"  {'part':<18}{'bytes':>14}  share",
        ]
        for name, n in self.breakdown.items():
            lines.append(f"  {name:<18}{format_bytes(n):>14}  {100 * n / max(self.peak_bytes, 1):5.1f}%")
        lines.append(f"  {'predicted peak':<18}{format_bytes(self.peak_bytes):>14}")
        if self.top_modules:
            lines.append("  activations kept by module: " + ", ".join(
                f"{name} {format_bytes(n)}" for name, n in self.top_modules))
        if budget_bytes is not None:
            verdict = "fits" if self.fits(budget_bytes) else "does NOT fit"
            lines.append(f"  {verdict} in the budget of {format_bytes(budget_bytes)}")
        return "\n".join(lines)


def _env_bytes(name, default):
    value = os.environ.get(name)
    return default if value is None else parse_bytes(value)


def _overheads(cfg, tensor_peak, cuda_context_bytes, cublas_workspace_bytes, allocator_margin):
    if cfg.device_kind != "cuda":
        return {}
    ctx = _env_bytes("LEANFIT_CUDA_CONTEXT", CUDA_CONTEXT_BYTES) if cuda_context_bytes is None else cuda_context_bytes
    margin = float(os.environ.get("LEANFIT_ALLOCATOR_MARGIN", ALLOCATOR_MARGIN)) if allocator_margin is None \
        else allocator_margin
    cublas = CUBLAS_WORKSPACE_BYTES if cublas_workspace_bytes is None else cublas_workspace_bytes
    return {"cublas_workspace": cublas, "allocator_margin": int(margin * tensor_peak), "cuda_context": ctx}


def estimate_step(cfg=None, *, cuda_context_bytes=None, cublas_workspace_bytes=None, allocator_margin=None,
                  top=5, **kwargs):
    """Traces one training step of `cfg` (a StepConfig, or its fields as keyword arguments) on `meta`.

    Args:
        cfg: the step to estimate; `cfg.model` is a preset, a local dir or a cached hub id (or a config).
        cuda_context_bytes, cublas_workspace_bytes, allocator_margin: override the documented constants.
        top: how many modules to list by the activation memory they keep.

    Returns:
        An `Estimate`; `estimate.peak_bytes` is what must fit on the device.

    Example:
        >>> est = estimate_step(model="gpt2", batch_size=24, block_size=1024, loss_impl="chunked")
        >>> print(est.table(budget_bytes=parse_bytes("15GiB")))
    """
    from .step_trace import trace_step

    cfg = (cfg or StepConfig(**kwargs)).validate()
    traced = trace_step(cfg, top=top)
    tensor_peak = sum(traced["breakdown"].values())
    extra = _overheads(cfg, tensor_peak, cuda_context_bytes, cublas_workspace_bytes, allocator_margin)
    breakdown = {**traced["breakdown"], **extra}
    allocated = tensor_peak + extra.get("cublas_workspace", 0)
    return Estimate(cfg, sum(breakdown.values()), tensor_peak, allocated, breakdown, traced["top_modules"],
                    traced["n_params"])


def _parser():
    p = argparse.ArgumentParser(prog="leanfit estimate", description="Predict a training step's peak memory "
                                "(traced on the meta device: no weights, no GPU).")
    p.add_argument("--model", default="gpt2", help="preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                   "smollm2-135m), local dir, or hub id with a cached config")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size (sequences)")
    p.add_argument("--block-size", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype")
    p.add_argument("--autocast", default=None, choices=("bfloat16", "float16"))
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--loss", dest="loss_impl", default="naive", choices=LOSS_IMPLS)
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--optimizer-in-backward", action="store_true")
    p.add_argument("--device", dest="device_kind", default="cuda", choices=DEVICE_KINDS)
    p.add_argument("--attn", dest="attn_implementation", default="sdpa", choices=ATTN_IMPLS)
    p.add_argument("--memory-budget", default=None, help="e.g. 15GiB, 14.75GiB, 800MiB, 16GB")
    p.add_argument("--choose", action="store_true", help="choose the settings that fit --memory-budget, "
                   "keeping batch-size x block-size tokens per optimizer step")
    p.add_argument("--no-optimizer-in-backward", dest="allow_oib", action="store_false",
                   help="with --choose: never step in the backward (keeps gradient accumulation and clipping)")
    p.add_argument("--cuda-context", default=None, help=f"CUDA context size (default {CUDA_CONTEXT_BYTES // MiB}MiB)")
    p.add_argument("--allocator-margin", type=float, default=None,
                   help=f"fraction added for allocator rounding and fragmentation (default {ALLOCATOR_MARGIN})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


class _ArgError(Exception):
    pass


def main(argv=None):
    parser = _parser()
    parser.error = lambda message: (_ for _ in ()).throw(_ArgError(message))
    try:
        args = parser.parse_args(argv)
        budget = None if args.memory_budget is None else parse_bytes(args.memory_budget)
        context = None if args.cuda_context is None else parse_bytes(args.cuda_context)
        fields = {k: getattr(args, k) for k in StepConfig.__dataclass_fields__}
        overrides = {"cuda_context_bytes": context, "allocator_margin": args.allocator_margin}
        if args.choose:
            return _choose(args, fields, budget, overrides)
        from .presets import load_config

        load_config(args.model)
        est = estimate_step(StepConfig(**fields), **overrides)
    except (_ArgError, ValueError) as e:
        print(f"leanfit estimate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(budget)) if args.json else est.table(budget))
    return 0


def _choose(args, fields, budget, overrides):
    from .budget import NothingFits, choose_config

    if budget is None:
        raise ValueError("--choose: expected --memory-budget, given none")
    try:
        choice = choose_config(args.model, args.batch_size * args.block_size, args.block_size, budget,
                               device_kind=args.device_kind, optimizer=args.optimizer,
                               allow_optimizer_in_backward=args.allow_oib, estimate_kwargs=overrides)
    except NothingFits as e:
        print(json.dumps(e.to_dict()) if args.json else e.estimate.table(budget), file=sys.stdout)
        print(f"leanfit estimate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(choice.to_dict()) if args.json else choice.describe())
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
