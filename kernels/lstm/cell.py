# B batch, H hidden, J units per program, G = 4H gate pre-activations in PyTorch's order (i, f, g, o)
"""The LSTM cell math shared by the Triton recurrence kernels (`fwd.py`, `bwd.py`, `persistent_*.py`).

Equations refer to `kernels/README.md` (Forward: (F1)-(F5), Backward: (B1)-(B7)).

- `sigmoid`, `tanh`: elementwise activations, `tanh(x) = 2 sigmoid(2x) - 1` (F3);
- `dot`: `tl.dot` that with `DOT_F32` widens both operands to fp32 first (the interpreter's `tl.dot`
  mishandles bf16: it multiplies the raw 16-bit patterns);
- `cell`: the activations and the state update (F3)-(F5) of one step;
- `gate_tile`: the pre-activations (F2) of the four gates for a block of columns, `W_hh` streamed in
  `BLOCK_K` steps along H (the tiled kernels, and the onchip/tiled backward with `RECOMPUTE`);
- `store_gates`, `load_gates`: the activated gates to/from a `(B, 4H)` row block in gate-major layout
  (`[i | f | g | o]`, each `H` wide), the buffer the forward saves for the backward;
- `gate_grads`: the gate pre-activation gradients and the carried `dc` (B1)-(B6), zero for dead rows;
- `split_gates`, `gate_columns`: the persistent kernels' unit-major gate columns (column `4 j + q` is
  gate `q` of unit `j`) and their split into the four gates.

Each is a `@triton.jit` function on a GPU and plain Python under the interpreter (`interpreter.device_fn`).
"""

import triton.language as tl

from ..interpreter import device_fn

__all__ = ["sigmoid", "tanh", "dot", "cell", "gate_tile", "store_gates", "load_gates", "gate_grads",
           "split_gates", "gate_columns"]


@device_fn
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@device_fn
def tanh(x):
    return 2.0 * sigmoid(2.0 * x) - 1.0


@device_fn
def dot(a, b, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@device_fn
def cell(a_i, a_f, a_g, a_o, c_prev):
    i = sigmoid(a_i)
    f = sigmoid(a_f)
    g = tanh(a_g)
    o = sigmoid(a_o)
    c = f * c_prev + i * g
    return i, f, g, o, c, o * tanh(c)


@device_fn
def gate_tile(
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
        a_i += dot(hk, tl.load(wt, mask=wmask, other=0.0), DOT_F32, PRECISION)
        a_f += dot(hk, tl.load(wt + H * H, mask=wmask, other=0.0), DOT_F32, PRECISION)
        a_g += dot(hk, tl.load(wt + 2 * H * H, mask=wmask, other=0.0), DOT_F32, PRECISION)
        a_o += dot(hk, tl.load(wt + 3 * H * H, mask=wmask, other=0.0), DOT_F32, PRECISION)
    return a_i, a_f, a_g, a_o


@device_fn
def store_gates(g_ptr, rows, cols, mask, H, i, f, g, o):
    gp = g_ptr + rows[:, None] * 4 * H + cols[None, :]
    tl.store(gp, i, mask=mask)
    tl.store(gp + H, f, mask=mask)
    tl.store(gp + 2 * H, g, mask=mask)
    tl.store(gp + 3 * H, o, mask=mask)


@device_fn
def load_gates(g_ptr, rows, cols, mask, H):
    gp = g_ptr + rows[:, None] * 4 * H + cols[None, :]
    i = tl.load(gp, mask=mask, other=0.0)
    f = tl.load(gp + H, mask=mask, other=0.0)
    g = tl.load(gp + 2 * H, mask=mask, other=0.0)
    o = tl.load(gp + 3 * H, mask=mask, other=0.0)
    return i, f, g, o


@device_fn
def gate_grads(dh, dc, i, f, g, o, c_prev, c, live):
    """Gate pre-activation gradients and the `dc` passed to step t-1 (all fp32)."""
    tc = tanh(c)
    dc = dc + dh * o * (1.0 - tc * tc)
    da_i = tl.where(live, dc * g * i * (1.0 - i), 0.0)
    da_f = tl.where(live, dc * c_prev * f * (1.0 - f), 0.0)
    da_g = tl.where(live, dc * i * (1.0 - g * g), 0.0)
    da_o = tl.where(live, dh * tc * o * (1.0 - o), 0.0)
    return da_i, da_f, da_g, da_o, dc * f


@device_fn
def split_gates(x, BLOCK_J: tl.constexpr):
    """(BLOCK_B, 4J) unit-major gate columns -> the four (BLOCK_B, J) gates i, f, g, o."""
    x = tl.reshape(x, (x.shape[0], BLOCK_J, 2, 2))
    ig, fo = tl.split(x)
    i, g = tl.split(ig)
    f, o = tl.split(fo)
    return i, f, g, o


@device_fn
def gate_columns(H, BLOCK_J: tl.constexpr):
    """Columns of this program's gates in a (.., 4H) row, unit-major, and which of them exist."""
    r = tl.arange(0, 4 * BLOCK_J)
    units = tl.program_id(0) * BLOCK_J + r // 4
    return (r % 4) * H + units, units < H
