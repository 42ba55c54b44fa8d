# B batch, T time, H hidden, J units per program, G = 4H gate pre-activations in PyTorch's order (i, f, g, o)
"""Persistent forward recurrence of one LSTM layer: `W_hh` split over the programs, one grid barrier per step.

Program `p` owns the hidden units `J_p = [p J, (p + 1) J)` with all four of their gates, so the cell update
stays inside the program. Before the time loop it loads its slice `W_hh[gates(J_p), :]` once, as a
`(SPLIT_K, BLOCK_K, 4J)` tensor that stays on chip for the whole sequence (Triton keeps it in shared memory
and loads the dot operand from there each step): the gate columns are unit-major (column `4 j + q` is gate
`q` of unit `j`), and the `H` inputs are split in `SPLIT_K` chunks, one per warp, so one batched `tl.dot` of
`h_{t-1}` as `(SPLIT_K, BLOCK_B, BLOCK_K)` with the slice, summed over the chunks, gives the `(BLOCK_B, 4J)`
pre-activations without any warp holding more than its chunk.

One stage per time step `t`, for each block of `BLOCK_B` rows:
1. load `xW[t]` and `c_{t-1}` of its slice (for the first block, before the barrier wait, so they arrive
   while it waits);
2. wait until every program has published `h_{t-1}` (stage `t-1`'s arrivals; `lstm/grid_barrier.py`);
3. read all of `h_{t-1}` (B x H) from L2 (`.cg`), dot, gate update with `c` in fp32;
4. write `h_t[:, J_p]`, `c_t[:, J_p]`, the activated gates when the backward stores them, and `h_n`;
then arrive. Buffers as in `fwd.py`: `h` and `c` are `(T+1, B, H)` with the initial state at 0.

With `STREAM_W` (fp32) the slice is not held: each step's dot runs over H in `SPLIT_K x BLOCK_K` chunks and
loads each chunk of `W_hh[gates(J_p), :]` again (`evict_last`, so it stays in L1). A second grid axis splits
the batch: program `(p, g)` owns rows `[g ROWS, (g + 1) ROWS)`, and the barrier counts every program of the
grid. With `C_RING` (nothing needs a gradient) `c` is a `(2, B, H)` ring, slot `t % 2`.

`BARRIER=False` runs the same stages with no barrier; the launcher then makes one launch per stage (the
interpreter path: its programs run one after another). A timed-out wait stops the program and sets the
flag; everything a stage writes depends only on the previous stage's output, so the launcher's relaunch from
the first incomplete stage rewrites the same values.
"""

import triton
import triton.language as tl

from .cell import dot, gate_columns, sigmoid, split_gates, tanh
from .grid_barrier import arrives, grid_arrive, grid_timed_out, grid_wait


@triton.jit(do_not_specialize=["s_first", "n_stages"])
def _lstm_fwd_persistent_kernel(
    xw_ptr,  # (T, B, 4H) x W_ih^T + b_ih + b_hh
    w_ptr,  # (4H, H) W_hh
    h_ptr,  # (T+1, B, H) h0 at [0], stage t publishes h_t at [t+1]
    c_ptr,  # (T+1, B, H) fp32, c0 at [0]
    g_ptr,  # (T, B, 4H) fp32 activated gates, written when STORE_GATES
    hn_ptr,  # (B, H)
    len_ptr,  # (B,) int32, each row's length (T where none was given)
    sync_ptr,  # (2,) int32 arrivals and timeout flag, zeroed before the launch
    s_first, n_stages, B, H, ROWS,
    STORE_GATES: tl.constexpr, C_RING: tl.constexpr, STREAM_W: tl.constexpr, BARRIER: tl.constexpr,
    SPIN_LIMIT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr, WITHHOLD_STAGE: tl.constexpr = -1,
):
    """Persistent forward, stages `s_first .. s_first + n_stages - 1`: README.md "Forward" (F2)-(F5) and
    "The persistent variant".

    Grid `(cdiv(H, BLOCK_J),)`, at most one program per SM: program 0 axis indexes blocks of `BLOCK_J` hidden
    units. Tile: each program owns units `J_p` with their four gates (`4 BLOCK_J` unit-major columns) for all
    `B` rows, visited in `BLOCK_B`-row blocks, and keeps `W_hh[gates(J_p), :]` on chip as `(SPLIT_K, BLOCK_K,
    4 BLOCK_J)`. Steps 1-4 below are those of the module docstring.
    """
    # 0. this program's units and rows; its slice W_hh[gates(J_p), :] once, split over H in SPLIT_K chunks
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    cols, col_ok = gate_columns(H, BLOCK_J)
    units = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    unit_ok = units < H
    row_lo = tl.program_id(1) * ROWS
    row_hi = tl.minimum(row_lo + ROWS, B)
    ks = tl.arange(0, SPLIT_K)[:, None, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :, None]
    k_h = tl.arange(0, SPLIT_K)[:, None, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, None, :]
    if not STREAM_W:
        w = tl.load(w_ptr + cols[None, None, :] * H + ks, mask=(ks < H) & col_ok[None, None, :], other=0.0)
    is_g = (tl.arange(0, 4 * BLOCK_J) % 4 == 2)[None, :]
    ok = tl.program_id(0) >= 0
    for s in range(0, n_stages):
        t = s_first + s
        xw_t = xw_ptr + t.to(tl.int64) * B * 4 * H
        h_t = h_ptr + t.to(tl.int64) * B * H
        if C_RING:
            c_in = c_ptr + (t % 2) * B * H
            c_out = c_ptr + ((t + 1) % 2) * B * H
        else:
            c_in = c_ptr + t.to(tl.int64) * B * H
            c_out = c_in + B * H
        if ok:
            for b0 in range(row_lo, row_hi, BLOCK_B):
                rows = b0 + tl.arange(0, BLOCK_B)
                row_ok = rows < row_hi
                gmask = row_ok[:, None] & col_ok[None, :]
                umask = row_ok[:, None] & unit_ok[None, :]
                state = rows[:, None] * H + units[None, :]
                # 1. xW[t] and c_{t-1} of this slice, before the barrier wait
                a = tl.load(xw_t + rows[:, None] * 4 * H + cols[None, :], mask=gmask, other=0.0).to(tl.float32)
                c_prev = tl.load(c_in + state, mask=umask, other=0.0)
                live = (t < tl.load(len_ptr + rows, mask=row_ok, other=0))[:, None]
                # 2. wait until every program has published h_{t-1}
                if BARRIER:
                    if (s > 0) & (b0 == row_lo):
                        ok = grid_wait(sync_ptr, n_prog * s, SPIN_LIMIT)
                if ok:
                    # 3. all of h_{t-1} from L2, a_t (F2) as batched dots summed over the chunks, (F3)-(F5)
                    if STREAM_W:
                        for k0 in range(0, H, SPLIT_K * BLOCK_K):
                            wk = tl.load(w_ptr + cols[None, None, :] * H + k0 + ks,
                                         mask=(k0 + ks < H) & col_ok[None, None, :], other=0.0,
                                         eviction_policy="evict_last")
                            h3 = tl.load(h_t + rows[None, :, None] * H + k0 + k_h,
                                         mask=row_ok[None, :, None] & (k0 + k_h < H), other=0.0,
                                         cache_modifier=".cg")
                            a += tl.sum(dot(h3, wk, DOT_F32, PRECISION), axis=0)
                    else:
                        h3 = tl.load(h_t + rows[None, :, None] * H + k_h, mask=row_ok[None, :, None] & (k_h < H),
                                     other=0.0, cache_modifier=".cg")
                        a += tl.sum(dot(h3, w, DOT_F32, PRECISION), axis=0)
                    act = tl.where(is_g, tanh(a), sigmoid(a))
                    if STORE_GATES:
                        tl.store(g_ptr + t.to(tl.int64) * B * 4 * H + rows[:, None] * 4 * H + cols[None, :], act,
                                 mask=gmask)
                    i, f, g, o = split_gates(act, BLOCK_J)
                    c_new = f * c_prev + i * g
                    h_new = o * tanh(c_new)
                    # 4. write h_t[:, J_p], c_t[:, J_p] and h_n (dead rows: h = 0, c carried)
                    tl.store(h_t + B * H + state, tl.where(live, h_new, 0.0).to(h_ptr.dtype.element_ty), mask=umask)
                    tl.store(c_out + state, tl.where(live, c_new, c_prev), mask=umask)
                    tl.store(hn_ptr + state, h_new.to(hn_ptr.dtype.element_ty), mask=umask & live)
            # 5. arrive: this program's h_t is published
            if BARRIER:
                if arrives(ok, t, WITHHOLD_STAGE):
                    grid_arrive(sync_ptr)
    if not ok:
        grid_timed_out(sync_ptr)
