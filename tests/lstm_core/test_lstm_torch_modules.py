# B batch, T time, I input, H hidden, P projection
"""Port of PyTorch's module tests for nn.LSTM / nn.LSTMCell, run on both classes (sources: `lstm_port.py`).

The samples are `module_inputs_torch_nn_LSTM` and `module_inputs_torch_nn_LSTMCell` from torch 2.13.0's
`common_modules.py`: unbatched inputs whose reference is the same module run on a batch of one. They drive the
checks of `test/test_modules.py`: forward against that reference, gradcheck and gradgradcheck (fast mode, as
`common_utils.gradcheck` runs them), non-contiguous inputs, pickling, repr, factory kwargs, construction under a
`meta` device context, and the error inputs with their exception class and message. Not ported: the CUDA-only
checks (device transfer, CPU/GPU parity), `test_memory_format` (no 4-D/5-D input) and
`test_if_train_and_eval_modes_differ` (it only checks a ModuleInfo flag).
"""

import io
import itertools
import pickle

import pytest
import torch
from torch.testing import make_tensor

from leanfit.lstm_core import LSTM, LSTMError
from tests.helpers import assert_close
from tests.lstm_core.lstm_port import CELLS, LSTMS, TRITON, TRITON_TOL, device_of, is_triton, params, twin


def _lstm_samples():
    """module_inputs_torch_nn_LSTM: 2 layers, I=2, H=3, every bias / batch_first / bidirectional / proj_size
    in {0, 2}; an unbatched (2, I) input without hx, and a (3, I) one with hx."""
    samples = {}
    for bias, batch_first, bidir, proj in itertools.product((False, True), (False, True), (False, True), (0, 2)):
        ctor = dict(input_size=2, hidden_size=3, num_layers=2, proj_size=proj, batch_first=batch_first, bias=bias,
                    bidirectional=bidir)
        name = f"bias={bias}-bf={batch_first}-bidir={bidir}-proj={proj}"
        samples[f"{name}-no-hx"] = (ctor, 2, False)
        samples[f"{name}-hx"] = (ctor, 3, True)
    return samples


LSTM_SAMPLES = _lstm_samples()
CELL_SAMPLES = {
    "default": dict(input_size=5, hidden_size=10),
    "bias=True": dict(input_size=5, hidden_size=10, bias=True),
}


def _lstm_args(ctor, T, with_hx, dtype, device, requires_grad):
    """The forward args of one sample: `x` (T, I) and, with hx, `(h_0, c_0)` ((L*D, P), (L*D, H))."""
    make = lambda *shape: make_tensor(shape, device=device, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    x = make(T, ctor["input_size"])
    if not with_hx:
        return (x,)
    n = ctor["num_layers"] * (2 if ctor["bidirectional"] else 1)
    return x, (make(n, ctor["proj_size"] or ctor["hidden_size"]), make(n, ctor["hidden_size"]))


def _cell_args(ctor, dtype, device, requires_grad):
    make = lambda *shape: make_tensor(shape, device=device, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return make(ctor["input_size"]), (make(ctor["hidden_size"]), make(ctor["hidden_size"]))


def _batch_of_one(m, args, batch_first):
    """no_batch_dim_reference_lstm: the unbatched call, run as a batch of one and squeezed back."""
    x = args[0].unsqueeze(0 if batch_first else 1)
    hx = tuple(t.unsqueeze(1) for t in args[1]) if len(args) > 1 else None
    out, (h, c) = m(x, hx)
    return out.squeeze(0 if batch_first else 1), (h.squeeze(1), c.squeeze(1))


def _cell_batch_of_one(m, args):
    x, (h, c) = args
    h1, c1 = m(x.unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0)))
    return h1.squeeze(0), c1.squeeze(0)


def _flat(obj):
    """Tensors of nested tuples, in order: `(out, (h, c))` -> `[out, h, c]`."""
    return [obj] if isinstance(obj, torch.Tensor) else [t for o in obj for t in _flat(o)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("sample", LSTM_SAMPLES.values(), ids=LSTM_SAMPLES.keys())
@pytest.mark.parametrize("cls", LSTMS)
def test_forward_matches_batch_of_one(cls, sample, dtype):
    """test_forward: unbatched output equals the batch-of-one reference; `.double()` / `.float()` then apply."""
    ctor, T, with_hx = sample
    m = cls(**ctor).to(dtype)
    args = _lstm_args(ctor, T, with_hx, dtype, "cpu", requires_grad=False)
    reference = _flat(_batch_of_one(m, args, ctor["batch_first"]))
    for name, r, o in zip(("output", "h_n", "c_n"), reference, _flat(m(*args))):
        assert_close(name, r, o)
    (m.double() if dtype == torch.float64 else m.float())(*args)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in m.parameters())


@pytest.mark.parametrize("sample", LSTM_SAMPLES.values(), ids=LSTM_SAMPLES.keys())
@pytest.mark.parametrize("cls", params({"lstm_core.LSTM": LSTM, "lstm_core.LSTM-triton": TRITON}))
def test_sample_matches_nn_lstm_with_copied_weights(cls, sample):
    """The chain of trust for each sample: output, states and every gradient against nn.LSTM. On Triton a
    projection is a documented limit: it must raise LSTMError naming proj_size."""
    ctor, T, with_hx = sample
    triton = is_triton(cls)
    if triton and ctor["proj_size"]:
        with pytest.raises(LSTMError, match=r"does not support a projection: expected proj_size=0, got proj_size=2"):
            cls(**ctor)
        return
    dtype, table = (torch.float32, TRITON_TOL) if triton else (torch.float64, None)
    ref, ours = twin(cls, dtype=dtype, **ctor)
    args = _lstm_args(ctor, T, with_hx, dtype, device_of(cls), requires_grad=False)
    results = []
    for m in (ref, ours):
        leaves = [t.detach().clone().requires_grad_() for t in _flat(args)]
        outs = _flat(m(leaves[0], tuple(leaves[1:]) or None))
        g = torch.Generator().manual_seed(1)
        upstream = [torch.randn(o.shape, generator=g, dtype=dtype).to(o.device) for o in outs]
        results.append((outs, torch.autograd.grad(outs, [*leaves, *m.parameters()], upstream)))
    for i, (r, o) in enumerate(zip(*(outs for outs, _ in results))):
        assert_close(f"output[{i}]", r, o, table=table)
    names = ["x", "h_0", "c_0"][: len(_flat(args))] + [n for n, _ in ref.named_parameters()]
    for name, r, o in zip(names, results[0][1], results[1][1]):
        assert_close(f"grad {name}", r, o, table=table)


@pytest.mark.parametrize("sample", CELL_SAMPLES.values(), ids=CELL_SAMPLES.keys())
@pytest.mark.parametrize("cls", CELLS)
def test_cell_forward_matches_batch_of_one(cls, sample):
    m = cls(**sample).double()
    args = _cell_args(sample, torch.float64, "cpu", requires_grad=False)
    for name, r, o in zip(("h", "c"), _cell_batch_of_one(m, args), m(*args)):
        assert_close(name, r, o)


def _gradcheck_fn(m, n_args):
    """The module as a function of its flat args then its parameters, as test_modules' fn_to_gradcheck."""
    names = [n for n, _ in m.named_parameters()]

    def fn(*flat):
        args, weights = flat[:n_args], flat[n_args:]
        out = torch.func.functional_call(m, dict(zip(names, weights)), (args[0], tuple(args[1:]) or None))
        return tuple(_flat(out))

    return fn


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck"])
@pytest.mark.parametrize("sample", LSTM_SAMPLES.values(), ids=LSTM_SAMPLES.keys())
@pytest.mark.parametrize("cls", LSTMS)
def test_grad_and_gradgrad(cls, sample, check):
    """test_grad / test_gradgrad: the total derivative over the inputs and every parameter, fp64."""
    ctor, T, with_hx = sample
    m = cls(**ctor).double()
    args = _flat(_lstm_args(ctor, T, with_hx, torch.float64, "cpu", requires_grad=True))
    weights = [p.detach().clone().requires_grad_() for p in m.parameters()]
    fn = _gradcheck_fn(m, len(args))
    assert getattr(torch.autograd, check)(fn, (*args, *weights), fast_mode=True)


@pytest.mark.parametrize("cls", CELLS)
def test_cell_grad_and_gradgrad(cls):
    m = cls(**CELL_SAMPLES["default"]).double()
    args = _flat(_cell_args(CELL_SAMPLES["default"], torch.float64, "cpu", requires_grad=True))
    weights = [p.detach().clone().requires_grad_() for p in m.parameters()]
    names = [n for n, _ in m.named_parameters()]
    fn = lambda x, h, c, *ws: torch.func.functional_call(m, dict(zip(names, ws)), (x, (h, c)))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*args, *weights), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (*args, *weights), fast_mode=True)


def _non_contiguous(t):
    """test_modules' trick: every other element of a doubled last axis."""
    out = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    assert not out.is_contiguous()
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("sample", LSTM_SAMPLES.values(), ids=LSTM_SAMPLES.keys())
@pytest.mark.parametrize("cls", LSTMS)
def test_non_contiguous_tensors(cls, sample):
    """Non-contiguous inputs and upstream gradients give the contiguous results, gradients included."""
    ctor, T, with_hx = sample
    m = cls(**ctor).double()
    args = _flat(_lstm_args(ctor, T, with_hx, torch.float64, "cpu", requires_grad=True))
    upstream = [torch.randn_like(o) for o in _flat(m(args[0], tuple(args[1:]) or None))]
    results = []
    for leaves, grads in itertools.product((args, [_non_contiguous(a) for a in args]),
                                           (upstream, [_non_contiguous(u) for u in upstream])):
        outs = _flat(m(leaves[0], tuple(leaves[1:]) or None))
        results.append((outs, torch.autograd.grad(outs, [*leaves, *m.parameters()], grads)))
    for outs, grads in results[1:]:
        for i, (r, o) in enumerate(zip(results[0][0] + list(results[0][1]), outs + list(grads))):
            assert_close(f"output/grad {i}", r, o)


@pytest.mark.parametrize("cls", LSTMS)
def test_pickle_repr_and_factory_kwargs(cls):
    """test_pickle, test_repr, test_factory_kwargs and test_device_ctx_init over every sample."""
    for ctor, T, with_hx in LSTM_SAMPLES.values():
        m = cls(**ctor).double()
        args = _lstm_args(ctor, T, with_hx, torch.float64, "cpu", requires_grad=False)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        copy = torch.load(buf, weights_only=False)
        for r, o in zip(_flat(m(*args)), _flat(copy(*args))):
            assert_close("unpickled output", r, o)
        assert_close("pickle.loads output", _flat(m(*args))[0], _flat(pickle.loads(pickle.dumps(m))(*args))[0])
        assert repr(m) and str(m)
        made = cls(**ctor, device="meta", dtype=torch.float64)
        assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in made.parameters())
        with torch.device("meta"):
            in_ctx = cls(**ctor)
        cpu = cls(**ctor)
        for p_meta, p_cpu in zip(in_ctx.parameters(), cpu.parameters()):
            assert p_meta.is_meta and (p_meta.shape, p_meta.dtype, p_meta.stride()) == (
                p_cpu.shape, p_cpu.dtype, p_cpu.stride())


def _lstm_error_inputs(dtype):
    """module_error_inputs_torch_nn_RNN_GRU, which nn.LSTM's ModuleInfo uses: (constructor args, forward input
    or None for a construction error, exception class, message pattern). The dtype case feeds an input of the
    other float dtype to a module built in `dtype`."""
    other = torch.float64 if dtype == torch.float32 else torch.float32
    return {
        "hidden_size=0": ((10, 0, 1), {}, None, ValueError, "hidden_size must be greater than zero"),
        "num_layers=0": ((10, 10, 0), {}, None, ValueError, "num_layers must be greater than zero"),
        "input-dtype": ((3, 5), dict(dtype=dtype), make_tensor((2, 4, 3), device="cpu", dtype=other), ValueError,
                        r"RNN input dtype .* does not match weight dtype .* "
                        r"Convert input: input\.to\(.*\), or convert model: model\.to\(.*\)"),
        "bias=0": ((3, 5), dict(bias=0), None, TypeError, "bias should be of type bool, got: int"),
        "bias=1": ((3, 5), dict(bias=1), None, TypeError, "bias should be of type bool, got: int"),
        "bias-str": ((3, 5), dict(bias="True"), None, TypeError, "bias should be of type bool, got: str"),
        "batch_first=0": ((3, 5), dict(batch_first=0), None, TypeError, "batch_first should be of type bool, got: int"),
        "batch_first=1": ((3, 5), dict(batch_first=1), None, TypeError, "batch_first should be of type bool, got: int"),
        "batch_first-str": ((3, 5), dict(batch_first="False"), None, TypeError,
                            "batch_first should be of type bool, got: str"),
        "input_size-float": ((3.0, 5), {}, None, TypeError, "input_size should be of type int, got: float"),
        "input_size-str": (("10", 5), {}, None, TypeError, "input_size should be of type int, got: str"),
        "input_size=0": ((0, 5), {}, None, ValueError, "input_size must be greater than zero"),
        "input_size<0": ((-1, 5), {}, None, ValueError, "input_size must be greater than zero"),
        "hidden_size-float": ((3, 5.0), {}, None, TypeError, "hidden_size should be of type int, got: float"),
    }


LSTM_ERROR_IDS = list(_lstm_error_inputs(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", LSTM_ERROR_IDS)
@pytest.mark.parametrize("cls", LSTMS)
def test_errors(cls, case, dtype):
    """test_errors: the exception class and message pattern PyTorch's tests expect."""
    args, kwargs, x, exc, pattern = _lstm_error_inputs(dtype)[case]
    if x is None:
        with pytest.raises(exc, match=pattern):
            cls(*args, **kwargs)
        return
    m = cls(*args, **kwargs)
    with pytest.raises(exc, match=pattern):
        m(x)


CELL_ERRORS = {
    "input_size": ((3, 11), ((3, 20), (3, 20)), RuntimeError, "input has inconsistent input_size: got 11 expected 10"),
    "hidden_size": ((3, 10), ((3, 21), (3, 21)), RuntimeError,
                    "hidden0 has inconsistent hidden_size: got 21, expected 20"),
    "batch": ((3, 10), ((5, 20), (5, 20)), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 5"),
    "hx-rank": ((3, 10), ((3, 1, 1, 20), (3, 1, 1, 20)), ValueError,
                r"Expected hx\[0\] to be 1D or 2D, got 4D instead"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CELL_ERRORS.values(), ids=CELL_ERRORS.keys())
@pytest.mark.parametrize("cls", CELLS)
def test_cell_errors(cls, case, dtype):
    """module_error_inputs_torch_nn_LSTMCell on LSTMCell(10, 20); the fp64 inputs meet fp32 weights, and the
    shape error still comes first."""
    x_shape, hx_shapes, exc, pattern = case
    x, hx = torch.randn(x_shape, dtype=dtype), tuple(torch.randn(s, dtype=dtype) for s in hx_shapes)
    with pytest.raises(exc, match=pattern):
        cls(10, 20)(x, hx)
