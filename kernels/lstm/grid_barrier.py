# P programs in the grid; sync: (2,) int32 [arrivals, timeout flag], zeroed by the launcher before each launch
"""A grid-wide barrier for persistent kernels: a monotonic arrival counter with a bounded spin.

Every program arrives once per stage (`grid_arrive`: a block barrier, so that all of the program's stores
come first, then one `atom.add.release.gpu`). Before reading what stage `s` published, a program waits until
the counter holds `P * (s + 1)` arrivals counted from the launch's first stage (`grid_wait`: polls with
`atom.add.acquire.gpu` of 0, then a block barrier so every thread reads after the acquire). The counter is
never reset during a launch, so there is no flip bit or generation to get wrong (PyTorch Inductor's
`x_grid_barrier` in `torch/_inductor/runtime/triton_helpers.py` flips the top bit of a reused semaphore
instead). Data published before the arrival must be read with `cache_modifier=".cg"`: L1 is not coherent
between SMs, L2 is.

The spin is bounded: after `SPIN_LIMIT` polls without the arrivals, `grid_wait` returns False. The kernel then
stops, sets the timeout flag, and the launcher runs the stages from the first one some program did not
complete (`arrivals // P` stages are complete in every program) one launch each, without the barrier
(`lstm_persistent.run_stages`). The first stage of a launch never waits, so a launch completes at least one
stage. The programs must be co-resident for the
barrier to pass at all: the launchers keep the grid within the SM count and ask for a cooperative launch,
which fails at launch, not in the spin, when the grid cannot be resident.

A test can make the barrier stall on hardware: `WITHHOLD_STAGE=k` (a constexpr, -1 by default, so normal
launches compile the same kernel) keeps the last program's arrival for stage `k` from coming (`arrives`). The
program still completes stage `k`; at stage `k + 1` every program's spin runs out, and the launcher relaunches
from stage `k` (`P (k + 1) - 1` arrivals). `k` must be at least 1: the driver takes fewer than `P` arrivals in
a launch for a broken barrier.

Under the Triton interpreter the programs of a launch run one after another, so a program waiting for a
later one times out: with a small `SPIN_LIMIT` the interpreter exercises exactly this timeout and relaunch
path, one stage per launch.
"""

import triton.language as tl

from ..interpreter import device_fn

__all__ = ["arrives", "grid_arrive", "grid_wait"]


@device_fn
def grid_arrive(sync_ptr):
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")


@device_fn
def arrives(ok, stage, WITHHOLD_STAGE: tl.constexpr):
    """`ok`, but False for the last program at `stage == WITHHOLD_STAGE` (test-only; -1: never)."""
    if WITHHOLD_STAGE >= 0:
        last = (tl.program_id(0) == tl.num_programs(0) - 1) & (tl.program_id(1) == tl.num_programs(1) - 1)
        ok = ok & ((stage != WITHHOLD_STAGE) | ~last)
    return ok


@device_fn
def grid_wait(sync_ptr, target, SPIN_LIMIT: tl.constexpr):
    """True once `target` arrivals are counted, False after `SPIN_LIMIT` more polls without them."""
    seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < target) & (spins < SPIN_LIMIT):
        seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()
    return seen >= target


@device_fn
def grid_timed_out(sync_ptr):
    tl.atomic_xchg(sync_ptr + 1, 1)
