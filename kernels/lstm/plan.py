# B batch, H hidden, J units per program, P programs, G batch groups; arch: compute capability (75, 80, 90)
"""The persistent LSTM's per-step time model and the plan `variant="auto"` takes from it: units per program,
where the `W_hh` slice lives (registers/shared memory, or re-read from L1 every step), and how many groups
the batch splits into across programs.

The constants are fitted to the first H200 run (`../shared/notes/gpu-h200-first-run.md` §2, derivation in
`kernels/README.md`, "Per-step model"); every time this module returns is a prediction. A step of one
direction costs a grid barrier plus, for each block of rows a program visits in turn, a block time that grows
with `H` and with the rows of the block, plus the streamed slice's bytes from L1 (or L2 where it does not fit).
"""

import dataclasses

import torch
import triton

__all__ = ["BARRIER_US", "ONCHIP_STEP_US", "Plan", "arch_tier", "persistent_plan", "block_us"]

# A step's fixed cost in one direction (the grid barrier and the round trips around it), and a 16-row block as
# c0 + c1 H (scaled by its rows): least squares over the three persistent figures of the first H200 run, B16
# H768 and B64 H1024 forward+backward (25.7 and 93 us a step; model 25.7, 88.7) and B128 H512 forward (35.7 us;
# model 44.3), with c0 = 0 (a free c0 fits negative).
BARRIER_US = 5.6
BLOCK_US = (0.0, 0.0095)
# The onchip variant's step in one direction (B8 H64 fp32 forward+backward: 23.8 us a step, 1 program).
ONCHIP_STEP_US = 11.9
# Bytes a microsecond an SM reads from L1 (128 B a clock) and from L2 (the README's 120 GB/s per SM), and the
# L1 a streamed slice may fill (the combined L1/shared array less what the kernels' own tiles take).
L1_BYTES_US, L2_BYTES_US = 225e3, 120e3
L1_BYTES = {75: 48 << 10, 80: 160 << 10, 90: 224 << 10}
# Rows of h (forward) or of one gate's dgates (backward) times BLOCK_H that an on-chip-slice program stages for
# its dot: above these the operands no longer fit 8 warps' registers (the recompute backward spills 8 B per
# thread at 16,384 on sm_80 and sm_90).
STAGED = (16384, 8192)
# A streamed slice may take 2x or 4x the fewest units a program (freeing SMs for batch groups), up to 16 units:
# at 32 the sm_80/90 kernels spill 4-68 B a thread (compile gate). On sm_75 (255 registers a thread at 8 warps)
# a streamed program takes the fewest units only, up to 32, with a quarter of the tile (`config.stream_chunk`):
# wider ones, or the sm_80 tile, spill 4-12 B a thread in the backward there.
WIDER_J, WIDER_MAX_J, WIDER_MIN_ARCH = (1, 2, 4), 16, 80
STREAM_MAX_J = {75: 32, 80: 16, 90: 16}


@dataclasses.dataclass(frozen=True)
class Plan:
    J: int  # units per program
    stream: bool  # W_hh slice re-read from L1/L2 each step (True) or held on chip (False)
    rows: tuple[int, int]  # rows per block, forward and backward
    groups: tuple[int, int]  # batch groups (the grid's second axis), forward and backward
    step_us: float  # predicted forward + backward step
    fwd_us: float  # predicted forward step


def arch_tier(arch: int) -> int:
    """The gate's architecture a compute capability takes its limits from (sm_86/89 those of sm_80)."""
    return 75 if arch < 80 else 80 if arch < 90 else 90


def block_us(H: int, rows: int) -> float:
    """A block of `rows` rows in one direction, slice reads aside."""
    c0, c1 = BLOCK_US
    return (c0 + c1 * H) * max(rows, 1) / 16


def _slice_us(J: int, H: int, itemsize: int, arch: int) -> float:
    nbytes = 4 * J * H * itemsize
    return nbytes / (L1_BYTES_US if nbytes <= L1_BYTES[arch_tier(arch)] else L2_BYTES_US)


def _fits_on_chip(H: int, J: int, rows: int, itemsize: int, shared: int) -> bool:
    block_h = max(16, triton.next_power_of_2(H))
    return itemsize * block_h * (4 * J + rows) <= shared


def persistent_plan(
    B: int, H: int, dtype: torch.dtype, arch: int, sms: int, shared: int, block_b: int = 16,
    block_j: int | None = None, groups: int | None = None, min_j: int = 4,
) -> Plan | None:
    """The fastest plan the model predicts for `B` rows of width `H` on `sms` SMs with `shared` bytes of shared
    memory a block, or None where no grid fits. fp32 always streams the slice (an fp32 slice in registers
    spills); `block_j` and `groups` pin those choices."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    block_h = max(16, triton.next_power_of_2(H))
    j0 = min_j
    while block_j is None and triton.cdiv(H, j0) > sms:
        j0 *= 2
    best = None
    for stream in (False, True):
        if not stream and dtype == torch.float32:
            continue
        for j in ((block_j,) if block_j else (j0,) if not stream else tuple(j0 * k for k in WIDER_J)):
            programs = triton.cdiv(H, j)
            wider_ok = arch >= WIDER_MIN_ARCH and programs * 2 <= sms and j <= WIDER_MAX_J
            if programs > sms or (stream and j > STREAM_MAX_J[arch_tier(arch)]) or (j > j0 and not wider_ok):
                continue
            rows = (block_b, block_b) if stream else tuple(max(1, min(block_b, most // block_h)) for most in STAGED)
            if not stream and not _fits_on_chip(H, j, rows[0], itemsize, shared):
                continue
            split = tuple(groups or max(1, min(triton.cdiv(B, r), sms // programs)) for r in rows)
            fwd, bwd = (BARRIER_US + triton.cdiv(triton.cdiv(B, g), r) * (
                block_us(H, min(r, B)) + (_slice_us(j, H, itemsize, arch) if stream else 0.0))
                for r, g in zip(rows, split))
            plan = Plan(j, stream, rows, split, fwd + bwd, fwd)
            if best is None or plan.step_us < best.step_us:
                best = plan
    return best
