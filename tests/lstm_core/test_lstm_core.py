# B batch, T time, I input, H hidden, P projection, L layers
"""`lstm_core` against `torch.nn.LSTM` / `nn.LSTMCell` with the same weights: outputs, states, every gradient."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from leanfit.lstm_core import LSTM, LSTMCell, lstm_cell
from tests.helpers import assert_close

I, H, T, B = 7, 12, 6, 4

GRID = [
    dict(num_layers=1),
    dict(num_layers=2),
    dict(num_layers=3),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=1, batch_first=True),
    dict(num_layers=2, proj_size=5),
    dict(num_layers=2, bidirectional=True, proj_size=5, batch_first=True),
    dict(num_layers=2, bias=False),
    dict(num_layers=3, bidirectional=True, bias=False),
]
INPUTS = ["batched", "unbatched", "packed"]


def _id(kw):
    return "-".join(f"{k}={v}" for k, v in kw.items())


def _pair(dtype, **kw):
    ref = torch.nn.LSTM(I, H, dtype=dtype, **kw)
    ours = LSTM(I, H, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _make_input(kind, dtype, batch_first):
    if kind == "unbatched":
        return torch.randn(T, I, dtype=dtype), None
    x = torch.randn(B, T, I, dtype=dtype) if batch_first else torch.randn(T, B, I, dtype=dtype)
    return x, (torch.tensor([T, 2, 5, 1]) if kind == "packed" else None)


def _run(model, x, lengths, hx, batch_first):
    """Runs one model and returns the leaves whose gradients must match, plus a scalar loss."""
    x = x.detach().clone().requires_grad_()
    hx = None if hx is None else tuple(t.detach().clone().requires_grad_() for t in hx)
    inp = x if lengths is None else pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, (h_n, c_n) = model(inp, hx)
    out = out.data if lengths is not None else out
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (out, h_n, c_n)]
    loss = sum((w * t).sum() for w, t in zip(weights, (out, h_n, c_n)))
    leaves = [x, *(hx or ()), *model.parameters()]
    grads = torch.autograd.grad(loss, leaves)
    return (out, h_n, c_n), grads, [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("given_hx", [False, True], ids=["hx=zeros", "hx=given"])
@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("kw", GRID, ids=_id)
def test_parity_with_nn_lstm(kw, kind, given_hx, dtype):
    ref, ours = _pair(dtype, **kw)
    batch_first = kw.get("batch_first", False)
    x, lengths = _make_input(kind, dtype, batch_first)
    hx = None
    if given_hx:
        n = kw["num_layers"] * (2 if kw.get("bidirectional") else 1)
        lead = (n,) if kind == "unbatched" else (n, B)
        hx = (torch.randn(*lead, kw.get("proj_size") or H, dtype=dtype), torch.randn(*lead, H, dtype=dtype))
    (r_out, r_h, r_c), r_grads, names = _run(ref, x, lengths, hx, batch_first)
    (o_out, o_h, o_c), o_grads, _ = _run(ours, x, lengths, hx, batch_first)
    assert_close("output", r_out, o_out)
    assert_close("h_n", r_h, o_h)
    assert_close("c_n", r_c, o_c)
    leaf_names = ["input"] + (["h_0", "c_0"] if hx else []) + [f"grad {n}" for n in names]
    for name, rg, og in zip(leaf_names, r_grads, o_grads):
        assert_close(name, rg, og)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cell_parity_with_nn_lstmcell(bias, batched):
    ref = torch.nn.LSTMCell(I, H, bias=bias, dtype=torch.float64)
    ours = LSTMCell(I, H, bias=bias, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    shape = (B,) if batched else ()
    x = torch.randn(*shape, I, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(*shape, H, dtype=torch.float64, requires_grad=True) for _ in range(2))
    results = []
    for model in (ref, ours):
        h, c = model(x, hx)
        loss = (h * torch.arange(H)).sum() + (c**2).sum()
        results.append((h, c, torch.autograd.grad(loss, [x, *hx, *model.parameters()])))
    for name, r, o in zip(("h", "c"), results[0][:2], results[1][:2]):
        assert_close(name, r, o)
    for i, (r, o) in enumerate(zip(results[0][2], results[1][2])):
        assert_close(f"grad[{i}]", r, o)


def test_state_dict_round_trip_both_directions():
    kw = dict(num_layers=2, bidirectional=True, proj_size=4)
    ref, ours = torch.nn.LSTM(I, H, **kw), LSTM(I, H, **kw)
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert [p.shape for p in ref.parameters()] == [p.shape for p in ours.parameters()]
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I)
    assert_close("ours -> nn.LSTM", ours(x)[0], ref(x)[0])
    ours2 = LSTM(I, H, **kw)
    ours2.load_state_dict(ref.state_dict())
    assert_close("nn.LSTM -> ours", ref(x)[0], ours2(x)[0])


def test_initialisation_distribution_matches():
    """Every parameter is U(-1/sqrt(H), 1/sqrt(H)), as in nn.LSTM: compare bounds and moments."""
    hidden = 256
    ours = LSTM(64, hidden, num_layers=2, proj_size=32)
    ref = torch.nn.LSTM(64, hidden, num_layers=2, proj_size=32)
    bound = hidden**-0.5
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert p.abs().max() <= bound, name
        assert p.abs().max() > 0.98 * bound, name
        if p.numel() > 10_000:
            assert abs(p.mean().item() - q.mean().item()) < 0.05 * bound, name
            assert abs(p.std().item() - q.std().item()) < 0.02 * bound, name


def test_gradcheck_cell():
    args = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
            for shape in [(3, 4), (3, 5), (3, 5), (20, 4), (20, 5), (20,), (20,)]]
    assert torch.autograd.gradcheck(lstm_cell, args)


def test_gradcheck_two_layer_bidirectional_stack():
    model = LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def fn(x, *params):
        out, (h, c) = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_dropout_masks_between_layers_like_nn_lstm(monkeypatch):
    """Dropout acts on every layer's output but the last: check the zero fraction and the 1/(1-p) scale."""
    p, hidden = 0.3, 64
    model = LSTM(8, hidden, num_layers=2, dropout=p).train()
    ref = torch.nn.LSTM(8, hidden, num_layers=2, dropout=p).train()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(50, 16, 8)
    calls = []
    original = torch.nn.functional.dropout

    def spy(t, *args, **kwargs):
        out = original(t, *args, **kwargs)
        calls.append((t.detach(), out.detach()))
        return out

    monkeypatch.setattr(torch.nn.functional, "dropout", spy)
    model(x)
    monkeypatch.undo()
    assert len(calls) == 1, f"dropout must act once, between the two layers; it acted {len(calls)} times"
    before, after = calls[0]
    zero = (after == 0) & (before != 0)
    assert abs(zero.float().mean().item() - p) < 0.02
    kept = ~zero
    assert_close("kept scaled by 1/(1-p)", before[kept] / (1 - p), after[kept], dtype=torch.float32)
    ref_out = torch.stack([ref(x)[0] for _ in range(20)])
    our_out = torch.stack([model(x)[0] for _ in range(20)])
    ref_spread = ref_out.std(0).mean().item()
    assert (our_out.mean(0) - ref_out.mean(0)).abs().mean() < 0.01
    assert abs(our_out.std(0).mean().item() - ref_spread) < 0.1 * ref_spread


def test_dropout_eval_equals_no_dropout():
    model = LSTM(8, 16, num_layers=3, dropout=0.5)
    plain = LSTM(8, 16, num_layers=3)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(9, 3, 8)
    assert_close("eval output", plain(x)[0], model.eval()(x)[0])
    assert not torch.allclose(plain(x)[0], model.train()(x)[0])


@pytest.mark.parametrize("num_layers,bidirectional", list(itertools.product([1, 2], [False, True])))
def test_hn_matches_last_output(num_layers, bidirectional):
    """h_n of the top layer is the last step of the forward direction and the first of the reverse one."""
    model = LSTM(I, H, num_layers=num_layers, bidirectional=bidirectional, dtype=torch.float64)
    out, (h_n, _) = model(torch.randn(T, B, I, dtype=torch.float64))
    top = h_n.view(num_layers, 2 if bidirectional else 1, B, H)[-1]
    assert_close("forward h_n", out[-1, :, :H], top[0])
    if bidirectional:
        assert_close("reverse h_n", out[0, :, H:], top[1])
