# N tokens, H hidden, V vocab, C chunk rows
"""Linear cross-entropy as cuBLAS products around one Triton kernel, per chunk of rows (Liger-Kernel's design).

For each chunk of C rows: z = h W^T (+ b), one product in the inputs' dtype with fp32 accumulation, into a
(C, V) buffer of that dtype; `_softmax_grad_kernel` then reads each row of z twice, in fp32: first the
online log-sum-exp, the target logit and the logit sum, hence the row's loss (L1); then it overwrites the
row, in place, with dloss/dy (L2, L3). Two more products give dh = g W and dW += g^T h (L4), db sums g.
Equations: kernels/LCE.md "Math"; the time and memory model: LCE.md "Hybrid path".

Rows per chunk (`hybrid_chunk_rows`): about N H / V, so that a chunk's logits hold about as many elements as
hidden, as Liger chooses them: the (C, V) buffer in the inputs' dtype is the only large temporary, and the dW
product of each chunk has C rows of work per read and write of dW.

Only the forward runs: for `mean` and `sum` the gradients are formed there, while each chunk's logits are at
hand, and the backward scales them (as the chunked path does, whose autograd Function this reuses).
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..interpreter import patch_interpreter_index
from ..launch import KernelConfig, launch
from .chunked import ChunkedLCEFunction, LCEOptions, dw_dtype_for

__all__ = ["HybridLCEFunction", "hybrid_chunk_rows", "hybrid_forward", "softmax_grad_config"]


@triton.jit
def _softcap(z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
    return z


@triton.jit
def _softmax_grad_kernel(z_ptr, y_ptr, loss_ptr, lse_ptr, V, stride, eps, softcap,
                         HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row of logits in, its loss (L1) and log-sum-exp out, and the row overwritten with dloss/dy (L2, L3).

    Grid `(C,)`: one program per row of the chunk. Tile: `BLOCK_V` columns at a time, two passes over the row,
    every value widened to fp32; the row itself stays in the inputs' dtype in global memory.
    """
    # 1. this row, its target; the first tile starts the online max and sum (L5)
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride
    y = tl.load(y_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    mask = cols < V
    z = _softcap(tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
    z = tl.where(mask, z, float("-inf"))
    m = tl.max(z, axis=0)
    s = tl.sum(tl.exp(z - m), axis=0)
    z_t = tl.sum(tl.where(cols == y, z, 0.0), axis=0)
    z_sum = tl.sum(tl.where(mask, z, 0.0), axis=0)
    # 2. the other tiles: target logit, logit sum, rescaled running sum
    for v0 in range(BLOCK_V, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = _softcap(tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        z_t += tl.sum(tl.where(cols == y, z, 0.0), axis=0)
        z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    # 3. the row's log-sum-exp and loss (L1)
    lse = m + tl.log(s)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, lse - (1.0 - eps) * z_t - eps / V * z_sum)
    # 4. second pass: dloss/dz (L2), times dz/dy (L3) under a softcap, written over the logits
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = _softcap(tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        g = tl.exp(z - lse) - eps / V
        g = tl.where(cols == y, g - (1.0 - eps), g)
        if HAS_SOFTCAP:
            zc = z / softcap
            g = g * (1.0 - zc * zc)
        tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


if isinstance(_softmax_grad_kernel, InterpretedFunction):
    patch_interpreter_index()

# Columns per step of a row: 16-bit rows are read 8 KiB at a time; one tile of fp32 values per warp lane set
# (BLOCK_V / (32 * warps) = 8 values per thread) keeps the loop in registers on sm_75 too.
BLOCK_V = 4096
WARPS = 16


def softmax_grad_config(rows: int, vocab: int, softcap: float | None) -> KernelConfig:
    """The launch for `rows` rows of a (rows, V) logits buffer."""
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    return KernelConfig(_softmax_grad_kernel, (rows,), dict(HAS_SOFTCAP=softcap is not None, BLOCK_V=block,
                                                           num_warps=min(WARPS, max(1, block // 256))))


def hybrid_chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: the power of two at or above N / ceil(V / H) (Liger-Kernel's rule), so that a chunk's
    (C, V) logits take about as many elements as the (N, H) hidden."""
    rows = triton.cdiv(n_rows, triton.cdiv(vocab, hidden))
    return max(1, min(n_rows, triton.next_power_of_2(rows)))


def _logits(h, weight, bias, out):
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _add_dw(dw: torch.Tensor, g: torch.Tensor, h: torch.Tensor):
    if dw.dtype == g.dtype:
        dw.addmm_(g.t(), h)
    else:
        dw.add_(torch.mm(g.t(), h))


def hybrid_forward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) no ignored rows: the caller drops them
    opts: LCEOptions,
    need: tuple[bool, bool, bool],
):
    """Summed loss (fp32), per-row lse, row count and the unscaled (dh, dW, db), as `chunked.chunked_forward`."""
    n, v = hidden.shape[0], weight.shape[0]
    rows = min(opts.chunk_size, max(n, 1))
    buf = hidden.new_empty((rows, v))
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need[0] else None
    dw = torch.zeros(weight.shape, dtype=dw_dtype_for(weight.dtype, opts.accumulate), device=weight.device) \
        if need[1] else None
    db = torch.zeros(v, dtype=torch.float32, device=weight.device) if need[2] else None
    eps, cap = opts.label_smoothing, 1.0 if opts.softcap is None else opts.softcap
    for a in range(0, n, rows):
        b = min(n, a + rows)
        h, z = hidden[a:b], _logits(hidden[a:b], weight, bias, buf[: b - a])
        launch(softmax_grad_config(b - a, v, opts.softcap), z, target[a:b], losses[a:b], lses[a:b], v, v, eps, cap)
        if dh is not None:
            torch.mm(z, weight, out=dh[a:b])
        if dw is not None:
            _add_dw(dw, z, h)
        if db is not None:
            db.add_(z.sum(0, dtype=torch.float32))
    return losses.sum(), lses, n, (dh, dw, db)


class HybridLCEFunction(ChunkedLCEFunction):
    """The hybrid path on flat inputs with every row valid, `mean`/`sum` only; the backward is the chunked
    path's (a scale of the gradients the forward formed)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, divisor, opts: LCEOptions, need: tuple[bool, bool, bool]):
        loss, _, _, grads = hybrid_forward(hidden, weight, bias, target, opts, need)
        ctx.opts, ctx.need, ctx.consumed = opts, need, False
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.grads, ctx.divisor = grads, divisor
        return loss if divisor is None else loss / divisor
