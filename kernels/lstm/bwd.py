# B batch, T time, H hidden, G = 4H gate pre-activations in PyTorch's order (i, f, g, o)
"""Triton backward recurrence of one LSTM layer: one launch loops over time in reverse.

The loop computes only the gate gradients `dgates_t` (written to `dg_ptr`) and the
carried `dh`, `dc`; the weight, bias and input gradients are matrix products over
all steps done afterwards by the caller (derivation in `kernels/README.md`).
The gates come from the forward's `g_ptr`, or with `RECOMPUTE` from `xw` and
`h_{t-1}` again. Rows whose sequence has ended (t >= lengths[b]) get zero gate
gradients and pass `dh`, `dc` through unchanged. Widths as in `fwd.py`.

The onchip kernel forms `dh_{t-1}` by adding the four `da_k W_k` products to `dh` already zeroed
where the row is live (a dead row's `da` is 0, so it keeps `dh`), not by selecting between the new
and the old `dh` afterwards: with the selection, triton 3.9's LLVM aborts on this kernel (sm_75 all
dtypes, sm_90 fp32), while both forms compile with triton 3.6.
"""

import triton
import triton.language as tl

from ..interpreter import device_fn
from .fwd import _cell, _dot, _gate_tile, _tanh


@device_fn
def _gate_grads(dh, dc, i, f, g, o, c_prev, c, live):
    """Gate pre-activation gradients and the `dc` passed to step t-1 (all fp32)."""
    tc = _tanh(c)
    dc = dc + dh * o * (1.0 - tc * tc)
    da_i = tl.where(live, dc * g * i * (1.0 - i), 0.0)
    da_f = tl.where(live, dc * c_prev * f * (1.0 - f), 0.0)
    da_g = tl.where(live, dc * i * (1.0 - g * g), 0.0)
    da_o = tl.where(live, dh * tc * o * (1.0 - o), 0.0)
    return da_i, da_f, da_g, da_o, dc * f


@device_fn
def _load_gates(g_ptr, rows, cols, mask, H):
    gp = g_ptr + rows[:, None] * 4 * H + cols[None, :]
    i = tl.load(gp, mask=mask, other=0.0)
    f = tl.load(gp + H, mask=mask, other=0.0)
    g = tl.load(gp + 2 * H, mask=mask, other=0.0)
    o = tl.load(gp + 3 * H, mask=mask, other=0.0)
    return i, f, g, o


@triton.jit
def _lstm_bwd_onchip_kernel(
    xw_ptr,  # (T, B, 4H), read when RECOMPUTE
    w_ptr,  # (4H, H) W_hh
    h_ptr,  # (T+1, B, H) forward states, read when RECOMPUTE
    c_ptr,  # (T+1, B, H) fp32 forward cell states
    g_ptr,  # (T, B, 4H) fp32 activated gates, read unless RECOMPUTE
    dout_ptr,  # (T, B, H)
    dhn_ptr,  # (B, H) fp32
    dcn_ptr,  # (B, H) fp32
    dg_ptr,  # (T, B, 4H) written: gate pre-activation gradients
    dh0_ptr,  # (B, H) fp32, written
    dc0_ptr,  # (B, H) fp32, written
    len_ptr,  # (B,) int32, each row's length (T where none was given)
    T, B, H,
    RECOMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < B
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    w = w_ptr + cols[:, None] * H + cols[None, :]
    wmask = cmask[:, None] & cmask[None, :]
    w_i = tl.load(w, mask=wmask, other=0.0)
    w_f = tl.load(w + H * H, mask=wmask, other=0.0)
    w_g = tl.load(w + 2 * H * H, mask=wmask, other=0.0)
    w_o = tl.load(w + 3 * H * H, mask=wmask, other=0.0)
    n_len = tl.load(len_ptr + rows, mask=rmask, other=0)
    state = rows[:, None] * H + cols[None, :]
    gate = rows[:, None] * 4 * H + cols[None, :]
    dh = tl.load(dhn_ptr + state, mask=mask, other=0.0)
    dc = tl.load(dcn_ptr + state, mask=mask, other=0.0)
    xw_ptr += (T - 1) * B * 4 * H
    g_ptr += (T - 1) * B * 4 * H
    dg_ptr += (T - 1) * B * 4 * H
    dout_ptr += (T - 1) * B * H
    h_ptr += (T - 1) * B * H
    c_ptr += (T - 1) * B * H
    for s in range(T):
        t = T - 1 - s
        live = (t < n_len)[:, None]
        c_prev = tl.load(c_ptr + state, mask=mask, other=0.0)
        c = tl.load(c_ptr + B * H + state, mask=mask, other=0.0)
        if RECOMPUTE:
            hd = tl.load(h_ptr + state, mask=mask, other=0.0)
            xw = xw_ptr + gate
            a_i = tl.load(xw, mask=mask, other=0.0).to(tl.float32)
            a_f = tl.load(xw + H, mask=mask, other=0.0).to(tl.float32)
            a_g = tl.load(xw + 2 * H, mask=mask, other=0.0).to(tl.float32)
            a_o = tl.load(xw + 3 * H, mask=mask, other=0.0).to(tl.float32)
            a_i += _dot(hd, tl.trans(w_i), DOT_F32, PRECISION)
            a_f += _dot(hd, tl.trans(w_f), DOT_F32, PRECISION)
            a_g += _dot(hd, tl.trans(w_g), DOT_F32, PRECISION)
            a_o += _dot(hd, tl.trans(w_o), DOT_F32, PRECISION)
            i, f, g, o, _, _ = _cell(a_i, a_f, a_g, a_o, c_prev)
        else:
            i, f, g, o = _load_gates(g_ptr, rows, cols, mask, H)
        dht = dh + tl.where(live, tl.load(dout_ptr + state, mask=mask, other=0.0).to(tl.float32), 0.0)
        da_i, da_f, da_g, da_o, dc_prev = _gate_grads(dht, dc, i, f, g, o, c_prev, c, live)
        dty = dg_ptr.dtype.element_ty
        da_i, da_f, da_g, da_o = da_i.to(dty), da_f.to(dty), da_g.to(dty), da_o.to(dty)
        dgp = dg_ptr + gate
        tl.store(dgp, da_i, mask=mask)
        tl.store(dgp + H, da_f, mask=mask)
        tl.store(dgp + 2 * H, da_g, mask=mask)
        tl.store(dgp + 3 * H, da_o, mask=mask)
        dh = tl.where(live, 0.0, dh)
        dh += _dot(da_i.to(w_i.dtype), w_i, DOT_F32, PRECISION)
        dh += _dot(da_f.to(w_i.dtype), w_f, DOT_F32, PRECISION)
        dh += _dot(da_g.to(w_i.dtype), w_g, DOT_F32, PRECISION)
        dh += _dot(da_o.to(w_i.dtype), w_o, DOT_F32, PRECISION)
        dc = tl.where(live, dc_prev, dc)
        xw_ptr -= B * 4 * H
        g_ptr -= B * 4 * H
        dg_ptr -= B * 4 * H
        dout_ptr -= B * H
        h_ptr -= B * H
        c_ptr -= B * H
    tl.store(dh0_ptr + state, dh, mask=mask)
    tl.store(dc0_ptr + state, dc, mask=mask)


@triton.jit
def _lstm_bwd_tiled_kernel(
    xw_ptr,  # (T, B, 4H), read when RECOMPUTE
    w_ptr,  # (4H, H) W_hh
    h_ptr,  # (T+1, B, H) forward states, read when RECOMPUTE
    c_ptr,  # (T+1, B, H) fp32 forward cell states
    g_ptr,  # (T, B, 4H) fp32 activated gates, read unless RECOMPUTE
    dout_ptr,  # (T, B, H)
    dh_ptr,  # (B, H) fp32: dh_n on entry, dh_0 on exit
    dc_ptr,  # (B, H) fp32: dc_n on entry, dc_0 on exit
    dg_ptr,  # (T, B, 4H) written: gate pre-activation gradients
    len_ptr,  # (B,) int32, each row's length (T where none was given)
    T, B, H,
    RECOMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    n_len = tl.load(len_ptr + rows, mask=rmask, other=0)
    xw_ptr += (T - 1) * B * 4 * H
    g_ptr += (T - 1) * B * 4 * H
    dg_ptr += (T - 1) * B * 4 * H
    dout_ptr += (T - 1) * B * H
    h_ptr += (T - 1) * B * H
    c_ptr += (T - 1) * B * H
    for s in range(T):
        live = (T - 1 - s < n_len)[:, None]
        for j0 in range(0, H, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            cmask = cols < H
            mask = rmask[:, None] & cmask[None, :]
            state = rows[:, None] * H + cols[None, :]
            c_prev = tl.load(c_ptr + state, mask=mask, other=0.0)
            c = tl.load(c_ptr + B * H + state, mask=mask, other=0.0)
            if RECOMPUTE:
                a_i, a_f, a_g, a_o = _gate_tile(
                    xw_ptr, h_ptr, w_ptr, rows, rmask, cols, cmask, H, BLOCK_K, PRECISION, DOT_F32
                )
                i, f, g, o, _, _ = _cell(a_i, a_f, a_g, a_o, c_prev)
            else:
                i, f, g, o = _load_gates(g_ptr, rows, cols, mask, H)
            dout = tl.load(dout_ptr + state, mask=mask, other=0.0).to(tl.float32)
            dht = tl.load(dh_ptr + state, mask=mask, other=0.0) + tl.where(live, dout, 0.0)
            dc = tl.load(dc_ptr + state, mask=mask, other=0.0)
            da_i, da_f, da_g, da_o, dc_prev = _gate_grads(dht, dc, i, f, g, o, c_prev, c, live)
            dgp = dg_ptr + rows[:, None] * 4 * H + cols[None, :]
            dty = dg_ptr.dtype.element_ty
            tl.store(dgp, da_i.to(dty), mask=mask)
            tl.store(dgp + H, da_f.to(dty), mask=mask)
            tl.store(dgp + 2 * H, da_g.to(dty), mask=mask)
            tl.store(dgp + 3 * H, da_o.to(dty), mask=mask)
            tl.store(dc_ptr + state, tl.where(live, dc_prev, dc), mask=mask)
        tl.debug_barrier()
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < H
            mask = rmask[:, None] & cmask[None, :]
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < H
                dgp = dg_ptr + rows[:, None] * 4 * H + ks[None, :]
                dmask = rmask[:, None] & kmask[None, :]
                wp = w_ptr + ks[:, None] * H + cols[None, :]
                wmask = kmask[:, None] & cmask[None, :]
                for q in tl.static_range(4):
                    da = tl.load(dgp + q * H, mask=dmask, other=0.0).to(w_ptr.dtype.element_ty)
                    acc += _dot(da, tl.load(wp + q * H * H, mask=wmask, other=0.0), DOT_F32, PRECISION)
            state = rows[:, None] * H + cols[None, :]
            dh_old = tl.load(dh_ptr + state, mask=mask, other=0.0)
            tl.store(dh_ptr + state, tl.where(live, acc, dh_old), mask=mask)
        xw_ptr -= B * 4 * H
        g_ptr -= B * 4 * H
        dg_ptr -= B * 4 * H
        dout_ptr -= B * H
        h_ptr -= B * H
        c_ptr -= B * H
        tl.debug_barrier()
