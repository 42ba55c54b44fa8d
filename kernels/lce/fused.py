# N tokens, H hidden, V vocab, S vocabulary splits, BN/BV/BH tile sizes along N/V/H
"""Fused linear cross-entropy in Triton: each (BN, BV) logits tile lives only in registers.

Forward: program (i, j) takes BN rows and the j-th of S equal runs of BV-wide vocabulary tiles; it forms
each tile with tl.dot over H and keeps an online log-sum-exp (running max m, running sum s rescaled by
exp(m_old - m_new)), the target logit and the logit sum (for label smoothing). It writes these four
partials per row and split; `_combine` merges the S splits (lse = M + log sum_j s_j exp(m_j - M)). S > 1
only when there are too few row tiles to fill the GPU (small N).

Backward (as in Cut Cross-Entropy): one program per (BN, BV) tile recomputes the logits, turns them into
dloss/dy with the saved lse (formulas in kernels/lce/chunked.py), skips the tile when every |dloss/dz|
in it is below `filter_eps` (gradient filtering), and otherwise adds its share of dh = g W, dW = g^T h
and db with atomics. dW goes into a buffer of the weight's dtype (`accumulate="param"`) or fp32; dh and
db always into fp32, because each row of dh sums V / BV tile products and in bf16 the small ones would
be absorbed. The fp32 dh buffer holds one launch's rows (`lce_bwd_config`), a small fraction of W.

Inputs may be fp32, bf16 or fp16; every dot accumulates in fp32. Under TRITON_INTERPRET=1 with bf16
(`EMU_BF16`), tiles are widened to fp32 before each dot, since the interpreter's numpy tl.dot mishandles
bf16, and dW is added with a load and a store, since it has no bf16 atomics (it runs one program at a
time, so nothing races); fp32 values are rounded to bf16 by `_round_bf16` (to nearest even, with integer
ops), since the interpreter's cast truncates and its "rtne" mode drops the carry into the exponent.

V and H are compile-time constants (one compile per head shape); N and the split length are not.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..interpreter import patch_interpreter_index
from ..launch import KernelConfig, device_arch, device_sms, launch
from .chunked import LCEOptions, no_autocast

__all__ = ["TritonLCEFunction", "lce_fwd_config", "lce_bwd_config", "lce_triton_forward", "lce_triton_backward"]

_DOT_PRECISION = {torch.float32: "ieee", torch.bfloat16: "tf32", torch.float16: "tf32"}


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _round_bf16(x):
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H: tl.constexpr, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr,
                 BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    acc = tl.zeros([BN, BV], dtype=tl.float32)
    for k0 in range(0, H, BH):
        ks = k0 + tl.arange(0, BH)
        kmask = ks < H
        a = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * H + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        if EMU_BF16:
            a, wt = a.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit(do_not_specialize=["tiles_per_split"])
def _lce_fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, N, tiles_per_split, softcap,
                    V: tl.constexpr, H: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr,
                    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    """Forward partials of the loss (L1): LCE.md "Math" and "Triton path" (online log-sum-exp (L5)).

    Grid `(cdiv(N, BN), S)`: axis 0 indexes blocks of `BN` rows, axis 1 the vocabulary split (the j-th run of
    `tiles_per_split` `BV`-wide tiles). Tile: each program owns `BN` rows and its run of vocabulary tiles;
    each `(BN, BV)` logits tile is `tl.dot`s over `H` in `BH` steps, in registers only. Writes the partials
    `(m, s, z_target, z_sum)` of its rows and split to `part_ptr` (4, S, N); the host merges them (L6).
    """
    # 1. this program's rows, split and targets; empty running max / sum
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    rmask = rows < N
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    m = tl.full([BN], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BN], dtype=tl.float32)
    z_t = tl.zeros([BN], dtype=tl.float32)
    z_sum = tl.zeros([BN], dtype=tl.float32)
    for t in range(tiles_per_split):
        cols = (split * tiles_per_split + t) * BV + tl.arange(0, BV)
        cmask = cols < V
        # 2. the (BN, BV) logits tile z = softcap(h W^T + b)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, softcap,
                         HAS_BIAS, HAS_SOFTCAP, PREC, EMU_BF16, BN, BV, BH)
        # 3. target logit and logit sum (for label smoothing), then the online max / rescaled sum (L5)
        z_t += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        z_sum += tl.sum(tl.where(cmask[None, :], z, 0.0), axis=1)
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    # 4. write the four partials of this row block and split
    out = part_ptr + split * N + rows
    stride = tl.num_programs(1) * N
    tl.store(out, m, mask=rmask)
    tl.store(out + stride, s, mask=rmask)
    tl.store(out + 2 * stride, z_t, mask=rmask)
    tl.store(out + 3 * stride, z_sum, mask=rmask)


@triton.jit
def _lce_bwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, gscale_ptr, dh_ptr, dw_ptr, db_ptr,
                    N, eps, softcap, filter_eps, V: tl.constexpr, H: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_DH: tl.constexpr,
                    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, FILTER: tl.constexpr, PREC: tl.constexpr,
                    EMU_BF16: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    """Gradients (L2)-(L4) of one logits tile: LCE.md "Math" and "Triton path" (as in Cut Cross-Entropy).

    Grid `(cdiv(N, BN), cdiv(V, BV))`: axis 0 indexes blocks of `BN` rows, axis 1 blocks of `BV` vocabulary
    columns. Tile: each program owns one `(BN, BV)` logits tile, recomputed with `tl.dot`s over `H` in `BH`
    steps, and adds its share of `dh` (BN, H), `dW` (BV, H) and `db` (BV) with atomics, in `BH`-wide chunks.
    """
    # 1. recompute this program's logits tile
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    rmask = rows < N
    cmask = cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, softcap,
                     HAS_BIAS, HAS_SOFTCAP, PREC, EMU_BF16, BN, BV, BH)
    # 2. dloss/dz (L2) from the saved lse; ignored rows (gscale 0) and padding columns give 0
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    gs = tl.load(gscale_ptr + rows, mask=rmask, other=0.0)
    g = tl.exp(z - lse[:, None]) - eps / V
    g = tl.where(cols[None, :] == y[:, None], g - (1.0 - eps), g)
    g = tl.where(cmask[None, :] & (gs != 0.0)[:, None], g, 0.0)
    # 3. gradient filtering: skip the tile when every |dloss/dz| is below filter_eps
    keep = True
    if FILTER:
        keep = tl.max(tl.max(tl.abs(g), axis=1), axis=0) >= filter_eps
    if keep:
        # 4. dloss/dy = dloss/dz * dz/dy (L3), times the upstream scale; db (L4)
        if HAS_SOFTCAP:
            zc = z / softcap
            g = g * (1.0 - zc * zc)
        g = g * gs[:, None]
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=cmask)
        if EMU_BF16:
            gd = _round_bf16(g).to(tl.float32)
        else:
            gd = g.to(h_ptr.dtype.element_ty)
        # 5. per BH chunk of H: dh += g W and dW += g^T h (L4), by atomics
        for k0 in range(0, H, BH):
            ks = k0 + tl.arange(0, BH)
            kmask = ks < H
            if NEED_DH:
                wk = tl.load(w_ptr + cols[:, None] * H + ks[None, :], mask=cmask[:, None] & kmask[None, :],
                             other=0.0)
                wk = wk.to(tl.float32) if EMU_BF16 else wk
                part = tl.dot(gd, wk, input_precision=PREC)
                tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], part,
                              mask=rmask[:, None] & kmask[None, :])
            if NEED_DW:
                hk = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                             other=0.0)
                hk = hk.to(tl.float32) if EMU_BF16 else hk
                part = tl.dot(tl.trans(gd), hk, input_precision=PREC)
                dwp = dw_ptr + cols[:, None] * H + ks[None, :]
                dmask = cmask[:, None] & kmask[None, :]
                if EMU_BF16:
                    part += tl.load(dwp, mask=dmask, other=0.0).to(tl.float32)
                    if dw_ptr.dtype.element_ty == tl.bfloat16:
                        part = _round_bf16(part)
                    tl.store(dwp, part, mask=dmask)
                else:
                    tl.atomic_add(dwp, part.to(dw_ptr.dtype.element_ty), mask=dmask)


INTERPRETED = isinstance(_lce_fwd_kernel, InterpretedFunction)
if INTERPRETED:
    patch_interpreter_index()

# Programs per SM the split forward aims for, so that one waiting on memory leaves another to run.
PROGRAMS_PER_SM = 2
# Under the interpreter there are no SMs; a small count still makes small-N tests take the split path.
INTERPRETER_SMS = 2
# The fp32 dh buffer may take this fraction of W's bytes; and at least this many rows go to one launch,
# so that its (rows / BN, V / BV) grid still fills the GPU.
DH_BUFFER_OF_W = 1 / 32
MIN_ROWS_PER_LAUNCH = 2048


def filter_threshold(dtype: torch.dtype, vocab: int) -> float:
    """|dloss/dz| below which the backward skips a tile: the dtype's machine epsilon / max(32, V).

    Cut Cross-Entropy (Wijmans et al. 2024, arXiv:2411.09009, section 4.3) uses eps / 32 (2^-12 for bf16) per
    entry. That bounds each skipped entry, not their sum: where the softmax is flat (an untrained head, a high-
    entropy row) every entry of a 50,257-word row is about 2e-5 < 2^-12, all tiles but the target's are
    skipped, and d_hidden lost 15-18% of its norm (GPT-2's vocabulary, N=3, bf16, sm_80 and sm_90 tiles).
    Dividing by V bounds the skipped mass of a row by eps, the rounding of the kept entries themselves."""
    return torch.finfo(dtype).eps / max(32, vocab)


def _t(bn, bv, bh, warps):
    return dict(BN=bn, BV=bv, BH=bh, num_warps=warps, num_stages=2)


# (architecture, fp32 inputs) -> forward and backward tiles. From AOT compiles with triton 3.6
# (`python -m bench.compile_gate -k lce`): (64, 128, 64) with 8 warps spilled 4-9 KB per thread on
# sm_75 (ptxas capped it at 64 registers) and needed 96 KiB of shared memory in the 16-bit backward (the T4
# allows 64 KiB); the fp32 backward spilled 260-300 B on sm_80/90 with any 64 x 128 tile. The tiles below
# compile without spills.
LCE_TILES = {
    (75, False): (_t(32, 64, 32, 4), _t(32, 64, 32, 4)),
    (75, True): (_t(32, 64, 32, 4), _t(32, 64, 32, 8)),
    (80, False): (_t(64, 128, 64, 8), _t(64, 128, 32, 8)),
    (80, True): (_t(64, 128, 64, 8), _t(32, 64, 32, 4)),
}
# Under the interpreter, small tiles keep the numpy work of small test shapes small.
INTERPRETER_TILES = dict(BN=16, BV=64, BH=32)


def _tiles(arch: int | None, dtype: torch.dtype, bwd: bool) -> dict:
    if arch is None:
        return dict(INTERPRETER_TILES)
    return dict(LCE_TILES[(75 if arch < 80 else 80, dtype == torch.float32)][bwd])


def _flags(has_bias: bool, softcap: float | None, dtype: torch.dtype) -> dict:
    dot_f32 = INTERPRETED and dtype == torch.bfloat16
    prec = "ieee" if dot_f32 else _DOT_PRECISION[dtype]
    return dict(HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None, PREC=prec, EMU_BF16=dot_f32)


def lce_fwd_config(n: int, v: int, dtype: torch.dtype, arch: int | None, num_sms: int | None,
                   has_bias: bool, softcap: float | None) -> tuple[KernelConfig, int]:
    """The forward launch for `n` rows (grid: row tiles x S splits) and the vocabulary tiles per split."""
    meta = {**_tiles(arch, dtype, False), **_flags(has_bias, softcap, dtype)}
    row_tiles, v_tiles = triton.cdiv(n, meta["BN"]), triton.cdiv(v, meta["BV"])
    want = PROGRAMS_PER_SM * (num_sms or INTERPRETER_SMS)
    splits = min(v_tiles, max(1, triton.cdiv(want, row_tiles)))
    per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, per_split)
    return KernelConfig(_lce_fwd_kernel, (row_tiles, splits), meta), per_split


def lce_bwd_config(n: int, v: int, width: int, dtype: torch.dtype, arch: int | None, has_bias: bool,
                   softcap: float | None, need: tuple[bool, bool, bool], filter_eps: float | None,
                   ) -> tuple[KernelConfig, int]:
    """The backward launch for one block of rows (grid: row tiles x vocabulary tiles) and the rows per launch."""
    meta = {**_tiles(arch, dtype, True), **_flags(has_bias, softcap, dtype)}
    meta.update(NEED_DH=need[0], NEED_DW=need[1], NEED_DB=need[2], FILTER=bool(filter_eps))
    w_bytes = v * width * torch.finfo(dtype).bits // 8
    rows = max(MIN_ROWS_PER_LAUNCH, int(w_bytes * DH_BUFFER_OF_W) // (width * 4)) // meta["BN"] * meta["BN"]
    rows = min(n, rows)
    return KernelConfig(_lce_bwd_kernel, (triton.cdiv(rows, meta["BN"]), triton.cdiv(v, meta["BV"])), meta), rows


def _combine(part: torch.Tensor, target: torch.Tensor, opts: LCEOptions, v: int):
    """Per-row loss (0 where ignored) and lse from the (4, S, N) forward partials."""
    m, s, z_t, z_sum = part.unbind(0)
    top = m.amax(0)
    lse = top + (s * torch.exp(m - top)).sum(0).log()
    loss = lse - (1.0 - opts.label_smoothing) * z_t.sum(0) - opts.label_smoothing / v * z_sum.sum(0)
    return torch.where(target != opts.ignore_index, loss, 0.0), lse


def lce_triton_forward(
    hidden: torch.Tensor,  # (N, H) contiguous
    weight: torch.Tensor,  # (V, H) contiguous
    bias: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,) int64
    opts: LCEOptions,
    arch: int | None = None,
    num_sms: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (N,) fp32, 0 where ignored, and per-row log-sum-exp (N,) fp32. `arch` and `num_sms`
    (the GPU the launch is for) default to those of hidden's device, None under the interpreter."""
    n, width = hidden.shape
    v = weight.shape[0]
    arch = device_arch(hidden.device) if arch is None else arch
    num_sms = device_sms(hidden.device) if num_sms is None else num_sms
    cfg, per_split = lce_fwd_config(n, v, hidden.dtype, arch, num_sms, bias is not None, opts.softcap)
    part = torch.full((4, cfg.grid[1], n), float("nan"), dtype=torch.float32, device=hidden.device)
    launch(cfg, hidden, weight, hidden if bias is None else bias, target, part, n, per_split,
           1.0 if opts.softcap is None else opts.softcap, V=v, H=width)
    return _combine(part, target, opts, v)


def lce_triton_backward(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    target: torch.Tensor,  # (N,)
    lse: torch.Tensor,  # (N,) fp32
    gscale: torch.Tensor,  # (N,) fp32: upstream gradient of each row's loss, 0 where ignored
    opts: LCEOptions,
    need: tuple[bool, bool, bool],
    arch: int | None = None,
    filter_eps: float | None = None,
):
    """(dh, dW, db) in the inputs' dtypes (None where not needed). `filter_eps` defaults to
    `filter_threshold(hidden.dtype, V)`; 0 turns the filter off."""
    n, width = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    arch = device_arch(dev) if arch is None else arch
    eps = filter_threshold(hidden.dtype, v) if filter_eps is None else filter_eps
    cfg, rows = lce_bwd_config(n, v, width, hidden.dtype, arch, bias is not None, opts.softcap, need, eps)
    dw_dtype = weight.dtype if opts.accumulate == "param" else torch.promote_types(weight.dtype, torch.float32)
    dw = torch.zeros((v, width), dtype=dw_dtype, device=dev) if need[1] else None
    db = torch.zeros((v,), dtype=torch.float32, device=dev) if need[2] else None
    dh = torch.empty_like(hidden) if need[0] else None
    dh_acc = torch.empty((rows, width), dtype=torch.float32, device=dev) if need[0] else None
    fallback = lse
    for a in range(0, n, rows):
        b = min(n, a + rows)
        if dh_acc is not None:
            dh_acc.zero_()
        part_cfg = cfg if b - a == rows else lce_bwd_config(b - a, v, width, hidden.dtype, arch, bias is not None,
                                                            opts.softcap, need, eps)[0]
        launch(part_cfg, hidden[a:b], weight, fallback if bias is None else bias, target[a:b], lse[a:b],
               gscale[a:b], fallback if dh_acc is None else dh_acc, fallback if dw is None else dw,
               fallback if db is None else db, b - a, opts.label_smoothing,
               1.0 if opts.softcap is None else opts.softcap, eps, V=v, H=width)
        if dh is not None:
            dh[a:b] = dh_acc[: b - a]
    return (
        dh,
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
            return loss
        total = loss.sum()
        return total if divisor is None else total / divisor

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
