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
has ended write `h = 0` and carry `c` forward unchanged; `hn_ptr` receives each row's
last valid `h`. The `_cell`, `_tanh` and `_gate_tile` helpers are reused by the
backward. `_dot` with `DOT_F32` multiplies in fp32: the launcher sets it for bf16 under
the interpreter, whose `tl.dot` mishandles bf16 (it multiplies the raw 16-bit patterns).
"""

import triton
import triton.language as tl

from ..interpreter import device_fn


@device_fn
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@device_fn
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@device_fn
def _dot(a, b, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@device_fn
def _cell(a_i, a_f, a_g, a_o, c_prev):
    i = _sigmoid(a_i)
    f = _sigmoid(a_f)
    g = _tanh(a_g)
    o = _sigmoid(a_o)
    c = f * c_prev + i * g
    return i, f, g, o, c, o * _tanh(c)


@device_fn
def _gate_tile(
    xw_ptr,  # (B, 4H) at step t
    h_ptr,  # (B, H) h_{t-1}
    w_ptr,  # (4H, H)
    rows, rmask, cols, cmask, H,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Pre-activations `xw[t] + h_{t-1} W_hh^T` of the four gates for columns `cols`, in fp32."""
    mask = rmask[:, None] & cmask[None, :]
    xw = xw_ptr + rows[:, None] * 4 * H + cols[None, :]
    a_i = tl.load(xw, mask=mask, other=0.0).to(tl.float32)
    a_f = tl.load(xw + H, mask=mask, other=0.0).to(tl.float32)
    a_g = tl.load(xw + 2 * H, mask=mask, other=0.0).to(tl.float32)
    a_o = tl.load(xw + 3 * H, mask=mask, other=0.0).to(tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        hk = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = w_ptr + cols[None, :] * H + ks[:, None]
        wmask = kmask[:, None] & cmask[None, :]
        a_i += _dot(hk, tl.load(wt, mask=wmask, other=0.0), DOT_F32, PRECISION)
        a_f += _dot(hk, tl.load(wt + H * H, mask=wmask, other=0.0), DOT_F32, PRECISION)
        a_g += _dot(hk, tl.load(wt + 2 * H * H, mask=wmask, other=0.0), DOT_F32, PRECISION)
        a_o += _dot(hk, tl.load(wt + 3 * H * H, mask=wmask, other=0.0), DOT_F32, PRECISION)
    return a_i, a_f, a_g, a_o


@device_fn
def _store_gates(g_ptr, rows, cols, mask, H, i, f, g, o):
    gp = g_ptr + rows[:, None] * 4 * H + cols[None, :]
    tl.store(gp, i, mask=mask)
    tl.store(gp + H, f, mask=mask)
    tl.store(gp + 2 * H, g, mask=mask)
    tl.store(gp + 3 * H, o, mask=mask)


@triton.jit
def _lstm_fwd_onchip_kernel(
    xw_ptr,  # (T, B, 4H) x W_ih^T + b_ih + b_hh
    w_ptr,  # (4H, H) W_hh
    h_ptr,  # (T+1, B, H) h0 at [0], written at [1:]
    c_ptr,  # (T+1, B, H) fp32, c0 at [0], written at [1:]
    g_ptr,  # (T, B, 4H) fp32 activated gates, written when STORE_GATES
    hn_ptr,  # (B, H)
    len_ptr,  # (B,) int32, each row's length (T where none was given)
    T, B, H,
    STORE_GATES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
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
    n_len = tl.load(len_ptr + rows, mask=rmask, other=0)
    state = rows[:, None] * H + cols[None, :]
    gate = rows[:, None] * 4 * H + cols[None, :]
    h = tl.load(h_ptr + state, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + state, mask=mask, other=0.0)
    for t in range(T):
        xw = xw_ptr + gate
        hd = h.to(w_i.dtype)
        a_i = tl.load(xw, mask=mask, other=0.0).to(tl.float32) + _dot(hd, w_i, DOT_F32, PRECISION)
        a_f = tl.load(xw + H, mask=mask, other=0.0).to(tl.float32) + _dot(hd, w_f, DOT_F32, PRECISION)
        a_g = tl.load(xw + 2 * H, mask=mask, other=0.0).to(tl.float32) + _dot(hd, w_g, DOT_F32, PRECISION)
        a_o = tl.load(xw + 3 * H, mask=mask, other=0.0).to(tl.float32) + _dot(hd, w_o, DOT_F32, PRECISION)
        i, f, g, o, c_new, h_new = _cell(a_i, a_f, a_g, a_o, c)
        if STORE_GATES:
            _store_gates(g_ptr, rows, cols, mask, H, i, f, g, o)
        live = (t < n_len)[:, None]
        c = tl.where(live, c_new, c)
        h = tl.where(live, h_new, h)
        tl.store(h_ptr + B * H + state, tl.where(live, h_new, 0.0).to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptr + B * H + state, c, mask=mask)
        xw_ptr += B * 4 * H
        g_ptr += B * 4 * H
        h_ptr += B * H
        c_ptr += B * H
    tl.store(hn_ptr + state, h.to(hn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lstm_fwd_tiled_kernel(
    xw_ptr,  # (T, B, 4H) x W_ih^T + b_ih + b_hh
    w_ptr,  # (4H, H) W_hh
    h_ptr,  # (T+1, B, H) h0 at [0], written at [1:]
    c_ptr,  # (T+1, B, H) fp32, c0 at [0], written at [1:]
    g_ptr,  # (T, B, 4H) fp32 activated gates, written when STORE_GATES
    hn_ptr,  # (B, H)
    len_ptr,  # (B,) int32, each row's length (T where none was given)
    T, B, H,
    STORE_GATES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    n_len = tl.load(len_ptr + rows, mask=rmask, other=0)
    for t in range(T):
        live = (t < n_len)[:, None]
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < H
            mask = rmask[:, None] & cmask[None, :]
            state = rows[:, None] * H + cols[None, :]
            a_i, a_f, a_g, a_o = _gate_tile(
                xw_ptr, h_ptr, w_ptr, rows, rmask, cols, cmask, H, BLOCK_K, PRECISION, DOT_F32
            )
            c_prev = tl.load(c_ptr + state, mask=mask, other=0.0)
            i, f, g, o, c_new, h_new = _cell(a_i, a_f, a_g, a_o, c_prev)
            if STORE_GATES:
                _store_gates(g_ptr, rows, cols, mask, H, i, f, g, o)
            tl.store(h_ptr + B * H + state, tl.where(live, h_new, 0.0).to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(c_ptr + B * H + state, tl.where(live, c_new, c_prev), mask=mask)
            tl.store(hn_ptr + state, h_new.to(hn_ptr.dtype.element_ty), mask=mask & live)
        xw_ptr += B * 4 * H
        g_ptr += B * 4 * H
        h_ptr += B * H
        c_ptr += B * H
        tl.debug_barrier()
