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

from .cell import cell, dot, gate_grads, gate_tile, load_gates


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
    """Backward recurrence, all of `W_hh` on chip: README.md "Backward" (B1)-(B7) for t = T-1 .. 0.

    Grid `(cdiv(B, BLOCK_B),)`: program 0 axis indexes blocks of `BLOCK_B` batch rows. Tile: each program owns
    its rows and all `H` units (`BLOCK_H = next_pow2(H)`), holds the four `(BLOCK_H, BLOCK_H)` blocks of `W_hh`
    and the carried `(dh, dc)` in registers. Writes `dgates_t` (the `da` of (B2)-(B5)), `dh_0` and `dc_0`.
    """
    # 1. this program's rows, all H units; load the four W_hh blocks once
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
    # 2. row lengths and the carried gradients (dh_n, dc_n); point every buffer at step T-1
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
        # 3. the gates at t: loaded from the forward's buffer, or recomputed (F2)-(F3) from xW[t], h_{t-1}
        if RECOMPUTE:
            hd = tl.load(h_ptr + state, mask=mask, other=0.0)
            xw = xw_ptr + gate
            a_i = tl.load(xw, mask=mask, other=0.0).to(tl.float32)
            a_f = tl.load(xw + H, mask=mask, other=0.0).to(tl.float32)
            a_g = tl.load(xw + 2 * H, mask=mask, other=0.0).to(tl.float32)
            a_o = tl.load(xw + 3 * H, mask=mask, other=0.0).to(tl.float32)
            a_i += dot(hd, tl.trans(w_i), DOT_F32, PRECISION)
            a_f += dot(hd, tl.trans(w_f), DOT_F32, PRECISION)
            a_g += dot(hd, tl.trans(w_g), DOT_F32, PRECISION)
            a_o += dot(hd, tl.trans(w_o), DOT_F32, PRECISION)
            i, f, g, o, _, _ = cell(a_i, a_f, a_g, a_o, c_prev)
        else:
            i, f, g, o = load_gates(g_ptr, rows, cols, mask, H)
        # 4. dh_t = carried + dout[t]; gate gradients (B1)-(B6), zero for dead rows; store dgates_t
        dht = dh + tl.where(live, tl.load(dout_ptr + state, mask=mask, other=0.0).to(tl.float32), 0.0)
        da_i, da_f, da_g, da_o, dc_prev = gate_grads(dht, dc, i, f, g, o, c_prev, c, live)
        dty = dg_ptr.dtype.element_ty
        da_i, da_f, da_g, da_o = da_i.to(dty), da_f.to(dty), da_g.to(dty), da_o.to(dty)
        dgp = dg_ptr + gate
        tl.store(dgp, da_i, mask=mask)
        tl.store(dgp + H, da_f, mask=mask)
        tl.store(dgp + 2 * H, da_g, mask=mask)
        tl.store(dgp + 3 * H, da_o, mask=mask)
        # 5. dh_{t-1} = sum_k da_k W_k (B7); dead rows (da = 0) pass dh and dc through
        dh = tl.where(live, 0.0, dh)
        dh += dot(da_i.to(w_i.dtype), w_i, DOT_F32, PRECISION)
        dh += dot(da_f.to(w_i.dtype), w_f, DOT_F32, PRECISION)
        dh += dot(da_g.to(w_i.dtype), w_g, DOT_F32, PRECISION)
        dh += dot(da_o.to(w_i.dtype), w_o, DOT_F32, PRECISION)
        dc = tl.where(live, dc_prev, dc)
        xw_ptr -= B * 4 * H
        g_ptr -= B * 4 * H
        dg_ptr -= B * 4 * H
        dout_ptr -= B * H
        h_ptr -= B * H
        c_ptr -= B * H
    # 6. dh_0, dc_0
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
    """Backward recurrence, `W_hh` streamed from L2 every step: README.md "Backward" (B1)-(B7).

    Grid `(cdiv(B, BLOCK_B),)`: program 0 axis indexes blocks of `BLOCK_B` batch rows. Tile: each program owns
    its rows and all `H` units, visited in `BLOCK_N`-wide column blocks, with the products over `H` in
    `BLOCK_K` steps. The carried `(dh, dc)` live in `dh_ptr`, `dc_ptr` (global memory, this program's rows).
    """
    # 1. this program's rows and their lengths; point every buffer at step T-1
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
        # 2. per BLOCK_N column block: the gates (loaded, or recomputed with (F2)-(F3)), gate gradients
        #    (B1)-(B6) from dh_t = carried + dout[t]; store dgates_t and dc_{t-1}
        for j0 in range(0, H, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            cmask = cols < H
            mask = rmask[:, None] & cmask[None, :]
            state = rows[:, None] * H + cols[None, :]
            c_prev = tl.load(c_ptr + state, mask=mask, other=0.0)
            c = tl.load(c_ptr + B * H + state, mask=mask, other=0.0)
            if RECOMPUTE:
                a_i, a_f, a_g, a_o = gate_tile(
                    xw_ptr, h_ptr, w_ptr, rows, rmask, cols, cmask, H, BLOCK_K, PRECISION, DOT_F32
                )
                i, f, g, o, _, _ = cell(a_i, a_f, a_g, a_o, c_prev)
            else:
                i, f, g, o = load_gates(g_ptr, rows, cols, mask, H)
            dout = tl.load(dout_ptr + state, mask=mask, other=0.0).to(tl.float32)
            dht = tl.load(dh_ptr + state, mask=mask, other=0.0) + tl.where(live, dout, 0.0)
            dc = tl.load(dc_ptr + state, mask=mask, other=0.0)
            da_i, da_f, da_g, da_o, dc_prev = gate_grads(dht, dc, i, f, g, o, c_prev, c, live)
            dgp = dg_ptr + rows[:, None] * 4 * H + cols[None, :]
            dty = dg_ptr.dtype.element_ty
            tl.store(dgp, da_i.to(dty), mask=mask)
            tl.store(dgp + H, da_f.to(dty), mask=mask)
            tl.store(dgp + 2 * H, da_g.to(dty), mask=mask)
            tl.store(dgp + 3 * H, da_o.to(dty), mask=mask)
            tl.store(dc_ptr + state, tl.where(live, dc_prev, dc), mask=mask)
        # 3. block barrier: all of dgates_t is written before it is read back
        tl.debug_barrier()
        # 4. dh_{t-1} = dgates_t W_hh (B7) per BLOCK_N column block, summed over K and the four gates
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
                    acc += dot(da, tl.load(wp + q * H * H, mask=wmask, other=0.0), DOT_F32, PRECISION)
            state = rows[:, None] * H + cols[None, :]
            # 5. dead rows keep the dh they carry
            dh_old = tl.load(dh_ptr + state, mask=mask, other=0.0)
            tl.store(dh_ptr + state, tl.where(live, acc, dh_old), mask=mask)
        xw_ptr -= B * 4 * H
        g_ptr -= B * 4 * H
        dg_ptr -= B * 4 * H
        dout_ptr -= B * H
        h_ptr -= B * H
        c_ptr -= B * H
        tl.debug_barrier()
