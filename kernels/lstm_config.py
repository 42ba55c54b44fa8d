# B batch, H hidden; arch: compute capability (75 T4, 80 A100, 90 H100), None under the interpreter
"""Launch configs of the fused LSTM per GPU architecture: variant, tiles, warps. `kernels/resources.py` compiles
them for sm_75/80/90 and the table in `kernels/README.md` shows what they cost.

Why these numbers (triton 3.6, `python -m leanfit.kernels.resources`):
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
"""

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from .launch import KernelConfig, shared_limit
from .lstm_bwd import _lstm_bwd_onchip_kernel, _lstm_bwd_tiled_kernel
from .lstm_fwd import _lstm_fwd_onchip_kernel, _lstm_fwd_tiled_kernel

__all__ = ["INTERPRETED", "VARIANTS", "lstm_config", "lstm_variants", "onchip_max_h"]

INTERPRETED = isinstance(_lstm_fwd_tiled_kernel, InterpretedFunction)
VARIANTS = ("auto", "onchip", "tiled")
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


def _tier(arch: int) -> int:
    return 75 if arch < 80 else 80 if arch < 90 else 90


def onchip_max_h(arch: int | None, dtype: torch.dtype) -> int:
    """The widest BLOCK_H the onchip variant takes on `arch` (64 where its shared memory fits, else 32)."""
    if arch is None:
        return 64
    need = ONCHIP64_SHARED[4 if dtype == torch.float32 else 2]
    return 64 if shared_limit(arch) >= need and _tier(arch) > 75 else 32


def lstm_variants(H: int, arch: int | None, dtype: torch.dtype) -> tuple[str, ...]:
    """The variants `lstm_config` accepts for width `H` on `arch`."""
    return ("onchip", "tiled") if triton.next_power_of_2(H) <= onchip_max_h(arch, dtype) else ("tiled",)


def _tiled(H, arch, block_n, block_k, bwd):
    if arch is None:
        n, k, warps = INTERPRETER_TILES
    else:
        n, k, warps = TILED[(_tier(arch), H % 16 == 0)][bwd]
    return dict(BLOCK_N=block_n or n, BLOCK_K=block_k or k, num_warps=warps)


def lstm_config(
    B: int, H: int, dtype: torch.dtype, arch: int | None, variant: str = "auto", block_b: int = 16,
    block_n: int | None = None, block_k: int | None = None,
) -> tuple[str, KernelConfig, KernelConfig]:
    """The variant and the forward and backward launch configs for `B` rows of width `H` on `arch`.

    `block_n`, `block_k` override the tiled variant's tiles. Raises ValueError for variant="onchip" wider than
    `onchip_max_h(arch, dtype)`."""
    limit = onchip_max_h(arch, dtype)
    block_h = max(16, triton.next_power_of_2(H))
    if variant == "auto":
        variant = "onchip" if block_h <= limit else "tiled"
    if variant == "onchip" and block_h > limit:
        where = "the interpreter" if arch is None else f"sm_{arch}"
        raise ValueError(f"fused_lstm: variant='onchip' takes H <= {limit} on {where} (W_hh must fit on chip); "
                         f"got H={H}: use variant='tiled' or 'auto'")
    meta = {"BLOCK_B": block_b, "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_F32": INTERPRETED and dtype == torch.bfloat16}
    grid = (triton.cdiv(B, block_b),)
    if variant == "onchip":
        meta.update(BLOCK_H=block_h, num_warps=8 if block_h >= 64 else 4)
        return variant, KernelConfig(_lstm_fwd_onchip_kernel, grid, meta), KernelConfig(
            _lstm_bwd_onchip_kernel, grid, dict(meta))
    fwd = {**meta, **_tiled(H, arch, block_n, block_k, 0)}
    bwd = {**meta, **_tiled(H, arch, block_n, block_k, 1)}
    return variant, KernelConfig(_lstm_fwd_tiled_kernel, grid, fwd), KernelConfig(_lstm_bwd_tiled_kernel, grid, bwd)
