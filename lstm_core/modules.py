# B batch, T time, I input, H hidden, P projection (P = H without one), L layers, D directions
"""`LSTMCell` and `LSTM`: drop-ins for `nn.LSTMCell` and `nn.LSTM` built on `functional`.

Same constructor arguments, parameter names, registration order (so the same
`state_dict`), initialisation and `(output, (h_n, c_n))` structure. Packed input
runs as a padded batch with per-row lengths; a reverse direction reverses each
row within its own length, so both directions see the same `lstm_layer`.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .checks import (
    LSTMError,
    check_dropout,
    check_flag,
    check_hx_pair,
    check_input_like,
    check_proj_size,
    check_sequence,
    check_size,
    check_state_like,
)
from .functional import lstm_cell, lstm_layer

__all__ = ["LSTMCell", "LSTM", "BACKENDS"]

BACKENDS = ("reference", "triton")


def _uniform_(params, hidden_size):
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for p in params:
            p.uniform_(-bound, bound)


class LSTMCell(nn.Module):
    """Drop-in for `nn.LSTMCell`: `cell(x, (h, c)) -> (h', c')`, batched or unbatched.

    Bad types raise `TypeError`, bad values `LSTMError` (a `ValueError` and a
    `RuntimeError`); `hx` is never broadcast, as in `nn.LSTMCell`.
    """

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__()
        check_flag("bias", bias)
        check_size("input_size", input_size)
        check_size("hidden_size", hidden_size)
        factory = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self):
        _uniform_(self.parameters(), self.hidden_size)

    def extra_repr(self):
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")

    def forward(
        self,
        input: torch.Tensor,  # (B, I) or (I,)
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,  # (B, H) each, or (H,) unbatched
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_forward(input, hx)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            h = c = x.new_zeros(x.shape[0], self.hidden_size)
        else:
            h, c = hx if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h, c = lstm_cell(x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))

    def _check_forward(self, input, hx):
        """Ranks, then sizes, then dtypes and devices: nn.LSTMCell's order."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"LSTMCell: expected input to be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise LSTMError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            check_hx_pair("LSTMCell", hx)
            for idx, t in enumerate(hx):
                if t.dim() not in (1, 2):
                    raise LSTMError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {t.dim()}D instead")
        self._check_sizes(input, hx)
        check_input_like(input, self.weight_ih)
        for idx, t in enumerate(hx or ()):
            check_state_like(f"hx[{idx}]", t, input)

    def _check_sizes(self, input, hx):
        if input.shape[-1] != self.input_size:
            raise LSTMError(f"input has inconsistent input_size: got {input.shape[-1]} expected {self.input_size}")
        for idx, t in enumerate(hx or ()):
            if t.dim() != input.dim():
                raise LSTMError(f"LSTMCell: {input.dim()}-D input needs {input.dim()}-D hx[{idx}], got {t.dim()}-D")
            if t.dim() == 2 and t.shape[0] != input.shape[0]:
                raise LSTMError(f"Input batch size {input.shape[0]} doesn't match hidden{idx} batch size {t.shape[0]}")
            if t.shape[-1] != self.hidden_size:
                raise LSTMError(
                    f"hidden{idx} has inconsistent hidden_size: got {t.shape[-1]}, expected {self.hidden_size}"
                )


def _reverse_rows(x, lengths):
    """Reverse time within each row's own length; an involution. `x` is (T, B, F)."""
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    t = torch.arange(T, device=x.device).unsqueeze(1)
    n = lengths.to(x.device).unsqueeze(0)
    idx = torch.where(t < n, n - 1 - t, t)
    return x.gather(0, idx.unsqueeze(-1).expand_as(x))


def _layer_fn(backend, variant, recompute):
    if backend == "reference":
        return lstm_layer
    from ..kernels.lstm import fused_lstm  # deferred: Triton is needed only for this backend, and slow to import

    return functools.partial(fused_lstm, variant=variant, recompute=recompute)


def _check_kernel_options(backend, variant, recompute):
    """`variant` and `recompute` choose the fused kernel, so they need backend='triton'."""
    check_flag("recompute", recompute)
    if backend == "reference":
        if variant != "auto" or recompute:
            raise LSTMError(f"variant and recompute choose the fused kernel: expected backend='triton' with "
                            f"variant={variant!r}, recompute={recompute}, got backend='reference'")
        return
    from ..kernels.lstm import VARIANTS  # deferred: importing kernels.lstm imports Triton

    if variant not in VARIANTS:
        raise LSTMError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _check_backend(backend, proj_size, dtype):
    """A known backend, within the fused kernel's limits (no projection; fp32, bf16, fp16)."""
    if backend not in BACKENDS:
        raise LSTMError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return
    from ..kernels.lstm import DTYPES  # deferred: importing kernels.lstm imports Triton

    if proj_size:
        raise LSTMError(
            f"backend='triton' does not support a projection: expected proj_size=0, got proj_size={proj_size}; "
            "use backend='reference' for proj_size > 0"
        )
    if dtype not in DTYPES:
        raise LSTMError(
            f"backend='triton' runs {', '.join(str(d) for d in DTYPES)}, got {dtype}; "
            f"use backend='reference' for {dtype}"
        )


class LSTM(nn.Module):
    """Drop-in for `nn.LSTM`, in plain tensor ops.

    Args are those of `nn.LSTM`, plus `backend`: `"reference"` (this package's
    `lstm_layer`: explicit BPTT in plain ops) or `"triton"` (`kernels.fused_lstm`, CUDA or the Triton
    interpreter; no `proj_size`, no fp64), and for `"triton"` the kernel's
    `variant` (`"auto"`, `"onchip"`, `"persistent"`, `"tiled"`; see
    `kernels/README.md`) and `recompute` (recompute the gates in the backward
    instead of storing them). `forward(input, hx=None)` takes
    `(T, B, I)`, `(B, T, I)` with `batch_first`, unbatched `(T, I)` or a
    `PackedSequence`, and returns `(output, (h_n, c_n))` as `nn.LSTM` does.

    Errors are those of `nn.LSTM`: `TypeError` for a wrong type (`bias=0`,
    `batch_first="False"`, `input_size=3.0`), and for a bad value `LSTMError`,
    which is both the `ValueError` and the `RuntimeError` that `nn.LSTM` raises
    (wrong state shapes, input size or device, an empty sequence).

    Not a subclass of `nn.LSTM`, so `isinstance(lstm, nn.LSTM)` is False: a
    subclass would inherit `nn.LSTM`'s private machinery (its `__init__`, `_apply`
    on every `.to()`, and `flatten_parameters` re-lay the weights into one cuDNN
    buffer; `_flat_weights`, `__setattr__` and pickling follow its internals).
    Code that checks the class should accept either,
    `isinstance(m, (torch.nn.LSTM, LSTM))`; the parameter names are the same.

    Example:
        >>> ref = torch.nn.LSTM(8, 16, num_layers=2)
        >>> lstm = LSTM(8, 16, num_layers=2)
        >>> lstm.load_state_dict(ref.state_dict())
        <All keys matched successfully>
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        proj_size=0,
        device=None,
        dtype=None,
        backend="reference",
        variant="auto",
        recompute=False,
    ):
        super().__init__()
        check_dropout(dropout, num_layers)
        check_flag("bias", bias)
        check_flag("batch_first", batch_first)
        check_flag("bidirectional", bidirectional, allow_01=True)
        check_size("input_size", input_size)
        check_size("hidden_size", hidden_size)
        check_size("num_layers", num_layers)
        check_proj_size(proj_size, hidden_size)
        _check_backend(backend, proj_size, dtype or torch.get_default_dtype())
        _check_kernel_options(backend, variant, recompute)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.backend = bool(bidirectional), proj_size, backend
        self.variant, self.recompute = variant, recompute
        self.num_directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        out_size = proj_size or hidden_size
        self._flat_weights_names = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else out_size * self.num_directions
            for suffix in ("", "_reverse")[: self.num_directions]:
                shapes = {
                    f"weight_ih_l{layer}{suffix}": (4 * hidden_size, layer_in),
                    f"weight_hh_l{layer}{suffix}": (4 * hidden_size, out_size),
                }
                if bias:
                    shapes[f"bias_ih_l{layer}{suffix}"] = (4 * hidden_size,)
                    shapes[f"bias_hh_l{layer}{suffix}"] = (4 * hidden_size,)
                if proj_size:
                    shapes[f"weight_hr_l{layer}{suffix}"] = (proj_size, hidden_size)
                for name, shape in shapes.items():
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(name)
        self.reset_parameters()

    def reset_parameters(self):
        _uniform_(self.parameters(), self.hidden_size)

    def flatten_parameters(self):
        """No-op, kept so code written for `nn.LSTM` runs unchanged."""

    @property
    def all_weights(self):
        per = len(self._flat_weights_names) // (self.num_layers * self.num_directions)
        ws = [getattr(self, n) for n in self._flat_weights_names]
        return [ws[i : i + per] for i in range(0, len(ws), per)]

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False), ("proj_size", 0), ("backend", "reference"),
                              ("variant", "auto"), ("recompute", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)!r}"
        return s

    def _weights(self, layer, direction):
        suffix = "_reverse" if direction else ""
        get = lambda kind: getattr(self, f"{kind}_l{layer}{suffix}", None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")

    def _unpack_input(self, input):
        """Returns `x` (T, B, I), `lengths` or None, and how to pack the output back."""
        if isinstance(input, PackedSequence):
            if input.data.dim() != 2:
                raise LSTMError(f"LSTM: expected PackedSequence data to be 2-D, got {input.data.dim()}-D")
            x, lengths = pad_packed_sequence(input)
            return x, lengths.to(x.device), input
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"LSTM: expected input to be a Tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise LSTMError(
                f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead: 2-D (T, I) unbatched or "
                f"3-D batched, given shape {tuple(input.shape)}"
            )
        if input.dim() == 2:
            return input.unsqueeze(1), None, "unbatched"
        return (input.transpose(0, 1) if self.batch_first else input), None, "batched"

    def _initial_state(
        self,
        hx: tuple[torch.Tensor, torch.Tensor] | None,  # (L*D, B, P), (L*D, B, H); 2-D when unbatched
        x: torch.Tensor,  # (T, B, I)
        kind,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num, batch = self.num_layers * self.num_directions, x.shape[1]
        shapes = ((num, batch, self.proj_size or self.hidden_size), (num, batch, self.hidden_size))
        if hx is None:
            return tuple(x.new_zeros(s) for s in shapes)
        check_hx_pair("LSTM", hx)
        unbatched = kind == "unbatched"
        dims = tuple(t.dim() for t in hx)
        if dims != ((2, 2) if unbatched else (3, 3)):
            layout = "unbatched 2-D input, hx and cx should also be 2-D" if unbatched else (
                "batched 3-D input, hx and cx should also be 3-D")
            raise LSTMError(f"For {layout} but got ({dims[0]}-D, {dims[1]}-D) tensors")
        states = []
        for idx, (name, t, shape) in enumerate(zip(("h_0", "c_0"), hx, shapes)):
            check_state_like(name, t, x)
            expected = (shape[0], shape[2]) if unbatched else shape
            if tuple(t.shape) != expected:
                raise LSTMError(f"Expected hidden[{idx}] ({name}) size {expected}, got {tuple(t.shape)}")
            states.append(t.unsqueeze(1) if unbatched else t)
        return tuple(states)

    def forward(self, input, hx=None):
        x, lengths, kind = self._unpack_input(input)
        check_input_like(x, self.weight_ih_l0)
        check_sequence(x, self.input_size)
        if self.backend == "triton":
            _check_backend(self.backend, self.proj_size, x.dtype)
        h0, c0 = self._initial_state(hx, x, kind)
        layer_fn = _layer_fn(self.backend, self.variant, self.recompute)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                xin = _reverse_rows(x, lengths) if direction else x
                out, (h, c) = layer_fn(xin, h0[k], c0[k], *self._weights(layer, direction), lengths=lengths)
                outs.append(_reverse_rows(out, lengths) if direction else out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if isinstance(kind, PackedSequence):
            return _repack(x, kind), (h_n, c_n)
        if kind == "unbatched":
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), (h_n, c_n)


def _repack(padded, like):
    """Packs `padded` (T, B, F), rows in the caller's order, in the layout of `like`."""
    rows = padded
    if like.sorted_indices is not None:
        rows = padded.index_select(1, like.sorted_indices)
    data = torch.cat([rows[t, :n] for t, n in enumerate(like.batch_sizes.tolist())])
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
