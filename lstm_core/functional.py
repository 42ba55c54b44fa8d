# B batch, T time, I input, H hidden, P projection (P = H without one)
"""The LSTM in plain tensor ops: the autograd reference for every fast path.

One step, with PyTorch's gate order (i, f, g, o) and W = [W_i; W_f; W_g; W_o]:

    gates = x W_ih^T + b_ih + h W_hh^T + b_hh            (B, 4H)
    i, f, o = sigmoid(.)    g = tanh(.)
    c' = f * c + i * g
    h' = o * tanh(c')            (then h' = h' W_hr^T with a projection)

`lstm_layer` runs one direction of one layer over time. The input projection for
all steps is one matrix product; only `h W_hh^T` stays inside the loop. Rows whose
sequence has ended (t >= lengths[b]) keep their state and output zeros, which is
what `nn.LSTM` does for a `PackedSequence`. It computes in fp32 (fp64 stays fp64)
and casts back to the input dtype.
"""

import torch

__all__ = ["lstm_cell", "lstm_layer", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def lstm_cell(
    x: torch.Tensor,  # (B, I)
    h: torch.Tensor,  # (B, P)
    c: torch.Tensor,  # (B, H)
    w_ih: torch.Tensor,  # (4H, I)
    w_hh: torch.Tensor,  # (4H, P)
    b_ih: torch.Tensor | None = None,  # (4H,)
    b_hh: torch.Tensor | None = None,  # (4H,)
    w_hr: torch.Tensor | None = None,  # (P, H)
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step. Returns `(h', c')` with shapes `(B, P)` and `(B, H)`."""
    gates = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        gates = gates + b_ih
    if b_hh is not None:
        gates = gates + b_hh
    return _update(gates, c, w_hr)


def _update(gates, c, w_hr):
    i, f, g, o = gates.chunk(4, dim=-1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    if w_hr is not None:
        h_next = h_next @ w_hr.T
    return h_next, c_next


def lstm_layer(
    x: torch.Tensor,  # (T, B, I)
    h0: torch.Tensor,  # (B, P)
    c0: torch.Tensor,  # (B, H)
    w_ih: torch.Tensor,  # (4H, I)
    w_hh: torch.Tensor,  # (4H, P)
    b_ih: torch.Tensor | None = None,  # (4H,)
    b_hh: torch.Tensor | None = None,  # (4H,)
    w_hr: torch.Tensor | None = None,  # (P, H)
    lengths: torch.Tensor | None = None,  # (B,) int64, each in [1, T]
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One direction of one LSTM layer, forward in time.

    Returns `(out, (h_n, c_n))`: `out` is `(T, B, P)` and the states are the
    ones after each row's last valid step. The kernel op `kernels.fused_lstm`
    has this signature, so either can be swapped in.
    """
    dtype = x.dtype
    cdt = compute_dtype(dtype)
    x, h, c, w_ih, w_hh = (t.to(cdt) for t in (x, h0, c0, w_ih, w_hh))
    b_ih, b_hh, w_hr = (None if t is None else t.to(cdt) for t in (b_ih, b_hh, w_hr))

    xw = x @ w_ih.T
    if b_ih is not None:
        xw = xw + b_ih
    if b_hh is not None:
        xw = xw + b_hh

    outs = []
    for t, xw_t in enumerate(xw.unbind(0)):
        h_next, c_next = _update(xw_t + h @ w_hh.T, c, w_hr)
        if lengths is None:
            h, c = h_next, c_next
            outs.append(h)
        else:
            live = (t < lengths).to(cdt).unsqueeze(1)
            h = live * h_next + (1 - live) * h
            c = live * c_next + (1 - live) * c
            outs.append(live * h_next)
    out = torch.stack(outs)
    return out.to(dtype), (h.to(dtype), c.to(dtype))
