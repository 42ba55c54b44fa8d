# N tokens, H hidden, V vocab
"""The reference linear cross-entropy: the whole (N, V) logits, then `F.cross_entropy`.

Same signature and results as `linear_cross_entropy`; the fast paths are checked against it. The logits
and the loss are computed and returned in fp32 (fp64 for fp64 inputs); the gradients keep the inputs' dtypes.
It holds N * V logits (and as much again for their gradient), which is what the fast paths avoid.
"""

import torch
import torch.nn.functional as F

__all__ = ["naive_linear_cross_entropy"]


def naive_linear_cross_entropy(
    hidden: torch.Tensor,  # (N, H) or (B, T, H)
    weight: torch.Tensor,  # (V, H)
    target: torch.Tensor,  # (N,) or (B, T)
    *,
    bias: torch.Tensor | None = None,  # (V,)
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    num_items: int | float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "naive",
    all_targets_valid: bool = False,
    accumulate: str = "param",
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight, bias), target, ...)` with `linear_cross_entropy`'s arguments.

    `chunk_size`, `impl`, `all_targets_valid` and `accumulate` are accepted so that either function can be called in the
    other's place; they change nothing here. See `leanfit.kernels.linear_cross_entropy` for the rest.

    Example:
        >>> naive_linear_cross_entropy(torch.randn(8, 16), torch.randn(100, 16), torch.randint(0, 100, (8,)))
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = F.linear(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    logits = logits.float() if acc == torch.float32 else logits
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    red = "sum" if num_items is not None else reduction
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                           reduction=red, label_smoothing=label_smoothing)
    if num_items is not None:
        loss = loss / num_items
    return loss.reshape(target.shape) if red == "none" else loss
