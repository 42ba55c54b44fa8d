# B batch, T time, H hidden, J units per program, G = 4H gate pre-activations in PyTorch's order (i, f, g, o)
"""Persistent backward recurrence of one LSTM layer: `W_hh` split over the programs, one grid barrier per step.

Program `p` owns the hidden units `J_p` (`J = BLOCK_J` of them) and the matching columns `W_hh[:, J_p]`,
loaded once as four `(SPLIT_K, BLOCK_K, J)` tensors, one per gate, each over that gate's `H` rows in one
chunk per warp. Four dots of `K = H`, not one of `K = 4H`, keep a quarter of the staged `dgates` rows live at
a time. With `dgates_T = 0`, the stage for time `t` (from `T-1` down to `-1`), for each block of rows:
1. load its own carried state and the forward's saved values at `t` (before the barrier wait);
2. wait until every program has published `dgates_{t+1}`;
3. read all of `dgates_{t+1}` (B x 4H) from L2 (`.cg`): `dh_t[:, J] = carried + dgates_{t+1} W_hh[:, J]`;
4. form its slice of `dgates_t` from `dh_t[:, J]`, `dc_t[:, J]` and the gates (stored, or with `RECOMPUTE`
   recomputed from `xW[t]`, `h_{t-1}` and `W_hh[gates(J), :]` streamed from L2), publish it, and carry
   `dh` (zero where the row is live: its part went into `dgates_t`) and `dc` to the next stage;
then arrive. The stage for `t = -1` writes `dh_0` and `dc_0`. Gate gradients as in `bwd.py`; the
weight, bias and input gradients are matrix products over all steps afterwards (`lstm/fused.py`).

With `STREAM_W` (fp32) the columns are not held but read again each step in H chunks over the four gates
(`_streamed_dh`); a second grid axis splits the batch as in the forward.

The carried `(dh, dc)` live in a two-slot ring indexed by the stage's parity. A program reads and writes only
its own columns there, and none can start stage `s + 1` before all have finished stage `s`, so after a
timed-out wait the slot that the first incomplete stage reads is intact and a relaunch from that stage
rewrites the same values. `BARRIER=False`: one stage per launch, as in the forward.
"""

import triton
import triton.language as tl

from ..interpreter import device_fn
from .cell import dot, gate_columns, gate_grads, load_gates, sigmoid, split_gates, tanh
from .grid_barrier import arrives, grid_arrive, grid_timed_out, grid_wait


@device_fn
def _recompute_gates(
    xw_ptr,  # (B, 4H) at step t
    h_ptr,  # (B, H) h_{t-1}
    w_ptr,  # (4H, H)
    rows, row_ok, step, H,
    BLOCK_J: tl.constexpr, RECOMPUTE_K: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """The activated gates i, f, g, o (BLOCK_B, J) of this program's units at one step."""
    cols, col_ok = gate_columns(H, BLOCK_J)
    gmask = (row_ok & step)[:, None] & col_ok[None, :]
    a = tl.load(xw_ptr + rows[:, None] * 4 * H + cols[None, :], mask=gmask, other=0.0).to(tl.float32)
    for k0 in range(0, H, RECOMPUTE_K):
        ks = k0 + tl.arange(0, RECOMPUTE_K)
        k_ok = ks < H
        hk = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=(row_ok & step)[:, None] & k_ok[None, :],
                     other=0.0)
        wk = tl.load(w_ptr + cols[None, :] * H + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a += dot(hk, wk, DOT_F32, PRECISION)
    is_g = (tl.arange(0, 4 * BLOCK_J) % 4 == 2)[None, :]
    return split_gates(tl.where(is_g, tanh(a), sigmoid(a)), BLOCK_J)


@device_fn
def _streamed_dh(
    dg_ptr,  # (SPLIT_K, BLOCK_B, BLOCK_K) pointers into dgates_{t+1}'s gate-i block at one H chunk
    w_ptr,  # (SPLIT_K, BLOCK_K, J) pointers into W_hh[:, J_p]'s gate-i rows at the same chunk
    dg_mask, w_mask, H, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One H chunk of `dgates_{t+1} W_hh[:, J_p]` over the four gates, `W_hh` read again from L1/L2 (fp32)."""
    part = dot(tl.load(dg_ptr, mask=dg_mask, other=0.0, cache_modifier=".cg"),
               tl.load(w_ptr, mask=w_mask, other=0.0, eviction_policy="evict_last"), DOT_F32, PRECISION)
    for q in tl.static_range(1, 4):
        da = tl.load(dg_ptr + q * H, mask=dg_mask, other=0.0, cache_modifier=".cg")
        wq = tl.load(w_ptr + q * H * H, mask=w_mask, other=0.0, eviction_policy="evict_last")
        part += dot(da, wq, DOT_F32, PRECISION)
    return tl.sum(part, axis=0)


@device_fn
def _publish(dg_ptr, state4, mask, H, da_i, da_f, da_g, da_o):
    dty = dg_ptr.dtype.element_ty
    tl.store(dg_ptr + state4, da_i.to(dty), mask=mask)
    tl.store(dg_ptr + state4 + H, da_f.to(dty), mask=mask)
    tl.store(dg_ptr + state4 + 2 * H, da_g.to(dty), mask=mask)
    tl.store(dg_ptr + state4 + 3 * H, da_o.to(dty), mask=mask)


@triton.jit(do_not_specialize=["s_first", "n_stages"])
def _lstm_bwd_persistent_kernel(
    xw_ptr,  # (T, B, 4H), read when RECOMPUTE
    w_ptr,  # (4H, H) W_hh
    h_ptr,  # (T+1, B, H) forward states, read when RECOMPUTE
    c_ptr,  # (T+1, B, H) fp32 forward cell states
    g_ptr,  # (T, B, 4H) fp32 activated gates, read unless RECOMPUTE
    dout_ptr,  # (T, B, H)
    dg_ptr,  # (T+1, B, 4H) the stage for t publishes dgates_t at [t]; [T] holds zeros
    dh_ptr,  # (2, B, H) fp32 ring: the dh carried into stage s at [s % 2]; dh_n at [0]
    dc_ptr,  # (2, B, H) fp32 ring, as dh; dc_n at [0]
    dh0_ptr,  # (B, H) fp32, written by the stage for t = -1
    dc0_ptr,  # (B, H) fp32, written by the stage for t = -1
    len_ptr,  # (B,) int32, each row's length (T where none was given)
    sync_ptr,  # (2,) int32 arrivals and timeout flag, zeroed before the launch
    s_first, n_stages, T, B, H, ROWS,
    RECOMPUTE: tl.constexpr, STREAM_W: tl.constexpr, BARRIER: tl.constexpr, SPIN_LIMIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr,
    RECOMPUTE_K: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, WITHHOLD_STAGE: tl.constexpr = -1,
):
    """Persistent backward, stages `s_first .. s_first + n_stages - 1` (stage `s` is time `t = T-1-s`, down to
    `t = -1`): README.md "Backward" (B1)-(B7) and "The persistent variant".

    Grid `(cdiv(H, BLOCK_J),)`, at most one program per SM: program 0 axis indexes blocks of `BLOCK_J` hidden
    units. Tile: each program owns units `J_p` for all `B` rows, visited in `BLOCK_B`-row blocks, and keeps
    `W_hh[:, J_p]` on chip as four `(SPLIT_K, BLOCK_K, BLOCK_J)` tensors; with `RECOMPUTE` it streams
    `W_hh[gates(J_p), :]` in `RECOMPUTE_K` steps. Steps 1-4 below are those of the module docstring.
    """
    # 0. this program's units and rows; its columns W_hh[:, J_p] once, one tensor per gate
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    units = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    unit_ok = units < H
    row_lo = tl.program_id(1) * ROWS
    row_hi = tl.minimum(row_lo + ROWS, B)
    kq = tl.arange(0, SPLIT_K)[:, None, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :, None]
    w_q = w_ptr + kq * H + units[None, None, :]
    if not STREAM_W:
        w_mask = (kq < H) & unit_ok[None, None, :]
        w_i = tl.load(w_q, mask=w_mask, other=0.0)
        w_f = tl.load(w_q + H * H, mask=w_mask, other=0.0)
        w_g = tl.load(w_q + 2 * H * H, mask=w_mask, other=0.0)
        w_o = tl.load(w_q + 3 * H * H, mask=w_mask, other=0.0)
    k_dg = tl.arange(0, SPLIT_K)[:, None, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, None, :]
    ok = tl.program_id(0) >= 0
    for s in range(0, n_stages):
        stage = s_first + s
        t = T - 1 - stage
        step = t >= 0
        t64 = t.to(tl.int64)
        ring_in = (stage % 2) * B * H
        ring_out = ((stage + 1) % 2) * B * H
        if ok:
            for b0 in range(row_lo, row_hi, BLOCK_B):
                rows = b0 + tl.arange(0, BLOCK_B)
                row_ok = rows < row_hi
                umask = row_ok[:, None] & unit_ok[None, :]
                smask = umask & step
                state = rows[:, None] * H + units[None, :]
                state4 = rows[:, None] * 4 * H + units[None, :]
                # 1. carried (dh, dc) from the ring, the forward's c_{t-1}, c_t, dout[t] (and gates), before the wait
                dh = tl.load(dh_ptr + ring_in + state, mask=umask, other=0.0)
                dc = tl.load(dc_ptr + ring_in + state, mask=umask, other=0.0)
                c_prev = tl.load(c_ptr + t64 * B * H + state, mask=smask, other=0.0)
                c = tl.load(c_ptr + (t64 + 1) * B * H + state, mask=smask, other=0.0)
                dout = tl.load(dout_ptr + t64 * B * H + state, mask=smask, other=0.0).to(tl.float32)
                live = (t < tl.load(len_ptr + rows, mask=row_ok, other=0))[:, None] & step
                if not RECOMPUTE:
                    i, f, g, o = load_gates(g_ptr + t64 * B * 4 * H, rows, units, smask, H)
                # 2. wait until every program has published dgates_{t+1}
                if BARRIER:
                    if (s > 0) & (b0 == row_lo):
                        ok = grid_wait(sync_ptr, n_prog * s, SPIN_LIMIT)
                if ok:
                    # 3. dh_t[:, J_p] = carried + dgates_{t+1} W_hh[:, J_p] (B7), one gate's rows at a time from L2
                    dg_t = dg_ptr + (t64 + 1) * B * 4 * H + rows[None, :, None] * 4 * H + k_dg
                    if STREAM_W:
                        for k0 in range(0, H, SPLIT_K * BLOCK_K):
                            dh += _streamed_dh(dg_t + k0, w_q + k0 * H, row_ok[None, :, None] & (k0 + k_dg < H),
                                               (k0 + kq < H) & unit_ok[None, None, :], H, PRECISION, DOT_F32)
                    else:
                        dg_mask = row_ok[None, :, None] & (k_dg < H)
                        da = tl.load(dg_t, mask=dg_mask, other=0.0, cache_modifier=".cg")
                        part = dot(da, w_i, DOT_F32, PRECISION)
                        da = tl.load(dg_t + H, mask=dg_mask, other=0.0, cache_modifier=".cg")
                        part += dot(da, w_f, DOT_F32, PRECISION)
                        da = tl.load(dg_t + 2 * H, mask=dg_mask, other=0.0, cache_modifier=".cg")
                        part += dot(da, w_g, DOT_F32, PRECISION)
                        da = tl.load(dg_t + 3 * H, mask=dg_mask, other=0.0, cache_modifier=".cg")
                        part += dot(da, w_o, DOT_F32, PRECISION)
                        dh += tl.sum(part, axis=0)
                    # 4. the gates (recomputed: (F2)-(F3)), gate gradients (B1)-(B6); publish dgates_t[:, J_p],
                    #    carry dh (0 where live) and dc_{t-1}; the stage for t = -1 writes dh_0, dc_0
                    if RECOMPUTE:
                        i, f, g, o = _recompute_gates(xw_ptr + t64 * B * 4 * H, h_ptr + t64 * B * H, w_ptr, rows,
                                                      row_ok, step, H, BLOCK_J, RECOMPUTE_K, PRECISION, DOT_F32)
                    dht = dh + tl.where(live, dout, 0.0)
                    da_i, da_f, da_g, da_o, dc_prev = gate_grads(dht, dc, i, f, g, o, c_prev, c, live)
                    _publish(dg_ptr + t64 * B * 4 * H, state4, smask, H, da_i, da_f, da_g, da_o)
                    tl.store(dh_ptr + ring_out + state, tl.where(live, 0.0, dht), mask=umask)
                    tl.store(dc_ptr + ring_out + state, tl.where(live, dc_prev, dc), mask=umask)
                    tl.store(dh0_ptr + state, dh, mask=umask & ~step)
                    tl.store(dc0_ptr + state, dc, mask=umask & ~step)
            # 5. arrive: this program's dgates_t is published
            if BARRIER:
                if arrives(ok, stage, WITHHOLD_STAGE):
                    grid_arrive(sync_ptr)
    if not ok:
        grid_timed_out(sync_ptr)
