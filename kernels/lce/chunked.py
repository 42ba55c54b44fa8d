# N tokens, H hidden, V vocab, C chunk rows
"""Chunked linear cross-entropy in plain PyTorch: the (N, V) logits never exist at once.

For a row with pre-activation y = h W^T + b, logits z = s tanh(y / s) (or z = y without a softcap s),
target t and label smoothing e:

    loss = lse(z) - (1 - e) z_t - (e / V) sum_j z_j
    dloss/dz = softmax(z) - (1 - e) onehot(t) - e / V
    dz/dy = 1 - (z / s)^2
    dh = dy W,   dW = sum_rows dy^T h,   db = sum_rows dy

Rows are processed C at a time; the log-sum-exp is taken in fp32 (fp64 for fp64 inputs), db accumulates in
that dtype and dW in the weight's dtype (`accumulate="param"`) or that one ("fp32"). Rows whose target is
`ignore_index` are dropped before any matmul.

16-bit logits come from two 16-bit products: y1 = h W^T rounded to 16 bits, then the residual
h W^T - y1 (addmm with beta=-1, which adds in fp32 before rounding), so y1 + residual carries about 16
more bits than y1. One fp32 product would be exact but is several times slower on CPUs with bf16
instructions; y1 alone is what `F.linear` gives the naive path, and its rounding (|y| 2^-9 for bf16)
dominated the error of the loss and of dW.

For `mean`/`sum` with gradients wanted, the forward already forms dh, dW, db (unscaled) while each
chunk's logits are at hand, so the backward is a single in-place scale. For `none` the forward keeps
only the per-row log-sum-exp and the backward recomputes each chunk's logits.
"""

import contextlib
import math
from dataclasses import dataclass

import torch

__all__ = ["ChunkedLCEFunction", "default_chunk_size"]


@dataclass(frozen=True)
class LCEOptions:
    ignore_index: int
    reduction: str
    label_smoothing: float
    softcap: float | None
    chunk_size: int
    all_targets_valid: bool = False
    accumulate: str = "param"


def no_autocast(device: torch.device):
    """The paths pick their own precisions; autocast would recast their fp32 buffers."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


MIN_CHUNK_ROWS = 256
# For 16-bit weights a chunk's fp32 logits may take at most this fraction of W's bytes. The chunk's other
# buffers are a 16-bit copy of them (half as much again) and, with a softcap, fp32 tanh values (as much
# again), so the memory above the inputs and their gradients stays under 10% of W.
CHUNK_LOGITS_OF_W = 1 / 32
# ... but never fewer rows than this: a narrow head's W is small, and each chunk adds one rounding to dW.
MIN_CAPPED_ROWS = 32


def default_chunk_size(n_rows: int, hidden: int, vocab: int, weight_bytes: int = 4, cuda: bool = False) -> int:
    """Rows per chunk so that a chunk's (C, V) logits take about as many elements as the (N, H) hidden,
    but at least `MIN_CHUNK_ROWS`: each chunk reads and writes the whole dW (V, H), so a thinner chunk
    turns the weight-gradient product into memory traffic (2 C FLOPs per 8 bytes). On the CPU, for 16-bit
    weights (`weight_bytes` < 4) memory comes first: the chunk's fp32 logits stay within `CHUNK_LOGITS_OF_W`
    of W's bytes, which at a large vocabulary (Gemma-2: H=2304, V=256,000) means 32 rows, not 256. On CUDA
    speed comes first: 32-row chunks made the dW product of the first GPU run 15-57x slower than the naive
    loop (LCE.md, "Time and memory model")."""
    rows = max(1, math.ceil(n_rows * hidden / vocab))
    rows = max(1 << (rows - 1).bit_length(), MIN_CHUNK_ROWS)
    if weight_bytes < 4 and not cuda:
        cap = max(MIN_CAPPED_ROWS, int(hidden * weight_bytes * CHUNK_LOGITS_OF_W / 4))
        rows = min(rows, 1 << (cap.bit_length() - 1))
    return max(1, min(n_rows, rows))


def acc_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dw_dtype_for(weight_dtype: torch.dtype, accumulate: str) -> torch.dtype:
    """The dtype dW is summed in: the weight's own ("param"), or at least fp32 ("fp32")."""
    return weight_dtype if accumulate == "param" else acc_dtype_for(weight_dtype)


def _chunk_logits(
    h: torch.Tensor,  # (C, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    out: torch.Tensor,  # (C, V) acc dtype
    softcap: float | None,
    tanh_out: torch.Tensor | None,  # (C, V) acc dtype, filled with tanh(y / s) when softcap is set
) -> torch.Tensor:
    if h.dtype == out.dtype:
        if bias is None:
            torch.mm(h, weight.t(), out=out)
        else:
            torch.addmm(bias, h, weight.t(), out=out)
    else:
        low = torch.mm(h, weight.t())
        out.copy_(low)
        out.add_(low.addmm_(h, weight.t(), beta=-1))
        if bias is not None:
            out.add_(bias)
    if softcap is not None:
        torch.div(out, softcap, out=tanh_out).tanh_()
        torch.mul(tanh_out, softcap, out=out)
    return out


def _softmax_stats(
    z: torch.Tensor,  # (C, V), overwritten with softmax(z)
    tgt: torch.Tensor,  # (C,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turns z into softmax(z) in place; returns the per-row loss and log-sum-exp."""
    z_t = z.gather(1, tgt[:, None]).squeeze(1)
    z_mean = z.mean(1) if eps else None
    m = z.amax(1, keepdim=True)
    z.sub_(m).exp_()
    s = z.sum(1, keepdim=True)
    z.div_(s)
    lse = (m + s.log()).squeeze(1)
    loss = lse - z_t if not eps else lse - (1 - eps) * z_t - eps * z_mean
    return loss, lse


def _logit_grad_(
    p: torch.Tensor,  # (C, V) softmax, overwritten with dloss/dy
    tgt: torch.Tensor,  # (C,)
    eps: float,
    tanh_z: torch.Tensor | None,  # (C, V) tanh(y / s), overwritten
) -> torch.Tensor:
    p.scatter_add_(1, tgt[:, None], torch.full_like(p[:, :1], -(1.0 - eps)))
    if eps:
        p.sub_(eps / p.shape[1])
    if tanh_z is not None:
        p.mul_(tanh_z.square_().neg_().add_(1.0))
    return p


# On the CPU a 16-bit dW takes each chunk's product g^T h in fp32 slices of this fraction of its rows, rounded
# once when added: the fp32 slice is 1/32 of W's bytes, and g is not rounded to 16 bits first. On CUDA it is one
# 16-bit product per chunk (g rounded to 16 bits, fp32 accumulation, one rounding when added, as Liger does):
# the 64 slices of each chunk were a launch storm there.
DW_SLICE_OF_W = 1 / 64


def _accumulate_grads(
    g: torch.Tensor,  # (C, V) acc dtype, dloss/dy
    h: torch.Tensor,  # (C, H)
    weight: torch.Tensor,  # (V, H)
    dh_out: torch.Tensor | None,  # (C, H) hidden dtype, written
    dw: torch.Tensor | None,  # (V, H) acc or weight dtype, accumulated
    db: torch.Tensor | None,  # (V,) acc dtype, accumulated
):
    if db is not None:
        db.add_(g.sum(0))
    if dh_out is not None:
        torch.mm(g if g.dtype == weight.dtype else g.to(weight.dtype), weight, out=dh_out)
    if dw is None:
        return
    if dw.dtype == h.dtype and h.is_cuda:
        dw.addmm_(g.to(h.dtype).t(), h)
        return
    h_acc = h if h.dtype == g.dtype else h.to(g.dtype)
    if dw.dtype == g.dtype:
        dw.addmm_(g.t(), h_acc)
        return
    step = max(1, math.ceil(dw.shape[0] * DW_SLICE_OF_W))
    for v0 in range(0, dw.shape[0], step):
        dw[v0 : v0 + step].add_(torch.mm(g[:, v0 : v0 + step].t(), h_acc))


def _row_chunks(n_valid: int, chunk: int):
    for start in range(0, n_valid, chunk):
        yield start, min(start + chunk, n_valid)


def _rows(idx: torch.Tensor | None, a: int, b: int):
    return slice(a, b) if idx is None else idx[a:b]


def _take(x: torch.Tensor, idx: torch.Tensor | None, a: int, b: int) -> torch.Tensor:
    return x[a:b] if idx is None else x.index_select(0, idx[a:b])


def _dh_slot(dh: torch.Tensor | None, idx: torch.Tensor | None, a: int, b: int, h: torch.Tensor):
    if dh is None:
        return None
    return dh[a:b] if idx is None else torch.empty_like(h)


def _valid_rows(target: torch.Tensor, opts: LCEOptions) -> tuple[torch.Tensor | None, int]:
    if opts.all_targets_valid:
        return None, target.numel()
    valid = target != opts.ignore_index
    n_valid = int(valid.sum())
    if n_valid == target.numel():
        return None, n_valid
    return valid.nonzero().squeeze(1), n_valid


def chunked_forward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,)
    opts: LCEOptions,
    need: tuple[bool, bool, bool],
):
    """Per-row losses (N,) or their sum, and the unscaled grads of hidden, weight, bias where `need` says."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype_for(hidden.dtype)
    idx, n_valid = _valid_rows(target, opts)
    chunk = min(opts.chunk_size, max(n_valid, 1))
    buf = hidden.new_empty((chunk, v), dtype=acc)
    tanh_buf = torch.empty_like(buf) if opts.softcap is not None else None
    dh = None
    if need[0]:
        dh = torch.empty_like(hidden) if idx is None else torch.zeros_like(hidden)
    dw = torch.zeros(weight.shape, dtype=dw_dtype_for(weight.dtype, opts.accumulate), device=weight.device) \
        if need[1] else None
    db = torch.zeros(v, dtype=acc, device=weight.device) if need[2] else None
    per_row = opts.reduction == "none"
    losses = hidden.new_zeros(n, dtype=acc) if per_row else None
    lses = hidden.new_zeros(n, dtype=acc) if per_row else None
    total = hidden.new_zeros((), dtype=acc)
    for a, b in _row_chunks(n_valid, chunk):
        h = _take(hidden, idx, a, b)
        tgt = _take(target, idx, a, b)
        tanh_c = None if tanh_buf is None else tanh_buf[: b - a]
        z = _chunk_logits(h, weight, bias, buf[: b - a], opts.softcap, tanh_c)
        loss, lse = _softmax_stats(z, tgt, opts.label_smoothing)
        if per_row:
            losses[_rows(idx, a, b)] = loss
            lses[_rows(idx, a, b)] = lse
        else:
            total += loss.sum()
        if any(need):
            g = _logit_grad_(z, tgt, opts.label_smoothing, tanh_c)
            dh_c = _dh_slot(dh, idx, a, b, h)
            _accumulate_grads(g, h, weight, dh_c, dw, db)
            if dh is not None and idx is not None:
                dh.index_copy_(0, idx[a:b], dh_c)
    return (losses if per_row else total), lses, n_valid, (dh, dw, db)


def chunked_backward_none(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,)
    lse: torch.Tensor,  # (N,) acc dtype
    grad_rows: torch.Tensor,  # (N,) upstream gradient of each row's loss
    opts: LCEOptions,
    need: tuple[bool, bool, bool],
):
    """Recomputes each chunk's logits and returns (dh, dW, db) for `reduction="none"`."""
    v = weight.shape[0]
    acc = lse.dtype
    idx, n_valid = _valid_rows(target, opts)
    chunk = min(opts.chunk_size, max(n_valid, 1))
    buf = hidden.new_empty((chunk, v), dtype=acc)
    tanh_buf = torch.empty_like(buf) if opts.softcap is not None else None
    dh = torch.zeros_like(hidden) if need[0] else None
    dw = torch.zeros(weight.shape, dtype=dw_dtype_for(weight.dtype, opts.accumulate), device=weight.device) \
        if need[1] else None
    db = torch.zeros(v, dtype=acc, device=weight.device) if need[2] else None
    grad_rows = grad_rows.to(acc)
    for a, b in _row_chunks(n_valid, chunk):
        h = _take(hidden, idx, a, b)
        tgt = _take(target, idx, a, b)
        tanh_c = None if tanh_buf is None else tanh_buf[: b - a]
        z = _chunk_logits(h, weight, bias, buf[: b - a], opts.softcap, tanh_c)
        z.sub_(_take(lse, idx, a, b)[:, None]).exp_()
        g = _logit_grad_(z, tgt, opts.label_smoothing, tanh_c)
        g.mul_(_take(grad_rows, idx, a, b)[:, None])
        dh_c = _dh_slot(dh, idx, a, b, h)
        _accumulate_grads(g, h, weight, dh_c, dw, db)
        if dh is not None and idx is not None:
            dh.index_copy_(0, idx[a:b], dh_c)
    return dh, dw, db


class ChunkedLCEFunction(torch.autograd.Function):
    """Chunked linear cross-entropy on flat inputs; `divisor` turns the sum into a mean (None: plain sum)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, divisor, opts: LCEOptions, need: tuple[bool, bool, bool]):
        scalar = opts.reduction != "none"
        fwd_need = need if scalar else (False, False, False)
        loss, lse, _, grads = chunked_forward(hidden, weight, bias, target, opts, fwd_need)
        ctx.opts, ctx.need, ctx.consumed = opts, need, False
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if scalar:
            ctx.grads = grads
            ctx.divisor = divisor
            out = loss if divisor is None else loss / divisor
        else:
            ctx.save_for_backward(hidden, weight, bias, target, lse)
            out = loss
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with no_autocast(grad_out.device):
            return ChunkedLCEFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        opts, need = ctx.opts, ctx.need
        if opts.reduction == "none":
            hidden, weight, bias, target, lse = ctx.saved_tensors
            dh, dw, db = chunked_backward_none(hidden, weight, bias, target, lse, grad_out, opts, need)
            return dh, _cast(dw, ctx.dtypes[0]), _cast(db, ctx.dtypes[1]), None, None, None, None
        if ctx.consumed:
            raise RuntimeError(
                "linear_cross_entropy (chunked): backward ran twice; the gradients formed in the forward are "
                "scaled in place, so retain_graph=True is not supported for reduction='mean'/'sum'"
            )
        ctx.consumed = True
        dh, dw, db = ctx.grads
        ctx.grads = None
        acc = next(g.dtype for g in (dw, db, dh, grad_out) if g is not None)
        scale = grad_out.to(acc)
        if ctx.divisor is not None:
            d = _as_tensor(ctx.divisor, scale)
            scale = scale / torch.where(d == 0, torch.ones_like(d), d)
        for g in (dh, dw, db):
            if g is not None:
                g.mul_(scale)
        return dh, _cast(dw, ctx.dtypes[0]), _cast(db, ctx.dtypes[1]), None, None, None, None


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    return x.to(like) if torch.is_tensor(x) else torch.tensor(float(x), dtype=like.dtype, device=like.device)


def _cast(g: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return None if g is None else g.to(dtype)
