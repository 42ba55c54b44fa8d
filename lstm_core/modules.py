# B batch, T time, I input, H hidden, P projection (P = H without one), L layers, D directions
"""`LSTMCell` and `LSTM`: drop-ins for `nn.LSTMCell` and `nn.LSTM` built on `functional`.

Same constructor arguments, parameter names, registration order (so the same
`state_dict`), initialisation and `(output, (h_n, c_n))` structure. Packed input
runs as a padded batch with per-row lengths; a reverse direction reverses each
row within its own length, so both directions see the same `lstm_layer`.
"""

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .functional import lstm_cell, lstm_layer

__all__ = ["LSTMCell", "LSTM", "BACKENDS"]

BACKENDS = ("reference", "triton")


def _check_size(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _uniform_(params, hidden_size):
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for p in params:
            p.uniform_(-bound, bound)


def _check_like(name, t, ref):
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have dtype {ref.dtype} like the weights, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like the weights, got {t.device}")


def _check_shape(name, t, expected):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"Expected {name} of shape {tuple(expected)}, got {tuple(t.shape)}")


class LSTMCell(nn.Module):
    """Drop-in for `nn.LSTMCell`: `cell(x, (h, c)) -> (h', c')`, batched or unbatched."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__()
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
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

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: expected input to be 1-D or 2-D, got {input.dim()}-D input")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"LSTMCell: expected input.size(-1) == {self.input_size}, got {input.shape[-1]}")
        _check_like("input", input, self.weight_ih)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        state = (x.shape[0], self.hidden_size)
        if hx is None:
            h = c = x.new_zeros(state)
        else:
            h, c = hx
            for name, t in (("hx[0]", h), ("hx[1]", c)):
                _check_like(name, t, self.weight_ih)
                _check_shape(name, t, state if batched else state[1:])
            if not batched:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
        h, c = lstm_cell(x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


def _reverse_rows(x, lengths):
    """Reverse time within each row's own length; an involution. `x` is (T, B, F)."""
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    t = torch.arange(T, device=x.device).unsqueeze(1)
    n = lengths.to(x.device).unsqueeze(0)
    idx = torch.where(t < n, n - 1 - t, t)
    return x.gather(0, idx.unsqueeze(-1).expand_as(x))


def _layer_fn(backend):
    if backend == "reference":
        return lstm_layer
    from ..kernels.lstm import fused_lstm  # deferred: Triton is needed only for this backend, and slow to import

    return fused_lstm


class LSTM(nn.Module):
    """Drop-in for `nn.LSTM`, in plain tensor ops.

    Args are those of `nn.LSTM`, plus `backend`: `"reference"` (this package's
    autograd loop) or `"triton"` (`kernels.fused_lstm`, CUDA or the Triton
    interpreter). `forward(input, hx=None)` takes `(T, B, I)`, `(B, T, I)` with
    `batch_first`, unbatched `(T, I)` or a `PackedSequence`, and returns
    `(output, (h_n, c_n))` as `nn.LSTM` does.

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
    ):
        super().__init__()
        _check_size("input_size", input_size)
        _check_size("hidden_size", hidden_size)
        _check_size("num_layers", num_layers)
        _check_size("proj_size", proj_size, minimum=0)
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} acts between layers, so it does nothing with num_layers=1", stacklevel=2
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.backend = bidirectional, proj_size, backend
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
                              ("bidirectional", False), ("proj_size", 0), ("backend", "reference")):
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
                raise ValueError(f"LSTM: expected PackedSequence data to be 2-D, got {input.data.dim()}-D")
            x, lengths = pad_packed_sequence(input)
            return x, lengths.to(x.device), input
        if input.dim() not in (2, 3):
            raise ValueError(
                f"LSTM: expected input to be 2-D (unbatched) or 3-D (batched), got {input.dim()}-D input "
                f"of shape {tuple(input.shape)}"
            )
        if input.dim() == 2:
            return input.unsqueeze(1), None, "unbatched"
        return (input.transpose(0, 1) if self.batch_first else input), None, "batched"

    def _initial_state(self, hx, batch, kind, like):
        num = self.num_layers * self.num_directions
        out_size = self.proj_size or self.hidden_size
        shapes = ((num, batch, out_size), (num, batch, self.hidden_size))
        if hx is None:
            return tuple(like.new_zeros(s) for s in shapes)
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ValueError(f"LSTM: expected hx to be a tuple (h_0, c_0), got {type(hx).__name__}")
        states = []
        for name, t, shape in zip(("h_0", "c_0"), hx, shapes):
            _check_like(name, t, like)
            if kind == "unbatched":
                if t.dim() != 2:
                    raise ValueError(f"LSTM: unbatched input needs 2-D {name}, got {t.dim()}-D")
                _check_shape(name, t, (shape[0], shape[2]))
                t = t.unsqueeze(1)
            else:
                _check_shape(name, t, shape)
            states.append(t)
        return tuple(states)

    def forward(self, input, hx=None):
        x, lengths, kind = self._unpack_input(input)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"LSTM: expected input.size(-1) == {self.input_size}, got {x.shape[-1]}")
        _check_like("input", x, self.weight_ih_l0)
        h0, c0 = self._initial_state(hx, x.shape[1], kind, self.weight_ih_l0)
        layer_fn = _layer_fn(self.backend)
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
