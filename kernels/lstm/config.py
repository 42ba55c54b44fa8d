# B batch, H hidden; arch: compute capability (75 T4, 80 A100, 90 H100), None under the interpreter
"""Launch configs of the fused LSTM per GPU architecture: variant, tiles, warps. `bench/compile_gate.py` compiles
them for sm_75/80/90 and the table in `kernels/README.md` shows what they cost.

Why these numbers (triton 3.6, `python -m bench.compile_gate`):
- onchip keeps the four (BLOCK_H, BLOCK_H) blocks of W_hh on chip, through shared memory as dot operands.
  At BLOCK_H=64 its backward needs up to 90 KiB in 16 bits and 136 KiB in fp32 (sm_80), over the T4's
  64 KiB per block and, in fp32, over the 99 KiB of sm_86/89: there onchip stops at H=32. At BLOCK_H=128 it
  spills and needs 136-530 KB on every architecture, so no architecture takes it.
- tiled streams W_hh in (BLOCK_K, BLOCK_N) tiles. 64 x 64 tiles spill on every architecture in the
  backward, and on sm_75 everywhere: with 4 warps Triton emits `.reqntid 128`, and for that ptxas caps
  sm_75 kernels at 64 registers (3.3-7.6 KB of spill per thread); 8 warps lift the cap. 32 x 32 tiles
  compile without spills, with 8 warps on sm_75 and in the sm_80 backward, 4 elsewhere.
- When H is not a multiple of 16 the JIT cannot prove 16-byte alignment of the rows, loads are not
  vectorized and the same tiles spill; narrower tiles (16 or 32 x 16) compile clean.
Architectures between the listed ones take the tiles of the nearest one below (sm_86/89 those of sm_80,
whose tiled kernels need at most 34 KiB of shared memory).
- persistent splits W_hh over at most one program per SM, `block_j` units each; `plan.py` picks the units,
  where the slice lives and the batch groups from its per-step model (`kernels/README.md`, decision table).
  A slice on chip (16 bits) stays in shared memory beside the rows staged for the dot (at most 160 KiB, A100
  at H=1024); BLOCK_B * BLOCK_H is at most 16,384 in the forward and 8,192 in the backward (with 16 rows the
  recompute backward spills 8 B at H=1024 on sm_80 and sm_90). An fp32 slice in registers spills (4.7 KB at
  H=768, sm_90), so fp32 streams it from L1 in (chunk, 4J) tiles of at most STREAM_TILE elements; on sm_75
  a quarter of that, and the fewest units only (larger tiles or wider programs spill 4-12 B in the backward
  there). 8 warps, one per K chunk of the batched dot (8 also avoid sm_75's 64-register cap), with
  `maxnreg=255`.
  Where the grid or the shared memory does not fit, variant="auto" takes the tiled variant instead.
"""

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from ..launch import KernelConfig, shared_limit
from .bwd import _lstm_bwd_onchip_kernel, _lstm_bwd_tiled_kernel
from .fwd import _lstm_fwd_onchip_kernel, _lstm_fwd_tiled_kernel
from .persistent_bwd import _lstm_bwd_persistent_kernel
from .persistent_fwd import _lstm_fwd_persistent_kernel
from .plan import ONCHIP_STEP_US, arch_tier, persistent_plan

__all__ = ["INTERPRETED", "VARIANTS", "lstm_config", "lstm_variants", "onchip_max_h", "persistent_shape"]

INTERPRETED = isinstance(_lstm_fwd_tiled_kernel, InterpretedFunction)
VARIANTS = ("auto", "onchip", "persistent", "tiled")
# (arch, H % 16 == 0) -> (BLOCK_N, BLOCK_K, num_warps) of the forward and of the backward.
TILED = {
    (75, True): ((32, 32, 8), (32, 32, 8)),
    (75, False): ((32, 16, 8), (32, 16, 8)),
    (80, True): ((32, 32, 4), (32, 32, 8)),
    (80, False): ((16, 16, 4), (16, 16, 4)),
    (90, True): ((32, 32, 4), (32, 32, 4)),
    (90, False): ((16, 16, 4), (32, 16, 4)),
}
# Shared memory the onchip kernels need at BLOCK_H=64 (the backward, on sm_80; `resources`), by input width.
ONCHIP64_SHARED = {4: 136 * 1024, 2: 90 * 1024}
# Under the interpreter tiles only change how many numpy steps a launch takes: fewer, larger ones are faster.
INTERPRETER_TILES = (64, 64, 4)
# SMs of the cards the compile gate builds for (T4, A100, H100): the persistent grid's bound when the launch is
# not for a device at hand.
GATE_SMS = {75: 40, 80: 108, 90: 132}
# Units per persistent program: at least 4, so that the forward's dot has N = 4 J >= 16 gate columns.
MIN_BLOCK_J = 4
# Warps per persistent program: one per K chunk of its batched dot.
PERSISTENT_WARPS = 8
# Elements of a streamed slice's (chunk, 4J) dot tile: 16 fp32 registers a thread at 8 warps; the H chunk is
# split in SPLIT_K pieces of BLOCK_K, one per warp.
STREAM_TILE = 4096
# Under the interpreter: 8 units per program (H = 64 runs 8 programs) and 2 K chunks, so the chunk sum runs.
INTERPRETER_BLOCK_J, INTERPRETER_SPLIT_K = 8, 2
# One persistent program per SM may use the whole register file (8 warps x 255 <= 65,536); without the bound
# ptxas keeps some of these kernels at 128 or fewer registers and spills 4-16 B per thread.
PERSISTENT_MAXNREG = 255
# Barrier polls before a wait gives up: about a second at a microsecond or less per atomic round trip through
# L2 (a prediction), far beyond any wait between co-resident programs; a mistake costs that, not a hang.
SPIN_LIMIT = 1 << 20
# K chunk of the backward's gate recompute, which streams W_hh[gates(J), :] from L2.
RECOMPUTE_K = 32


def onchip_max_h(arch: int | None, dtype: torch.dtype) -> int:
    """The widest BLOCK_H the onchip variant takes on `arch` (64 where its shared memory fits, else 32)."""
    if arch is None:
        return 64
    need = ONCHIP64_SHARED[4 if dtype == torch.float32 else 2]
    return 64 if shared_limit(arch) >= need and arch_tier(arch) > 75 else 32


def stream_chunk(H: int, J: int, arch: int) -> int:
    """The H chunk of a streamed slice's dot: a (chunk, 4J) tile of STREAM_TILE elements (a quarter on sm_75),
    16 to next_pow2(H)."""
    tile = STREAM_TILE if arch_tier(arch) > 75 else STREAM_TILE // 4
    return max(16, min(max(16, triton.next_power_of_2(H)), tile // (4 * J)))


def persistent_shape(
    H: int, dtype: torch.dtype, arch: int | None, sms: int | None = None, block_b: int = 16,
    block_j: int | None = None, B: int = 16, groups: int | None = None,
) -> dict | None:
    """Units per program, warps, K chunks, rows per block and batch groups of the persistent variant for `B`
    rows (`plan.persistent_plan` on a GPU); None where no grid fits the SMs (or, for a slice on chip, the
    shared memory). fp32 streams its slice from L1 every step (`STREAM_W`), under the interpreter too."""
    block_h = max(16, triton.next_power_of_2(H))
    stream = dtype == torch.float32
    if arch is None:
        split_k, block_k = (INTERPRETER_SPLIT_K, 16) if stream else (INTERPRETER_SPLIT_K, block_h // 2)
        return dict(BLOCK_J=block_j or INTERPRETER_BLOCK_J, SPLIT_K=split_k, BLOCK_K=block_k, STREAM_W=stream,
                    num_warps=4, rows=(block_b, block_b), groups=(groups or 1, groups or 1), step_us=None)
    plan = persistent_plan(B, H, dtype, arch, sms or GATE_SMS[arch_tier(arch)], shared_limit(arch), block_b, block_j,
                           groups, MIN_BLOCK_J)
    if plan is None:
        return None
    chunk = stream_chunk(H, plan.J, arch) if plan.stream else block_h
    split_k = min(PERSISTENT_WARPS, chunk // 16)
    return dict(BLOCK_J=plan.J, SPLIT_K=split_k, BLOCK_K=chunk // split_k, STREAM_W=plan.stream,
                num_warps=PERSISTENT_WARPS, rows=plan.rows, groups=plan.groups, step_us=plan.step_us)


def lstm_variants(H: int, arch: int | None, dtype: torch.dtype, sms: int | None = None) -> tuple[str, ...]:
    """The variants `lstm_config` accepts for width `H` on `arch` (with `sms` SMs; by default the gate's card)."""
    onchip = ("onchip",) if triton.next_power_of_2(H) <= onchip_max_h(arch, dtype) else ()
    persistent = ("persistent",) if persistent_shape(H, dtype, arch, sms) else ()
    return onchip + persistent + ("tiled",)


def _persistent(B, H, dtype, arch, sms, block_b, block_j, groups, meta):
    shape = persistent_shape(H, dtype, arch, sms, block_b, block_j, B, groups)
    if shape is None:
        sms = sms or GATE_SMS[arch_tier(arch)]
        raise ValueError(f"fused_lstm: variant='persistent' does not fit H={H} on sm_{arch} with {sms} SMs (grid "
                         "over the SMs or W_hh slice over the shared memory); use variant='tiled' or 'auto'")
    programs = triton.cdiv(H, shape["BLOCK_J"])
    common = {**meta, "BLOCK_J": shape["BLOCK_J"], "num_warps": shape["num_warps"], "SPIN_LIMIT": SPIN_LIMIT,
              "BARRIER": arch is not None, "STREAM_W": shape["STREAM_W"], "SPLIT_K": shape["SPLIT_K"],
              "BLOCK_K": shape["BLOCK_K"]}
    if arch is not None:
        common.update(launch_cooperative_grid=True, maxnreg=PERSISTENT_MAXNREG)
    (fwd_b, bwd_b), (fwd_g, bwd_g) = shape["rows"], shape["groups"]
    fwd = {**common, "BLOCK_B": fwd_b}
    bwd = {**common, "BLOCK_B": bwd_b, "RECOMPUTE_K": RECOMPUTE_K}
    return (KernelConfig(_lstm_fwd_persistent_kernel, (programs, fwd_g), fwd),
            KernelConfig(_lstm_bwd_persistent_kernel, (programs, bwd_g), bwd))


def _tiled(H, arch, block_n, block_k, bwd):
    if arch is None:
        n, k, warps = INTERPRETER_TILES
    else:
        n, k, warps = TILED[(arch_tier(arch), H % 16 == 0)][bwd]
    return dict(BLOCK_N=block_n or n, BLOCK_K=block_k or k, num_warps=warps)


def _auto(B, H, dtype, arch, sms, block_b, limit):
    """onchip, persistent or tiled: under the interpreter onchip where it fits, else tiled; on a GPU the
    faster of onchip and persistent by the per-step model (`plan.py`), else tiled."""
    block_h = max(16, triton.next_power_of_2(H))
    shape = persistent_shape(H, dtype, arch, sms, block_b, B=B) if arch is not None else None
    if shape is None:
        return "onchip" if block_h <= limit else "tiled"
    if block_h > limit:
        return "persistent"
    waves = triton.cdiv(triton.cdiv(B, block_b), sms or GATE_SMS[arch_tier(arch)])
    return "persistent" if shape["step_us"] < 2 * ONCHIP_STEP_US * waves else "onchip"


def lstm_config(
    B: int, H: int, dtype: torch.dtype, arch: int | None, variant: str = "auto", block_b: int = 16,
    block_n: int | None = None, block_k: int | None = None, sms: int | None = None, block_j: int | None = None,
    tf32: bool = False, groups: int | None = None,
) -> tuple[str, KernelConfig, KernelConfig]:
    """The variant and the forward and backward launch configs for `B` rows of width `H` on `arch` with `sms`
    SMs (by default those of the gate's card for `arch`).

    "auto" follows the decision table of `kernels/README.md` (`_auto`). `block_n`, `block_k` override the tiled
    variant's tiles, `block_j` and `groups` the persistent variant's units per program and batch groups. `tf32`
    lets the persistent variant's fp32 products use TF32 (`torch.backends.cudnn.allow_tf32`, as nn.LSTM); the
    onchip and tiled variants stay ieee fp32 (with TF32 the onchip backward outgrows sm_80's shared memory at
    H=64 and the tiled forward spills at H=100).
    Raises ValueError for variant="onchip" wider than `onchip_max_h(arch, dtype)` and for variant="persistent"
    where it does not fit.
    """
    limit = onchip_max_h(arch, dtype)
    block_h = max(16, triton.next_power_of_2(H))
    if variant == "auto":
        variant = _auto(B, H, dtype, arch, sms, block_b, limit)
    if variant == "onchip" and block_h > limit:
        where = "the interpreter" if arch is None else f"sm_{arch}"
        raise ValueError(f"fused_lstm: variant='onchip' takes H <= {limit} on {where} (W_hh must fit on chip); "
                         f"got H={H}: use variant='tiled' or 'auto'")
    tf32 = tf32 and variant == "persistent"
    meta = {"BLOCK_B": block_b, "PRECISION": "ieee" if dtype == torch.float32 and not tf32 else "tf32",
            "DOT_F32": INTERPRETED and dtype == torch.bfloat16}
    if variant == "persistent":
        return variant, *_persistent(B, H, dtype, arch, sms, block_b, block_j, groups, meta)
    grid = (triton.cdiv(B, block_b),)
    if variant == "onchip":
        meta.update(BLOCK_H=block_h, num_warps=8 if block_h >= 64 else 4)
        return variant, KernelConfig(_lstm_fwd_onchip_kernel, grid, meta), KernelConfig(
            _lstm_bwd_onchip_kernel, grid, dict(meta))
    fwd = {**meta, **_tiled(H, arch, block_n, block_k, 0)}
    bwd = {**meta, **_tiled(H, arch, block_n, block_k, 1)}
    return variant, KernelConfig(_lstm_fwd_tiled_kernel, grid, fwd), KernelConfig(_lstm_bwd_tiled_kernel, grid, bwd)
