# T time, B batch, I input, H hidden, N tokens, V vocab
"""Contracts of every kernel launch and autograd function that a CPU run cannot see in the results.

Precision: the interpreter computes every `tl.dot` in full precision whatever `input_precision` says, so an fp32
recurrence or head that asks for TF32 passes every numeric test on the CPU (the LSTM asks for it only when
`cudnn.allow_tf32` is on, as nn.LSTM). The launch each launcher records
(`record_launches`, the compile gate's own cases, on `meta` tensors) is checked for the precision it asks for,
per dtype and per `allow_tf32` state; `test_gpu_compile.py` checks the compiled PTX.

Inputs: `fused_lstm`, `linear_cross_entropy` and `lstm_layer` leave every input and every incoming gradient
bitwise unchanged through forward and backward.
"""

import contextlib

import pytest
import torch

from bench.compile_gate import _LAUNCHES, DTYPES, cases
from leanfit.kernels import linear_cross_entropy
from leanfit.kernels.lstm import fused_lstm
from leanfit.kernels.lstm.config import INTERPRETED
from leanfit.lstm_core.functional import lstm_layer
from tests.helpers import HAS_TRITON, TRITON_DEVICE
from tests.kernels.test_fused_lstm import _inputs

pytestmark = pytest.mark.gpu  # runs on CUDA when there is one: the GPU lane

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no CUDA, no interpreter")
GATE_CASES = cases()


# Kernels without a tl.dot, which therefore ask for no dot precision.
NO_DOT_KERNELS = ("_softmax_grad_kernel",)


def _precision(kwargs: dict) -> tuple[str, bool]:
    """The `input_precision` a recorded launch asks for and whether it widens 16-bit operands to fp32."""
    if "PRECISION" in kwargs:
        return kwargs["PRECISION"], kwargs["DOT_F32"]
    return kwargs["PREC"], kwargs["EMU_BF16"]


def _widened(dtype: torch.dtype) -> bool:
    """16-bit operands go to the dot as they are (`input_precision` applies to fp32 operands only); bf16 ones are
    widened to fp32 only under the interpreter, whose numpy dot mishandles bf16."""
    return INTERPRETED and dtype == torch.bfloat16


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["tf32-off", "tf32-on"])
def test_every_gate_launch_asks_for_its_dtypes_precision(allow_tf32):
    """fp32 dots in IEEE fp32 whatever torch's TF32 switches say, except the persistent LSTM cases built with
    `tf32=True` (what `fused_lstm` passes when `cudnn.allow_tf32` is on: `test_persistent_fp32.py` checks that)."""
    with tf32_switches(allow_tf32):
        fp32_kernels = _check_gate_launches()
    assert {"_lce_fwd_kernel", "_lce_bwd_kernel", "_lstm_fwd_tiled_kernel", "_lstm_bwd_onchip_kernel"} <= fp32_kernels


@contextlib.contextmanager
def tf32_switches(allow: bool):
    """torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 set to `allow`, then restored
    (the cuBLAS switch is a property, which monkeypatch cannot restore)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _check_gate_launches() -> set:
    fp32_kernels = set()
    for case in GATE_CASES:
        dtype = DTYPES[case.dtype]
        launches = _LAUNCHES[case.op](case)
        assert launches, case.key
        for launch in launches:
            if launch.kernel.fn.__name__ in NO_DOT_KERNELS:
                continue
            precision, widened = _precision(launch.kwargs)
            where = (case.key, launch.kernel.fn.__name__)
            if dtype == torch.float32:
                expected = "tf32" if case.op == "lstm" and "tf32" in case.flags else "ieee"
                assert (precision, widened) == (expected, False), where
                fp32_kernels.add(launch.kernel.fn.__name__)
            else:
                assert widened == _widened(dtype), where
    return fp32_kernels


def _bitwise_snapshot(tensors):
    return [None if t is None else t.detach().clone() for t in tensors]


def _assert_unchanged(names, before, tensors):
    for name, b, t in zip(names, before, tensors):
        if b is None:
            continue
        assert torch.equal(b.view(-1).view(torch.uint8), t.detach().reshape(-1).view(torch.uint8)), (
            f"{name} was modified in place")


LSTM_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")
LSTM_CASES = {
    "onchip": dict(H=16, variant="onchip"),
    "tiled": dict(H=16, variant="tiled"),
    "tiled-recompute": dict(H=16, variant="tiled", recompute=True),
    "persistent": dict(H=16, variant="persistent", block_j=8),
    "persistent-recompute": dict(H=16, variant="persistent", block_j=8, recompute=True),
    "reference": dict(H=16, fn=lstm_layer),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", LSTM_CASES.values(), ids=LSTM_CASES.keys())
def test_lstm_leaves_inputs_and_incoming_gradients_unchanged(case, dtype, device):
    case = dict(case)
    fn, H = case.pop("fn", fused_lstm), case.pop("H")
    if fn is fused_lstm and not HAS_TRITON:
        pytest.skip("no CUDA, no interpreter")
    T, B, I = 4, 3, 8
    inputs = _inputs(T, B, I, H, dtype, device)
    lengths = torch.tensor([4, 1, 3], device=device)
    upstream = [torch.randn(s, device=device).to(dtype) for s in ((T, B, H), (B, H), (B, H))]
    names = (*LSTM_NAMES, "lengths", "d_out", "d_h_n", "d_c_n")
    watched = [*inputs, lengths, *upstream]
    before = _bitwise_snapshot(watched)
    out, (h_n, c_n) = fn(*inputs, lengths=lengths, **case)
    _assert_unchanged(names, before, watched)
    grads = torch.autograd.grad((out, h_n, c_n), inputs, upstream)
    assert all(torch.isfinite(g).all() for g in grads)
    _assert_unchanged(names, before, watched)


LCE_IMPLS = ["chunked", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", LCE_IMPLS)
def test_linear_cross_entropy_leaves_inputs_and_incoming_gradients_unchanged(impl, dtype, reduction):
    device = TRITON_DEVICE if impl == "triton" else torch.device("cpu")
    n, hdim, v = 24, 16, 80
    hidden = torch.randn(n, hdim, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, hdim, device=device) / hdim**0.5).to(dtype).requires_grad_()
    bias = torch.randn(v, device=device).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=device)
    target[::5] = -100
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, reduction=reduction, label_smoothing=0.1,
                                softcap=20.0, impl=impl, chunk_size=8)
    upstream = torch.rand(loss.shape, device=device).to(dtype) + 0.5
    watched = [hidden, weight, bias, target, upstream]
    names = ("hidden", "weight", "bias", "target", "d_loss")
    before = _bitwise_snapshot(watched)
    grads = torch.autograd.grad(loss, (hidden, weight, bias), upstream)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    _assert_unchanged(names, before, watched)
