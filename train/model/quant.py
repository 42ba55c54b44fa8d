# N rows (out features), K columns (in features) of a quantized weight
"""bitsandbytes for leanfit: its import, the 4-bit base of QLoRA, and what 4-bit weights take (a leaf module).

- `import_bitsandbytes()`: bitsandbytes' CPU backend tries `from kernels import get_kernel` (HF's hub-kernels
  distribution) when it is imported. Where this repository's root is on `sys.path` (the tests, `python -m` in a
  checkout) that name would find leanfit's own `kernels/` folder and load a second copy of it, so the import
  runs with that one path entry hidden, and with bitsandbytes' warning about the missing hub kernel (and the
  deprecation warnings its imports raise) quieted.
  PEFT imports bitsandbytes whenever it is installed, so `import_peft()` goes through here first.
- QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): the base's linear layers in NF4
  with double quantization, computed in the autocast dtype. bitsandbytes quantizes a weight when it moves to a
  CUDA device; leanfit runs QLoRA on CUDA only (`check_qlora`).
- Sizes of one 4-bit weight of N x K elements, from `bitsandbytes.functional.quantize_4bit` (0.50): the packed
  codes, ceil(N K / 2) bytes; with double quantization the block absmax as uint8 (one per 64 elements) and
  their own fp32 absmax (one per 256 blocks), an fp32 offset and the 16-value NF4 code. The forward and the
  backward each dequantize the whole weight into a temporary of the compute dtype (above 1,536 rows, as any
  training micro-batch has, `gemm_4bit` takes that path rather than its fused kernel), and nothing but the
  packed weight is saved for the backward.
"""

import contextlib
import logging
import math
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["import_bitsandbytes", "import_peft", "nf4_config", "check_qlora", "nf4_buffers", "NF4Linear",
           "BLOCK_4BIT", "BLOCK_NESTED"]

BLOCK_4BIT = 64  # elements per absmax (bitsandbytes' default 4-bit block size)
BLOCK_NESTED = 256  # absmax values per second-level absmax (double quantization)
_OWN_KERNELS = Path(__file__).resolve().parents[2] / "kernels"


@contextlib.contextmanager
def _own_kernels_hidden():
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if (Path(p or ".") / "kernels").resolve() != _OWN_KERNELS]
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.path[:] = saved
        log.setLevel(level)


def import_bitsandbytes():
    """The bitsandbytes module; ValueError when it is not installed."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    with _own_kernels_hidden():
        try:
            import bitsandbytes
        except ImportError as e:
            raise ValueError(f"bitsandbytes is not installed ({e}): expected `pip install bitsandbytes`") from None
    return bitsandbytes


def import_peft():
    """The peft module, imported after bitsandbytes (see the module doc)."""
    import_bitsandbytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import peft
    return peft


def check_qlora(device: torch.device):
    """Raises ValueError unless a 4-bit base can be trained on `device` (CUDA)."""
    if device.type != "cuda":
        raise ValueError(f"--qlora: a 4-bit base (bitsandbytes NF4) is trained on CUDA only, and this run is on "
                         f"{device}: expected --device cuda, or --lora for a 16/32-bit base")


def nf4_config(compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` of the QLoRA paper's base: NF4, double quantization."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def nf4_buffers(n_elements: int, device="meta") -> dict:
    """Empty tensors of the sizes bitsandbytes keeps for one double-quantized NF4 weight of `n_elements`."""
    blocks = math.ceil(n_elements / BLOCK_4BIT)
    return {
        "packed": torch.empty(math.ceil(n_elements / 2), 1, dtype=torch.uint8, device=device),
        "absmax": torch.empty(blocks, dtype=torch.uint8, device=device),
        "absmax2": torch.empty(math.ceil(blocks / BLOCK_NESTED), dtype=torch.float32, device=device),
        "code": torch.empty(16, dtype=torch.float32, device=device),
        "offset": torch.empty((), dtype=torch.float32, device=device),
    }


def _dequantized(absmax: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """What dequantizing allocates: the fp32 block absmax first, then the (N, K) weight in `dtype`."""
    scales = torch.empty(absmax.numel(), dtype=torch.float32, device=absmax.device)
    weight = torch.empty(shape, dtype=dtype, device=absmax.device)
    del scales
    return weight


class _NF4MatMul(torch.autograd.Function):
    """bitsandbytes' `MatMul4Bit` as the estimate sees it: the weight dequantized into a temporary in the forward
    and again in the backward; nothing of the input is saved."""

    @staticmethod
    def forward(ctx, x, absmax, shape, bias):
        ctx.shape = shape
        ctx.save_for_backward(absmax)
        return torch.nn.functional.linear(x, _dequantized(absmax, shape, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (absmax,) = ctx.saved_tensors
        return grad_out @ _dequantized(absmax, ctx.shape, grad_out.dtype), None, None, None


class NF4Linear(torch.nn.Linear):
    """A stand-in for `bitsandbytes.nn.Linear4bit` on `meta` (the estimate): the buffers of `nf4_buffers`, a frozen
    bias in the compute dtype, and `_NF4MatMul`. A `torch.nn.Linear`, so PEFT puts an adapter on it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, device="meta"):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        buffers = nf4_buffers(in_features * out_features, device)
        self.weight = torch.nn.Parameter(buffers.pop("packed"), requires_grad=False)
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
        self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                       requires_grad=False) if bias else None

    def forward(self, x):
        out = _NF4MatMul.apply(x.to(self.compute_dtype), self.absmax, (self.out_features, self.in_features),
                               self.bias)
        return out.to(x.dtype)
