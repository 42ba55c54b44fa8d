# B batch, T time, H hidden, G = 4H gate pre-activations in PyTorch's order (i, f, g, o)
"""Triton forward recurrence of one LSTM layer: one launch loops over all time steps.

Each program owns `BLOCK_B` rows of the batch and all `H` units, so a step needs no
communication between programs. Two widths:

- `_lstm_fwd_onchip_kernel` loads the four `(H, H)` blocks of `W_hh` once and keeps
  them and the state `(h, c)` in registers for the whole sequence (small `H`);
- `_lstm_fwd_tiled_kernel` streams `W_hh` in `(BLOCK_K, BLOCK_N)` tiles every step and
  reads `h_{t-1}` back from the output it wrote, with a block barrier between steps.

Buffers shared with the backward: `h_ptr` and `c_ptr` are `(T+1, B, H)` with the
initial state at index 0 and the state after step `t` at `t+1`. Rows whose sequence
has ended write `h = 0` and carry `c` forward unchanged (with `C_RING`, when nothing needs a gradient,
`c` is a `(2, B, H)` ring instead); `hn_ptr` receives each row's
last valid `h`. The cell math (`cell`, `gate_tile`, `store_gates`, `dot`) is in `cell.py`,
shared with the backward and the persistent kernels. `dot` with `DOT_F32` multiplies in fp32:
the launcher sets it for bf16 under the interpreter, whose `tl.dot` mishandles bf16 (it
multiplies the raw 16-bit patterns).
"""

import triton
import triton.language as tl

from ..interpreter import device_fn
from .cell import cell, dot, gate_tile, store_gates


@device_fn
def _c_slots(c_ptr, t, stride, C_RING: tl.constexpr):
    """Where c_{t-1} and c_t of step t live: `c_ptr` (advanced one slot a step) and the next slot, or the
    ring's slots (t % 2) and ((t + 1) % 2) from the ring's base `c_ptr`."""
    if C_RING:
        return c_ptr + (t % 2) * stride, c_ptr + ((t + 1) % 2) * stride
    return c_ptr, c_ptr + stride


@triton.jit
def _lstm_fwd_onchip_kernel(
    xw_ptr,  # (T, B, 4H) x W_ih^T + b_ih + b_hh
    w_ptr,  # (4H, H) W_hh
    h_ptr,  # (T+1, B, H) h0 at [0], written at [1:]
    c_ptr,  # (T+1, B, H) fp32, c0 at [0], written at [1:]; with C_RING (2, B, H), c_t at [t % 2]
    g_ptr,  # (T, B, 4H) fp32 activated gates, written when STORE_GATES
    hn_ptr,  # (B, H)
    len_ptr,  # (B,) int32, each row's length (T where none was given)
    T, B, H,
    STORE_GATES: tl.constexpr, C_RING: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Forward recurrence, all of `W_hh` on chip: README.md "Forward" (F2)-(F5) for t = 0 .. T-1.

    Grid `(cdiv(B, BLOCK_B),)`: program 0 axis indexes blocks of `BLOCK_B` batch rows. Tile: each program owns
    its rows and all `H` units (`BLOCK_H = next_pow2(H)` columns), holds the four `(BLOCK_H, BLOCK_H)` blocks
    of `W_hh^T` and the state `(h, c)` in registers for the whole sequence.
    """
    # 1. this program's rows, all H units; load the four W_hh^T blocks once
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < B
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    wt = w_ptr + cols[None, :] * H + cols[:, None]
    wmask = cmask[:, None] & cmask[None, :]
    w_i = tl.load(wt, mask=wmask, other=0.0)
    w_f = tl.load(wt + H * H, mask=wmask, other=0.0)
    w_g = tl.load(wt + 2 * H * H, mask=wmask, other=0.0)
    w_o = tl.load(wt + 3 * H * H, mask=wmask, other=0.0)
    # 2. row lengths and the initial state (h0, c0), kept in registers
    n_len = tl.load(len_ptr + rows, mask=rmask, other=0)
    state = rows[:, None] * H + cols[None, :]
    gate = rows[:, None] * 4 * H + cols[None, :]
    h = tl.load(h_ptr + state, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + state, mask=mask, other=0.0)
    for t in range(T):
        # 3. pre-activations a_t = xW[t] + h_{t-1} W_hh^T (F2), then the cell update (F3)-(F5)
        xw = xw_ptr + gate
        hd = h.to(w_i.dtype)
        a_i = tl.load(xw, mask=mask, other=0.0).to(tl.float32) + dot(hd, w_i, DOT_F32, PRECISION)
        a_f = tl.load(xw + H, mask=mask, other=0.0).to(tl.float32) + dot(hd, w_f, DOT_F32, PRECISION)
        a_g = tl.load(xw + 2 * H, mask=mask, other=0.0).to(tl.float32) + dot(hd, w_g, DOT_F32, PRECISION)
        a_o = tl.load(xw + 3 * H, mask=mask, other=0.0).to(tl.float32) + dot(hd, w_o, DOT_F32, PRECISION)
        i, f, g, o, c_new, h_new = cell(a_i, a_f, a_g, a_o, c)
        if STORE_GATES:
            store_gates(g_ptr, rows, cols, mask, H, i, f, g, o)
        # 4. dead rows (t >= length) keep their state and write h = 0; write h_t, c_t at [t+1]
        live = (t < n_len)[:, None]
        c = tl.where(live, c_new, c)
        h = tl.where(live, h_new, h)
        tl.store(h_ptr + B * H + state, tl.where(live, h_new, 0.0).to(h_ptr.dtype.element_ty), mask=mask)
        _, c_out = _c_slots(c_ptr, t, B * H, C_RING)
        tl.store(c_out + state, c, mask=mask)
        xw_ptr += B * 4 * H
        g_ptr += B * 4 * H
        h_ptr += B * H
        if not C_RING:
            c_ptr += B * H
    # 5. h_n: each row's last valid h
    tl.store(hn_ptr + state, h.to(hn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lstm_fwd_tiled_kernel(
    xw_ptr,  # (T, B, 4H) x W_ih^T + b_ih + b_hh
    w_ptr,  # (4H, H) W_hh
    h_ptr,  # (T+1, B, H) h0 at [0], written at [1:]
    c_ptr,  # (T+1, B, H) fp32, c0 at [0], written at [1:]; with C_RING (2, B, H), c_t at [t % 2]
    g_ptr,  # (T, B, 4H) fp32 activated gates, written when STORE_GATES
    hn_ptr,  # (B, H)
    len_ptr,  # (B,) int32, each row's length (T where none was given)
    T, B, H,
    STORE_GATES: tl.constexpr, C_RING: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Forward recurrence, `W_hh` streamed from L2 every step: README.md "Forward" (F2)-(F5).

    Grid `(cdiv(B, BLOCK_B),)`: program 0 axis indexes blocks of `BLOCK_B` batch rows. Tile: each program owns
    its rows and all `H` units, visited in `BLOCK_N`-wide column blocks; (F2) sums over `H` in `BLOCK_K` steps
    (`cell.gate_tile`). `h_{t-1}` is read back from `h_ptr[t]`, written by this program one step earlier.
    """
    # 1. this program's rows and their lengths
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    n_len = tl.load(len_ptr + rows, mask=rmask, other=0)
    for t in range(T):
        live = (t < n_len)[:, None]
        # 2. per BLOCK_N column block: a_t (F2) streamed over K, the cell update (F3)-(F5)
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < H
            mask = rmask[:, None] & cmask[None, :]
            state = rows[:, None] * H + cols[None, :]
            a_i, a_f, a_g, a_o = gate_tile(
                xw_ptr, h_ptr, w_ptr, rows, rmask, cols, cmask, H, BLOCK_K, PRECISION, DOT_F32
            )
            c_in, c_out = _c_slots(c_ptr, t, B * H, C_RING)
            c_prev = tl.load(c_in + state, mask=mask, other=0.0)
            i, f, g, o, c_new, h_new = cell(a_i, a_f, a_g, a_o, c_prev)
            if STORE_GATES:
                store_gates(g_ptr, rows, cols, mask, H, i, f, g, o)
            # 3. write h_t (0 for dead rows), c_t (carried for dead rows) and h_n where live
            tl.store(h_ptr + B * H + state, tl.where(live, h_new, 0.0).to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(c_out + state, tl.where(live, c_new, c_prev), mask=mask)
            tl.store(hn_ptr + state, h_new.to(hn_ptr.dtype.element_ty), mask=mask & live)
        xw_ptr += B * 4 * H
        g_ptr += B * 4 * H
        h_ptr += B * H
        if not C_RING:
            c_ptr += B * H
        # 4. block barrier: the next step reads the h_t this program just wrote
        tl.debug_barrier()
