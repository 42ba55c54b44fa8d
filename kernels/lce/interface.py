# N tokens, B batch, T time, H hidden, V vocab
"""Linear cross-entropy that never materializes the (N, V) logits: input checks and dispatch.

`linear_cross_entropy(h, W, y)` equals `F.cross_entropy(F.linear(h, W, b), y)` in value and in the gradients
of `h`, `W` and `b`. `impl="chunked"` (kernels/lce/chunked.py) is plain PyTorch on any device;
`impl="triton"` (kernels/lce/fused.py) keeps each logits tile on chip; `impl="hybrid"` (kernels/lce/hybrid.py)
runs cuBLAS products around one Triton kernel per chunk of rows. See kernels/LCE.md.
"""

import os
from dataclasses import replace

import torch

from .chunked import ChunkedLCEFunction, LCEOptions, default_chunk_size, no_autocast

__all__ = ["linear_cross_entropy", "IMPLS"]

_REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "chunked", "triton", "hybrid")
ACCUMULATE = ("param", "fp32")


def _check(cond: bool, expected: str, given) -> None:
    if not cond:
        raise ValueError(f"linear_cross_entropy: expected {expected}, given {given}")


def _validate(hidden, weight, target, bias, reduction, label_smoothing, softcap, num_items, chunk_size, impl,
              accumulate):
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        _check(torch.is_tensor(t), f"{name} to be a torch.Tensor", type(t).__name__)
    _check(hidden.dim() in (2, 3), "hidden of shape (N, H) or (B, T, H)", f"shape {tuple(hidden.shape)}")
    _check(weight.dim() == 2, "weight of shape (V, H)", f"shape {tuple(weight.shape)}")
    _check(
        hidden.shape[-1] == weight.shape[1],
        f"hidden's last dim to equal weight's H={weight.shape[1]}",
        f"hidden shape {tuple(hidden.shape)}",
    )
    _check(
        tuple(target.shape) == tuple(hidden.shape[:-1]),
        f"target of shape {tuple(hidden.shape[:-1])}",
        f"shape {tuple(target.shape)}",
    )
    _check(hidden.is_floating_point(), "a floating-point hidden", hidden.dtype)
    _check(weight.dtype == hidden.dtype, f"weight dtype {hidden.dtype} (same as hidden)", weight.dtype)
    _check(not target.is_floating_point() and not target.is_complex(), "an integer target", target.dtype)
    _check(weight.device == hidden.device, f"weight on {hidden.device} (same as hidden)", weight.device)
    _check(target.device == hidden.device, f"target on {hidden.device} (same as hidden)", target.device)
    if bias is not None:
        _check(torch.is_tensor(bias), "bias to be a torch.Tensor or None", type(bias).__name__)
        _check(tuple(bias.shape) == (weight.shape[0],), f"bias of shape ({weight.shape[0]},)", tuple(bias.shape))
        _check(bias.dtype == hidden.dtype, f"bias dtype {hidden.dtype} (same as hidden)", bias.dtype)
        _check(bias.device == hidden.device, f"bias on {hidden.device} (same as hidden)", bias.device)
    _check(reduction in _REDUCTIONS, f"reduction in {_REDUCTIONS}", repr(reduction))
    _check(0.0 <= float(label_smoothing) <= 1.0, "label_smoothing in [0, 1]", label_smoothing)
    _check(softcap is None or float(softcap) > 0, "softcap None or > 0", softcap)
    if num_items is not None:
        _check(reduction != "none", "num_items only with reduction 'mean' or 'sum'", f"reduction={reduction!r}")
        n = num_items if not torch.is_tensor(num_items) else None
        _check(n is None or float(n) > 0, "num_items > 0", num_items)
    _check(
        chunk_size is None or (isinstance(chunk_size, int) and chunk_size > 0),
        "chunk_size None or a positive int",
        chunk_size,
    )
    _check(impl in IMPLS, f"impl in {IMPLS}", repr(impl))
    _check(accumulate in ACCUMULATE, f"accumulate in {ACCUMULATE}", repr(accumulate))


def _check_targets(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        first = target[bad][0].item()
        raise ValueError(
            f"linear_cross_entropy: expected target values in [0, {vocab}) or ignore_index={ignore_index}, "
            f"given {first}"
        )


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl == "auto":
        return "hybrid" if device.type == "cuda" and dtype in _TRITON_DTYPES else "chunked"
    if impl in ("triton", "hybrid") and dtype not in _TRITON_DTYPES:
        raise ValueError(
            f"linear_cross_entropy: expected a dtype in {_TRITON_DTYPES} for impl={impl!r}, given {dtype}"
        )
    if impl in ("triton", "hybrid") and device.type not in ("cuda", "meta") \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"linear_cross_entropy: expected a CUDA tensor (or TRITON_INTERPRET=1) for impl={impl!r}, "
            f"given a tensor on {device}"
        )
    return impl


def _hybrid(flat_h, weight, bias, flat_t, divisor, opts, need, chunk_size):
    """The hybrid path on the valid rows (autograd scatters d_hidden back to the ignored rows' zeros)."""
    from .hybrid import HybridLCEFunction, hybrid_chunk_rows  # deferred: importing Triton is slow and CUDA-only

    if not opts.all_targets_valid:
        keep = (flat_t != opts.ignore_index).nonzero().squeeze(1)
        if keep.numel() != flat_t.numel():
            flat_h, flat_t = flat_h.index_select(0, keep), flat_t.index_select(0, keep)
    rows = chunk_size or hybrid_chunk_rows(max(1, flat_t.numel()), weight.shape[1], weight.shape[0])
    return HybridLCEFunction.apply(flat_h, weight, bias, flat_t, divisor, replace(opts, chunk_size=rows), need)


def _autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype autocast would run `F.linear` in for fp32 inputs on `device`, or None (not autocasting)."""
    if dtype != torch.float32 or device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    cast = torch.get_autocast_dtype(device.type)
    return cast if cast in (torch.bfloat16, torch.float16) else None


def linear_cross_entropy(
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
    impl: str = "auto",
    all_targets_valid: bool = False,
    accumulate: str = "param",
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `target`, without holding the (N, V) logits.

    Same value and gradients (hidden, weight, bias) as
    `F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=..., reduction=...,
    label_smoothing=...)`, with the logits first passed through `softcap * tanh(logits / softcap)` when
    `softcap` is set (Gemma-2 style).

    Args:
        hidden: final hidden states, (N, H) or (B, T, H); fp32, bf16, fp16 or fp64.
        weight: output embedding, (V, H), same dtype and device as hidden. A weight tied to the token
            embedding receives its gradient like any other use of the parameter.
        target: class indices, (N,) or (B, T); values in [0, V) or `ignore_index`.
        bias: optional (V,) output bias.
        ignore_index: targets equal to it add nothing to the loss, the count or the gradients.
        reduction: "mean" (over non-ignored rows), "sum", or "none" (loss per row, 0 where ignored,
            shaped like target). As in torch, "mean" with every row ignored returns nan (0 / 0) and
            zero gradients.
        label_smoothing: as in F.cross_entropy, in [0, 1].
        softcap: if set (> 0), logits become softcap * tanh(logits / softcap) before the softmax.
        num_items: if set, returns the sum divided by num_items (a global count of non-ignored tokens),
            so micro-batches accumulate to the full-batch mean. Not allowed with reduction="none".
        chunk_size: rows per chunk for the chunked path; default: a chunk's logits about the size of
            hidden (see `default_chunk_size`).
        impl: "chunked" (plain PyTorch, any dtype); "triton" (the fused kernel, every logits tile on chip:
            the least memory); "hybrid" (cuBLAS products around a Triton softmax-gradient kernel per chunk of
            rows, Liger-Kernel's design: the fastest on a GPU by LCE.md's model); both fp32/bf16/fp16 on CUDA,
            or the interpreter with TRITON_INTERPRET=1; "auto": hybrid on CUDA, chunked otherwise or for fp64.
            `reduction="none"` runs the chunked path in hybrid's place.
        all_targets_valid: the caller promises every target is in [0, V), none `ignore_index`; the two scans
            of the targets that need their values on the host (the range check, the ignored-row count) are
            skipped. It lets the loss run on `meta` tensors (the memory estimate) and saves a device sync.
        accumulate: the dtype dW is summed in across row chunks (chunked) or row tiles (Triton): "param",
            the weight's own dtype, as Cut Cross-Entropy and Liger do, so that a bf16 head needs no fp32
            copy of its gradient (twice W's size); or "fp32" (fp64 stays fp64), more exact and that much
            larger. dh and db are summed in fp32 either way.

    Under autocast (fp32 inputs, `torch.autocast` on with bf16 or fp16), the products run in the autocast
    dtype with fp32 accumulation, as `F.linear` does there; the log-sum-exp and the loss stay fp32, and dW is
    summed in fp32 (the fp32 parameter's own dtype) before the one rounding that `F.linear`'s dW also gets.

    Returns:
        A 0-dim tensor for "mean"/"sum", else a tensor shaped like target; in fp32 (fp64 for fp64 inputs), as
        HF's upcast loss, Liger and CCE return it: a 16-bit loss would round a value near 10 to 0.03-0.06 nats.
        The gradients keep the inputs' dtypes.

    Example:
        >>> h = torch.randn(8, 16, requires_grad=True)
        >>> w = torch.randn(100, 16, requires_grad=True)
        >>> y = torch.randint(0, 100, (8,))
        >>> linear_cross_entropy(h, w, y).backward()
    """
    _validate(hidden, weight, target, bias, reduction, label_smoothing, softcap, num_items, chunk_size, impl,
              accumulate)
    cast = _autocast_dtype(hidden.device, hidden.dtype)
    if cast is not None and weight.dtype == torch.float32:
        hidden, weight = hidden.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
        accumulate = "fp32"
    vocab, width = weight.shape
    flat_h = hidden.reshape(-1, width)
    flat_t = target.reshape(-1).long()
    if not all_targets_valid:
        _check_targets(flat_t, vocab, ignore_index)
    n = flat_h.shape[0]
    opts = LCEOptions(
        ignore_index=int(ignore_index),
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        softcap=None if softcap is None else float(softcap),
        chunk_size=chunk_size or default_chunk_size(max(n, 1), width, vocab, weight.element_size(), hidden.is_cuda),
        all_targets_valid=bool(all_targets_valid),
        accumulate=accumulate,
    )
    divisor = None
    if num_items is not None:
        divisor = num_items
    elif reduction == "mean":
        divisor = (flat_t != ignore_index).sum()
    grad_on = torch.is_grad_enabled()
    need = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    resolved = _resolve_impl(impl, hidden.device, hidden.dtype)
    if resolved == "hybrid" and reduction == "none":
        resolved = "chunked"  # per-row losses: their upstream weights come after the forward that forms grads
    fn = ChunkedLCEFunction
    if resolved == "triton":
        from .fused import TritonLCEFunction as fn  # deferred: importing Triton is slow and CUDA-only
    with no_autocast(hidden.device):
        if resolved == "hybrid":
            return _hybrid(flat_h, weight, bias, flat_t, divisor, opts, need, chunk_size)
        out = fn.apply(flat_h, weight, bias, flat_t, divisor, opts, need)
    return out.reshape(target.shape) if reduction == "none" else out
