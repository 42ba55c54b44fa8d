"""Bad input to `lstm_core`: a ValueError that names what was expected and what was given,
raised where `nn.LSTM` raises (construction or forward), and the restrictions on what it may call."""

import pathlib
import re

import pytest
import torch

import leanfit.lstm_core as lstm_core
from leanfit.lstm_core import LSTM, LSTMCell


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_size=0, hidden_size=4), r"input_size must be a positive integer, got 0"),
        (dict(input_size=3, hidden_size=-1), r"hidden_size must be a positive integer, got -1"),
        (dict(input_size=3, hidden_size=4, num_layers=0), r"num_layers must be a positive integer, got 0"),
        (dict(input_size=3, hidden_size=4, proj_size=-2), r"proj_size must be an integer >= 0, got -2"),
        (dict(input_size=3, hidden_size=4, proj_size=4), r"proj_size must be smaller than hidden_size \(4\), got 4"),
        (dict(input_size=3, hidden_size=4, dropout=1.5), r"dropout must be a number in \[0, 1\], got 1.5"),
        (dict(input_size=3, hidden_size=4, dropout=-0.1), r"dropout must be a number in \[0, 1\], got -0.1"),
        (dict(input_size=3, hidden_size=4, backend="cuda"), r"backend must be one of .*got 'cuda'"),
    ],
    ids=["input_size=0", "hidden_size<0", "num_layers=0", "proj_size<0", "proj>=hidden", "dropout>1",
         "dropout<0", "backend"],
)
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSTM(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(proj_size=4), dict(hidden_size=0), dict(dropout=2.0)],
                         ids=["proj>=hidden", "hidden_size=0", "dropout=2"])
def test_nn_lstm_rejects_the_same_at_construction(kwargs):
    """The reference raises on the same arguments at the same point, so ours raises where it does."""
    full = dict(input_size=3, hidden_size=4) | kwargs
    with pytest.raises(ValueError):
        torch.nn.LSTM(**full)
    with pytest.raises(ValueError):
        LSTM(**full)


def test_dropout_with_one_layer_warns_like_nn_lstm():
    with pytest.warns(UserWarning, match="num_layers=1"):
        LSTM(3, 4, dropout=0.5)


@pytest.mark.parametrize(
    "make_input,match",
    [
        (lambda: torch.randn(2, 3, 4, 3), r"expected input to be 2-D \(unbatched\) or 3-D \(batched\), got 4-D"),
        (lambda: torch.randn(5), r"expected input to be 2-D \(unbatched\) or 3-D \(batched\), got 1-D"),
        (lambda: torch.randn(5, 2, 6), r"expected input.size\(-1\) == 3, got 6"),
        (lambda: torch.randn(5, 2, 3, dtype=torch.float64), r"input must have dtype torch.float32.*got torch.float64"),
        (lambda: torch.randn(5, 2, 3, device="meta"), r"input must be on cpu.*got meta"),
    ],
    ids=["rank4", "rank1", "feature-size", "dtype", "device"],
)
def test_forward_rejects_input(make_input, match):
    with pytest.raises(ValueError, match=match):
        LSTM(3, 4)(make_input())


@pytest.mark.parametrize(
    "hx,x_shape,match",
    [
        ((torch.zeros(1, 2, 4), torch.zeros(1, 3, 4)), (5, 2, 3),
         r"Expected c_0 of shape \(1, 2, 4\), got \(1, 3, 4\)"),
        ((torch.zeros(2, 2, 4), torch.zeros(1, 2, 4)), (5, 2, 3),
         r"Expected h_0 of shape \(1, 2, 4\), got \(2, 2, 4\)"),
        ((torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)), (5, 3), r"unbatched input needs 2-D h_0, got 3-D"),
        ((torch.zeros(1, 4),), (5, 2, 3), r"expected hx to be a tuple \(h_0, c_0\)"),
        ((torch.zeros(1, 2, 4, dtype=torch.float64), torch.zeros(1, 2, 4)), (5, 2, 3),
         r"h_0 must have dtype torch.float32.*got torch.float64"),
    ],
    ids=["c0-batch", "h0-layers", "unbatched-3d-hx", "one-state", "hx-dtype"],
)
def test_forward_rejects_hx(hx, x_shape, match):
    with pytest.raises(ValueError, match=match):
        LSTM(3, 4)(torch.randn(x_shape), hx)


def test_projection_hx_shape_names_proj_size():
    with pytest.raises(ValueError, match=r"Expected h_0 of shape \(1, 2, 2\), got \(1, 2, 4\)"):
        LSTM(3, 4, proj_size=2)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda c: c(torch.randn(2, 3, 3)), r"expected input to be 1-D or 2-D, got 3-D"),
        (lambda c: c(torch.randn(2, 5)), r"expected input.size\(-1\) == 3, got 5"),
        (lambda c: c(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(2, 4))), r"Expected hx\[0\] of shape \(2, 4\)"),
        (lambda c: c(torch.randn(2, 3, dtype=torch.float64)), r"input must have dtype torch.float32"),
    ],
    ids=["rank3", "feature-size", "hx-shape", "dtype"],
)
def test_cell_rejects(call, match):
    with pytest.raises(ValueError, match=match):
        call(LSTMCell(3, 4))


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
