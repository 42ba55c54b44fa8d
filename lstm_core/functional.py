# B batch, T time, I input, H hidden, P projection (P = H without one)
"""The LSTM in plain tensor ops: the autograd reference for every fast path, and a fast path of its own.

One step, with PyTorch's gate order (i, f, g, o) and W = [W_i; W_f; W_g; W_o]:

    gates = x W_ih^T + b_ih + h W_hh^T + b_hh            (B, 4H)
    i, f, o = sigmoid(.)    g = tanh(.)
    c' = f * c + i * g
    h' = o * tanh(c')            (then h' = h' W_hr^T with a projection)

`lstm_layer_autograd` runs one direction of one layer over time as a plain autograd loop: the input
projection for all steps is one matrix product; only `h W_hh^T` stays inside the loop. Rows whose
sequence has ended (t >= lengths[b]) keep their state and output zeros, which is what `nn.LSTM` does
for a `PackedSequence`. It computes in fp32 (fp64 stays fp64) and casts back to the input dtype.

`lstm_layer` (same signature, same results) takes a fast path, `_LSTMLayer`, built for small shapes on
CPU, where the loop's cost is per-op overhead (about 12 autograd nodes a step) rather than arithmetic.
Its forward runs without autograd, 7 in-place ops a step: one `addmm_` into the step's precomputed
input projection, one sigmoid over the whole gate block (the g rows of the weights and bias are
doubled, and tanh(z) = 2 sigmoid(2z) - 1: a sigmoid costs less than half a tanh, a sliced op more
than a whole one), the affine map to g, then c and h. It keeps the activated gates, c_0..c_T and
tanh(c_1..c_T). Its backward is explicit backpropagation through time. With dh_t the gradient that
reaches h_t (from out_t and from step t+1) and dc_t the one that reaches c_t, going backwards:

    dc_t   += dh_t * o * (1 - tanh(c_t)^2)
    d(o)    = dh_t * tanh(c_t) * o (1 - o)     d(i) = dc_t * g * i (1 - i)
    d(f)    = dc_t * c_t-1 * f (1 - f)         d(g) = dc_t * i * (1 - g^2)
    dc_t-1  = dc_t * f                         dh_t-1 = d_out_t-1 + dgates_t W_hh

The factors of dh_t and dc_t above depend only on stored values, so they are formed for all steps
at once; a step then costs 4 elementwise ops and one matrix product, and dW_ih, dW_hh, the bias and
dx are one matrix product (or sum) each over all steps. With `lengths`, the forward runs rows past
their end on unmasked, gathers h_n and c_n at each row's last step and zeroes the output after it;
the backward zeroes the factors past each row's end and replaces f there by 1 (so dc_n passes
through to the last step unchanged), and adds dh_n at each row's last step.

`lstm_layer` falls back to `lstm_layer_autograd` for a projection (`w_hr`), an empty sequence, under
forward-mode AD or functorch transforms (vmap, grad), which `_LSTMLayer` does not implement, and under
autocast (whose low-precision products would meet its fp32 buffers).
A backward with `create_graph=True` (double backward, gradgradcheck) recomputes the layer with
`lstm_layer_autograd` and differentiates that, so the fast path stays twice differentiable. Without
grad (inference, or no input that requires grad) the forward loop runs alone and nothing is kept.
bf16 and fp16 inputs are cast to fp32 for either path, and the results cast back.
"""

import torch
from torch.autograd import forward_ad

__all__ = ["lstm_cell", "lstm_layer", "lstm_layer_autograd", "compute_dtype"]


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


def lstm_layer_autograd(
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
    """`lstm_layer` as a plain autograd loop: the reference the fast path is checked against."""
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
    has this signature, so either can be swapped in. Runs the fast path
    (module docstring) where it applies, else `lstm_layer_autograd`.
    """
    if w_hr is not None or x.shape[0] == 0 or _transformed() or torch.is_autocast_enabled(x.device.type):
        return lstm_layer_autograd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    dtype = x.dtype
    cdt = compute_dtype(dtype)
    args = [None if t is None else t.to(cdt) for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        out, h_n, c_n = _LSTMLayer.apply(*args, lengths)
    else:
        with torch.no_grad():
            out, h_n, c_n = _forward(*args, lengths, keep=False)[:3]
    return out.to(dtype), (h_n.to(dtype), c_n.to(dtype))


def _transformed() -> bool:
    """True under forward-mode AD or a functorch transform, which `_LSTMLayer` does not implement."""
    return forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def _scale_g(w):
    """w with its g block doubled: sigmoid(2z) then gives tanh(z) = 2 sigmoid(2z) - 1, so that one sigmoid
    covers all four gates (a sigmoid costs less than half a tanh on CPU, a slice of a gate block more)."""
    if w is None:
        return None
    H = w.shape[0] // 4
    w = w.clone()
    w[2 * H : 3 * H] *= 2
    return w


def _live(lengths, T):
    """(T, B, 1) bool, True where step t < lengths[b]."""
    return (torch.arange(T, device=lengths.device).unsqueeze(1) < lengths).unsqueeze(2)


def _forward(
    x: torch.Tensor,  # (T, B, I)
    h0: torch.Tensor,  # (B, H)
    c0: torch.Tensor,  # (B, H)
    w_ih: torch.Tensor,  # (4H, I)
    w_hh: torch.Tensor,  # (4H, H)
    b_ih: torch.Tensor | None,  # (4H,)
    b_hh: torch.Tensor | None,  # (4H,)
    lengths: torch.Tensor | None,  # (B,)
    keep: bool,
):
    """The forward loop without autograd. Returns out (T, B, H), h_n, c_n, and with `keep` the activated
    gates (T, B, 4H), c (T + 1, B, H) from c_0 on, and tanh(c) (T, B, H) from c_1 on."""
    T, B, I = x.shape
    H = w_hh.shape[1]
    bias = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)
    x2 = x.reshape(T * B, I)
    w_ih, w_hhT, bias = _scale_g(w_ih), _scale_g(w_hh).T, _scale_g(bias)
    a = (x2 @ w_ih.T if bias is None else torch.addmm(bias, x2, w_ih.T)).view(T, B, 4 * H)
    out, tc, c = x.new_empty(T, B, H), x.new_empty(T, B, H), x.new_empty(T + 1, B, H)
    c[0] = c0
    minus_one = x.new_full((), -1.0)
    i, f, g, o = (a[..., k * H : (k + 1) * H].unbind(0) for k in range(4))
    cs = c.unbind(0)
    steps = zip(a.unbind(0), i, f, g, o, out.unbind(0), cs[:-1], cs[1:], tc.unbind(0))
    h_prev = h0
    for a_t, i_t, f_t, g_t, o_t, h_t, c_prev, c_t, tc_t in steps:
        a_t.addmm_(h_prev, w_hhT)
        a_t.sigmoid_()
        torch.add(minus_one, g_t, alpha=2, out=g_t)
        torch.mul(f_t, c_prev, out=c_t)
        c_t.addcmul_(i_t, g_t)
        torch.tanh(c_t, out=tc_t)
        torch.mul(o_t, tc_t, out=h_t)
        h_prev = h_t
    if lengths is None:
        h_n, c_n = out[-1].clone(), c[-1].clone()
    else:
        lengths = lengths.to(x.device)
        rows = torch.arange(B, device=x.device)
        h_n, c_n = out[lengths - 1, rows], c[lengths, rows]
        out.masked_fill_(~_live(lengths, T), 0)
    return (out, h_n, c_n, a, c, tc) if keep else (out, h_n, c_n)


def _backward(
    saved,  # x, h0, c0, w_ih, w_hh, a, c, tc: as in `_forward`
    lengths: torch.Tensor | None,  # (B,)
    d_out: torch.Tensor,  # (T, B, H)
    d_h_n: torch.Tensor,  # (B, H)
    d_c_n: torch.Tensor,  # (B, H)
    needs: tuple[bool, ...],  # x, h0, c0, w_ih, w_hh, b_ih, b_hh
):
    """Backpropagation through time (module docstring). Returns the gradients of x, h0, c0, w_ih, w_hh and
    the bias, None where `needs` says none is wanted."""
    x, h0, c0, w_ih, w_hh, a, c, tc = saved
    T, B, I = x.shape
    H = w_hh.shape[1]
    i, f, g, o = a.view(T, B, 4, H).unbind(2)
    h = o * tc  # h_1 .. h_T, the output before any masking
    d_o = torch.addcmul(h, h, o, value=-1)  # factor of dh_t in d(o): tanh(c) o (1 - o)
    k = torch.addcmul(o, h, tc, value=-1)  # factor of dh_t in dc_t: o (1 - tanh(c)^2)
    r = x.new_empty(T, B, 3, H)  # factors of dc_t in d(i), d(f), d(g)
    ig, cf = i * g, c[:-1] * f
    torch.addcmul(ig, ig, i, value=-1, out=r[:, :, 0])  # g i (1 - i)
    torch.addcmul(cf, cf, f, value=-1, out=r[:, :, 1])  # c_{t-1} f (1 - f)
    torch.addcmul(i, ig, g, value=-1, out=r[:, :, 2])  # i (1 - g^2)
    dh = d_out.clone()
    if lengths is None:
        dh[-1] += d_h_n
    else:
        live = _live(lengths.to(x.device), T)
        for t in (d_o, k, r.view(T, B, 3 * H), dh):
            t.masked_fill_(~live, 0)
        f = torch.where(live, f, 1.0)
        dh.index_put_((lengths.to(x.device) - 1, torch.arange(B, device=x.device)), d_h_n, accumulate=True)
    dc = d_c_n.clone()
    dc3 = dc.unsqueeze(1)
    dgates = x.new_empty(T, B, 4 * H)
    dg4 = dgates.view(T, B, 4, H)
    dhs = dh.unbind(0)
    steps = zip(dhs, [None, *dhs[:-1]], d_o.unbind(0), k.unbind(0), r.unbind(0), f.unbind(0),
                dgates.unbind(0), dg4[:, :, 3].unbind(0), dg4[:, :, :3].unbind(0))
    for dh_t, dh_prev, d_o_t, k_t, r_t, f_t, dg_t, dg_o_t, dg_ifg_t in reversed(list(steps)):
        dc.addcmul_(dh_t, k_t)
        torch.mul(dh_t, d_o_t, out=dg_o_t)
        torch.mul(dc3, r_t, out=dg_ifg_t)
        dc.mul_(f_t)
        if dh_prev is not None:
            dh_prev.addmm_(dg_t, w_hh)
    dg2 = dgates.view(T * B, 4 * H)
    d_x = (dg2 @ w_ih).view(T, B, I) if needs[0] else None
    d_h0 = dgates[0] @ w_hh if needs[1] else None
    d_c0 = dc if needs[2] else None
    d_w_ih = dg2.T @ x.reshape(T * B, I) if needs[3] else None
    d_w_hh = None
    if needs[4]:
        d_w_hh = dgates[0].T @ h0
        if T > 1:
            d_w_hh.addmm_(dg2[B:].T, h[:-1].reshape((T - 1) * B, H))
    d_bias = dg2.sum(0) if needs[5] or needs[6] else None
    return d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_bias


class _LSTMLayer(torch.autograd.Function):
    """`lstm_layer` without a projection, inputs already in the compute dtype; outputs out, h_n, c_n."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths):
        out, h_n, c_n, a, c, tc = _forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, keep=True)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, a, c, tc)
        ctx.lengths = lengths
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_out, d_h_n, d_c_n):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, a, c, tc = ctx.saved_tensors
        needs = ctx.needs_input_grad[:7]
        if torch.is_grad_enabled():
            return (*_backward_autograd((x, h0, c0, w_ih, w_hh, b_ih, b_hh), ctx.lengths, (d_out, d_h_n, d_c_n),
                                        needs), None)  # lengths
        d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_bias = _backward(
            (x, h0, c0, w_ih, w_hh, a, c, tc), ctx.lengths, d_out, d_h_n, d_c_n, needs)
        d_b_ih = d_bias if needs[5] else None
        d_b_hh = (d_bias.clone() if needs[5] else d_bias) if needs[6] else None  # two grads, two tensors
        return d_x, d_h0, d_c0, d_w_ih, d_w_hh, d_b_ih, d_b_hh, None  # lengths


def _backward_autograd(inputs, lengths, grads, needs):
    """The gradients of `inputs` by differentiating `lstm_layer_autograd` with a graph (double backward)."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    out, (h_n, c_n) = lstm_layer_autograd(*inputs, lengths=lengths)
    found = iter(torch.autograd.grad((out, h_n, c_n), wanted, grads, create_graph=True, allow_unused=True))
    return tuple(next(found) if need else None for need in needs)
