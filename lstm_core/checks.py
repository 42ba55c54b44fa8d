# B batch, T time, I input, H hidden, P projection (P = H without one), L layers, D directions
"""Argument and input checks for `LSTM` and `LSTMCell`, raising what `nn.LSTM` raises.

`nn.LSTM` raises `TypeError` for an argument of the wrong type, `ValueError` for a bad
constructor value, input rank or input dtype, and `RuntimeError` for wrong shapes,
devices or an empty sequence. Here a wrong type raises `TypeError` and every bad value
raises `LSTMError`, which derives from both `ValueError` and `RuntimeError`: whichever
of the two a caller written for `nn.LSTM` catches, it catches ours. Messages keep
PyTorch's wording (its tests match on it) and add what was given.
"""

import numbers
import warnings

import torch

__all__ = ["LSTMError", "check_size", "check_flag", "check_dropout", "check_proj_size", "check_input_like",
           "check_state_like", "check_sequence", "check_hx_pair"]


class LSTMError(ValueError, RuntimeError):
    """A bad value given to `LSTM` or `LSTMCell`: an argument, an input or a state.

    Both a `ValueError` and a `RuntimeError`, the two classes `nn.LSTM` raises for bad
    values, so `except ValueError` and `except RuntimeError` both catch it.
    """


def _type_name(value):
    return f"{type(value).__name__} ({value!r})"


def check_size(name, value, minimum=1):
    """An int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {_type_name(value)}")
    if value < minimum:
        bound = "greater than zero" if minimum == 1 else f"at least {minimum}"
        raise LSTMError(f"{name} must be {bound}, got {value}")


def check_flag(name, value, allow_01=False):
    """A bool; with `allow_01`, also the ints 0 and 1 (which `nn.LSTM` takes for `bidirectional`)."""
    if isinstance(value, bool) or (allow_01 and isinstance(value, int) and value in (0, 1)):
        return
    expected = "bool (or 0/1)" if allow_01 else "bool"
    raise TypeError(f"{name} should be of type {expected}, got: {_type_name(value)}")


def check_dropout(dropout, num_layers, stacklevel=3):
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1:
        raise LSTMError(
            "dropout should be a number in range [0, 1] representing the probability of an element being "
            f"zeroed, got {dropout!r}"
        )
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            f"dropout={dropout} acts between layers, so it does nothing with num_layers=1", stacklevel=stacklevel
        )


def check_proj_size(proj_size, hidden_size):
    if isinstance(proj_size, bool) or not isinstance(proj_size, int):
        raise TypeError(f"proj_size should be of type int, got: {_type_name(proj_size)}")
    if proj_size < 0:
        raise LSTMError(f"proj_size should be a positive integer or zero to disable projections, got {proj_size}")
    if proj_size >= hidden_size:
        raise LSTMError(f"proj_size has to be smaller than hidden_size ({hidden_size}), got {proj_size}")


def check_input_like(x, weight):
    """The input has the weights' dtype and device."""
    if x.dtype != weight.dtype:
        raise LSTMError(
            f"RNN input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
            f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})"
        )
    if x.device != weight.device:
        raise LSTMError(
            "Input and parameter tensors are not at the same device, found input tensor at "
            f"{x.device} and parameter tensor at {weight.device}"
        )


def check_state_like(name, t, x):
    """A state `name` ("hx[0]", ...) has the input's dtype and device; the input was checked first."""
    if t.device != x.device:
        raise LSTMError(
            f"Input and hidden tensors are not at the same device, found input tensor at {x.device} "
            f"and hidden tensor {name} at {t.device}"
        )
    if t.dtype != x.dtype:
        raise LSTMError(f"Expected {name} of dtype {x.dtype} like the input, got {t.dtype}")


def check_sequence(
    x: torch.Tensor,  # (T, B, I)
    input_size: int,
):
    """The feature size and a non-empty time axis of a time-major input."""
    if x.shape[-1] != input_size:
        raise LSTMError(f"input.size(-1) must be equal to input_size. Expected {input_size}, got {x.shape[-1]}")
    if x.shape[0] == 0:
        raise LSTMError(f"Expected sequence length to be larger than 0 in RNN, got input with T=0 "
                        f"(time-major shape {tuple(x.shape)})")


def check_hx_pair(who, hx):
    """`hx` is a pair of tensors `(h, c)`."""
    if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(t, torch.Tensor) for t in hx):
        given = type(hx).__name__ if not isinstance(hx, (tuple, list)) else f"a {type(hx).__name__} of " + (
            ", ".join(type(t).__name__ for t in hx) or "nothing")
        raise TypeError(f"{who}: expected hx to be a tuple of two tensors (h_0, c_0), got {given}")
