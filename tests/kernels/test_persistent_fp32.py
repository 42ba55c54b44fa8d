# B batch, T time, I input, H hidden, J units per program, G batch groups
"""The fp32 persistent LSTM (the `W_hh` slice streamed from L1, `STREAM_W`), batch groups across programs, the
no-grad forward that keeps `c` in a two-slot ring, and the TF32 switch: against `lstm_core` (in fp32 and fp64)
and `nn.LSTM`, outputs, final states and every gradient.

Under the interpreter the TF32 products are exact, so there the TF32-on cases check the routing (which
precision each launch gets) and the numbers at TF32's tolerance; on a GPU they check the numbers TF32 gives.
"""

import pytest
import torch

from leanfit.kernels.launch import record_launches
from leanfit.kernels.lstm import FusedLSTMFunction, fused_lstm
from leanfit.kernels.lstm.config import lstm_config, persistent_shape
from leanfit.kernels.lstm.fused import recurrence_fwd
from leanfit.lstm_core import LSTM
from leanfit.lstm_core.functional import lstm_layer
from tests.helpers import assert_close
from tests.kernels import test_fused_lstm as base

pytestmark = pytest.mark.gpu

# TF32 rounds each product's operands to 10 mantissa bits (cuDNN's fp32 default measured 3-4e-4 relative).
TF32_TOL = {torch.float32: (3e-3, 3e-3)}


@pytest.mark.parametrize("B", [1, 3, 16, 64])
def test_fp32_persistent_matches_reference_at_each_batch(B, device):
    lengths = [5 - (b % 4) for b in range(B)] if B > 1 else None
    base._check_layer(5, B, 12, 40, torch.float32, device, lengths=lengths, variant="persistent", block_j=16)


@pytest.mark.parametrize("recompute", [False, True], ids=["stored-gates", "recompute"])
@pytest.mark.parametrize("H", [16, 33, 100])
def test_fp32_persistent_widths_and_recompute(H, recompute, device):
    base._check_layer(5, 5, 10, H, torch.float32, device, lengths=[5, 1, 3, 5, 2], variant="persistent",
                      recompute=recompute, block_j=32 if H > 64 else 8)


def test_fp32_persistent_is_within_1e5_of_fp64(device):
    """Parity target of issue 25: with TF32 off every output and gradient within 1e-5 (relative RMS) of fp64."""
    T, B, I, H = 9, 4, 16, 64
    inputs = base._inputs(T, B, I, H, torch.float32, device)
    upstream = [torch.randn(s, device=device) for s in ((T, B, H), (B, H), (B, H))]
    out, grads = base._run(fused_lstm, inputs, upstream, variant="persistent")
    ref64 = [t.detach().double().requires_grad_() for t in inputs]
    ref, ref_grads = base._run(lstm_layer, ref64, [u.double() for u in upstream])
    for name, r, o in zip(("out", "h_n", "c_n", *(f"d{n}" for n in base.NAMES)), (*ref, *ref_grads), (*out, *grads)):
        rel = ((o.double() - r).norm() / r.norm()).item()
        assert rel <= 1e-5, f"{name}: relative error {rel:.2e} against fp64"


def _launched_precisions(fn):
    with record_launches(keep=True) as launches:
        fn()
    return {launch.kwargs["PRECISION"] for launch in launches}


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["tf32-off", "tf32-on"])
def test_tf32_follows_cudnn_allow_tf32(allow_tf32, device):
    torch.backends.cudnn.allow_tf32 = allow_tf32
    T, B, I, H = 5, 3, 8, 48
    inputs = base._inputs(T, B, I, H, torch.float32, device)
    upstream = [torch.randn(s, device=device) for s in ((T, B, H), (B, H), (B, H))]
    ref, ref_grads = base._run(lstm_layer, inputs, upstream)
    assert _launched_precisions(lambda: fused_lstm(*[t.detach() for t in inputs], variant="persistent")) == {
        "tf32" if allow_tf32 else "ieee"}
    out, grads = base._run(fused_lstm, inputs, upstream, variant="persistent")
    table = TF32_TOL if allow_tf32 else base.TOL
    for name, r, o in zip(("out", "h_n", "c_n", *(f"d{n}" for n in base.NAMES)), (*ref, *ref_grads), (*out, *grads)):
        assert_close(name, r, o, table=table)


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_groups_match_one_group(groups, dtype, device):
    """The grid's second axis splits the rows: every group of programs owns whole BLOCK_B blocks, and a barrier
    counts the programs of all groups."""
    T, B, I, H = 4, 20, 12, 32
    inputs = base._inputs(T, B, I, H, dtype, device)
    lengths = torch.tensor([4, 2, 3, 1] * 5, device=device)
    upstream = [torch.randn(s, device=device).to(dtype) for s in ((T, B, H), (B, H), (B, H))]
    ref, ref_grads = base._run(lstm_layer, inputs, upstream, lengths=lengths)
    _, fwd, bwd = lstm_config(B, H, dtype, None, "persistent", block_b=4, block_j=16, groups=groups)
    assert fwd.grid == bwd.grid == (2, groups)
    fn = lambda *a, lengths: _pair(FusedLSTMFunction.apply(*a, lengths.int(), fwd, bwd, True))  # noqa: E731
    out, grads = base._run(fn, [t.contiguous() for t in inputs], upstream, lengths=lengths)
    for name, r, o in zip(("out", "h_n", "c_n", *(f"d{n}" for n in base.NAMES)), (*ref, *ref_grads), (*out, *grads)):
        assert_close(name, r, o, table=base.TOL)


def _pair(result):
    out, h_n, c_n = result
    return out, (h_n, c_n)


@pytest.mark.parametrize("variant", ["persistent", "onchip", "tiled"])
@pytest.mark.parametrize("T", [1, 4, 7])
def test_no_grad_forward_keeps_c_in_a_ring(T, variant, device):
    B, I, H = 3, 8, 32
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (t.detach() for t in base._inputs(T, B, I, H, torch.float32, device))
    lengths = torch.tensor([T, max(1, T - 2), 1], device=device)
    ref, (ref_h, ref_c) = lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=lengths)
    _, fwd, _ = lstm_config(B, H, torch.float32, None, variant, block_n=16, block_k=16)
    xw = (x.reshape(T * B, I) @ w_ih.T + b_ih + b_hh).view(T, B, 4 * H)
    h, c, gates, h_n = recurrence_fwd(xw, w_hh, h0, c0, lengths.int(), fwd, store_gates=False, save_states=False)
    assert c.shape == (2, B, H) and gates is None
    assert_close("out", ref, h[1:], table=base.TOL)
    assert_close("h_n", ref_h, h_n, table=base.TOL)
    assert_close("c_n", ref_c, c[T % 2], table=base.TOL)
    with torch.no_grad():
        out, (h_n, c_n) = fused_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, variant=variant)
    assert_close("c_n (module path)", ref_c, c_n, table=base.TOL)


def test_module_fp32_persistent_layers_bidirectional_packed_against_nn_lstm(device):
    kwargs = dict(input_size=10, hidden_size=24, num_layers=2, bidirectional=True)
    ref = torch.nn.LSTM(device=device, **kwargs)
    fused = LSTM(backend="triton", variant="persistent", device=device, **kwargs)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 10, device=device)
    lengths = torch.tensor([6, 3, 1, 5])
    hx = tuple(torch.randn(4, 4, 24, device=device) for _ in range(2))
    base.assert_same_module_results(base.run_packed(ref, x, lengths, hx), base.run_packed(fused, x, lengths, hx))


@pytest.mark.parametrize("arch, sms", [(75, 40), (80, 108), (90, 132)])
@pytest.mark.parametrize("H", [64, 128, 256, 768, 1024])
@pytest.mark.parametrize("B", [1, 8, 64])
def test_fp32_persistent_plan_fits_every_gate_card(arch, sms, H, B):
    shape = persistent_shape(H, torch.float32, arch, sms, B=B)
    assert shape is not None and shape["STREAM_W"]
    programs = -(-H // shape["BLOCK_J"])
    assert all(programs * g <= sms for g in shape["groups"])
    assert all(g <= -(-B // r) for g, r in zip(shape["groups"], shape["rows"]))
    assert shape["SPLIT_K"] * shape["BLOCK_K"] * 4 * shape["BLOCK_J"] <= (4096 if arch > 75 else 1024) or \
        shape["SPLIT_K"] * shape["BLOCK_K"] == 16


def test_sm75_streams_the_fewest_units():
    """Wider streamed programs spill on sm_75 (compile gate), so a T4 never takes them, even where the batch
    groups they would free are predicted faster; an A100 does."""
    t4 = persistent_shape(512, torch.bfloat16, 75, 40, B=128)
    a100 = persistent_shape(512, torch.bfloat16, 80, 108, B=128)
    assert t4["STREAM_W"] and t4["BLOCK_J"] == 16 and a100["BLOCK_J"] > 4
    assert lstm_config(8, 256, torch.float32, 75, "auto", sms=40)[0] == "persistent"


@pytest.mark.parametrize("arch, sms", [(86, 84), (89, 128), (100, 148)])
def test_cards_between_the_gate_architectures_take_the_limits_below(arch, sms):
    """An RTX 3090 (sm_86), an L40 (sm_89) or a B200 (sm_100) plans with the limits of sm_80/sm_90."""
    for dtype in (torch.float32, torch.bfloat16):
        shape = persistent_shape(256, dtype, arch, sms, B=8)
        assert shape is not None and -(-256 // shape["BLOCK_J"]) * shape["groups"][0] <= sms
        assert lstm_config(8, 256, dtype, arch, "auto", sms=sms)[0] == "persistent"
