# N tokens, H hidden, V vocab, BN/BV/BH tile sizes along N/V/H
"""Fused linear cross-entropy in Triton: each (BN, BV) logits tile lives only in registers.

Forward: one program per BN rows walks the vocabulary in BV tiles, forms each tile with tl.dot over
H, and keeps an online log-sum-exp (running max m, running sum s rescaled by exp(m_old - m_new)), the
target logit and the logit sum (for label smoothing). It writes only the per-row loss and lse.

Backward (as in Cut Cross-Entropy): one program per (BN, BV) tile recomputes the logits, turns them
into dloss/dy with the saved lse (formulas in kernels/lce_chunked.py), and adds its share of
dh = g W and dW = g^T h (and db) into fp32 buffers with atomics. Inputs may be fp32, bf16 or fp16;
every dot accumulates in fp32. Under TRITON_INTERPRET=1, whose numpy tl.dot mishandles bf16 tiles,
bf16 tiles are widened to fp32 before each dot. V and H are compile-time constants (one compile per
head shape); N is not.
"""

import os

import torch
import triton
import triton.language as tl

from .lce_chunked import LCEOptions, no_autocast

__all__ = ["TritonLCEFunction", "lce_triton_forward", "lce_triton_backward"]

_DOT_PRECISION = {torch.float32: "ieee", torch.bfloat16: "tf32", torch.float16: "tf32"}


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H: tl.constexpr, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
                 BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    acc = tl.zeros([BN, BV], dtype=tl.float32)
    for k0 in range(0, H, BH):
        ks = k0 + tl.arange(0, BH)
        kmask = ks < H
        a = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * H + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        if DOT_F32:
            a, wt = a.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _lce_fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, loss_ptr, lse_ptr, N, V: tl.constexpr, H: tl.constexpr,
                    ignore_index, eps, softcap,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
                    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    y = tl.load(y_ptr + rows, mask=rmask, other=ignore_index)
    m = tl.full([BN], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BN], dtype=tl.float32)
    z_t = tl.zeros([BN], dtype=tl.float32)
    z_sum = tl.zeros([BN], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, softcap,
                         HAS_BIAS, HAS_SOFTCAP, PREC, DOT_F32, BN, BV, BH)
        z_t += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        z_sum += tl.sum(tl.where(cmask[None, :], z, 0.0), axis=1)
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    loss = lse - (1.0 - eps) * z_t - eps / V * z_sum
    valid = rmask & (y != ignore_index)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


@triton.jit
def _lce_bwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, gscale_ptr, dh_ptr, dw_ptr, db_ptr,
                    N, V: tl.constexpr, H: tl.constexpr, eps, softcap,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_DH: tl.constexpr,
                    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, PREC: tl.constexpr,
                    DOT_F32: tl.constexpr,
                    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    rmask = rows < N
    cmask = cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, softcap,
                     HAS_BIAS, HAS_SOFTCAP, PREC, DOT_F32, BN, BV, BH)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    gs = tl.load(gscale_ptr + rows, mask=rmask, other=0.0)
    g = tl.exp(z - lse[:, None]) - eps / V
    g = tl.where(cols[None, :] == y[:, None], g - (1.0 - eps), g)
    if HAS_SOFTCAP:
        zc = z / softcap
        g = g * (1.0 - zc * zc)
    g = tl.where(cmask[None, :] & rmask[:, None], g * gs[:, None], 0.0)
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=cmask)
    gd = g.to(h_ptr.dtype.element_ty)
    if DOT_F32:
        gd = gd.to(tl.float32)
    for k0 in range(0, H, BH):
        ks = k0 + tl.arange(0, BH)
        kmask = ks < H
        if NEED_DH:
            wk = tl.load(w_ptr + cols[:, None] * H + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            wk = wk.to(tl.float32) if DOT_F32 else wk
            part = tl.dot(gd, wk, input_precision=PREC)
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], part, mask=rmask[:, None] & kmask[None, :])
        if NEED_DW:
            hk = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            hk = hk.to(tl.float32) if DOT_F32 else hk
            part = tl.dot(tl.trans(gd), hk, input_precision=PREC)
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], part, mask=cmask[:, None] & kmask[None, :])


def _tiles(hidden: torch.Tensor) -> dict:
    if hidden.device.type != "cuda":
        return dict(BN=16, BV=64, BH=32)
    return dict(BN=64, BV=128, BH=64, num_warps=8, num_stages=2)


def _flags(bias, opts: LCEOptions, dtype) -> dict:
    dot_f32 = os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16
    prec = "ieee" if dot_f32 else _DOT_PRECISION[dtype]
    return dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None, PREC=prec, DOT_F32=dot_f32)


def lce_triton_forward(
    hidden: torch.Tensor,  # (N, H) contiguous
    weight: torch.Tensor,  # (V, H) contiguous
    bias: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64
    opts: LCEOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (N,) fp32, 0 where ignored, and per-row log-sum-exp (N,) fp32."""
    n, width = hidden.shape
    v = weight.shape[0]
    loss = torch.full((n,), float("nan"), dtype=torch.float32, device=hidden.device)
    lse = torch.full_like(loss, float("nan"))
    t = _tiles(hidden)
    grid = (triton.cdiv(n, t["BN"]),)
    _lce_fwd_kernel[grid](
        hidden, weight, hidden if bias is None else bias, target, loss, lse, n, v, width, opts.ignore_index,
        opts.label_smoothing, 1.0 if opts.softcap is None else opts.softcap, **_flags(bias, opts, hidden.dtype), **t,
    )
    return loss, lse


def lce_triton_backward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,)
    lse: torch.Tensor,  # (N,) fp32
    gscale: torch.Tensor,  # (N,) fp32: upstream gradient of each row's loss, 0 where ignored
    opts: LCEOptions,
    need: tuple[bool, bool, bool],
):
    """(dh, dW, db) in the inputs' dtypes (None where not needed), accumulated in fp32."""
    n, width = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros((n, width), dtype=torch.float32, device=dev) if need[0] else None
    dw = torch.zeros((v, width), dtype=torch.float32, device=dev) if need[1] else None
    db = torch.zeros((v,), dtype=torch.float32, device=dev) if need[2] else None
    t = _tiles(hidden)
    grid = (triton.cdiv(n, t["BN"]), triton.cdiv(v, t["BV"]))
    _lce_bwd_kernel[grid](
        hidden, weight, hidden if bias is None else bias, target, lse, gscale,
        lse if dh is None else dh, lse if dw is None else dw, lse if db is None else db,
        n, v, width, opts.label_smoothing, 1.0 if opts.softcap is None else opts.softcap,
        NEED_DH=need[0], NEED_DW=need[1], NEED_DB=need[2], **_flags(bias, opts, hidden.dtype), **t,
    )
    return (
        None if dh is None else dh.to(hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


class TritonLCEFunction(torch.autograd.Function):
    """Fused linear cross-entropy on flat inputs; `divisor` turns the sum into a mean (None: plain sum)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, divisor, opts: LCEOptions, need: tuple[bool, bool, bool]):
        if hidden.dtype not in _DOT_PRECISION:
            raise ValueError(
                f"linear_cross_entropy: expected fp32, bf16 or fp16 for impl='triton', given {hidden.dtype}"
            )
        hidden, weight = hidden.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        loss, lse = lce_triton_forward(hidden, weight, bias, target, opts)
        ctx.opts, ctx.need, ctx.divisor = opts, need, divisor
        if any(need):
            ctx.save_for_backward(hidden, weight, bias, target, lse)
        if opts.reduction == "none":
            return loss.to(hidden.dtype)
        total = loss.sum()
        return (total if divisor is None else total / divisor).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        with no_autocast(grad_out.device):
            return TritonLCEFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        opts = ctx.opts
        valid = (target != opts.ignore_index).float()
        if opts.reduction == "none":
            gscale = grad_out.float().reshape(-1) * valid
        else:
            scale = grad_out.float()
            if ctx.divisor is not None:
                d = ctx.divisor.float() if torch.is_tensor(ctx.divisor) else torch.tensor(float(ctx.divisor))
                d = d.to(scale.device)
                scale = scale / torch.where(d == 0, torch.ones_like(d), d)
            gscale = valid * scale
        dh, dw, db = lce_triton_backward(hidden, weight, bias, target, lse, gscale.contiguous(), opts, ctx.need)
        return dh, dw, db, None, None, None, None
