"""linear_cross_entropy against F.cross_entropy(F.linear(h, W, b), y): values and the grads of h, W, b."""

import pytest
import torch
import torch.nn.functional as F

import leanfit.kernels.lce.chunked as lce_chunked
from leanfit.kernels import linear_cross_entropy, naive_linear_cross_entropy
from tests.helpers import HAS_TRITON, assert_close

pytestmark = pytest.mark.gpu  # runs on CUDA when there is one: the GPU lane

TABLE = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 5e-3),
}
_NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="no CUDA, no interpreter")
IMPLS = ["chunked", pytest.param("triton", marks=_NEEDS_TRITON), pytest.param("hybrid", marks=_NEEDS_TRITON)]
# The paths whose 16-bit logits carry about 16 more bits than one 16-bit product (chunked: two products;
# triton: tl.dot's fp32 accumulator); hybrid's are one cuBLAS product rounded to 16 bits, as Liger's are.
EXACT_LOGIT_IMPLS = IMPLS[:2]


def _reference(h, w, y, b=None, **kw):
    return naive_linear_cross_entropy(h, w, y, bias=b, **kw)


def _inputs(shape_n, h, v, dtype, device, bias=False, scale=1.0):
    hid = (torch.randn(*shape_n, h, device=device) * scale).to(dtype).requires_grad_()
    w = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, device=device) * 0.1).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, shape_n, device=device)
    return hid, w, b, y


def _run(fn, h, w, b, y, upstream, **kw):
    leaves = [t for t in (h, w, b) if t is not None]
    loss = fn(h, w, y, b, **kw)
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    return loss, grads


def _exact(impl):
    """The most precise dtype an impl takes: fp64 for chunked, fp32 for Triton."""
    return torch.float64 if impl == "chunked" else torch.float32


def _ours(impl):
    return lambda h, w, y, b, **kw: linear_cross_entropy(h, w, y, bias=b, impl=impl, **kw)


def _check(impl, h, w, b, y, dtype, **kw):
    red = kw.get("reduction", "mean")
    upstream = torch.randn(y.shape, device=y.device) if red == "none" else torch.tensor(1.7, device=y.device)
    ref_loss, ref_grads = _run(_reference, h, w, b, y, upstream, **kw)
    loss, grads = _run(_ours(impl), h, w, b, y, upstream, **kw)
    assert loss.dtype == (torch.float64 if h.dtype == torch.float64 else torch.float32)
    assert_close("loss", ref_loss, loss, dtype=dtype, table=TABLE)
    for name, r, g in zip(("d_hidden", "d_weight", "d_bias"), ref_grads, grads):
        assert g.dtype == dtype
        assert_close(name, r, g, dtype=dtype, table=TABLE)


SHAPES = {
    "n_not_div_chunk": ((37,), 20, 123, 8),
    "v123": ((16,), 24, 123, None),
    "t1": ((1,), 8, 50, None),
    "h500": ((5,), 500, 64, 4),
    "btv": ((2, 7), 16, 40, 3),
    "gpt2_vocab_small_n": ((3,), 16, 50257, None),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(impl, dtype, shape, device):
    if impl != "chunked" and shape[2] > 1000 and device.type == "cpu":
        pytest.skip("large vocab under the Triton interpreter is too slow")
    if impl != "chunked" and dtype == torch.float64:
        pytest.skip("the Triton path takes fp32, bf16, fp16")
    n_shape, hdim, v, chunk = shape
    h, w, b, y = _inputs(n_shape, hdim, v, dtype, device, bias=True)
    _check(impl, h, w, b, y, dtype, chunk_size=chunk)


OPTIONS = {
    "mean": dict(reduction="mean"),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "smooth_mean": dict(reduction="mean", label_smoothing=0.1),
    "smooth_none": dict(reduction="none", label_smoothing=0.25),
    "softcap": dict(reduction="mean", softcap=2.0),
    "softcap_smooth_sum": dict(reduction="sum", softcap=3.0, label_smoothing=0.1),
    "num_items": dict(reduction="sum", num_items=11),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("opts", list(OPTIONS.values()), ids=list(OPTIONS))
def test_options(impl, opts, bias, device):
    h, w, b, y = _inputs((29,), 24, 77, _exact(impl), device, bias=bias, scale=3.0)
    y[::4] = -100
    _check(impl, h, w, b, y, _exact(impl), chunk_size=8, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_other_dtypes_with_options(impl, dtype, device):
    h, w, b, y = _inputs((2, 9), 32, 65, dtype, device, bias=True)
    y[0, :3] = -100
    _check(impl, h, w, b, y, dtype, chunk_size=5, label_smoothing=0.1, softcap=4.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_and_a_fully_ignored_chunk(impl, reduction, device):
    h, w, b, y = _inputs((24,), 16, 50, _exact(impl), device, bias=True)
    y[8:16] = -100
    y[3] = -100
    _check(impl, h, w, b, y, _exact(impl), chunk_size=8, reduction=reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_matches_torch(impl, reduction, device):
    """Torch returns nan for "mean" (0 / 0), 0 for "sum", zeros for "none"; all gradients are zero."""
    h, w, b, y = _inputs((6,), 8, 20, torch.float32, device, bias=True)
    y.fill_(-100)
    upstream = torch.ones(y.shape, device=device) if reduction == "none" else torch.tensor(1.0, device=device)
    ref_loss, ref_grads = _run(_reference, h, w, b, y, upstream, reduction=reduction)
    loss, grads = _run(_ours(impl), h, w, b, y, upstream, reduction=reduction)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref_loss))
    if reduction == "mean":
        assert torch.isnan(loss)
    else:
        assert_close("loss", ref_loss, loss, table=TABLE)
    for r, g in zip(ref_grads, grads):
        assert torch.equal(g, torch.zeros_like(g)) and torch.equal(r, torch.zeros_like(r))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_accumulation_with_num_items_equals_full_batch(impl, device):
    h, w, b, y = _inputs((30,), 16, 45, _exact(impl), device, bias=True)
    y[5:12] = -100
    full = linear_cross_entropy(h, w, y, bias=b, impl=impl, chunk_size=7)
    full_grads = torch.autograd.grad(full, (h, w, b))
    num_items = int((y != -100).sum())
    parts = [slice(0, 9), slice(9, 30)]
    total, acc = 0.0, [torch.zeros_like(t) for t in (w, b)]
    dh = torch.zeros_like(h)
    for rows in parts:
        part = linear_cross_entropy(h[rows], w, y[rows], bias=b, impl=impl, chunk_size=7, num_items=num_items)
        gh, gw, gb = torch.autograd.grad(part, (h, w, b))
        total, acc = total + part, [acc[0] + gw, acc[1] + gb]
        dh += gh
    assert_close("loss", full, total, table=TABLE)
    for name, r, g in zip(("d_hidden", "d_weight", "d_bias"), full_grads, (dh, *acc)):
        assert_close(name, r, g, table=TABLE)


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_weights_get_both_gradients(impl, device):
    emb = torch.nn.Embedding(40, 16, device=device, dtype=_exact(impl))
    ids = torch.randint(0, 40, (3, 6), device=device)

    def loss_with(fn):
        emb.zero_grad(set_to_none=True)
        hid = torch.tanh(emb(ids[:, :-1]))
        y = ids[:, 1:]
        loss = fn(hid, emb.weight, y)
        loss.backward()
        return loss.detach(), emb.weight.grad.clone()

    ref = loss_with(lambda hid, w, y: _reference(hid, w, y))
    out = loss_with(lambda hid, w, y: linear_cross_entropy(hid, w, y, impl=impl, chunk_size=4))
    assert_close("loss", ref[0], out[0], table=TABLE)
    assert_close("d_embedding (tied)", ref[1], out[1], table=TABLE)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_gives_only_the_hidden_grad(impl, device):
    h, w, b, y = _inputs((12,), 16, 30, _exact(impl), device, bias=True)
    w.requires_grad_(False)
    b.requires_grad_(False)
    loss = linear_cross_entropy(h, w, y, bias=b, impl=impl, chunk_size=5)
    (gh,) = torch.autograd.grad(loss, (h,))
    ref = _reference(h, w, y, b)
    assert_close("d_hidden", torch.autograd.grad(ref, (h,))[0], gh, table=TABLE)


def test_no_grad_path_skips_gradient_work(monkeypatch, device):
    def fail(*args, **kwargs):
        raise AssertionError("gradient work ran without any input requiring grad")

    monkeypatch.setattr(lce_chunked, "_accumulate_grads", fail)
    monkeypatch.setattr(lce_chunked, "_logit_grad_", fail)
    h, w, b, y = _inputs((20,), 16, 30, torch.float64, device, bias=True)
    with torch.no_grad():
        for red in ("mean", "sum", "none"):
            out = linear_cross_entropy(h, w, y, bias=b, impl="chunked", chunk_size=6, reduction=red)
            assert out.grad_fn is None
            assert_close(f"loss {red}", _reference(h, w, y, b, reduction=red), out, table=TABLE)
    out = linear_cross_entropy(h.detach(), w.detach(), y, impl="chunked", reduction="none")
    assert out.grad_fn is None and out.shape == y.shape


def test_second_backward_through_scalar_loss_raises(device):
    h, w, b, y = _inputs((10,), 8, 20, torch.float32, device)
    loss = linear_cross_entropy(h, w, y, impl="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_default_chunk_size_follows_the_memory_rule():
    n, hdim, v = 65536, 2048, 32000
    c = lce_chunked.default_chunk_size(n, hdim, v)
    assert n * hdim / 2 <= c * v <= 2 * n * hdim
    assert lce_chunked.default_chunk_size(8192, 576, 49152) == lce_chunked.MIN_CHUNK_ROWS
    assert lce_chunked.default_chunk_size(3, 16, 50257) == 3


def test_default_chunk_size_for_16_bit_weights_bounds_the_logits_by_w():
    """A 16-bit head's chunk of fp32 logits stays within 1/32 of W's bytes, but at least 32 rows."""
    for n, hdim, v in ((8192, 2304, 256000), (8192, 576, 49152), (8192, 4096, 128256), (100, 64, 1000)):
        c = lce_chunked.default_chunk_size(n, hdim, v, 2)
        assert c * v * 4 <= v * hdim * 2 / 32 or c == 32
        assert 32 <= c <= lce_chunked.default_chunk_size(n, hdim, v)


def _bad_cases():
    h = torch.randn(4, 8)
    w = torch.randn(10, 8)
    y = torch.randint(0, 10, (4,))
    return {
        "hidden_1d": (dict(hidden=torch.randn(8)), "hidden of shape"),
        "h_mismatch": (dict(weight=torch.randn(10, 7)), "last dim"),
        "target_shape": (dict(target=torch.randint(0, 10, (5,))), "target of shape"),
        "target_too_big": (dict(target=torch.tensor([0, 1, 10, 2])), r"\[0, 10\)"),
        "target_negative": (dict(target=torch.tensor([0, -3, 1, 2])), "given -3"),
        "target_float": (dict(target=y.float()), "integer target"),
        "mixed_dtypes": (dict(weight=w.double()), "weight dtype"),
        "mixed_devices": (dict(weight=w.to("meta")), "weight on"),
        "bias_shape": (dict(bias=torch.randn(9)), "bias of shape"),
        "bias_dtype": (dict(bias=torch.randn(10, dtype=torch.float64)), "bias dtype"),
        "reduction": (dict(reduction="avg"), "reduction"),
        "smoothing": (dict(label_smoothing=1.5), "label_smoothing"),
        "softcap": (dict(softcap=0.0), "softcap"),
        "num_items_none": (dict(reduction="none", num_items=3), "num_items"),
        "num_items_zero": (dict(num_items=0), "num_items"),
        "chunk": (dict(chunk_size=0), "chunk_size"),
        "impl": (dict(impl="cuda"), "impl"),
        "accumulate": (dict(accumulate="bf16"), "accumulate in"),
        "triton_fp64": (dict(hidden=h.double(), weight=w.double(), impl="triton"), "dtype in"),
    }, dict(hidden=h, weight=w, target=y)


BAD, BASE = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_value_error(case):
    change, match = BAD[case]
    args = dict(BASE)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)


@pytest.mark.parametrize("impl", EXACT_LOGIT_IMPLS)
def test_under_autocast_the_products_run_in_its_dtype_and_the_loss_in_fp32(impl, device):
    """fp32 parameters under bf16 autocast (how finetune trains): the loss equals the fp64 loss of the
    bf16-cast inputs (what `F.linear` under autocast multiplies) to fp32 precision, the gradients come back in
    fp32 and match that reference's within bf16 tolerance, and the loss is not the fp32 one (the products
    really ran in bf16)."""
    h, w, b, y = _inputs((13,), 16, 40, torch.float32, device, bias=True, scale=3.0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, bias=b, impl=impl, chunk_size=4)
        grads = torch.autograd.grad(loss, (h, w, b))
    cast = [t.detach().bfloat16().double().requires_grad_() for t in (h, w, b)]
    ref = F.cross_entropy(F.linear(*cast), y)
    exact = F.cross_entropy(F.linear(h.double(), w.double(), b.double()), y)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert abs(loss.item() - ref.item()) <= 1e-5, (loss.item(), ref.item())
    assert abs(loss.item() - exact.item()) > 1e-4, "the products ran in fp32, not in autocast's bf16"
    for name, r, g in zip(("d_hidden", "d_weight", "d_bias"), torch.autograd.grad(ref, cast), grads):
        assert_close(name, r, g, dtype=torch.bfloat16, table=TABLE)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_naive_reference_against_the_formula_in_fp64(reduction):
    """The reference itself, against lse(z) - (1 - e) z_t - (e / V) sum_j z_j written out in fp64."""
    h, w, b, y = _inputs((2, 9), 12, 30, torch.float64, "cpu", bias=True)
    y[0, 3] = -100
    eps, cap = 0.1, 5.0
    out = naive_linear_cross_entropy(h, w, y, bias=b, reduction=reduction, label_smoothing=eps, softcap=cap)
    z = cap * torch.tanh((h @ w.T + b) / cap)
    per_row = torch.logsumexp(z, -1) - (1 - eps) * z.gather(-1, y.clamp_min(0)[..., None])[..., 0] - eps * z.mean(-1)
    per_row = per_row * (y != -100)
    expected = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / (y != -100).sum()}[reduction]
    assert_close("loss", expected, out)
    up = torch.randn_like(out)
    grads = torch.autograd.grad(out, (h, w, b), up)
    ref_grads = torch.autograd.grad(expected, (h, w, b), up)
    for name, r, g in zip(("d_hidden", "d_weight", "d_bias"), ref_grads, grads):
        assert_close(name, r, g)


@pytest.mark.parametrize("impl", EXACT_LOGIT_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_16_bit_input_gives_an_fp32_loss_within_1e4_of_fp64(impl, dtype, device):
    """The loss value is not rounded to the inputs' 16 bits: a bf16 loss near 4.6 nats would be off by up to
    2^-7 * 4 = 0.03. Against the fp64 loss of the same 16-bit inputs."""
    h, w, _, y = _inputs((64,), 32, 100, dtype, device, scale=2.0)
    y[::7] = -100
    loss = linear_cross_entropy(h, w, y, impl=impl, chunk_size=16)
    ref = F.cross_entropy(F.linear(h.double(), w.double()), y)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-4, (loss.item(), ref.item())


@pytest.mark.parametrize("impl", IMPLS[2:])
def test_the_hybrid_path_under_autocast_matches_the_naive_autocast_loop(impl, device):
    """Its logits are one product in autocast's bf16, as `F.linear` gives the naive loop under autocast, and
    the rest of its arithmetic is fp32: the loss and the fp32 gradients match that loop's."""
    h, w, b, y = _inputs((13,), 16, 40, torch.float32, device, bias=True, scale=3.0)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, bias=b, impl=impl, chunk_size=4)
        grads = torch.autograd.grad(loss, (h, w, b))
        naive = F.cross_entropy(F.linear(h, w, b).float(), y)
        naive_grads = torch.autograd.grad(naive, (h, w, b))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert_close("loss", naive, loss, dtype=torch.float32, table=TABLE)
    for name, r, g in zip(("d_hidden", "d_weight", "d_bias"), naive_grads, grads):
        assert_close(name, r, g, dtype=torch.bfloat16, table=TABLE)
