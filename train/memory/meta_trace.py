# B batch, T block (tokens), H heads, D head dim
"""Stand-ins that make a training step traced on the `meta` device allocate what it would on the target device.

- Attention: on `meta`, `scaled_dot_product_attention` takes the math path and keeps the B·H·T² scores. The
  fused kernels keep only the output and a log-sum-exp. `SdpaStandIn` routes SDPA to the op
  `leanfit::attention_standin`, which allocates what the kernel the target would take allocates: on CUDA the
  one `gpus.sdpa_kernel` names for the card's compute capability (PyTorch's dispatch), on the CPU flash when
  `torch._fused_sdp_choice` picks it. From PyTorch's sources:
  - flash (`mha_fwd`/`mha_bwd`, aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp): keeps the
    lse (B, H, T) fp32; the backward adds softmax_d (B, H, T₁₂₈) and a dq accumulator (B, T₁₂₈, H, D₃₂) in
    fp32 (T₁₂₈: T rounded up to 128), and dk, dv expanded to the query heads under GQA;
  - memory-efficient (`_efficient_attention_forward` in cuda/attention.cu, `_efficient_attention_backward`
    in cuda/attention_backward.cu, `AttentionBackwardKernel` in cuda/mem_eff_attention/kernel_backward.h):
    keeps the lse padded to 32 queries (`kAlignLSE`); fp16/bf16 forwards with a head dim over 128 use an fp32
    output accumulator; the backward adds delta (B, H, T) fp32 (for fp32 inputs computed as
    `(grad_out.float() * out.float()).sum(-1)`, a full fp32 product first) and a workspace: per (batch, head)
    a dq tile accumulator (fp32 tiles of 64 queries (128 above head dim 64) x 64 dims, 16 bytes of lock each),
    plus for fp16/bf16 above head dim 128 fp32 dk, dv accumulators for each of ceil(T/64) key splits;
  - on the CPU (the fused CPU kernel): delta like the lse, and a dq accumulator for 16-bit inputs.
- Autocast: autocast does nothing to `meta` tensors. `AutocastEmulation` is a torch-function mode (above
  autograd, like autocast) that casts the inputs of the autocast lower-precision ops to the autocast dtype
  and of the fp32 ops to fp32 (CUDA or CPU op lists from the "Autocast Op Reference" of the torch.amp docs),
  caching the casts of leaf tensors that require grad, as autocast does, until `clear_cache()`.
- Backward: `run_backward` keeps the modes above active during the backward (checkpoint recomputation).
- Data-dependent checks: transformers' `find_packed_sequence_indices` fails on `meta` when there is no cache
  (training with gradient checkpointing), and its padding warning reads token ids (`.item()`).
  `unpacked_sequences()` makes the first report one sequence per row, which is what the fine-tuning blocks
  are, and skips the second, which only warns.
"""

import contextlib
from collections import Counter

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..gpus import sdpa_kernel

DEFAULT_CAPABILITY = (8, 0)  # no card named: sm_80, the oldest with flash attention and bf16 (the A100)

LOWER_PRECISION_OPS = frozenset(
    {"__matmul__", "__rmatmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul",
     "multi_dot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
     "linear", "matmul", "mm", "mv", "prelu", "scaled_dot_product_attention"}
)
FP32_OPS = frozenset(
    {"__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits",
     "cosh", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv", "exp",
     "expm1", "group_norm", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax", "log10", "log1p", "log2",
     "mse_loss", "nll_loss", "norm", "normalize", "pdist", "pow", "prod", "reciprocal", "rsqrt", "sinh",
     "smooth_l1_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan"}
)

CPU_LOWER_PRECISION_OPS = frozenset(
    {"conv1d", "conv2d", "conv3d", "bmm", "mm", "linalg_vecdot", "baddbmm", "addmm", "addbmm", "linear",
     "matmul", "__matmul__", "__rmatmul__", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
     "conv_transpose3d", "prelu", "scaled_dot_product_attention"}
)
CPU_FP32_OPS = frozenset(
    {"avg_pool3d", "binary_cross_entropy", "grid_sampler", "polar", "prod", "quantile", "nanquantile", "stft",
     "cdist", "trace", "cholesky", "inverse", "pinverse", "max_pool3d", "adaptive_avg_pool3d", "mse_loss",
     "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "poisson_nll_loss", "smooth_l1_loss",
     "cross_entropy", "l1_loss", "huber_loss", "margin_ranking_loss", "soft_margin_loss",
     "triplet_margin_loss", "multi_margin_loss", "ctc_loss", "kl_div", "multilabel_margin_loss",
     "binary_cross_entropy_with_logits"}
)


def _ceil(n, m):
    return -(-n // m) * m


def _lse_length(kernel, t):
    return _ceil(t, 32) if kernel == "efficient" else t  # kAlignLSE


@torch.library.custom_op("leanfit::attention_standin", mutates_args=())
def attention_standin(q: Tensor, k: Tensor, v: Tensor, kernel: str) -> tuple[Tensor, Tensor]:
    """Allocates what the fused attention forward `kernel` keeps: out (B, H, T, Dv) and the fp32 lse."""
    raise NotImplementedError("leanfit::attention_standin only traces memory; it has no real kernel")


@attention_standin.register_fake
def _attention_standin_fake(q, k, v, kernel):
    b, h, t, _ = q.shape
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(b, h, _lse_length(kernel, t), dtype=torch.float32)


def _forward_scratch(kernel, q, v):
    """The efficient forward's fp32 output accumulator (kNeedsOutputAccumulatorBuffer), or None.

    Allocated around the op rather than in its fake, which runs below the tracker's dispatch mode.
    """
    b, h, t, _ = q.shape
    if kernel == "efficient" and q.element_size() < 4 and v.shape[-1] > 128:
        return q.new_empty(b, t, h, v.shape[-1], dtype=torch.float32)
    return None


def _setup_context(ctx, inputs, output):
    ctx.kernel = inputs[3]
    ctx.mark_non_differentiable(output[1])  # as PyTorch's fused ops' lse: no gradient buffer is made for it
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:3], *output)


def _flash_scratch(q, k, v):
    b, h, t, d = q.shape
    t128 = _ceil(t, 128)
    scratch = [q.new_empty(b, h, t128, dtype=torch.float32), q.new_empty(b, t128, h, _ceil(d, 32), dtype=torch.float32)]
    if k.shape[1] != h:
        scratch += [k.new_empty(b, k.shape[2], h, d), v.new_empty(b, v.shape[2], h, v.shape[-1])]
    return scratch


def _efficient_scratch(q, k, v, out):
    b, h, t, d = q.shape
    n, dv = k.shape[2], v.shape[-1]
    half = q.element_size() < 4
    block_i, block_j = (64 if max(d, dv) <= 64 else 128), 64
    floats = -(-t // block_i) * -(-d // block_j) * (4 + block_i * block_j)
    if half and max(d, dv) > 128:
        floats += -(-n // block_j) * _ceil(n, block_j) * (_ceil(d, block_i) + _ceil(dv, block_i))
    product = None if half else torch.empty_like(out, dtype=torch.float32)
    delta = q.new_empty(b, h, t, dtype=torch.float32)
    del product
    return [delta, q.new_empty(b * h * _ceil(floats, 4), dtype=torch.float32)]


def _cpu_scratch(q, lse):
    return [torch.empty_like(lse)] + ([torch.empty_like(q, dtype=torch.float32)] if q.element_size() < 4 else [])


def _attention_standin_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if ctx.kernel == "flash":
        scratch = _flash_scratch(q, k, v)
    elif ctx.kernel == "efficient":
        scratch = _efficient_scratch(q, k, v, out)
    else:
        scratch = _cpu_scratch(q, lse)
    del scratch
    return (*grads, None)


attention_standin.register_autograd(_attention_standin_backward, setup_context=_setup_context)


def _cuda_kernel(capability, q, k, v, attn_mask, dropout_p, is_causal):
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(q.dtype)
    if dtype is None:
        return "math"
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    kernel = sdpa_kernel(capability, dtype, q.shape[-1], v.shape[-1], attn_mask is not None, dropout_p, training,
                         not is_causal or q.shape[-2] == k.shape[-2])
    if kernel == "efficient" and k.shape[1] != q.shape[1]:  # the CUTLASS kernels check equal head counts
        return "math"
    return kernel


def _cpu_fused(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa):
    small = [torch.zeros(1, t.shape[1], 2, t.shape[-1], dtype=t.dtype) for t in (q, k, v)]
    mask = None if attn_mask is None else torch.zeros(1, 1, 2, 2, dtype=attn_mask.dtype)
    return torch._fused_sdp_choice(*small, mask, dropout_p, is_causal, enable_gqa=enable_gqa) != 0


class SdpaStandIn(TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` to `leanfit::attention_standin` where the target fuses it.

    `capability`: the CUDA card's compute capability (default `DEFAULT_CAPABILITY`); `kernels` counts the calls
    by the kernel stood in for ("math" calls run as they are).
    """

    def __init__(self, device_kind, capability=None):
        super().__init__()
        self.device_kind = device_kind
        self.capability = tuple(capability or DEFAULT_CAPABILITY)
        self.kernels = Counter()

    def _kernel(self, q, k, v, mask, dropout_p, is_causal, gqa):
        if self.device_kind == "cuda":
            return _cuda_kernel(self.capability, q, k, v, mask, dropout_p, is_causal)
        return "cpu" if _cpu_fused(q, k, v, mask, dropout_p, is_causal, gqa) else "math"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            dropout_p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
            is_causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
            kernel = self._kernel(q, k, v, mask, dropout_p, is_causal, kwargs.get("enable_gqa", False))
            self.kernels[kernel] += 1
            if kernel != "math":
                scratch = _forward_scratch(kernel, q, v)
                out = torch.ops.leanfit.attention_standin(q, k, v, kernel)[0]
                del scratch
                return out
        return func(*args, **kwargs)


class AutocastEmulation(TorchFunctionMode):
    """Casts like `torch.autocast(dtype=dtype)` does on CUDA, for tensors (e.g. `meta`) autocast ignores."""

    def __init__(self, dtype, device_kind="cuda"):
        super().__init__()
        self.dtype = dtype
        cuda = device_kind == "cuda"
        self.lower = LOWER_PRECISION_OPS if cuda else CPU_LOWER_PRECISION_OPS
        self.fp32 = FP32_OPS if cuda else CPU_FP32_OPS
        self.cache = {}
        self.caching = True

    def clear_cache(self):
        self.cache.clear()
        self.caching = False

    def _cast(self, x, dtype):
        if not (isinstance(x, Tensor) and x.is_floating_point()) or x.dtype == dtype:
            return x
        cacheable = self.caching and x.is_leaf and x.requires_grad
        if cacheable and id(x) in self.cache:
            return self.cache[id(x)][1]
        y = x.to(dtype)
        if cacheable:
            self.cache[id(x)] = (x, y)
        return y

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if "out" in kwargs:
            return func(*args, **kwargs)
        if name in self.lower:
            dtype = self.dtype
        elif name in self.fp32:
            dtype = torch.float32
        else:
            return func(*args, **kwargs)
        args = [self._cast(a, dtype) for a in args]
        kwargs = {key: self._cast(a, dtype) for key, a in kwargs.items()}
        return func(*args, **kwargs)


def run_backward(loss):
    """`loss.backward()` that keeps the torch-function modes active, so checkpoint recomputation sees them.

    `Tensor.backward` is itself overridable: a mode intercepting it is popped while it runs, and the
    recomputed forward would then differ from the traced one. This calls the engine directly instead.
    """
    from torch.autograd.graph import _engine_run_backward

    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)


@contextlib.contextmanager
def unpacked_sequences():
    """Makes transformers treat each row as one sequence without reading the token or position ids."""
    from transformers import PreTrainedModel, masking_utils

    packed, padding = masking_utils.find_packed_sequence_indices, PreTrainedModel.warn_if_padding_and_no_attention_mask
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    PreTrainedModel.warn_if_padding_and_no_attention_mask = lambda self, input_ids, attention_mask: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = packed
        PreTrainedModel.warn_if_padding_and_no_attention_mask = padding
