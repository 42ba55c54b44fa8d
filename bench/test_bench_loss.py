# N tokens, H hidden, V vocab
"""Linear cross-entropy, forward+backward: time (pytest-benchmark) and peak memory (extra_info).

Providers: `naive` F.cross_entropy(F.linear(h, W), y); `manual`, the users' log_softmax + gather recipe;
`native`, torch's chunked F.linear_cross_entropy(..., options=LinearCrossEntropyOptions()) (torch >= 2.13,
skipped where missing); `chunked`, `triton` and `hybrid` (GPU), ours; `liger` (Liger-Kernel) and `cce` (Apple's
cut_cross_entropy) on GPU when importable.

Accuracy, once per case: `loss_err` (absolute) and `dh_err`, `dw_err` (relative RMS; dW over the target rows
and 4,096 others) against the same math in fp64 on the same inputs, W converted to fp64 a slice at a time.

Memory is measured once per case, outside the timed rounds, and reported as `peak_mib` and
`above_floor_mib` = peak minus the inputs and their gradients (h, W, dh, dW). On the CPU it is the tracked
tensor peak of torch.distributed._tools.mem_tracker.MemTracker, with the inputs created inside the
tracker so that every provider is charged for them alike; on GPU, torch.cuda.max_memory_allocated.

The big CPU shapes (N=8,192, and Gemma-2 2B's head: H=2,304, V=256,000, bf16, the shape of the Cut
Cross-Entropy paper's table) take minutes per provider on 2 cores, so they run only with
LEANFIT_BENCH_FULL=1 (set by scripts/bench.sh); the smoke run (`--benchmark-disable`) uses small shapes.
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from leanfit.kernels import linear_cross_entropy

FULL = os.environ.get("LEANFIT_BENCH_FULL") == "1"
HAS_NATIVE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
CUDA = torch.cuda.is_available()

BF16 = torch.bfloat16
CPU_SHAPES = {
    "smollm2-N8192-H576-V49152": (8192, 576, 49152, torch.float32),
    "gpt2-N8192-H768-V50257": (8192, 768, 50257, torch.float32),
    "gemma2-N256-H2304-V256000-bf16": (256, 2304, 256000, BF16),
} if FULL else {
    "small-N2048-H256-V4096": (2048, 256, 4096, torch.float32),
    "small-N256-H256-V4096-bf16": (256, 256, 4096, BF16),
}
GPU_SHAPES = {
    "smollm2-N24576-H576-V49152": (24576, 576, 49152),
    "gpt2-N24576-H768-V50257": (24576, 768, 50257),
    "gemma2-N8192-H2304-V256000": (8192, 2304, 256000),
    "llama3-N24576-H4096-V128256": (24576, 4096, 128256),
}
# Correctness gates against the fp64 result before timing (accuracy itself is reported, not asserted).
TOLERANCE = {torch.float32: 1e-4, BF16: 5e-2}
# V columns of W converted to fp64 at a time by the reference; dW is compared on the target rows and these many.
REFERENCE_SLICE, DW_ROWS = 8192, 4096


def _naive(h, w, y):
    return F.cross_entropy(F.linear(h, w), y)


def _manual(h, w, y):
    logp = torch.log_softmax(F.linear(h, w).float(), dim=-1)
    return -logp.gather(-1, y[:, None]).mean()


def _native(h, w, y):
    return F.linear_cross_entropy(h, w, y, options=torch.nn.LinearCrossEntropyOptions())


def _liger(h, w, y):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()(w, h, y)


def _cce(h, w, y):
    from cut_cross_entropy import linear_cross_entropy as cce

    return cce(h, w, y)


PROVIDERS = {
    "naive": _naive,
    "manual": _manual,
    "native": _native,
    "chunked": lambda h, w, y: linear_cross_entropy(h, w, y, impl="chunked"),
    "triton": lambda h, w, y: linear_cross_entropy(h, w, y, impl="triton"),
    "hybrid": lambda h, w, y: linear_cross_entropy(h, w, y, impl="hybrid"),
    "liger": _liger,
    "cce": _cce,
}
CPU_PROVIDERS = ["naive", "manual", "native", "chunked"]
GPU_PROVIDERS = ["naive", "manual", "native", "chunked", "triton", "hybrid", "liger", "cce"]
_REFERENCE = {}


def _skip_missing(provider):
    if provider == "native" and not HAS_NATIVE:
        pytest.skip(f"torch {torch.__version__} has no F.linear_cross_entropy / LinearCrossEntropyOptions")
    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}.get(provider)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not importable")


def _inputs(n, hdim, v, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, hdim, generator=g).to(device, dtype)
    w = (torch.randn(v, hdim, generator=g) / hdim**0.5).to(device, dtype)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    return h, w, y


def _step(fn, h, w, y):
    h.grad, w.grad = None, None
    loss = fn(h, w, y)
    loss.backward()
    if h.is_cuda:
        torch.cuda.synchronize()
    return loss


def _fp64_reference(h, w, y, rows):
    """Mean loss, dh and dW[rows] of the inputs as given, in fp64, W converted a slice of V at a time."""
    h64 = h.detach().double()
    n, v = h.shape[0], w.shape[0]
    slices = [(a, min(v, a + REFERENCE_SLICE)) for a in range(0, v, REFERENCE_SLICE)]
    lse = torch.full((n,), float("-inf"), dtype=torch.float64, device=h.device)
    for a, b in slices:
        lse = torch.logaddexp(lse, (h64 @ w[a:b].double().T).logsumexp(1))
    loss = (lse - (h64 * w[y].double()).sum(1)).mean()
    dh = torch.zeros_like(h64)
    dw = torch.zeros(len(rows), h.shape[1], dtype=torch.float64, device=h.device)
    for a, b in slices:
        wd = w[a:b].double()
        g = torch.exp(h64 @ wd.T - lse[:, None])
        hit = (y >= a) & (y < b)
        g[hit.nonzero()[:, 0], y[hit] - a] -= 1.0
        g /= n
        dh += g @ wd
        inside = (rows >= a) & (rows < b)
        dw[inside] = g[:, rows[inside] - a].T @ h64
    return loss, dh, dw


def _reference(key, h, w, y):
    """fp64 loss, dh, dW on a set of rows (the targets and DW_ROWS others), computed once per shape."""
    if key not in _REFERENCE:
        g = torch.Generator(device="cpu").manual_seed(1)
        others = torch.randperm(w.shape[0], generator=g)[:DW_ROWS].to(y.device)
        rows = torch.unique(torch.cat([y, others]))
        _REFERENCE.clear()
        _REFERENCE[key] = (rows, *_fp64_reference(h, w, y, rows))
    return _REFERENCE[key]


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _check(benchmark, key, loss, h, w, y, tol):
    """Fails the case if the result is off by more than `tol`; reports its error against fp64 in extra_info."""
    rows, ref_loss, ref_dh, ref_dw = _reference(key, h, w, y)
    dw = w.grad[rows]
    benchmark.extra_info.update(loss_err=abs(loss.item() - ref_loss.item()), dh_err=_rel(h.grad, ref_dh),
                                dw_err=_rel(dw, ref_dw))
    torch.testing.assert_close(loss.detach().double(), ref_loss, atol=tol, rtol=tol)
    torch.testing.assert_close(h.grad.double(), ref_dh, atol=tol, rtol=tol)
    torch.testing.assert_close(dw.double(), ref_dw, atol=tol, rtol=tol)


def _cpu_peak(fn, h0, w0, y):
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = _step(fn, h, w, y)
    peak = tracker.get_tracker_snapshot("peak")[h.device]["Total"]
    return peak, loss, h, w


def _gpu_peak(fn, h, w, y):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() - h.nbytes - w.nbytes
    loss = _step(fn, h, w, y)
    return torch.cuda.max_memory_allocated() - base, loss


def _record(benchmark, shape, provider, dtype, device, peak, floor, n):
    benchmark.group = f"loss-{device}-{shape}"
    benchmark.extra_info.update(
        provider=provider, shape=shape, device=device, dtype=str(dtype).replace("torch.", ""), mode="fwd+bwd",
        peak_mib=peak / 2**20, floor_mib=floor / 2**20, above_floor_mib=(peak - floor) / 2**20,
        threads=torch.get_num_threads(),
    )


def _tokens_per_s(benchmark, n):
    if benchmark.stats:
        benchmark.extra_info["tokens_per_s"] = n / benchmark.stats.stats.mean


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("shape", list(CPU_SHAPES))
def test_bench_loss_cpu(benchmark, shape, provider):
    _skip_missing(provider)
    n, hdim, v, dtype = CPU_SHAPES[shape]
    fn = PROVIDERS[provider]
    h0, w0, y = _inputs(n, hdim, v, dtype, "cpu")
    peak, loss, h, w = _cpu_peak(fn, h0, w0, y)
    _record(benchmark, shape, provider, dtype, "cpu", peak, 2 * (h.nbytes + w.nbytes), n)
    _check(benchmark, shape, loss, h, w, y, TOLERANCE[dtype])
    del h, w
    h, w = h0.requires_grad_(), w0.requires_grad_()
    benchmark.pedantic(_step, args=(fn, h, w, y), rounds=2 if FULL else 1, warmup_rounds=0)
    _tokens_per_s(benchmark, n)


@pytest.mark.skipif(not CUDA, reason="GPU benchmark")
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_bench_loss_gpu(benchmark, shape, provider):
    _skip_missing(provider)
    n, hdim, v = GPU_SHAPES[shape]
    fn = PROVIDERS[provider]
    h, w, y = _inputs(n, hdim, v, torch.bfloat16, "cuda")
    h.requires_grad_()
    w.requires_grad_()
    _step(fn, h, w, y)
    peak, loss = _gpu_peak(fn, h, w, y)
    _record(benchmark, shape, provider, BF16, "cuda", peak, 2 * (h.nbytes + w.nbytes), n)
    _check(benchmark, shape, loss, h, w, y, TOLERANCE[BF16])
    benchmark.pedantic(_step, args=(fn, h, w, y), rounds=5, warmup_rounds=1)
    _tokens_per_s(benchmark, n)
