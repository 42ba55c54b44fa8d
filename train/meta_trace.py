# B batch, T block (tokens), H heads, D head dim
"""Stand-ins that make a training step traced on the `meta` device allocate what it would on the target device.

- Attention: on `meta`, `scaled_dot_product_attention` takes the math path and keeps the B·H·T² scores.
  CUDA's flash and memory-efficient kernels keep only the output and a log-sum-exp (B·H·T, fp32), and their
  backward allocates dq, dk, dv plus fp32 scratch (flash: a dq accumulator and the softmax row sums, see
  `mha_bwd` in PyTorch's `aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp`). `SdpaStandIn`
  routes SDPA to the op `leanfit::attention_standin`, which allocates exactly that, whenever the target
  device would take a fused kernel (on the CPU: whenever `torch._fused_sdp_choice` picks flash).
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

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

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


@torch.library.custom_op("leanfit::attention_standin", mutates_args=())
def attention_standin(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Allocates what a fused attention forward keeps: out (B, H, T, D) and lse (B, H, T) fp32."""
    raise NotImplementedError("leanfit::attention_standin only traces memory; it has no real kernel")


@attention_standin.register_fake
def _attention_standin_fake(q, k, v):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _attention_standin_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    delta = torch.empty_like(lse)
    dq_accum = torch.empty_like(q, dtype=torch.float32) if q.element_size() < 4 else None
    grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    del delta, dq_accum
    return grads


attention_standin.register_autograd(_attention_standin_backward, setup_context=_setup_context)


def _fused_on(device_kind, q, k, v, attn_mask, dropout_p, is_causal, enable_gqa):
    if device_kind == "cuda":
        return attn_mask is None and not (enable_gqa and q.dtype == torch.float32)
    small = [torch.zeros(1, t.shape[1], 2, t.shape[-1], dtype=t.dtype) for t in (q, k, v)]
    mask = None if attn_mask is None else torch.zeros(1, 1, 2, 2, dtype=attn_mask.dtype)
    return torch._fused_sdp_choice(*small, mask, dropout_p, is_causal, enable_gqa=enable_gqa) != 0


class SdpaStandIn(TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` to `leanfit::attention_standin` where `device_kind` fuses it."""

    def __init__(self, device_kind):
        super().__init__()
        self.device_kind = device_kind

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            dropout_p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
            is_causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
            gqa = kwargs.get("enable_gqa", False)
            if _fused_on(self.device_kind, q, k, v, mask, dropout_p, is_causal, gqa):
                return torch.ops.leanfit.attention_standin(q, k, v)[0]
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
