# B batch, T time, I input, H hidden, J units per program, P programs
"""The persistent LSTM (`variant="persistent"`) against the `lstm_core` reference: outputs, final states and
every gradient; the same results for any number of programs; the barrier's timeout and relaunch path.

Under the interpreter the launcher runs one stage per launch (the programs of a launch run one after another,
so a spin barrier could not pass). The buffers a stage reads from other programs (`h`, `dgates`) hold NaN until
published, so reading one early makes the outputs NaN, which `assert_close` rejects. The timeout path runs
the same kernels with the barrier and a spin limit of 0: each launch then completes what the programs that
ran before the last arrival could, and the launcher relaunches from the first incomplete stage. On a GPU the
test-only `WITHHOLD_STAGE` keeps one program's arrival from coming, so the barrier really stalls there.
"""

import dataclasses

import pytest
import torch

from leanfit.kernels.lstm import FusedLSTMFunction, fused_lstm
from leanfit.kernels.lstm import persistent as lstm_persistent
from leanfit.kernels.lstm.config import lstm_config, persistent_shape
from leanfit.lstm_core import LSTM, LSTMError
from leanfit.lstm_core.functional import lstm_layer
from tests.helpers import TRITON_DEVICE, assert_close
from tests.kernels.test_fused_lstm import (
    NAMES,
    TOL,
    _check_layer,
    _inputs,
    _run,
    assert_same_module_results,
    run_packed,
)

pytestmark = pytest.mark.gpu  # runs on CUDA when there is one: the GPU lane

CASES = {
    "T1-B1-H32-P4": dict(T=1, B=1, I=24, H=32),
    "T5-B3-H64-P8-lengths": dict(T=5, B=3, I=24, H=64, lengths=[5, 2, 4]),
    "T17-B3-H32-P4-lengths-recompute": dict(T=17, B=3, I=20, H=32, lengths=[17, 9, 1], recompute=True),
    "T5-B16-H100-P4-lengths": dict(T=5, B=16, I=40, H=100, block_j=32, lengths=[5, 1, 3, 4] * 4),
    "T17-B1-H100-P4": dict(T=17, B=1, I=12, H=100, block_j=32),
    "T5-B16-H64-P4-2blocks-recompute": dict(T=5, B=16, I=24, H=64, block_j=16, block_b=8, recompute=True,
                                            lengths=[5, 2] * 8),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_persistent_matches_reference(case, device):
    _check_layer(dtype=torch.float32, device=device, variant="persistent", **case)


@pytest.mark.parametrize("recompute", [False, True], ids=["stored-gates", "recompute"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_persistent_half_matches_reference(dtype, recompute, device):
    _check_layer(5, 3, 24, 32, dtype, device, lengths=[5, 2, 4], variant="persistent", recompute=recompute)


# Programs own disjoint units and every unit's sums run over the same K chunks, so only the matmul's own
# summation order (numpy's, or the MMA tiling, depends on the tile shape) may differ: fp32 rounding, 20x below
# the tolerance against the reference.
SAME = {torch.float32: (1e-6, 1e-6)}


def test_same_results_for_2_4_8_programs(device):
    inputs = _inputs(5, 3, 24, 64, torch.float32, device)
    lengths = torch.tensor([5, 2, 4], device=device)
    upstream = [torch.randn(s, device=device) for s in ((5, 3, 64), (3, 64), (3, 64))]
    results = [_run(fused_lstm, inputs, upstream, lengths=lengths, variant="persistent", block_j=j)
               for j in (32, 16, 8)]
    (ref_out, ref_grads), *others = results
    for out, grads in others:
        for name, r, o in zip(("out", "h_n", "c_n", *(f"d{n}" for n in NAMES)), (*ref_out, *ref_grads),
                              (*out, *grads)):
            assert_close(f"{name}, 2 programs against more", r, o, table=SAME)


def _barrier_configs(T, B, H, device, spin_limit, block_j=None):
    _, fwd, bwd = lstm_config(B, H, torch.float32, None, "persistent", block_j=block_j)
    force = lambda cfg: dataclasses.replace(cfg, meta={**cfg.meta, "BARRIER": True,  # noqa: E731
                                                       "SPIN_LIMIT": spin_limit})
    return force(fwd), force(bwd)


def _counted_launches(monkeypatch):
    """Records (kernel name, first stage, arrivals, timed out) for each launch the persistent driver makes."""
    seen = []
    real = lstm_persistent.launch

    def counting(cfg, **kwargs):
        ran = real(cfg, **kwargs)
        arrivals, timed_out = kwargs["sync_ptr"].tolist()
        seen.append((cfg.kernel.fn.__name__, kwargs["s_first"], arrivals, timed_out))
        return ran

    monkeypatch.setattr(lstm_persistent, "launch", counting)
    return seen


def _check_barrier_path(T, B, I, H, device, fwd, bwd, lengths):
    inputs = _inputs(T, B, I, H, torch.float32, device)
    upstream = [torch.randn(s, device=device) for s in ((T, B, H), (B, H), (B, H))]
    lengths = torch.tensor(lengths, device=device)
    ref, ref_grads = _run(lstm_layer, inputs, upstream, lengths=lengths)
    args = [t.contiguous() for t in inputs]
    fn = lambda *a, lengths: _as_pair(FusedLSTMFunction.apply(*a, lengths.int(), fwd, bwd, True))  # noqa: E731
    out, grads = _run(fn, args, upstream, lengths=lengths)
    for name, r, o in zip(("out", "h_n", "c_n", *(f"d{n}" for n in NAMES)), (*ref, *ref_grads), (*out, *grads)):
        assert_close(name, r, o, table=TOL)


def _as_pair(result):
    out, h_n, c_n = result
    return out, (h_n, c_n)


def test_barrier_timeouts_relaunch_to_the_right_answer(device, monkeypatch):
    """Spin limit 0 with 4 programs: the launch times out after its first stage or two, and the launcher runs
    the stages not every program completed one launch each, without the barrier, from the first of them. On a
    GPU every program arrives anyway, so nothing times out: the withheld-arrival test covers the hardware."""
    if device.type == "cuda":
        pytest.skip("a GPU runs the programs at once, so spin limit 0 does not stall; see the withheld-arrival test")
    T, H = 6, 32
    fwd, bwd = _barrier_configs(T, 3, H, device, spin_limit=0)
    seen = _counted_launches(monkeypatch)
    monkeypatch.setattr(lstm_persistent, "_STALLED", [])
    with pytest.warns(RuntimeWarning, match="grid barrier timed out"):
        _check_barrier_path(T, 3, 8, H, device, fwd, bwd, lengths=[6, 2, 5])
    (_, first, arrivals, timed_out), *rest = [s for s in seen if s[0] == "_lstm_fwd_persistent_kernel"]
    assert first == 0 and timed_out and 1 <= arrivals // 4 < T, seen
    assert [f for _, f, _, _ in rest] == list(range(arrivals // 4, T)), seen
    backward = [f for kernel, f, _, _ in seen if kernel == "_lstm_bwd_persistent_kernel"]
    assert backward == list(range(T + 1)), "after a stall, later calls run one stage per launch from the start"


WITHHELD = {"forward": ("_lstm_fwd_persistent_kernel", 0), "backward": ("_lstm_bwd_persistent_kernel", 1)}


def _withhold(cfg, stage):
    return dataclasses.replace(cfg, meta={**cfg.meta, "WITHHOLD_STAGE": stage})


@pytest.mark.parametrize("programs", [1, 4])
@pytest.mark.parametrize("kernel, which", WITHHELD.values(), ids=WITHHELD.keys())
def test_a_withheld_arrival_stalls_the_barrier_and_the_relaunch_is_exact(kernel, which, programs, device,
                                                                        monkeypatch):
    """The last program does not arrive at stage k (WITHHOLD_STAGE): every program's bounded spin at stage k+1
    runs out, the launch ends with P (k + 1) - 1 arrivals, and the launcher runs stages k.. one launch each, so
    the withheld program's stage k is computed again. On a GPU the others really spin; under the interpreter
    one program stalls on its own missing arrival."""
    if programs > 1 and device.type != "cuda":
        pytest.skip("under the interpreter the programs of a launch run one after another, so with more than one "
                    "the barrier times out at stage 1 whatever is withheld (test_barrier_timeouts_relaunch_...)")
    T, H, k = 6, 32, 3
    spin_limit = 1 << 16 if device.type == "cuda" else 0
    configs = list(_barrier_configs(T, 3, H, device, spin_limit=spin_limit, block_j=H // programs))
    configs[which] = _withhold(configs[which], k)
    seen = _counted_launches(monkeypatch)
    monkeypatch.setattr(lstm_persistent, "_STALLED", [])
    with pytest.warns(RuntimeWarning, match=f"grid barrier timed out at stage {k} of"):
        _check_barrier_path(T, 3, 8, H, device, *configs, lengths=[6, 2, 5])
    launches = [(first, arrivals, timed_out) for name, first, arrivals, timed_out in seen if name == kernel]
    stages = T + which
    assert launches == [(0, programs * (k + 1) - 1, 1)] + [(s, 0, 0) for s in range(k, stages)], seen


def test_barrier_that_never_times_out_runs_one_launch(device, monkeypatch):
    """One program: every wait is already satisfied, so the whole sequence is one launch per direction."""
    T, H = 5, 32
    fwd, bwd = _barrier_configs(T, 2, H, device, spin_limit=0, block_j=32)
    seen = _counted_launches(monkeypatch)
    _check_barrier_path(T, 2, 8, H, device, fwd, bwd, lengths=[5, 3])
    assert [(k, first, arrivals, t) for k, first, arrivals, t in seen] == [
        ("_lstm_fwd_persistent_kernel", 0, T, 0), ("_lstm_bwd_persistent_kernel", 0, T + 1, 0)]


def test_a_launch_that_completes_no_stage_raises(device, monkeypatch):
    """A broken barrier (no arrivals counted) is reported, not relaunched forever."""
    fwd, bwd = _barrier_configs(3, 2, 32, device, spin_limit=0)

    def lost_arrivals(cfg, **kwargs):
        kwargs["sync_ptr"][1] = 1
        return True

    monkeypatch.setattr(lstm_persistent, "launch", lost_arrivals)
    with pytest.raises(RuntimeError, match=r"timed out with 0 barrier arrivals, fewer than its 4 programs"):
        _check_barrier_path(3, 2, 8, 32, device, fwd, bwd, lengths=[3, 1])


def test_a_stage_writes_only_its_own_step(device):
    """After k stepwise stages, h_1..h_k are written and h_{k+1}.. still hold the NaN they were filled with."""
    T, B, H, k = 6, 3, 32, 2
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (t.detach() for t in _inputs(T, B, 8, H, torch.float32, device))
    _, fwd, _ = lstm_config(B, H, torch.float32, None, "persistent")
    xw = (x.reshape(T * B, -1) @ w_ih.T + b_ih + b_hh).view(T, B, 4 * H)
    h = torch.full((T + 1, B, H), float("nan"), device=device)
    c = torch.full_like(h, float("nan"))
    h[0], c[0] = h0, c0
    h_n = torch.full_like(h0, float("nan"))
    lengths = torch.full((B,), T, dtype=torch.int32, device=device)
    lstm_persistent.run_stages(fwd, k, xw_ptr=xw, w_ptr=w_hh, h_ptr=h, c_ptr=c, g_ptr=c, hn_ptr=h_n,
                               len_ptr=lengths, B=B, H=H, ROWS=B, STORE_GATES=False, C_RING=False)
    ref, _ = lstm_layer(x[:k], h0, c0, w_ih, w_hh, b_ih, b_hh)
    assert_close("h_1..h_k", ref, h[1:k + 1], table=TOL)
    assert torch.isnan(h[k + 1:]).all() and torch.isnan(c[k + 1:]).all()


def test_module_persistent_layers_bidirectional_packed(device):
    kwargs = dict(input_size=10, hidden_size=32, num_layers=2, bidirectional=True)
    ref = LSTM(backend="reference", device=device, **kwargs)
    fused = LSTM(backend="triton", variant="persistent", recompute=True, device=device, **kwargs)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 10, device=device)
    lengths = torch.tensor([5, 2, 4])
    hx = tuple(torch.randn(4, 3, 32, device=device) for _ in range(2))
    assert_same_module_results(run_packed(ref, x, lengths, hx), run_packed(fused, x, lengths, hx))
    assert "variant='persistent'" in repr(fused) and "recompute=True" in repr(fused)


@pytest.mark.parametrize(
    "arch, sms, B, H, dtype, expected",
    [
        (90, 132, 16, 768, torch.float16, ("persistent", 8, (96, 1), False)),
        (90, 132, 16, 1024, torch.bfloat16, ("persistent", 8, (128, 1), False)),
        (80, 108, 16, 1024, torch.float16, ("persistent", 16, (64, 1), False)),
        (90, 132, 16, 768, torch.float32, ("persistent", 8, (96, 1), True)),
        (90, 132, 1, 256, torch.float32, ("persistent", 4, (64, 1), True)),
        (90, 132, 32, 128, torch.float32, ("persistent", 4, (32, 2), True)),
        (90, 132, 128, 512, torch.bfloat16, ("persistent", 16, (32, 4), True)),
        (90, 8, 16, 1024, torch.float16, ("tiled", None, (1,), None)),
        (None, None, 16, 768, torch.float16, ("tiled", None, (1,), None)),
        (None, None, 16, 64, torch.float32, ("onchip", None, (1,), None)),
    ],
    ids=["H100-768", "H100-1024-bf16", "A100-1024", "H100-768-fp32", "H100-B1-256-fp32", "H100-B32-128-fp32-groups",
         "H100-B128-512-wide-streamed", "8-SMs-tiled", "interpreter-auto", "interpreter-onchip"],
)
def test_auto_follows_the_decision_table(arch, sms, B, H, dtype, expected):
    """The rows of kernels/README.md's decision table (fewest units that fit the SMs; fp32 streams its slice;
    wider streamed programs where that frees SMs for batch groups; tiled where no grid fits)."""
    variant, fwd, bwd = lstm_config(B, H, dtype, arch, "auto", sms=sms)
    assert (variant, fwd.meta.get("BLOCK_J"), fwd.grid, fwd.meta.get("STREAM_W")) == expected
    if variant == "persistent":
        assert fwd.meta["BARRIER"] and fwd.meta["launch_cooperative_grid"]
        assert fwd.grid[0] * max(fwd.grid[1], bwd.grid[1]) <= sms


def test_persistent_that_does_not_fit_raises():
    assert persistent_shape(1024, torch.float16, 90, sms=8) is None
    with pytest.raises(ValueError, match=r"variant='persistent' does not fit H=1024 on sm_90 with 8 SMs"):
        lstm_config(16, 1024, torch.float16, 90, "persistent", sms=8)


def test_bad_persistent_options_raise(device):
    args = [t.detach() for t in _inputs(3, 2, 4, 32, torch.float32, device)]
    with pytest.raises(ValueError, match=r"expected block_j a power of two >= 1 or None, got 3"):
        fused_lstm(*args, variant="persistent", block_j=3)
    with pytest.raises(LSTMError, match=r"expected backend='triton' with variant='persistent'"):
        LSTM(4, 8, variant="persistent")
    with pytest.raises(LSTMError, match=r"variant must be one of .*got 'fast'"):
        LSTM(4, 8, backend="triton", variant="fast")

    assert "variant" not in repr(LSTM(4, 8, backend="triton"))


@pytest.mark.skipif(TRITON_DEVICE.type != "cuda", reason="the GPU configs (barrier, cooperative launch) need CUDA")
@pytest.mark.parametrize("recompute", [False, True], ids=["stored-gates", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("H", [100, 256, 512, 768, 1024])
def test_persistent_at_the_compile_gate_widths_on_this_gpu(H, dtype, recompute, device):
    _check_layer(5, 20, 16, H, dtype, device, lengths=[5, 2] * 10, variant="persistent", recompute=recompute)
