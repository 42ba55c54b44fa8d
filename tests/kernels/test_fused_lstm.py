# B batch, T time, I input, H hidden, V vocab
"""`kernels.fused_lstm` against the `lstm_core` reference: outputs, final states and every gradient.

Runs under the Triton interpreter on the CPU (conftest sets TRITON_INTERPRET=1) and on
CUDA, with the same cases. The launchers fill every output with NaN before the kernels
write, so `assert_close` (which rejects NaN) also checks that every element is written.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from leanfit.kernels.lstm import fused_lstm
from leanfit.lstm_core import LSTM
from leanfit.lstm_core.functional import lstm_layer
from tests.helpers import TRITON_DEVICE, assert_close

pytestmark = pytest.mark.gpu  # runs on CUDA when there is one: the GPU lane

TOL = {
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (8e-2, 3e-2),
    torch.float16: (1e-2, 1e-2),
}
NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")


def _inputs(T, B, I, H, dtype, device):
    bound = H**-0.5
    uniform = lambda *s: (torch.rand(*s, device=device) * 2 - 1) * bound  # noqa: E731
    ts = (
        torch.randn(T, B, I, device=device),
        0.5 * torch.randn(B, H, device=device),
        0.5 * torch.randn(B, H, device=device),
        uniform(4 * H, I),
        uniform(4 * H, H),
        uniform(4 * H),
        uniform(4 * H),
    )
    return [t.to(dtype).requires_grad_() for t in ts]


def _run(fn, inputs, upstream, **kwargs):
    out, (h_n, c_n) = fn(*inputs, **kwargs)
    grads = torch.autograd.grad((out, h_n, c_n), inputs, upstream)
    return (out, h_n, c_n), grads


def _check_layer(T, B, I, H, dtype, device, lengths=None, **kwargs):
    inputs = _inputs(T, B, I, H, dtype, device)
    if lengths is not None:
        lengths = torch.tensor(lengths, device=device)
    upstream = [torch.randn(s, device=device).to(dtype) for s in ((T, B, H), (B, H), (B, H))]
    ref, ref_grads = _run(lstm_layer, inputs, upstream, lengths=lengths)
    out, grads = _run(fused_lstm, inputs, upstream, lengths=lengths, **kwargs)
    for name, r, o in zip(("out", "h_n", "c_n"), ref, out):
        assert o.dtype == dtype
        assert_close(name, r, o, table=TOL)
    for name, r, o in zip(NAMES, ref_grads, grads):
        assert_close(f"d{name}", r, o, table=TOL)


LAYER_CASES = {
    "T1-B1-H40-onchip": dict(T=1, B=1, I=24, H=40, variant="onchip"),
    "T63-B5-H40-onchip": dict(T=63, B=5, I=24, H=40, variant="onchip"),
    "T9-B5-H60-onchip": dict(T=9, B=5, I=24, H=60, variant="onchip"),
    "T1-B5-H40-tiled32": dict(T=1, B=5, I=24, H=40, variant="tiled", block_n=32, block_k=32),
    "T9-B1-H40-tiled32": dict(T=9, B=1, I=24, H=40, variant="tiled", block_n=32, block_k=32),
    "T9-B5-H100-tiled64": dict(T=9, B=5, I=24, H=100, variant="tiled", block_n=64, block_k=64),
    "T9-B5-H40-onchip-recompute": dict(T=9, B=5, I=24, H=40, variant="onchip", recompute=True),
    "T9-B5-H40-tiled32-recompute": dict(T=9, B=5, I=24, H=40, variant="tiled", block_n=32, block_k=32,
                                        recompute=True),
    "T9-B5-H40-onchip-lengths": dict(T=9, B=5, I=24, H=40, variant="onchip", lengths=[9, 3, 1, 7, 9]),
    "T9-B5-H40-tiled32-lengths-recompute": dict(T=9, B=5, I=24, H=40, variant="tiled", block_n=32, block_k=32,
                                                lengths=[9, 3, 1, 7, 9], recompute=True),
    "T9-B20-H40-auto-block16": dict(T=9, B=20, I=40, H=40),
}


@pytest.mark.parametrize("case", LAYER_CASES.values(), ids=LAYER_CASES.keys())
def test_layer_matches_reference_fp32(case, device):
    _check_layer(dtype=torch.float32, device=device, **case)


@pytest.mark.parametrize("variant", ["onchip", "tiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_layer_matches_reference_half(dtype, variant, device):
    tiles = dict(block_n=32, block_k=32)
    _check_layer(7, 5, 24, 40, dtype, device, lengths=[7, 2, 7, 5, 1], variant=variant, **tiles)


@pytest.mark.parametrize("variant", ["onchip", "tiled"])
def test_forward_without_grad_matches_reference(variant, device):
    inputs = [t.detach() for t in _inputs(5, 3, 12, 40, torch.float32, device)]
    lengths = torch.tensor([5, 1, 3], device=device)
    ref, (ref_h, ref_c) = lstm_layer(*inputs, lengths=lengths)
    with torch.no_grad():
        out, (h_n, c_n) = fused_lstm(*inputs, lengths=lengths, variant=variant, block_n=32, block_k=32)
    for name, r, o in zip(("out", "h_n", "c_n"), (ref, ref_h, ref_c), (out, h_n, c_n)):
        assert_close(name, r, o, table=TOL)


@pytest.mark.parametrize("variant", ["onchip", "tiled"])
def test_empty_batch_matches_reference(variant, device):
    """B = 0 launches nothing and returns what the reference returns: empty outputs, zero weight gradients."""
    inputs = _inputs(4, 0, 6, 40, torch.float32, device)
    upstream = [torch.randn(s, device=device) for s in ((4, 0, 40), (0, 40), (0, 40))]
    ref, ref_grads = _run(lstm_layer, inputs, upstream)
    out, grads = _run(fused_lstm, inputs, upstream, variant=variant, block_n=32, block_k=32)
    for name, r, o in zip(("out", "h_n", "c_n"), ref, out):
        assert_close(name, r, o, table=TOL)
    for name, r, o in zip(NAMES, ref_grads, grads):
        assert_close(f"d{name}", r, o, table=TOL)
    assert not any(g.any() for g in grads[3:])


def _twin_lstms(device, **kwargs):
    ref = LSTM(backend="reference", device=device, **kwargs)
    fused = LSTM(backend="triton", device=device, **kwargs)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _param_grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def test_module_layers_bidirectional_dropout_states(device):
    kwargs = dict(input_size=10, hidden_size=16, num_layers=2, bidirectional=True, batch_first=True,
                  dropout=0.3)
    ref, fused = _twin_lstms(device, **kwargs)
    x = torch.randn(3, 6, 10, device=device)
    h0, c0 = (torch.randn(4, 3, 16, device=device) for _ in range(2))
    results = []
    for m in (ref, fused):
        inputs = [t.clone().requires_grad_() for t in (x, h0, c0)]
        torch.manual_seed(1)
        out, (h_n, c_n) = m(inputs[0], (inputs[1], inputs[2]))
        torch.manual_seed(2)
        (out * torch.randn_like(out)).sum().add((h_n * c_n).sum()).backward()
        results.append(((out, h_n, c_n), [t.grad for t in inputs], _param_grads(m)))
    (ref_out, ref_in, ref_p), (out, grads_in, grads_p) = results
    for name, r, o in zip(("output", "h_n", "c_n"), ref_out, out):
        assert_close(name, r, o, table=TOL)
    for name, r, o in zip(("dx", "dh0", "dc0"), ref_in, grads_in):
        assert_close(name, r, o, table=TOL)
    for name, r in ref_p.items():
        assert_close(f"d{name}", r, grads_p[name], table=TOL)


def run_packed(module, x, lengths, hx=None):
    """Output data, h_n, c_n, dx and every parameter's gradient of `module` on `x` packed by `lengths`."""
    xi = x.clone().requires_grad_()
    out, (h_n, c_n) = module(pack_padded_sequence(xi, lengths, enforce_sorted=False), hx)
    torch.manual_seed(2)
    (out.data * torch.randn_like(out.data)).sum().add(h_n.sum() - c_n.sum()).backward()
    return (out.data, h_n, c_n), xi.grad, _param_grads(module)


def assert_same_module_results(ref, got):
    (ref_out, ref_dx, ref_p), (out, dx, grads_p) = ref, got
    for name, r, o in zip(("output", "h_n", "c_n"), ref_out, out):
        assert_close(name, r, o, table=TOL)
    assert_close("dx", ref_dx, dx, table=TOL)
    for name, r in ref_p.items():
        assert_close(f"d{name}", r, grads_p[name], table=TOL)


def test_module_packed_sequence(device):
    ref, fused = _twin_lstms(device, input_size=6, hidden_size=16, bidirectional=True)
    x = torch.randn(7, 3, 6, device=device)
    lengths = torch.tensor([4, 7, 2])
    assert_same_module_results(run_packed(ref, x, lengths), run_packed(fused, x, lengths))


class _TinyLM(torch.nn.Module):
    def __init__(self, backend, V=13, E=8, H=16):
        super().__init__()
        self.emb = torch.nn.Embedding(V, E)
        self.lstm = LSTM(E, H, batch_first=True, backend=backend)
        self.head = torch.nn.Linear(H, V)

    def forward(self, tokens):
        out, _ = self.lstm(self.emb(tokens))
        return self.head(out)


def _train(model, tokens, steps):
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_convergence_matches_reference(device):
    ref = _TinyLM("reference").to(device)
    fused = _TinyLM("triton").to(device)
    fused.load_state_dict(ref.state_dict())
    tokens = torch.arange(11, device=device).repeat(4, 1).add(torch.arange(4, device=device)[:, None]) % 13
    ref_losses = _train(ref, tokens, 5)
    losses = _train(fused, tokens, 5)
    assert ref_losses[-1] < 0.8 * ref_losses[0], f"reference did not learn: {ref_losses}"
    curve_tol = {torch.float32: (1e-4, 1e-4)}
    assert_close("loss curve", torch.tensor(ref_losses), torch.tensor(losses), table=curve_tol)


def test_projection_is_rejected(device):
    T, B, I, H, P = 3, 2, 4, 8, 5
    x, h0, c0, w_ih, _, b_ih, b_hh = _inputs(T, B, I, H, torch.float32, device)
    w_hh, w_hr = torch.randn(4 * H, P, device=device), torch.randn(P, H, device=device)
    with pytest.raises(ValueError, match="projection"):
        fused_lstm(x, h0[:, :P], c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    with pytest.raises(ValueError, match="projection"):
        LSTM(I, H, proj_size=P, backend="triton", device=device)(x)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "lengths": torch.tensor([3, 0])}, r"lengths in \[1, 3\]"),
        (lambda a: {**a, "lengths": torch.tensor([3, 4])}, r"lengths in \[1, 3\]"),
        (lambda a: {**a, "h0": a["h0"][:, :-1]}, r"h0 of shape \(2, 8\)"),
        (lambda a: {k: v.double() for k, v in a.items()}, "dtype"),
        (lambda a: {**a, "variant": "fast"}, "variant"),
    ],
    ids=["length-0", "length-over-T", "h0-shape", "fp64", "variant"],
)
def test_bad_input_raises(change, match, device):
    args = dict(zip(NAMES, (t.detach() for t in _inputs(3, 2, 4, 8, torch.float32, device))))
    with pytest.raises(ValueError, match=match):
        fused_lstm(**change(args))


@pytest.mark.skipif(TRITON_DEVICE.type == "cuda", reason="the error is for a CPU without the Triton interpreter")
def test_cpu_without_interpreter_says_what_it_needs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import torch; from leanfit.lstm_core import LSTM; LSTM(4, 8, backend='triton')(torch.randn(3, 2, 4))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode != 0
    assert "needs a CUDA device or the Triton interpreter" in proc.stderr, proc.stderr[-2000:]


def test_onchip_wider_than_it_fits_raises(device):
    args = [t.detach() for t in _inputs(3, 2, 4, 100, torch.float32, device)]
    with pytest.raises(ValueError, match=r"variant='onchip' takes H <= 64"):
        fused_lstm(*args, variant="onchip")


@pytest.mark.skipif(TRITON_DEVICE.type != "cuda", reason="the per-architecture configs are chosen only on CUDA")
@pytest.mark.parametrize("recompute", [False, True], ids=["stored-gates", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("H", [32, 64, 100, 256, 512, 768, 1024])
def test_every_width_of_the_compile_gate_runs_on_this_gpu(H, dtype, recompute, device):
    _check_layer(5, 20, 16, H, dtype, device, lengths=[5, 2] * 10, recompute=recompute)
