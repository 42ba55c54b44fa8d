"""Bad input to `lstm_core`: the exception class `nn.LSTM` raises (TypeError for a wrong type; `LSTMError`,
both a ValueError and a RuntimeError, for a bad value) with a message that names what was expected and what
was given, raised where `nn.LSTM` raises; and the restrictions on what the package may call."""

import pathlib
import re

import pytest
import torch

import leanfit.lstm_core as lstm_core
from leanfit.lstm_core import LSTM, LSTMCell, LSTMError


def test_lstm_error_is_both_classes_nn_lstm_raises():
    assert issubclass(LSTMError, ValueError) and issubclass(LSTMError, RuntimeError)
    assert not issubclass(LSTMError, TypeError)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_size=0, hidden_size=4), r"input_size must be greater than zero, got 0"),
        (dict(input_size=3, hidden_size=-1), r"hidden_size must be greater than zero, got -1"),
        (dict(input_size=3, hidden_size=4, num_layers=0), r"num_layers must be greater than zero, got 0"),
        (dict(input_size=3, hidden_size=4, proj_size=-2), r"proj_size should be a positive integer or zero .*got -2"),
        (dict(input_size=3, hidden_size=4, proj_size=4), r"proj_size has to be smaller than hidden_size \(4\), got 4"),
        (dict(input_size=3, hidden_size=4, dropout=1.5), r"dropout should be a number in range \[0, 1\].*got 1.5"),
        (dict(input_size=3, hidden_size=4, dropout="0.5"), r"dropout should be a number .*got '0.5'"),
        (dict(input_size=3, hidden_size=4, backend="cuda"), r"backend must be one of .*got 'cuda'"),
    ],
    ids=["input_size=0", "hidden_size<0", "num_layers=0", "proj_size<0", "proj>=hidden", "dropout>1",
         "dropout-str", "backend"],
)
def test_constructor_rejects_value(kwargs, match):
    with pytest.raises(LSTMError, match=match):
        LSTM(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bias=0), r"bias should be of type bool, got: int \(0\)"),
        (dict(bias="True"), r"bias should be of type bool, got: str \('True'\)"),
        (dict(batch_first="False"), r"batch_first should be of type bool, got: str \('False'\)"),
        (dict(batch_first=1), r"batch_first should be of type bool, got: int \(1\)"),
        (dict(bidirectional="False"), r"bidirectional should be of type bool \(or 0/1\), got: str \('False'\)"),
        (dict(bidirectional=2), r"bidirectional should be of type bool \(or 0/1\), got: int \(2\)"),
        (dict(input_size=3.0), r"input_size should be of type int, got: float \(3.0\)"),
        (dict(input_size=True), r"input_size should be of type int, got: bool \(True\)"),
        (dict(hidden_size="4"), r"hidden_size should be of type int, got: str \('4'\)"),
        (dict(num_layers=2.0), r"num_layers should be of type int, got: float \(2.0\)"),
        (dict(proj_size=1.5), r"proj_size should be of type int, got: float \(1.5\)"),
    ],
    ids=["bias=0", "bias-str", "batch_first-str", "batch_first=1", "bidirectional-str", "bidirectional=2",
         "input_size-float", "input_size-bool", "hidden_size-str", "num_layers-float", "proj_size-float"],
)
def test_constructor_rejects_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        LSTM(**(dict(input_size=3, hidden_size=4) | kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [dict(proj_size=4), dict(hidden_size=0), dict(dropout=2.0), dict(bias=0), dict(batch_first="False"),
     dict(input_size=3.0), dict(hidden_size="4"), dict(num_layers=2.0), dict(proj_size=1.5)],
    ids=["proj>=hidden", "hidden_size=0", "dropout=2", "bias=0", "batch_first-str", "input_size-float",
         "hidden_size-str", "num_layers-float", "proj_size-float"],
)
def test_raises_what_nn_lstm_raises_at_construction(kwargs):
    """nn.LSTM is the reference: ours raises at the same point, an instance of the class it raises."""
    full = dict(input_size=3, hidden_size=4) | kwargs
    with pytest.raises(Exception) as ref:
        torch.nn.LSTM(**full)
    with pytest.raises(type(ref.value)):
        LSTM(**full)


def test_bidirectional_takes_0_and_1_like_nn_lstm():
    for flag in (0, 1):
        ours, ref = LSTM(3, 4, bidirectional=flag), torch.nn.LSTM(3, 4, bidirectional=flag)
        assert list(ours.state_dict()) == list(ref.state_dict())


def test_dropout_with_one_layer_warns_like_nn_lstm():
    with pytest.warns(UserWarning, match="num_layers=1"):
        LSTM(3, 4, dropout=0.5)


def _both_raise(make_ref, make_ours, call):
    """Runs `call` on nn.LSTM(Cell) and on ours; returns (nn's exception, ours). Ours must be an instance of
    the class nn's is, so an `except` written for nn.LSTM catches it."""
    with pytest.raises(Exception) as ref:
        call(make_ref())
    with pytest.raises(Exception) as ours:
        call(make_ours())
    assert isinstance(ours.value, type(ref.value)), (type(ref.value), type(ours.value), str(ours.value))
    return ref.value, ours.value


FORWARD_INPUTS = {
    "rank4": (lambda: torch.randn(2, 3, 4, 3), r"Expected input to be 2D or 3D, got 4D instead.*\(2, 3, 4, 3\)"),
    "rank1": (lambda: torch.randn(5), r"Expected input to be 2D or 3D, got 1D instead"),
    "feature-size": (lambda: torch.randn(5, 2, 6), r"input.size\(-1\) must be equal to input_size. Expected 3, got 6"),
    "dtype": (lambda: torch.randn(5, 2, 3, dtype=torch.float64),
              r"RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)"),
    "device": (lambda: torch.randn(5, 2, 3, device="meta"),
               r"Input and parameter tensors are not at the same device, found input tensor at meta"),
    "T=0": (lambda: torch.randn(0, 2, 3), r"Expected sequence length to be larger than 0 in RNN.*\(0, 2, 3\)"),
    "T=0-unbatched": (lambda: torch.randn(0, 3), r"Expected sequence length to be larger than 0"),
}


@pytest.mark.parametrize("make_input,match", FORWARD_INPUTS.values(), ids=FORWARD_INPUTS.keys())
def test_forward_rejects_input(make_input, match):
    x = make_input()
    _, ours = _both_raise(lambda: torch.nn.LSTM(3, 4), lambda: LSTM(3, 4), lambda m: m(x))
    assert isinstance(ours, LSTMError)
    assert re.search(match, str(ours)), str(ours)


def test_forward_rejects_a_non_tensor_input():
    with pytest.raises(TypeError, match=r"expected input to be a Tensor or a PackedSequence, got list"):
        LSTM(3, 4)([[1.0, 2.0, 3.0]])


HX_CASES = {
    "c0-batch": ((torch.zeros(1, 2, 4), torch.zeros(1, 3, 4)), (5, 2, 3),
                 r"Expected hidden\[1\] \(c_0\) size \(1, 2, 4\), got \(1, 3, 4\)"),
    "h0-layers": ((torch.zeros(2, 2, 4), torch.zeros(1, 2, 4)), (5, 2, 3),
                  r"Expected hidden\[0\] \(h_0\) size \(1, 2, 4\), got \(2, 2, 4\)"),
    "unbatched-h0": ((torch.zeros(2, 4), torch.zeros(1, 4)), (5, 3),
                     r"Expected hidden\[0\] \(h_0\) size \(1, 4\), got \(2, 4\)"),
    "unbatched-3d-hx": ((torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)), (5, 3),
                        r"For unbatched 2-D input, hx and cx should also be 2-D but got \(3-D, 3-D\)"),
    "batched-2d-hx": ((torch.zeros(1, 4), torch.zeros(1, 4)), (5, 2, 3),
                      r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 2-D\)"),
}


@pytest.mark.parametrize("hx,x_shape,match", HX_CASES.values(), ids=HX_CASES.keys())
def test_forward_rejects_hx(hx, x_shape, match):
    x = torch.randn(x_shape)
    _, ours = _both_raise(lambda: torch.nn.LSTM(3, 4), lambda: LSTM(3, 4), lambda m: m(x, hx))
    assert isinstance(ours, LSTMError)
    assert re.search(match, str(ours)), str(ours)


@pytest.mark.parametrize(
    "hx,exc,match",
    [
        ((torch.zeros(1, 2, 4),), TypeError, r"expected hx to be a tuple of two tensors \(h_0, c_0\), got a tuple"),
        (torch.zeros(1, 2, 4), TypeError, r"expected hx to be a tuple of two tensors \(h_0, c_0\), got Tensor"),
        ((torch.zeros(1, 2, 4, dtype=torch.float64), torch.zeros(1, 2, 4)), LSTMError,
         r"Expected h_0 of dtype torch.float32 like the input, got torch.float64"),
        ((torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, device="meta")), LSTMError,
         r"Input and hidden tensors are not at the same device, found input tensor at cpu and hidden tensor c_0 "
         r"at meta"),
    ],
    ids=["one-state", "bare-tensor", "hx-dtype", "hx-device"],
)
def test_forward_rejects_hx_ours(hx, exc, match):
    """Cases where nn.LSTM fails by accident (IndexError, a oneDNN message): ours says what it expected."""
    with pytest.raises(exc, match=match):
        LSTM(3, 4)(torch.randn(5, 2, 3), hx)


def test_projection_hx_shape_names_proj_size():
    x, hx = torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    _, ours = _both_raise(lambda: torch.nn.LSTM(3, 4, proj_size=2), lambda: LSTM(3, 4, proj_size=2),
                          lambda m: m(x, hx))
    assert re.search(r"Expected hidden\[0\] \(h_0\) size \(1, 2, 2\), got \(1, 2, 4\)", str(ours)), str(ours)


CELL_CASES = {
    "rank3": (lambda c: c(torch.randn(2, 3, 3)), r"LSTMCell: Expected input to be 1D or 2D, got 3D instead"),
    "hx-rank4": (lambda c: c(torch.randn(2, 3), (torch.zeros(2, 1, 1, 4), torch.zeros(2, 4))),
                 r"LSTMCell: Expected hx\[0\] to be 1D or 2D, got 4D instead"),
    "feature-size": (lambda c: c(torch.randn(2, 5)), r"input has inconsistent input_size: got 5 expected 3"),
    "hx-batch": (lambda c: c(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(2, 4))),
                 r"Input batch size 2 doesn't match hidden0 batch size 3"),
    "hx-broadcast": (lambda c: c(torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(1, 4))),
                     r"Input batch size 2 doesn't match hidden1 batch size 1"),
    "hx-size": (lambda c: c(torch.randn(2, 3), (torch.zeros(2, 5), torch.zeros(2, 4))),
                r"hidden0 has inconsistent hidden_size: got 5, expected 4"),
    "unbatched-2d-hx": (lambda c: c(torch.randn(3), (torch.zeros(1, 4), torch.zeros(1, 4))),
                        r"LSTMCell: 1-D input needs 1-D hx\[0\], got 2-D"),
    "dtype": (lambda c: c(torch.randn(2, 3, dtype=torch.float64)),
              r"RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)"),
}


FP64_SHAPE_ERRORS = {
    "input-size": ((3, 11), ((3, 20), (3, 20))),
    "hidden-size": ((3, 10), ((3, 21), (3, 21))),
    "batch-size": ((3, 10), ((5, 20), (5, 20))),
    "hidden1-batch-size": ((3, 10), ((3, 20), (5, 20))),
    "input-size-no-hx": ((3, 11), None),
}


@pytest.mark.parametrize("x_shape,hx_shapes", FP64_SHAPE_ERRORS.values(), ids=FP64_SHAPE_ERRORS.keys())
def test_cell_reports_a_shape_error_before_the_dtype_like_nn_lstmcell(x_shape, hx_shapes):
    """An fp64 input of the wrong size meets an fp32 cell: nn.LSTMCell names the size, so ours does too."""
    x = torch.randn(x_shape, dtype=torch.float64)
    hx = None if hx_shapes is None else tuple(torch.randn(s, dtype=torch.float64) for s in hx_shapes)
    ref, ours = _both_raise(lambda: torch.nn.LSTMCell(10, 20), lambda: LSTMCell(10, 20), lambda c: c(x, hx))
    assert str(ours) == str(ref)


@pytest.mark.parametrize("call,match", CELL_CASES.values(), ids=CELL_CASES.keys())
def test_cell_rejects(call, match):
    _, ours = _both_raise(lambda: torch.nn.LSTMCell(3, 4), lambda: LSTMCell(3, 4), call)
    assert isinstance(ours, LSTMError)
    assert re.search(match, str(ours)), str(ours)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(input_size=3.0), TypeError, r"input_size should be of type int, got: float \(3.0\)"),
        (dict(hidden_size=-1), LSTMError, r"hidden_size must be greater than zero, got -1"),
        (dict(bias=0), TypeError, r"bias should be of type bool, got: int \(0\)"),
    ],
    ids=["input_size-float", "hidden_size<0", "bias=0"],
)
def test_cell_constructor_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LSTMCell(**(dict(input_size=3, hidden_size=4) | kwargs))


FORBIDDEN = [r"nn\.LSTM\b", r"nn\.LSTMCell\b", r"from\s+torch\.nn\s+import[^\n]*\bLSTM", r"_VF",
             r"_thnn_fused_lstm_cell", r"RNNBase", r"torch\.lstm\b", r"torch\.lstm_cell\b", r"_cudnn_rnn"]


def test_source_uses_no_builtin_lstm():
    """The package's own source may not call PyTorch's LSTM implementations (docstrings may name them)."""
    root = pathlib.Path(lstm_core.__file__).parent
    files = sorted(root.glob("*.py"))
    assert files, f"no source found under {root}"
    offences = []
    for path in files:
        code = _strip_docstrings_and_comments(path.read_text())
        for pattern in FORBIDDEN:
            for m in re.finditer(pattern, code, flags=re.MULTILINE):
                offences.append(f"{path.name}: {m.group(0)!r}")
    assert not offences, f"forbidden calls in lstm_core: {offences}"


def test_source_scan_catches_a_forbidden_call():
    """The scanner itself must flag a call hidden among allowed code."""
    code = _strip_docstrings_and_comments(
        '"""nn.LSTM in a docstring is fine"""\nout = torch._VF.lstm(x)  # nn.LSTMCell in a comment too\n'
    )
    assert [p for p in FORBIDDEN if re.search(p, code)] == [r"_VF"]
    assert re.search(FORBIDDEN[2], "from torch.nn import GRU, LSTM")


def _strip_docstrings_and_comments(source):
    """The source with docstrings blanked and comments cut, line structure kept."""
    import ast
    import io
    import tokenize

    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                for n in range(first.lineno - 1, first.end_lineno):
                    lines[n] = ""
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return "\n".join(lines)
