# B batch, T time, I input, H hidden, P projection, L layers, D directions
"""Port of the nn.LSTM / nn.LSTMCell checks of PyTorch's `test/test_nn.py`, run on both classes (sources:
`tests/lstm_core/lstm_port.py`). Each test names the test it ports; RNN-only tests are ported to LSTM where they check
behaviour an LSTM shares (dropout state), and multi-GPU device checks use the `meta` device as the other
device. A subset runs on `backend="triton"` too, with fp32 where the source uses fp64 (a documented limit).
"""

import copy
import io

import pytest
import torch
from torch.nn.utils import remove_weight_norm, weight_norm
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from leanfit.lstm_core import LSTM, LSTMError
from tests.helpers import assert_close
from tests.lstm_core.lstm_port import (
    CELLS,
    LSTM_IMPLS,
    LSTMS,
    LSTMS_AND_TRITON,
    TRITON,
    TRITON_TOL,
    device_of,
    is_triton,
)

I, H, P, L, B, T, BAD = 3, 5, 2, 2, 4, 6, 7  # BAD is prime, so no size divides it


ARGS_CASES = {  # (input shape, hidden shape)
    "input-batch": ((T, BAD, I), (L, B, H)),
    "hidden-batch": ((T, B, I), (L, BAD, H)),
    "input-size": ((T, B, BAD), (L, B, H)),
    "hidden-size": ((T, B, I), (L, B, BAD)),
    "hidden-layers": ((T, B, I), (BAD, B, H)),
}


@pytest.mark.parametrize("case", ARGS_CASES.values(), ids=ARGS_CASES.keys())
@pytest.mark.parametrize("cls", LSTMS_AND_TRITON)
def test_rnn_args_check(cls, case):
    """test_rnn_args_check: a wrong batch, input size, hidden size or layer count in the input, h_0 or c_0
    raises RuntimeError."""
    input_shape, hidden_shape = case
    dev = device_of(cls)
    x, bad, good = (torch.randn(s, device=dev) for s in (input_shape, hidden_shape, (L, B, H)))
    pairs = [(bad, bad)] if hidden_shape == (L, B, H) else [(bad, good), (good, bad)]
    model = cls(I, H, L)
    for hx in pairs:
        with pytest.raises(RuntimeError):
            model(x, hx)


PROJ_CASES = {  # (input shape, h_0 shape, c_0 shape)
    "input-batch": ((T, BAD, I), (L, B, P), (L, B, H)),
    "hidden-batch": ((T, B, I), (L, BAD, P), (L, BAD, H)),
    "input-size": ((T, B, BAD), (L, B, P), (L, B, H)),
    "hidden-size": ((T, B, I), (L, B, BAD), (L, B, BAD)),
    "hidden-layers": ((T, B, I), (BAD, B, P), (BAD, B, H)),
    "h0-layers=hidden_size": ((T, B, I), (H, B, P), (L, B, H)),
    "h0-layers": ((T, B, I), (BAD, B, P), (L, B, H)),
    "c0-layers": ((T, B, I), (L, B, P), (BAD, B, H)),
}


@pytest.mark.parametrize("case", PROJ_CASES.values(), ids=PROJ_CASES.keys())
@pytest.mark.parametrize("cls", LSTMS)
def test_projections_lstm_args_check(cls, case):
    """test_projections_lstm_args_check: the same with proj_size=2, where h_0 is (L, B, P)."""
    x, h0, c0 = (torch.randn(s) for s in case)
    with pytest.raises(RuntimeError):
        cls(I, H, L, proj_size=P)(x, (h0, c0))


@pytest.mark.parametrize("proj_size", [0, 10], ids=["plain", "proj"])
@pytest.mark.parametrize("cls", LSTMS_AND_TRITON)
def test_forward_exception_messages(cls, proj_size):
    """test_cudnn_forward_exception (it runs on the CPU too): the message names the hidden size or input size."""
    if is_triton(cls) and proj_size:
        pytest.skip("proj_size is a documented Triton limit, checked in test_triton_limits_raise_clear_errors")
    dev = device_of(cls)
    model = cls(10, 20, batch_first=True, proj_size=proj_size)
    hidden = (torch.zeros(1, 2, 19, device=dev), torch.zeros(1, 2, 19, device=dev))
    with pytest.raises(RuntimeError, match="Expected hidden.*size.*got"):
        model(torch.randn(2, 3, 10, device=dev), hidden)
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size"):
        model(torch.randn(2, 3, 3, device=dev))


@pytest.mark.parametrize("proj_size", [0, P], ids=["plain", "proj"])
@pytest.mark.parametrize("cls", LSTMS)
def test_rnn_check_device(cls, proj_size):
    """test_rnn_check_device / test_projections_lstm_check_device, with `meta` standing in for a second GPU."""
    model = cls(I, H, L, proj_size=proj_size)
    on_meta = copy.deepcopy(model).to("meta")
    x = torch.randn(T, B, I)
    h, c = torch.randn(L, B, proj_size or H), torch.randn(L, B, H)
    params, hidden = "Input and parameter tensors are not at the same device", "Input and hidden tensors are not at"
    for run, pattern in [
        (lambda: model(x.to("meta")), params),
        (lambda: on_meta(x), params),
        (lambda: model(x, (h.to("meta"), c.to("meta"))), hidden),
        (lambda: on_meta(x.to("meta"), (h, c)), hidden),
        (lambda: on_meta(x.to("meta"), (h.to("meta"), c)), hidden),
    ]:
        with pytest.raises(RuntimeError, match=pattern):
            run()


@pytest.mark.parametrize("cls", LSTMS_AND_TRITON)
def test_rnn_initial_hidden_state(cls):
    """test_rnn_initial_hidden_state: zero h_0 and c_0 give what hx=None gives."""
    dev = device_of(cls)
    rnn = cls(30, 20, 2)
    x, zeros = torch.randn(10, 32, 30, device=dev), torch.zeros(2, 32, 20, device=dev)
    out1, (h1, c1) = rnn(x, (zeros, zeros))
    out2, (h2, c2) = rnn(x)
    for name, a, b in (("output", out1, out2), ("h_n", h1, h2), ("c_n", c1, c2)):
        assert_close(name, a, b)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cls", LSTMS)
def test_projections_lstm_initial_hidden_state(cls, bidirectional):
    rnn = cls(30, 20, 2, bidirectional=bidirectional, proj_size=10)
    dirs = 2 if bidirectional else 1
    x = torch.randn(10, 32, 30)
    out1, (h1, c1) = rnn(x, (torch.zeros(2 * dirs, 32, 10), torch.zeros(2 * dirs, 32, 20)))
    out2, (h2, c2) = rnn(x)
    for name, a, b in (("output", out1, out2), ("h_n", h1, h2), ("c_n", c1, c2)):
        assert_close(name, a, b)


WEIGHT_NORM_CASES = {"weight_ih_l0": (dict(), 4), "weight_hr_l0": (dict(proj_size=16), 5)}
OLD_WEIGHT_NORM = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")


@OLD_WEIGHT_NORM
@pytest.mark.parametrize("name", WEIGHT_NORM_CASES)
@pytest.mark.parametrize("cls", LSTMS)
def test_rnn_weight_norm(cls, name):
    """test_rnn_weight_norm (public part) with test_RNN_cudnn_weight_norm's output check, on the CPU: weight
    norm replaces the parameter by `_g` and `_v`, keeps the output, and removing it restores the parameter."""
    kwargs, _ = WEIGHT_NORM_CASES[name]
    m = cls(32, 32, **kwargs)
    x = torch.randn(7, 6, 32)
    expected = m(x)[0]
    m = weight_norm(m, name=name)
    params = dict(m.named_parameters())
    assert name not in params and f"{name}_g" in params and f"{name}_v" in params
    assert_close("output with weight norm", expected, m(x)[0])
    m = remove_weight_norm(m, name=name)
    params = dict(m.named_parameters())
    assert params.get(name) is not None and f"{name}_g" not in params and f"{name}_v" not in params
    assert isinstance(getattr(m, name), torch.nn.Parameter)
    assert_close("output after removal", expected, m(x)[0])


@OLD_WEIGHT_NORM
@pytest.mark.parametrize("name", WEIGHT_NORM_CASES)
@pytest.mark.parametrize("cls", LSTMS)
def test_rnn_weight_norm_flat_weights(cls, name):
    """test_rnn_weight_norm's count of Parameters in `_flat_weights`."""
    if cls is LSTM:
        pytest.skip("reads nn.LSTM's private `_flat_weights` (the weight list it hands to cuDNN and _VF.lstm); "
                    "lstm_core.LSTM keeps no such list, its weights are read by name at each forward")
    kwargs, num_params = WEIGHT_NORM_CASES[name]
    m = weight_norm(cls(32, 32, **kwargs), name=name)
    assert sum(isinstance(p, torch.nn.Parameter) for p in m._flat_weights) == num_params - 1
    m = remove_weight_norm(m, name=name)
    assert sum(isinstance(p, torch.nn.Parameter) for p in m._flat_weights) == num_params


@pytest.mark.parametrize("cls", LSTMS_AND_TRITON)
def test_RNN_input_size_zero(cls):
    """test_RNN_input_size_zero: a batch of 0 gives an empty output and backward runs; as nn.LSTM does, the
    parameter gradients are then zeros."""
    rnn = cls(input_size=3, hidden_size=4)
    out, (h, c) = rnn(torch.zeros(5, 0, 3, device=device_of(cls)))
    assert out.shape == (5, 0, 4) and h.shape == c.shape == (1, 0, 4)
    out.sum().backward()
    for n, p in rnn.named_parameters():
        assert p.grad is not None and not p.grad.any(), n


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
@pytest.mark.parametrize("cls", LSTMS_AND_TRITON)
def test_error_RNN_seq_len_zero(cls, bidirectional):
    rnn = cls(5, 6, bidirectional=bidirectional)
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        rnn(torch.ones(0, 10, 5, device=device_of(cls)))


VARIABLE_SEQUENCE = [  # enforce_sorted, lengths
    (True, [5]),
    (False, [5]),
    (True, [10, 10, 6, 2, 2, 1, 1]),
    (False, [10, 10, 6, 2, 2, 1, 1]),
    (False, [2, 1, 3, 2, 10, 5, 3]),
]
VARIABLE_SEQUENCE_CASES = [
    pytest.param(cls, sort, lengths, default_hx, proj, id=f"{name}-{sort}-{lengths}-hx={not default_hx}-p{proj}")
    for name, cls in LSTM_IMPLS.items() for sort, lengths in VARIABLE_SEQUENCE for default_hx in (True, False)
    for proj in (0, 2)
] + [pytest.param(TRITON, False, [2, 1, 3, 2, 10, 5, 3], False, 0, id="lstm_core.LSTM-triton")]


@pytest.mark.parametrize("cls,enforce_sorted,lengths,default_hx,proj_size", VARIABLE_SEQUENCE_CASES)
def test_variable_sequence(cls, enforce_sorted, lengths, default_hx, proj_size):
    """test_variable_sequence: a packed batch equals each sequence run alone, forward and backward, 2 layers,
    bidirectional, fp32 (the source's tolerances: 1e-5, and 2e-4 for the parameter gradients)."""
    dev = device_of(cls)
    lstm = cls(3, 4, bidirectional=True, num_layers=2, proj_size=proj_size)
    alone = copy.deepcopy(lstm)
    x = torch.randn(max(lengths), len(lengths), 3, device=dev, requires_grad=True)
    hx = None if default_hx else (torch.randn(4, len(lengths), proj_size or 4, device=dev),
                                  torch.randn(4, len(lengths), 4, device=dev))
    outs, states = [], []
    for i, n in enumerate(lengths):
        out, state = alone(x[:n, i:i + 1], None if hx is None else tuple(t[:, i:i + 1].contiguous() for t in hx))
        outs.append(torch.cat([out, out.new_zeros(max(lengths) - n, *out.shape[1:])]))
        states.append(state)
    seq_out = torch.cat(outs, 1)
    packed_out, packed_state = lstm(pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted), hx)
    unpacked, unpacked_len = pad_packed_sequence(packed_out)
    table = TRITON_TOL if is_triton(cls) else {torch.float32: (1e-5, 0)}
    assert unpacked_len.tolist() == lengths
    assert_close("output", seq_out, unpacked, table=table)
    for k, name in enumerate(("h_n", "c_n")):
        assert_close(name, torch.cat([s[k] for s in states], 1), packed_state[k], table=table)
    seq_out.sum().backward()
    grad_seq = x.grad.clone()
    x.grad = None
    unpacked.sum().backward()
    assert_close("grad x", grad_seq, x.grad, table=table)
    param_table = TRITON_TOL if is_triton(cls) else {torch.float32: (2e-4, 0)}
    for (n, p1), p2 in zip(lstm.named_parameters(), alone.parameters()):
        assert_close(f"grad {n}", p2.grad, p1.grad, table=param_table)


@pytest.mark.parametrize("cls,dtype", [
    pytest.param(torch.nn.LSTM, torch.float64, id="nn.LSTM-fp64"),
    pytest.param(LSTM, torch.float64, id="lstm_core.LSTM-fp64"),
    pytest.param(TRITON, torch.float32, id="lstm_core.LSTM-triton-fp32"),
])
def test_rnn_retain_variables(cls, dtype):
    """test_rnn_retain_variables: backward through a retained graph five times gives the same gradients."""
    rnn = cls(10, 20, num_layers=2).to(dtype)
    x = torch.randn(5, 6, 10, device=device_of(cls), dtype=dtype, requires_grad=True)
    output = rnn(x)
    output[0].sum().backward(retain_graph=True)
    grads = [x.grad.clone()] + [p.grad.clone() for p in rnn.parameters()]
    for _ in range(4):
        rnn.zero_grad()
        x.grad.zero_()
        output[0].sum().backward(retain_graph=True)
        for i, (g, g2) in enumerate(zip(grads, [x.grad] + [p.grad for p in rnn.parameters()])):
            assert torch.equal(g, g2), f"gradient {i} changed on a second backward"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0, 0.1234])
@pytest.mark.parametrize("cls", LSTMS_AND_TRITON)
def test_RNN_dropout_state(cls, p, train):
    """test_RNN_dropout_state, ported from nn.RNN to nn.LSTM: dropout acts only in training with p > 0, and
    survives torch.save / torch.load and flatten_parameters."""
    dev = device_of(cls)
    rnn = cls(100, 100, 2, bias=False, dropout=p).train(train)
    x, hx = torch.rand(1, 1, 100, device=dev), (torch.rand(2, 1, 100, device=dev), torch.rand(2, 1, 100, device=dev))
    out1, (h1, _) = rnn(x, hx)
    out2, (h2, _) = rnn(x, hx)
    buf = io.BytesIO()
    torch.save(rnn, buf)
    buf.seek(0)
    rnn2 = torch.load(buf, weights_only=False)
    rnn2.flatten_parameters()
    out3, (h3, _) = rnn2(x, hx)
    if p == 0 or not train:
        for name, a, b in (("output", out1, out2), ("reloaded output", out1, out3), ("h_n", h1, h2),
                           ("reloaded h_n", h1, h3)):
            assert_close(name, a, b)
    else:
        assert not torch.allclose(out1, out2) and not torch.allclose(out1, out3)
        assert not torch.allclose(h1, h2) and not torch.allclose(h1, h3)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls", LSTMS)
def test_RNN_change_dropout(cls, train):
    """test_RNN_change_dropout, ported from nn.RNN to nn.LSTM: setting `.dropout` after construction takes
    effect at the next forward."""
    rnn = cls(100, 100, 2, dropout=0).train(train)
    x = torch.rand(3, 2, 100)
    prev = None
    for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
        rnn.dropout = p
        out1, (h1, _) = rnn(x)
        out2, (h2, _) = rnn(x)
        if p in (0, 1) or not train:
            assert_close("output", out1, out2)
            assert_close("h_n", h1, h2)
        else:
            assert not torch.allclose(out1, out2) and not torch.allclose(h1, h2)
        if prev is not None:
            if train:
                assert not torch.allclose(out1, prev) and not torch.allclose(out2, prev)
            else:
                assert_close("output across p", prev, out1)
                assert_close("output across p", prev, out2)
        prev = out1.detach()


@pytest.mark.parametrize("cls", LSTMS)
def test_LSTM_grad_and_gradgrad(cls):
    """test_LSTM_grad_and_gradgrad: gradcheck and gradgradcheck of every output with respect to the input."""
    x = torch.rand(1, 3, 4, dtype=torch.float64, requires_grad=True)
    for bias in (True, False):
        mod = cls(4, 4, bias=bias).double()

        def fn(inp, mod=mod):
            out, (h, c) = mod(inp)
            return out, h, c

        assert torch.autograd.gradcheck(fn, (x,), check_batched_grad=False)
        assert torch.autograd.gradgradcheck(fn, (x,), check_batched_grad=False)


def test_triton_limits_raise_clear_errors():
    """The Triton backend's documented limits, fp64 and proj_size > 0, raise LSTMError naming the fix, at
    construction and, for a module converted afterwards, at forward."""
    with pytest.raises(LSTMError, match=r"expected proj_size=0, got proj_size=2; use backend='reference'"):
        LSTM(3, 4, proj_size=2, backend="triton")
    with pytest.raises(LSTMError, match=r"got torch.float64; use backend='reference' for torch.float64"):
        LSTM(3, 4, dtype=torch.float64, backend="triton")
    rnn = LSTM(3, 4, backend="triton").double()
    with pytest.raises(LSTMError, match=r"backend='triton' runs .*got torch.float64"):
        rnn(torch.randn(5, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("cls", CELLS)
def test_LSTM_cell(cls, bias):
    """test_LSTM_cell: six steps and a backward reach every parameter."""
    x, hx, cx = torch.randn(3, 10), torch.randn(3, 20), torch.randn(3, 20)
    lstm = cls(10, 20, bias=bias)
    for _ in range(6):
        hx, cx = lstm(x, (hx, cx))
    (hx + cx).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lstm.parameters())


@pytest.mark.parametrize("cls", CELLS)
def test_RNN_cell_no_broadcasting(cls):
    """test_RNN_cell_no_broadcasting (LSTMCell part): hx is never broadcast to the input's batch or size."""
    good = torch.randn(3, 20)
    for x, bad in ((torch.randn(3, 10), torch.randn(1, 20)), (torch.randn(3, 10), torch.randn(3, 1)),
                   (torch.randn(3, 1), good)):
        for hx in ((bad, good), (good, bad)):
            with pytest.raises(RuntimeError):
                cls(10, 20)(x, hx)


@pytest.mark.parametrize("cls", CELLS)
def test_LSTM_cell_forward_sizes(cls):
    """test_LSTM_cell_forward_input_size and test_LSTM_cell_forward_hidden_size."""
    lstm = cls(10, 20)
    hx, cx = torch.randn(3, 20), torch.randn(3, 20)
    with pytest.raises(RuntimeError):
        lstm(torch.randn(3, 11), (hx, cx))
    with pytest.raises(RuntimeError):
        lstm(torch.randn(3, 10), (torch.randn(3, 21), cx))
    with pytest.raises(RuntimeError):
        lstm(torch.randn(3, 10), (cx, torch.randn(3, 21)))


@pytest.mark.parametrize("cls", CELLS)
def test_lstmcell_backward_only_one_output_grad(cls):
    """test_lstmcell_backward_only_one_output_grad (CUDA-only there; the check holds on the CPU): a backward
    from h alone or from c alone reaches the input."""
    cell = cls(2, 3).double()
    s = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    for i in range(2):
        cell(s)[i].sum().backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
