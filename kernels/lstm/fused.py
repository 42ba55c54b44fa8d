# B batch, T time, I input, H hidden, G = 4H gates (i, f, g, o)
"""`fused_lstm`: one LSTM layer and direction with its recurrence in Triton, forward and backward.

A drop-in for `lstm_core.functional.lstm_layer` (same arguments, same `(out, (h_n, c_n))`).
The input projection `x W_ih^T + b_ih + b_hh` for all steps is one torch matrix product;
one Triton launch then runs the recurrence over time (`fwd.py`). The
backward runs one reverse-time launch that yields only the gate gradients and the
carried `dh`, `dc` (`bwd.py`); `dW_hh`, `dW_ih`, the bias gradient and
`dx` are matrix products over all steps afterwards. States and accumulation are fp32;
the persistent variant's fp32 products run in TF32 when `torch.backends.cudnn.allow_tf32` is on
(nn.LSTM's switch), every other fp32 product in ieee fp32. Derivations: `kernels/README.md`.
"""

import torch

from ..interpreter import patch_interpreter_index
from ..launch import KernelConfig, device_arch, device_sms, launch
from .bwd import _lstm_bwd_onchip_kernel
from .config import INTERPRETED, VARIANTS, lstm_config
from .persistent import persistent_bwd, persistent_fwd
from .persistent_bwd import _lstm_bwd_persistent_kernel
from .persistent_fwd import _lstm_fwd_persistent_kernel

__all__ = ["fused_lstm"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
if INTERPRETED:
    patch_interpreter_index()


def recurrence_fwd(
    xw: torch.Tensor,  # (T, B, 4H)
    w_hh: torch.Tensor,  # (4H, H)
    h0: torch.Tensor,  # (B, H)
    c0: torch.Tensor,  # (B, H)
    lengths: torch.Tensor,  # (B,) int32, T for every row when none were given
    cfg: KernelConfig,
    store_gates: bool,
    save_states: bool = True,
):
    """Runs the forward recurrence. Returns `h` (T+1, B, H), `c` (T+1, B, H) fp32,
    `gates` (T, B, 4H) fp32 activated or None, and `h_n` (B, H). Without `save_states` (nothing needs a
    gradient) `c` is a (2, B, H) ring: `c[T % 2]` is the last state."""
    T, B, G = xw.shape
    H = G // 4
    h = torch.full((T + 1, B, H), float("nan"), dtype=xw.dtype, device=xw.device)
    c_steps = T + 1 if save_states else 2
    c = torch.full((c_steps, B, H), float("nan"), dtype=torch.float32, device=xw.device)
    h[0] = h0
    c[0] = c0
    gates = torch.full((T, B, G), float("nan"), dtype=torch.float32, device=xw.device) if store_gates else c
    h_n = torch.full((B, H), float("nan"), dtype=xw.dtype, device=xw.device)
    if B and cfg.kernel is _lstm_fwd_persistent_kernel:
        persistent_fwd(xw, w_hh, h, c, gates, h_n, lengths, cfg, store_gates, not save_states)
    elif B:
        launch(cfg, xw, w_hh, h, c, gates, h_n, lengths, T, B, H, STORE_GATES=store_gates, C_RING=not save_states)
    return h, c, (gates if store_gates else None), h_n


def recurrence_bwd(
    xw: torch.Tensor | None,  # (T, B, 4H), needed when gates is None
    w_hh: torch.Tensor,  # (4H, H)
    h: torch.Tensor,  # (T+1, B, H)
    c: torch.Tensor,  # (T+1, B, H) fp32
    gates: torch.Tensor | None,  # (T, B, 4H) fp32
    dout: torch.Tensor,  # (T, B, H)
    dh_n: torch.Tensor,  # (B, H)
    dc_n: torch.Tensor,  # (B, H)
    lengths: torch.Tensor,  # (B,) int32, T for every row when none were given
    cfg: KernelConfig,
):
    """Runs the backward recurrence. Returns `dgates` (T, B, 4H) in `h`'s dtype, `dh0`, `dc0` (B, H) fp32."""
    T, B, H = dout.shape
    recompute = gates is None
    xw, gates = (xw, c) if recompute else (c, gates)
    if B and cfg.kernel is _lstm_bwd_persistent_kernel:
        return persistent_bwd(xw, w_hh, h, c, gates, dout, dh_n.float(), dc_n.float(), lengths, cfg, recompute)
    dg = torch.full((T, B, 4 * H), float("nan"), dtype=h.dtype, device=h.device)
    dh = dh_n.float().contiguous()
    dc = dc_n.float().contiguous()
    flags = {"RECOMPUTE": recompute}
    if B == 0:
        return dg, dh, dc
    if cfg.kernel is _lstm_bwd_onchip_kernel:
        dh0 = torch.full_like(dh, float("nan"))
        dc0 = torch.full_like(dc, float("nan"))
        launch(cfg, xw, w_hh, h, c, gates, dout, dh, dc, dg, dh0, dc0, lengths, T, B, H, **flags)
        return dg, dh0, dc0
    dh, dc = dh.clone(), dc.clone()
    launch(cfg, xw, w_hh, h, c, gates, dout, dh, dc, dg, lengths, T, B, H, **flags)
    return dg, dh, dc


def _input_projection(x, w_ih, b_ih, b_hh):
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    bias = None
    for b in (b_ih, b_hh):
        if b is not None:
            bias = b.float() if bias is None else bias + b.float()
    if bias is None:
        return (x2 @ w_ih.T).view(T, B, w_ih.shape[0])
    return torch.addmm(bias.to(x.dtype), x2, w_ih.T).view(T, B, w_ih.shape[0])


class FusedLSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, fwd_cfg, bwd_cfg, store_gates, save_states=True):
        xw = _input_projection(x, w_ih, b_ih, b_hh)
        h, c, gates, h_n = recurrence_fwd(xw, w_hh, h0, c0, lengths, fwd_cfg, store_gates, save_states)
        if save_states:
            ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, h, c, gates, lengths)
        ctx.bwd_cfg = bwd_cfg
        c_n = c[-1] if save_states else c[x.shape[0] % c.shape[0]]
        return h[1:], h_n, c_n.to(x.dtype, copy=True)

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        x, w_ih, w_hh, b_ih, b_hh, h, c, gates, lengths = ctx.saved_tensors
        T, B, I = x.shape
        H = w_hh.shape[1]
        xw = _input_projection(x, w_ih, b_ih, b_hh) if gates is None else None
        dout = dout.contiguous()
        dg, dh0, dc0 = recurrence_bwd(xw, w_hh, h, c, gates, dout, dh_n, dc_n, lengths, ctx.bwd_cfg)
        dg2 = dg.view(T * B, 4 * H)
        need = ctx.needs_input_grad
        dx = (dg2 @ w_ih).view(T, B, I) if need[0] else None
        dw_ih = dg2.T @ x.reshape(T * B, I) if need[3] else None
        dw_hh = dg2.T @ h[:-1].reshape(T * B, H) if need[4] else None
        db = dg2.sum(0, dtype=torch.float32).to(x.dtype) if need[5] or need[6] else None
        return (
            dx, dh0.to(x.dtype), dc0.to(x.dtype), dw_ih, dw_hh,
            db if need[5] else None, db if need[6] else None, None, None, None, None, None,
        )


def _check_args(x, w_hh, w_hr, variant, block_j):
    if w_hr is not None:
        raise ValueError(
            "fused_lstm does not support a projection (proj_size > 0): expected w_hr=None, got a tensor"
        )
    if variant not in VARIANTS:
        raise ValueError(f"fused_lstm: variant must be one of {VARIANTS}, got {variant!r}")
    if block_j is not None and (not isinstance(block_j, int) or block_j < 1 or block_j & (block_j - 1)):
        raise ValueError(f"fused_lstm: expected block_j a power of two >= 1 or None, got {block_j!r}")
    if x.dim() != 3 or x.shape[0] == 0:
        raise ValueError(f"fused_lstm: expected x of shape (T, B, I) with T >= 1, got {tuple(x.shape)}")
    if w_hh.dim() != 2 or w_hh.shape[0] != 4 * w_hh.shape[1]:
        raise ValueError(f"fused_lstm: expected w_hh of shape (4H, H), got {tuple(w_hh.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"fused_lstm: expected x dtype in {DTYPES}, got {x.dtype}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "fused_lstm needs a CUDA device or the Triton interpreter (TRITON_INTERPRET=1, set before triton "
            f"is imported); got a tensor on {x.device.type} without the interpreter"
        )


def _check_tensors(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths):
    T, B, I = x.shape
    H = w_hh.shape[1]
    expected = {"h0": (B, H), "c0": (B, H), "w_ih": (4 * H, I), "b_ih": (4 * H,), "b_hh": (4 * H,)}
    given = {"h0": h0, "c0": c0, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}
    for name, t in given.items():
        if t is None:
            continue
        if tuple(t.shape) != expected.get(name, tuple(t.shape)):
            raise ValueError(f"fused_lstm: expected {name} of shape {expected[name]}, got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"fused_lstm: expected {name} as {x.dtype} on {x.device}, got {t.dtype} on {t.device}"
            )
    if lengths is None:
        return
    if tuple(lengths.shape) != (B,) or lengths.dtype.is_floating_point:
        raise ValueError(f"fused_lstm: expected integer lengths of shape ({B},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if B == 0:
        return
    lo, hi = int(lengths.min()), int(lengths.max())
    if not 1 <= lo <= hi <= T:
        raise ValueError(f"fused_lstm: expected lengths in [1, {T}], got min {lo} max {hi}")


def fused_lstm(
    x: torch.Tensor,  # (T, B, I)
    h0: torch.Tensor,  # (B, H)
    c0: torch.Tensor,  # (B, H)
    w_ih: torch.Tensor,  # (4H, I)
    w_hh: torch.Tensor,  # (4H, H)
    b_ih: torch.Tensor | None = None,  # (4H,)
    b_hh: torch.Tensor | None = None,  # (4H,)
    w_hr: torch.Tensor | None = None,  # must be None
    lengths: torch.Tensor | None = None,  # (B,) integer, each in [1, T]
    *,
    recompute: bool = False,
    variant: str = "auto",
    block_b: int = 16,
    block_n: int | None = None,
    block_k: int | None = None,
    block_j: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One direction of one LSTM layer, forward in time, with a Triton recurrence.

    Args:
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths: as in `lstm_core.functional.lstm_layer`;
            all tensors share `x`'s dtype (fp32, bf16 or fp16) and device (CUDA, or any
            device under `TRITON_INTERPRET=1`). Rows with `t >= lengths[b]` keep their
            state and output zeros. T >= 1; B = 0 launches nothing and returns empty
            outputs (the weight gradients are then zeros), as `nn.LSTM` does.
        w_hr: projection weights; only None is supported (raises ValueError otherwise).
        recompute: store only `h` and `c` for the backward and recompute the gates
            there (saves the `(T, B, 4H)` fp32 gate buffer, costs one more matmul and
            the recurrent product again).
        variant: "onchip" keeps `W_hh` on chip in each program (small H: up to 64, 32 on sm_75
            and for fp32 on sm_86/89; wider raises ValueError), "persistent" splits it over at
            most one program per SM with a grid barrier per step (raises ValueError where the
            grid or the slice does not fit), "tiled" streams it in `(block_k, block_n)` tiles
            every step; "auto" picks onchip, else persistent, else tiled, where each fits (under
            the interpreter onchip or tiled). See `kernels/README.md` and `kernels/lstm/config.py`.
        block_b, block_n, block_k: batch rows per program (per block, for persistent) and the
            tiled variant's tiles (powers of two, at least 16); by default the tiles suit the
            GPU's architecture.
        block_j: hidden units per persistent program (a power of two); by default the fewest
            that keep the grid within the GPU's SMs (8 under the interpreter).

    Returns:
        `(out, (h_n, c_n))`: `out` (T, B, H), `h_n` and `c_n` (B, H), in `x`'s dtype.

    Example:
        >>> T, B, I, H = 5, 3, 8, 16
        >>> w_ih, w_hh = torch.randn(4 * H, I), torch.randn(4 * H, H)
        >>> x, h0, c0 = torch.randn(T, B, I), torch.zeros(B, H), torch.zeros(B, H)
        >>> out, (h_n, c_n) = fused_lstm(x, h0, c0, w_ih, w_hh)
        >>> out.shape
        torch.Size([5, 3, 16])
    """
    _check_args(x, w_hh, w_hr, variant, block_j)
    _check_tensors(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths)
    H = w_hh.shape[1]
    tf32 = x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    _, fwd_cfg, bwd_cfg = lstm_config(x.shape[1], H, x.dtype, device_arch(x.device), variant, block_b, block_n,
                                      block_k, device_sms(x.device), block_j, tf32)
    if lengths is None:
        lengths = torch.full((x.shape[1],), x.shape[0], dtype=torch.int32, device=x.device)
    lengths = lengths.to(device=x.device, dtype=torch.int32).contiguous()
    args = [t if t is None else t.contiguous() for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    out, h_n, c_n = FusedLSTMFunction.apply(*args, lengths, fwd_cfg, bwd_cfg, needs_grad and not recompute,
                                            needs_grad)
    return out, (h_n, c_n)
