# T time, B batch, I input, H hidden, P programs
"""The persistent LSTM's synchronisation where program order matters: what a run in program order cannot show.

Under the interpreter the programs of a launch run one after another, 0 to P-1, each through as many stages as
its barrier waits allow (spin limit 0: a wait passes only if the arrivals are already counted). Here they also
run P-1 to 0 (`reversed_programs`), so a program that reads `h_{t-1}` or `dgates_{t+1}` before every program
has published it, because its wait counts one arrival too few, reads the NaN those buffers are filled with
and the outputs are NaN. The withheld-arrival path (the last program's arrival for stage k never comes, the
launcher relaunches from stage k) runs from every stage of the forward and of the backward, so that every
slot of the backward's (dh, dc) ring is read again after a relaunch.
"""

import pytest
import triton.runtime.interpreter as interpreter

from leanfit.kernels.lstm import persistent as lstm_persistent
from tests.kernels.test_persistent_lstm import (
    _barrier_configs,
    _check_barrier_path,
    _counted_launches,
    _withhold,
)

pytestmark = pytest.mark.gpu  # runs on CUDA when there is one: the GPU lane

T, B, I, H = 5, 3, 8, 32
LENGTHS = [5, 2, 4]


@pytest.fixture
def reversed_programs(monkeypatch):
    """Every interpreted launch runs its programs last to first."""
    builder = interpreter.interpreter_builder
    real = type(builder).set_grid_idx

    def last_first(x, y, z):
        real(builder, builder.grid_dim[0] - 1 - x, y, z)

    monkeypatch.setattr(builder, "set_grid_idx", last_first)


def _interpreter_only(device):
    if device.type == "cuda":
        pytest.skip("program order is the interpreter's; on a GPU the programs run at once")


# First to last with 4 programs is test_barrier_timeouts_relaunch_to_the_right_answer; with 2, a wait that counts
# one arrival too few passes at stage 1 before the other program has published h_1 (or dgates_T-1).
ORDERS = [("first-to-last", 2), ("last-to-first", 2), ("last-to-first", 4)]


@pytest.mark.parametrize("order, programs", ORDERS, ids=[f"{o}-P{p}" for o, p in ORDERS])
def test_no_program_reads_a_step_before_every_program_published_it(order, programs, device, request, monkeypatch):
    _interpreter_only(device)
    if order == "last-to-first":
        request.getfixturevalue("reversed_programs")
    fwd, bwd = _barrier_configs(T, B, H, device, spin_limit=0, block_j=H // programs)
    seen = _counted_launches(monkeypatch)
    monkeypatch.setattr(lstm_persistent, "_STALLED", [])
    with pytest.warns(RuntimeWarning, match="grid barrier timed out"):
        _check_barrier_path(T, B, I, H, device, fwd, bwd, lengths=LENGTHS)
    first_fwd = seen[0]
    assert first_fwd[0] == "_lstm_fwd_persistent_kernel" and first_fwd[3] == 1, seen


STAGES = [("forward", k) for k in range(1, T)] + [("backward", k) for k in range(1, T + 1)]


@pytest.mark.parametrize("which, k", STAGES, ids=[f"{w}-stage{k}" for w, k in STAGES])
def test_relaunch_after_a_withheld_arrival_from_every_stage(which, k, device, monkeypatch):
    """One program (on a GPU, four): its arrival for stage k is withheld, the launch times out at stage k+1 (or
    ends after the last stage with one arrival missing) and the launcher reruns stages k.. one launch each; the
    results match the reference, so stage k found its inputs, the backward's ring slot included, intact."""
    programs = 4 if device.type == "cuda" else 1
    spin_limit = 1 << 16 if device.type == "cuda" else 0
    configs = list(_barrier_configs(T, B, H, device, spin_limit=spin_limit, block_j=H // programs))
    index = 0 if which == "forward" else 1
    configs[index] = _withhold(configs[index], k)
    seen = _counted_launches(monkeypatch)
    monkeypatch.setattr(lstm_persistent, "_STALLED", [])
    stages = T + index
    last = k == stages - 1
    if last:
        _check_barrier_path(T, B, I, H, device, *configs, lengths=LENGTHS)
    else:
        with pytest.warns(RuntimeWarning, match=f"grid barrier timed out at stage {k} of {stages}"):
            _check_barrier_path(T, B, I, H, device, *configs, lengths=LENGTHS)
    kernel = configs[index].kernel.fn.__name__
    launches = [(first, arrivals, timed_out) for name, first, arrivals, timed_out in seen if name == kernel]
    if last:
        assert launches == [(0, programs * stages - 1, 0)], seen
    else:
        assert launches == [(0, programs * (k + 1) - 1, 1)] + [(s, 0, 0) for s in range(k, stages)], seen
    if which == "forward" and not last:
        backward = [first for name, first, _, _ in seen if name == "_lstm_bwd_persistent_kernel"]
        assert backward == list(range(T + 1)), "after the stall, the backward runs one stage per launch"
