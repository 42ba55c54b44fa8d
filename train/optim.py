"""The one optimizer factory: what fine-tuning steps with, and what the memory estimate traces.

Weight decay applies to matrices (dim >= 2) only. On CUDA the fused kernels, on the CPU the foreach ones.
`adamw8bit` is bitsandbytes' `AdamW8bit` (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"):
both moments of a parameter of 4,096 elements or more in uint8, with one fp32 absmax per 256 of them; smaller
parameters keep fp32 moments. It runs on CUDA and, through bitsandbytes' PyTorch fallback, on the CPU and on `meta`.
`traced=True` gives the version the estimate runs on `meta`, where fused kernels do not exist: the
single-tensor loop stands in for fused (both hold only one parameter's temporaries at a time, where foreach
would hold a temporary as large as all the optimizer state).
"""

import torch

from .model.quant import import_bitsandbytes
from .optim_backward import OptimizerInBackward

__all__ = ["OPTIMIZERS", "make_optimizer"]

OPTIMIZERS = ("adamw", "adam", "sgd", "adamw8bit")


def _build(name, groups, lr, betas, kind):
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **kind)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, **kind)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, **kind)
    if name == "adamw8bit":
        return import_bitsandbytes().optim.AdamW8bit(groups, lr=lr, betas=betas)
    raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, given {name!r}")


def make_optimizer(model: torch.nn.Module, name: str = "adamw", device_kind: str = "cpu", *, lr: float = 1e-4,
                   weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), in_backward: bool = False,
                   traced: bool = False):
    """The optimizer over `model`'s trainable parameters.

    Args:
        name: one of `OPTIMIZERS`.
        device_kind: "cuda" or "cpu": which kernels the step uses.
        in_backward: an `OptimizerInBackward` (one optimizer per parameter, stepped in the backward).
        traced: the stand-in for tracing on `meta` (see the module doc).
    Example:
        >>> opt = make_optimizer(model, "adamw", "cuda", lr=1e-4, weight_decay=0.01)
    """
    if device_kind == "cuda":
        kind = {"foreach": False} if traced else {"fused": True}
    else:
        kind = {"foreach": True}

    def groups(params):
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
                if g["params"]]

    if in_backward:
        return OptimizerInBackward(model, lambda ps: _build(name, groups(ps), lr, betas, kind))
    return _build(name, groups([p for p in model.parameters() if p.requires_grad]), lr, betas, kind)
