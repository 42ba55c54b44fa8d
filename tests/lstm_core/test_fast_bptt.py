# B batch, T time, I input, H hidden
"""`lstm_layer`'s fast path (explicit backpropagation through time) against the plain autograd loop
`lstm_layer_autograd` in fp64, and against `torch.nn.LSTM` in fp32: outputs, final states and the
gradients of x, h0, c0 and every weight and bias, for random upstream gradients into any of out, h_n, c_n."""

import pytest
import torch
from torch.autograd import forward_ad

from leanfit.lstm_core.functional import _LSTMLayer, lstm_layer, lstm_layer_autograd
from tests.helpers import assert_close

NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")
SHAPES = {  # T, B, I, H
    "T1": (1, 3, 4, 5),
    "T7-H5": (7, 4, 3, 5),
    "B1-H12": (6, 1, 7, 12),
}
LENGTHS = {"full": None, "packed": "packed"}
UPSTREAM = {
    "all": ("out", "h_n", "c_n"),
    "out": ("out",),
    "h_n": ("h_n",),
    "c_n": ("c_n",),
    "states": ("h_n", "c_n"),
}


def _inputs(T, B, I, H, dtype=torch.float64, bias=True, scale=1.0):
    shapes = [(T, B, I), (B, H), (B, H), (4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]
    inputs = [scale * torch.randn(s, dtype=torch.float64) for s in shapes]
    if not bias:
        inputs[5:] = [None, None]
    return [None if t is None else t.to(dtype).requires_grad_() for t in inputs]


def _lengths(kind, T, B):
    """None, or per-row lengths with a full row and a one-step row first."""
    if kind is None:
        return None
    return torch.tensor(([T, 1] + torch.randint(1, T + 1, (B,)).tolist())[:B])


def _run(fn, inputs, lengths, upstream):
    """`fn`'s outputs and the gradients of every input given the upstream gradients of `upstream`'s outputs."""
    out, (h_n, c_n) = fn(*inputs, lengths=lengths)
    outputs = dict(out=out, h_n=h_n, c_n=c_n)
    used = [k for k in outputs if k in upstream]
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad([outputs[k] for k in used], leaves, [upstream[k] for k in used])
    return outputs, grads


def _compare(ref, fast, names, dtype=None):
    (r_out, r_grads), (f_out, f_grads) = ref, fast
    for k in r_out:
        assert f_out[k].dtype == r_out[k].dtype, f"{k}: dtype {f_out[k].dtype} != {r_out[k].dtype}"
        assert_close(k, r_out[k], f_out[k], dtype)
    for name, r, f in zip(names, r_grads, f_grads):
        assert_close(f"grad {name}", r, f, dtype)


@pytest.mark.parametrize("which", UPSTREAM.values(), ids=UPSTREAM.keys())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_fast_path_matches_autograd_loop_fp64(shape, kind, bias, which):
    T, B, I, H = shape
    inputs = _inputs(T, B, I, H, bias=bias)
    lengths = _lengths(kind, T, B)
    upstream = {k: torch.randn(s, dtype=torch.float64) for k, s in
                (("out", (T, B, H)), ("h_n", (B, H)), ("c_n", (B, H))) if k in which}
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    _compare(_run(lstm_layer_autograd, inputs, lengths, upstream), _run(lstm_layer, inputs, lengths, upstream), names)


def test_fast_path_runs_the_function():
    """The comparisons above check the fast path only if `lstm_layer` takes it."""
    out, (h_n, c_n) = lstm_layer(*_inputs(3, 2, 4, 5))
    assert all(type(t.grad_fn).__name__ == "_LSTMLayerBackward" for t in (out, h_n, c_n))


@pytest.mark.parametrize("kind", LENGTHS.values(), ids=LENGTHS.keys())
def test_fast_path_matches_nn_lstm_fp32(kind):
    """fp32 against `nn.LSTM` with the same weights, non-zero h0 and c0, a packed batch where `lengths` is given."""
    T, B, I, H = 9, 5, 6, 10
    torch.manual_seed(1)
    ref = torch.nn.LSTM(I, H)
    params = [p.detach().clone().requires_grad_() for p in ref.parameters()]  # w_ih, w_hh, b_ih, b_hh
    x, h0, c0 = (torch.randn(s, requires_grad=True) for s in ((T, B, I), (B, H), (B, H)))
    lengths = _lengths(kind, T, B)
    d_out, d_h, d_c = torch.randn(T, B, H), torch.randn(B, H), torch.randn(B, H)
    inp = x if lengths is None else torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    r_out, (r_h, r_c) = ref(inp, (h0.unsqueeze(0), c0.unsqueeze(0)))
    if lengths is not None:
        r_out = torch.nn.utils.rnn.pad_packed_sequence(r_out, total_length=T)[0]
    r_grads = torch.autograd.grad((r_out, r_h[0], r_c[0]), [x, h0, c0, *ref.parameters()], (d_out, d_h, d_c))
    out, (h_n, c_n) = lstm_layer(x, h0, c0, *params, lengths=lengths)
    grads = torch.autograd.grad((out, h_n, c_n), [x, h0, c0, *params], (d_out, d_h, d_c))
    _compare(((dict(out=r_out, h_n=r_h[0], c_n=r_c[0]), r_grads)), (dict(out=out, h_n=h_n, c_n=c_n), grads), NAMES)


@pytest.mark.parametrize("wanted", [("x",), ("w_ih", "w_hh"), ("h0", "c0"), ("b_hh",), ("b_ih", "b_hh")])
def test_only_some_inputs_need_grad(wanted):
    T, B, I, H = 5, 3, 4, 6
    inputs = [t.detach().requires_grad_(n in wanted) for n, t in zip(NAMES, _inputs(T, B, I, H))]
    lengths = torch.tensor([5, 2, 4])
    upstream = [torch.randn(s, dtype=torch.float64) for s in ((T, B, H), (B, H), (B, H))]
    grads = {}
    for fn in (lstm_layer_autograd, lstm_layer):
        out, (h_n, c_n) = fn(*inputs, lengths=lengths)
        grads[fn] = torch.autograd.grad((out, h_n, c_n), [t for t in inputs if t.requires_grad], upstream)
    for name, r, f in zip(wanted, grads[lstm_layer_autograd], grads[lstm_layer]):
        assert_close(f"grad {name}", r, f)


def test_inference_keeps_no_graph():
    inputs = _inputs(4, 2, 3, 5)
    with torch.no_grad():
        ref = lstm_layer_autograd(*inputs)
        out, (h_n, c_n) = lstm_layer(*inputs)
    plain = [t.detach() for t in inputs]
    out2, _ = lstm_layer(*plain)
    assert out.grad_fn is None and h_n.grad_fn is None and out2.grad_fn is None
    assert_close("out", ref[0], out)
    assert_close("out without requires_grad", ref[0], out2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
def test_dtype_in_is_dtype_out(dtype):
    """bf16 and fp16 compute in fp32 and cast back; fp64 stays fp64. Gradients come back in the input dtype."""
    T, B, I, H = 5, 3, 4, 6
    inputs = _inputs(T, B, I, H, dtype=dtype, scale=0.5)
    lengths = torch.tensor([5, 1, 3])
    upstream = {k: torch.randn(s).to(dtype) for k, s in (("out", (T, B, H)), ("h_n", (B, H)), ("c_n", (B, H)))}
    ref, fast = _run(lstm_layer_autograd, inputs, lengths, upstream), _run(lstm_layer, inputs, lengths, upstream)
    assert all(g.dtype == dtype for g in fast[1])
    _compare(ref, fast, NAMES, dtype)


def test_empty_batch():
    inputs = _inputs(3, 0, 4, 5)
    out, (h_n, c_n) = lstm_layer(*inputs)
    assert out.shape == (3, 0, 5) and h_n.shape == c_n.shape == (0, 5)
    grads = torch.autograd.grad(out.sum() + h_n.sum() + c_n.sum(), inputs)
    assert all(g.shape == t.shape for g, t in zip(grads, inputs))
    assert all(g.abs().sum() == 0 for g in grads[3:])


def test_projection_falls_back_to_the_loop():
    T, B, I, H, P = 4, 2, 3, 6, 4
    x, h0, c0, w_ih, _, b_ih, b_hh = _inputs(T, B, I, H)
    w_hh, w_hr = torch.randn(4 * H, P, dtype=torch.float64), torch.randn(P, H, dtype=torch.float64)
    out, (h_n, _) = lstm_layer(x, h0[:, :P], c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    assert out.shape == (T, B, P) and type(out.grad_fn).__name__ != "_LSTMLayerBackward"
    assert_close("out", lstm_layer_autograd(x, h0[:, :P], c0, w_ih, w_hh, b_ih, b_hh, w_hr)[0], out)


@pytest.mark.parametrize("kind", LENGTHS.values(), ids=LENGTHS.keys())
def test_gradcheck_and_gradgradcheck(kind):
    """First order through the explicit backward; second order through the loop it recomputes with."""
    T, B, I, H = 3, 2, 2, 3
    inputs = _inputs(T, B, I, H, scale=0.5)
    lengths = None if kind is None else torch.tensor([3, 1])

    def fn(*args):
        out, (h_n, c_n) = lstm_layer(*args, lengths=lengths)
        return out, h_n, c_n

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's forward-AD import, not ours
def test_forward_mode_ad_falls_back_to_the_loop():
    """`_LSTMLayer` has no jvp: under forward AD `lstm_layer` takes the loop, whose tangents are checked here."""
    T, B, I, H = 4, 2, 3, 5
    primals = [t.detach() for t in _inputs(T, B, I, H)]
    tangents = [torch.randn_like(t) for t in primals]
    found = {}
    for fn in (lstm_layer_autograd, lstm_layer):
        with forward_ad.dual_level():
            out = fn(*[forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)])[0]
            found[fn] = forward_ad.unpack_dual(out).tangent
    assert_close("out tangent", found[lstm_layer_autograd], found[lstm_layer])


def test_function_checked_directly_with_gradcheck():
    """`_LSTMLayer` on its own (no casting wrapper), both biases and the lengths path."""
    inputs = _inputs(3, 3, 2, 2, scale=0.5)
    lengths = torch.tensor([2, 3, 1])
    assert torch.autograd.gradcheck(lambda *a: _LSTMLayer.apply(*a, lengths), inputs)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's import, not ours
def test_vmap_falls_back_to_the_loop():
    """`_LSTMLayer` has no vmap rule: under `torch.func.vmap` `lstm_layer` takes the loop."""
    T, B, I, H = 3, 2, 4, 5
    x, *rest = [t.detach() for t in _inputs(T, B, I, H)]
    xs = torch.randn(3, *x.shape, dtype=x.dtype)
    found = [torch.func.vmap(lambda x, fn=fn: fn(x, *rest)[0])(xs) for fn in (lstm_layer_autograd, lstm_layer)]
    assert_close("vmapped out", *found)


def test_autocast_falls_back_to_the_loop():
    """Under autocast the products run in bf16, which `_LSTMLayer`'s fp32 buffers do not take: the loop runs."""
    inputs = [t.detach().float().requires_grad_() for t in _inputs(4, 3, 5, 6)]
    found = {}
    for fn in (lstm_layer_autograd, lstm_layer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h_n, c_n) = fn(*inputs)
        found[fn] = (out, *torch.autograd.grad(out.sum() + h_n.sum() + c_n.sum(), inputs))
    for name, r, f in zip(("out", *NAMES), found[lstm_layer_autograd], found[lstm_layer]):
        assert_close(name, r, f)
