# B batch, T time, H hidden, G = 4H; P programs in a persistent grid
"""Host side of the persistent LSTM kernels: their buffers, and the stage driver that finishes a call after a
barrier timeout (`grid_barrier.py`). No autograd here; `fused.py` calls these from `recurrence_fwd` and
`recurrence_bwd`.

A forward has T stages (one per step), a backward T+1 (one per step, then the one that writes dh_0, dc_0).
With the barrier (a GPU) the driver makes one launch for all stages. If a program's wait timed out, the
stages that not every program completed run one launch each, without the barrier, from the first of them:
correct whatever made the barrier stall, at the cost of a launch per step, and a warning says so once; later
calls in the process skip the barrier too (`_STALLED`). The first stage of a launch never waits, so a launch
that completes no stage means the barrier itself is broken, and raises. Without the barrier (the
interpreter) every stage is its own launch.
"""

import dataclasses
import math
import warnings

import torch
import triton

from ..launch import KernelConfig, launch

__all__ = ["group_rows", "persistent_bwd", "persistent_fwd", "run_stages"]


def group_rows(cfg: KernelConfig, B: int) -> int:
    """Rows of the batch each program's group owns: the grid's second axis splits the batch in equal groups of
    whole `BLOCK_B` blocks."""
    blocks = triton.cdiv(B, cfg.meta["BLOCK_B"])
    return triton.cdiv(blocks, cfg.grid[1]) * cfg.meta["BLOCK_B"]


def _one_stage_per_launch(cfg: KernelConfig, first: int, n_stages: int, args: dict):
    sync = torch.zeros(2, dtype=torch.int32, device=args["w_ptr"].device)
    for s in range(first, n_stages):
        launch(cfg, **args, sync_ptr=sync, s_first=s, n_stages=1)


_STALLED = []  # holds True once a barrier timed out in this process


def _without_barrier(cfg: KernelConfig) -> KernelConfig:
    return dataclasses.replace(cfg, meta={**cfg.meta, "BARRIER": False, "launch_cooperative_grid": False})


def run_stages(cfg: KernelConfig, n_stages: int, **args) -> None:
    """Runs stages [0, n_stages) of a persistent kernel with the arguments `args` (all but the sync buffer
    and the stage range)."""
    if not cfg.meta["BARRIER"] or _STALLED:
        _one_stage_per_launch(_without_barrier(cfg) if cfg.meta["BARRIER"] else cfg, 0, n_stages, args)
        return
    sync = torch.zeros(2, dtype=torch.int32, device=args["w_ptr"].device)
    if not launch(cfg, **args, sync_ptr=sync, s_first=0, n_stages=n_stages):
        return
    arrivals, timed_out = sync.tolist()
    if not timed_out:
        return
    programs = math.prod(cfg.grid)
    if arrivals < programs:
        raise RuntimeError(
            f"persistent LSTM: the launch timed out with {arrivals} barrier arrivals, fewer than its {programs} "
            f"programs; its first stage never waits, so the barrier itself is broken")
    first = arrivals // programs
    warnings.warn(f"persistent LSTM: the grid barrier timed out at stage {first} of {n_stages}; from there on, in "
                  f"this process, the persistent kernels run one launch per step", RuntimeWarning, stacklevel=2)
    _STALLED.append(True)
    _one_stage_per_launch(_without_barrier(cfg), first, n_stages, args)


def persistent_fwd(
    xw: torch.Tensor,  # (T, B, 4H)
    w_hh: torch.Tensor,  # (4H, H)
    h: torch.Tensor,  # (T+1, B, H), h0 at [0], NaN elsewhere
    c: torch.Tensor,  # (T+1, B, H) fp32, c0 at [0], NaN elsewhere; or (2, B, H), a ring, when nothing is saved
    gates: torch.Tensor,  # (T, B, 4H) fp32, or any tensor when not store_gates
    h_n: torch.Tensor,  # (B, H)
    lengths: torch.Tensor,  # (B,) int32
    cfg: KernelConfig,
    store_gates: bool,
    c_ring: bool,
) -> None:
    T, B, G = xw.shape
    run_stages(cfg, T, xw_ptr=xw, w_ptr=w_hh, h_ptr=h, c_ptr=c, g_ptr=gates, hn_ptr=h_n, len_ptr=lengths, B=B,
               H=G // 4, ROWS=group_rows(cfg, B), STORE_GATES=store_gates, C_RING=c_ring)


def persistent_bwd(
    xw: torch.Tensor,  # (T, B, 4H), or any tensor when gates are given
    w_hh: torch.Tensor,  # (4H, H)
    h: torch.Tensor,  # (T+1, B, H)
    c: torch.Tensor,  # (T+1, B, H) fp32
    gates: torch.Tensor,  # (T, B, 4H) fp32, or any tensor when recompute
    dout: torch.Tensor,  # (T, B, H)
    dh_n: torch.Tensor,  # (B, H) fp32
    dc_n: torch.Tensor,  # (B, H) fp32
    lengths: torch.Tensor,  # (B,) int32
    cfg: KernelConfig,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns `dgates` (T, B, 4H) in `h`'s dtype, `dh0`, `dc0` (B, H) fp32."""
    T, B, H = dout.shape
    nan = float("nan")
    dg = torch.full((T + 1, B, 4 * H), nan, dtype=h.dtype, device=h.device)
    dg[T] = 0
    dh = torch.full((2, B, H), nan, dtype=torch.float32, device=h.device)
    dc = torch.full_like(dh, nan)
    dh[0], dc[0] = dh_n, dc_n
    dh0, dc0 = torch.full_like(dh_n, nan), torch.full_like(dc_n, nan)
    run_stages(cfg, T + 1, xw_ptr=xw, w_ptr=w_hh, h_ptr=h, c_ptr=c, g_ptr=gates, dout_ptr=dout, dg_ptr=dg,
               dh_ptr=dh, dc_ptr=dc, dh0_ptr=dh0, dc0_ptr=dc0, len_ptr=lengths, T=T, B=B, H=H,
               ROWS=group_rows(cfg, B), RECOMPUTE=recompute)
    return dg[:T], dh0, dc0
