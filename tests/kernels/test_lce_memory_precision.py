# N tokens, H hidden, V vocab
"""linear_cross_entropy's dW accumulation, vocabulary-split forward, gradient filter and memory above the floor.

Precision: dW against an fp64 computation, with the error of the naive bf16 path (F.cross_entropy(F.linear(h, W), y)
in bf16, what a model without a fused loss computes) as the bound. Memory: MemTracker's peak on `meta` tensors
at Gemma-2 2B's head (H=2304, V=256,000), kernel launches recorded instead of run.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from leanfit.kernels import linear_cross_entropy, naive_linear_cross_entropy
from leanfit.kernels.launch import record_launches
from leanfit.kernels.lce.chunked import LCEOptions
from tests.helpers import HAS_TRITON, TRITON_DEVICE, assert_close

pytestmark = pytest.mark.gpu  # runs on CUDA when there is one: the GPU lane

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no CUDA, no interpreter")
IMPLS = ["chunked", pytest.param("triton", marks=needs_triton)]
# The Triton path takes meta tensors only under the interpreter (elsewhere it checks for CUDA tensors).
META_IMPLS = ["chunked", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETED, reason="needs the "
                                                                          "interpreter for meta tensors"))]
# chunked: 8 chunks of 32 rows (the default for a 16-bit head this narrow); triton: 4 tiles of 16 rows under
# the interpreter. Small enough for the interpreter, wide enough that dW sums several 16-bit additions.
PRECISION_SHAPES = {"chunked": (256, 1024, 8192), "triton": (64, 64, 512)}


def _trained_like(n, hdim, v, device, seed=0):
    """bf16 hidden states pointing at their targets (p_target about 0.5, max logit about 13-16), as after
    training, when the target logits are large and bf16 rounds them most."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, hdim, generator=g) / hdim**0.5
    y = torch.randint(0, v, (n,), generator=g)
    h = 8.0 * w[y] + torch.randn(n, hdim, generator=g)
    return h.bfloat16().to(device), w.bfloat16().to(device), y.to(device)


def _dw_error(loss_fn, h, w, y, ref):
    weight = w.clone().requires_grad_()
    loss_fn(h, weight, y).backward()
    assert weight.grad.dtype == w.dtype
    return ((weight.grad.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("impl", IMPLS)
def test_param_accumulation_error_within_the_naive_bf16_path(impl, device):
    h, w, y = _trained_like(*PRECISION_SHAPES[impl], device)
    w64 = w.double().requires_grad_()
    naive_linear_cross_entropy(h.double(), w64, y).backward()
    naive = _dw_error(lambda a, b, t: F.cross_entropy(F.linear(a, b), t), h, w, y, w64.grad)
    param = _dw_error(lambda a, b, t: linear_cross_entropy(a, b, t, impl=impl), h, w, y, w64.grad)
    fp32 = _dw_error(lambda a, b, t: linear_cross_entropy(a, b, t, impl=impl, accumulate="fp32"), h, w, y,
                     w64.grad)
    assert param <= naive, f"dW relative error: param {param:.3e} > naive bf16 {naive:.3e}"
    assert fp32 <= param, f"dW relative error: fp32 accumulation {fp32:.3e} > param {param:.3e}"


def _options(**kw):
    base = dict(ignore_index=-100, reduction="sum", label_smoothing=0.0, softcap=None, chunk_size=64)
    return LCEOptions(**{**base, **kw})


@needs_triton
def test_vocabulary_split_forward_matches_reference(device):
    from leanfit.kernels.lce.fused import lce_fwd_config, lce_triton_forward

    n, hdim, v = 16, 24, 300
    h = torch.randn(n, hdim, device=device)
    w = torch.randn(v, hdim, device=device) / hdim**0.5
    b = torch.randn(v, device=device)
    y = torch.randint(0, v, (n,), device=device)
    y[3] = -100
    opts = _options(label_smoothing=0.1, softcap=3.0)
    ref = naive_linear_cross_entropy(h.double(), w.double(), y, bias=b.double(), reduction="none",
                                     label_smoothing=0.1, softcap=3.0)
    z = 3.0 * torch.tanh((h.double() @ w.double().T + b.double()) / 3.0)
    for sms in (1, 64):
        cfg, _ = lce_fwd_config(n, v, h.dtype, None, sms, True, 3.0)
        loss, lse = lce_triton_forward(h, w, b, y, opts, num_sms=sms)
        assert_close(f"loss, {cfg.grid[1]} vocabulary splits", ref, loss, dtype=torch.float32)
        assert_close(f"lse, {cfg.grid[1]} vocabulary splits", torch.logsumexp(z, -1), lse, dtype=torch.float32)
    assert lce_fwd_config(n, v, h.dtype, None, 64, True, 3.0)[0].grid[1] > 1


def _dead_columns_head(n, v, live, device, hdim=16):
    """fp32 (h, W, b, y) whose columns `live..` have a bias of -30 (softmax about 1e-13); targets below `live`."""
    h = torch.randn(n, hdim, device=device)
    w = torch.randn(v, hdim, device=device) / hdim**0.5
    b = torch.zeros(v, device=device)
    b[live:] = -30.0
    return h, w, b, torch.randint(0, live, (n,), device=device)


def _exact_grads(h, w, b, y, scale):
    """fp64 gradients of sum(scale * per-row loss) for hidden, weight and bias."""
    hr, wr, br = (t.double().requires_grad_() for t in (h, w, b))
    per_row = naive_linear_cross_entropy(hr, wr, y, bias=br, reduction="none")
    return torch.autograd.grad(per_row, (hr, wr, br), scale.double())


@needs_triton
def test_gradient_filter_skips_negligible_tiles_within_its_bound(device):
    """Columns 64.. get a bias of -30 (softmax about 1e-13, below fp32's threshold 2^-23 / 256): their tiles are
    skipped, so their dW and db are exactly 0, and each gradient moves by at most threshold * |upstream| times
    the sum of the other factor's magnitudes over the skipped entries."""
    from leanfit.kernels.lce.fused import filter_threshold, lce_triton_backward, lce_triton_forward

    n, v, live = 32, 256, 64
    h, w, b, y = _dead_columns_head(n, v, live, device)
    opts = _options()
    _, lse = lce_triton_forward(h, w, b, y, opts)
    scale = torch.rand(n, device=device) + 0.5
    need = (True, True, True)
    kept = lce_triton_backward(h, w, b, y, lse, scale, opts, need, filter_eps=0.0)
    filtered = lce_triton_backward(h, w, b, y, lse, scale, opts, need)
    eps = filter_threshold(torch.float32, v)
    assert torch.count_nonzero(kept[1][live:]) > 0
    assert torch.count_nonzero(filtered[1][live:]) == 0 and torch.count_nonzero(filtered[2][live:]) == 0
    dh_bound = eps * scale[:, None] * w[live:].abs().sum(0)[None, :]
    dw_bound = eps * (scale[:, None] * h.abs()).sum(0)[None, :]
    assert torch.all((filtered[0] - kept[0]).abs() <= dh_bound * 1.01 + 1e-7)
    assert torch.all((filtered[1] - kept[1]).abs() <= dw_bound * 1.01 + 1e-7)
    exact = _exact_grads(h, w, b, y, scale)
    for name, r, k, f in zip(("d_hidden", "d_weight", "d_bias"), exact, kept, filtered):
        assert_close(f"{name} unfiltered", r, k, dtype=torch.float32)
        assert_close(f"{name} filtered", r, f, dtype=torch.float32)


def test_param_accumulation_rounds_after_the_product():
    """One chunk: each dW element is the fp32 product g^T h rounded once to bf16, so it is within bf16's unit
    roundoff 2^-8 of the fp64 value (plus the fp32 product's own error); rounding g to bf16 before the product
    misses that bound on about one element in six."""
    n, hdim, v = 64, 32, 512
    h, w, y = _trained_like(n, hdim, v, "cpu")
    w64 = w.double().requires_grad_()
    naive_linear_cross_entropy(h.double(), w64, y).backward()
    weight = w.clone().requires_grad_()
    linear_cross_entropy(h, weight, y, impl="chunked", chunk_size=n, accumulate="param").backward()
    assert weight.grad.dtype == torch.bfloat16
    ref = w64.grad
    bound = 2.0**-8 * ref.abs() + 2.0**-20 * ref.abs().max()
    err = (weight.grad.double() - ref).abs()
    assert torch.all(err <= bound), f"{int((err > bound).sum())} of {err.numel()} dW elements over the bound"


# Columns 64.. get a bias of -7.3: their softmax is about 1e-5 (logits within +-0.15 of the bias), between fp16's
# threshold at V = 256, 2^-10 / 256 = 2^-18 = 3.8e-6, and bf16's, 2^-7 / 256 = 2^-15 = 3.1e-5, so fp32 and fp16
# keep those tiles and bf16 skips them.
FILTER_KEEPS = {torch.float32: True, torch.float16: True, torch.bfloat16: False}


@needs_triton
@pytest.mark.parametrize("dtype", FILTER_KEEPS, ids=["fp32", "fp16", "bf16"])
def test_gradient_filter_threshold_follows_the_dtype(dtype, device):
    from leanfit.kernels.lce.fused import filter_threshold, lce_triton_backward, lce_triton_forward

    assert filter_threshold(dtype, 256) == {torch.float32: 2.0**-31, torch.float16: 2.0**-18,
                                            torch.bfloat16: 2.0**-15}[dtype]
    n, hdim, v, live = 32, 16, 256, 64
    h = torch.randn(n, hdim, device=device).to(dtype)
    w = (0.02 * torch.randn(v, hdim, device=device)).to(dtype)
    b = torch.zeros(v, device=device, dtype=dtype)
    b[live:] = -7.3
    y = torch.randint(0, live, (n,), device=device)
    opts = _options()
    _, lse = lce_triton_forward(h, w, b, y, opts)
    softmax = torch.exp(F.linear(h.float(), w.float(), b.float())[:, live:] - lse[:, None])
    assert 2.0**-18 < softmax.min() and softmax.max() < 2.0**-15
    _, dw, db = lce_triton_backward(h, w, b, y, lse, torch.ones(n, device=device), opts, (False, True, True))
    kept = bool(torch.count_nonzero(dw[live:])) and bool(torch.count_nonzero(db[live:]))
    assert kept == FILTER_KEEPS[dtype], f"{dtype}: tiles with |dloss/dz| about 1e-5 kept={kept}"
    assert torch.count_nonzero(dw[:live]) > 0


@needs_triton
def test_gradient_filter_keeps_a_tile_whose_only_large_entries_are_negative(device):
    """Targets in columns 64..127 whose logits are about -30: in that tile every dloss/dz is about 1e-13 except
    the target terms p - 1, about -1. The filter looks at |dloss/dz|, so the tile is kept and the gradients match
    fp64."""
    from leanfit.kernels.lce.fused import lce_triton_backward, lce_triton_forward

    n, v, live = 32, 256, 64
    h, w, b, y = _dead_columns_head(n, v, live, device)
    y[::2] = live + torch.randint(0, live, (n // 2,), device=device)
    opts = _options()
    _, lse = lce_triton_forward(h, w, b, y, opts)
    scale = torch.rand(n, device=device) + 0.5
    got = lce_triton_backward(h, w, b, y, lse, scale, opts, (True, True, True))
    exact = _exact_grads(h, w, b, y, scale)
    assert torch.count_nonzero(got[1][live : 2 * live]) > 0
    for name, r, g in zip(("d_hidden", "d_weight", "d_bias"), exact, got):
        assert_close(f"{name} with negative-only tiles", r, g, dtype=torch.float32)


GEMMA2_HEAD = (2304, 256000)


def _memory_above_floor(impl, n, accumulate, softcap):
    hdim, v = GEMMA2_HEAD
    tracker = MemTracker()
    with tracker, record_launches(keep=False):
        h = torch.empty(n, hdim, device="meta", dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(v, hdim, device="meta", dtype=torch.bfloat16, requires_grad=True)
        y = torch.empty(n, device="meta", dtype=torch.int64)
        linear_cross_entropy(h, w, y, impl=impl, accumulate=accumulate, softcap=softcap,
                             all_targets_valid=True).backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("meta")]["Total"]
    return peak - 2 * (h.nbytes + w.nbytes), w.nbytes


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap30"])
@pytest.mark.parametrize("n", [256, 8192])
@pytest.mark.parametrize("impl", META_IMPLS)
def test_default_memory_above_floor_at_gemma2_head_is_under_a_tenth_of_w(impl, n, softcap):
    above, w_bytes = _memory_above_floor(impl, n, "param", softcap)
    assert above <= 0.10 * w_bytes, f"{impl}: {above / 2**20:.1f} MiB above the floor, W is {w_bytes / 2**20:.0f} MiB"


@pytest.mark.parametrize("impl", META_IMPLS)
def test_fp32_accumulation_holds_an_fp32_dw(impl):
    above, w_bytes = _memory_above_floor(impl, 256, "fp32", None)
    assert above >= 2 * w_bytes


@pytest.mark.skipif(TRITON_DEVICE.type != "cuda", reason="the per-architecture configs are chosen only on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head", [(576, 49152), (768, 50257), (2304, 256000)], ids=["H576", "H768", "H2304"])
def test_compile_gate_heads_run_on_this_gpu(head, dtype, device):
    """The gate's heads at N=2,048 (the vocabulary-split forward) against the fp32 reference."""
    hdim, v = head
    h = torch.randn(2048, hdim, device=device).to(dtype).requires_grad_()
    w = (torch.randn(v, hdim, device=device) / hdim**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (2048,), device=device)
    ref = naive_linear_cross_entropy(h, w, y)
    ref_grads = torch.autograd.grad(ref, (h, w))
    loss = linear_cross_entropy(h, w, y, impl="triton")
    grads = torch.autograd.grad(loss, (h, w))
    table = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2), torch.float16: (5e-3, 1e-2)}
    assert_close("loss", ref, loss, table=table)
    for name, r, g in zip(("d_hidden", "d_weight"), ref_grads, grads):
        assert_close(name, r, g, table=table)


# (architecture, SMs) of the cards the launchers pick tiles for: T4, A100, H100.
GPU_TILES = {"sm75": (75, 40), "sm80": (80, 108), "sm90": (90, 132)}


def _slow_but(card, dtype):
    return () if (card, dtype) == ("sm90", torch.bfloat16) else pytest.mark.slow


@needs_triton
@pytest.mark.parametrize("card, dtype", [pytest.param(c, d, marks=_slow_but(c, d), id=f"{c}-{str(d)[6:]}")
                                         for c in GPU_TILES for d in (torch.bfloat16, torch.float16, torch.float32)])
def test_each_cards_tiles_match_fp64_on_a_flat_softmax(card, dtype):
    """The forward and backward with the tiles, vocabulary splits and filter threshold a GPU of that kind gets,
    on a flat softmax over 8,192 words at N=3: the rows of W share one direction, so every probability is near
    1/8,192 = 1.2e-4 (below CCE's bf16 per-entry filter 2^-12) and their sum, the p-weighted mean of W, is most
    of d_hidden. The split forward must merge to the right lse, and the filter must drop no gradient mass."""
    from leanfit.kernels.lce.fused import lce_triton_backward, lce_triton_forward

    arch, sms = GPU_TILES[card]
    n, hdim, v = 3, 16, 8192
    h = torch.randn(n, hdim, device=TRITON_DEVICE).to(dtype)
    shared = torch.randn(hdim, device=TRITON_DEVICE)
    w = (shared + torch.randn(v, hdim, device=TRITON_DEVICE) / 50).to(dtype)
    y = torch.randint(0, v, (n,), device=TRITON_DEVICE)
    opts = _options()
    loss, lse = lce_triton_forward(h, w, None, y, opts, arch=arch, num_sms=sms)
    grads = lce_triton_backward(h, w, None, y, lse, torch.ones(n, device=TRITON_DEVICE), opts, (True, True, False),
                                arch=arch)
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    ref = naive_linear_cross_entropy(hr, wr, y, reduction="none")
    ref_dh, ref_dw = torch.autograd.grad(ref.sum(), (hr, wr))
    assert_close("loss", ref.float(), loss, dtype=torch.float32)
    assert_close("d_hidden", ref_dh, grads[0], dtype=dtype)
    assert_close("d_weight", ref_dw, grads[1], dtype=dtype)
