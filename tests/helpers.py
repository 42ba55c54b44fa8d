"""One tolerance table per dtype, one `assert_close` that reports how far off a tensor is, and where Triton runs."""

import os

import torch

TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = TRITON_DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def device_for(impl):
    """Where a test puts the tensors for `impl`: Triton's on CUDA when there is one, else on the CPU for the
    interpreter (conftest sets TRITON_INTERPRET=1 without CUDA); every other impl on the CPU."""
    return TRITON_DEVICE if impl == "triton" else torch.device("cpu")


def tolerance(dtype, table=None):
    return (table or TOLERANCES)[dtype]


def assert_close(name, ref, out, dtype=None, table=None):
    """Checks `out` against `ref` at the tolerance of `dtype` (default: `ref.dtype`)."""
    atol, rtol = tolerance(dtype or ref.dtype, table)
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    r, o = ref.detach().double(), out.detach().double()
    err = (o - r).abs()
    max_abs = err.max().item() if err.numel() else 0.0
    rms = lambda t: t.square().mean().sqrt()
    rel_rms = (rms(err) / rms(r).clamp_min(1e-30)).item() if err.numel() else 0.0
    ok = bool(torch.all(err <= atol + rtol * r.abs()))
    assert ok and not torch.isnan(o).any(), (
        f"{name}: max_abs={max_abs:.3e} rel_rms={rel_rms:.3e} "
        f"(atol={atol:g}, rtol={rtol:g}, dtype={dtype or ref.dtype})"
    )
