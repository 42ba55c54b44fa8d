"""The cards `--gpu` plans for, and which attention kernel PyTorch runs on each (a leaf module).

Per card: the memory PyTorch gets, the compute capability, bf16 yes/no, and from those the SDPA kernel.

Sources:
- Compute capability: NVIDIA, "CUDA GPU Compute Capability" (developer.nvidia.com/cuda-gpus): T4 7.5, A10 8.6,
  L4 8.9, A100 8.0, H100 9.0. The A10G is AWS's variant of the A10 (GA102, same 24 GB GDDR6; AWS EC2 G5
  instances page; baseten.co, "NVIDIA A10 vs A10G").
- Memory on the datasheets: T4 16 GB GDDR6, L4 24 GB GDDR6, A10G 24 GB GDDR6, A100 40 GB or 80 GB HBM2e,
  H100 80 GB HBM3.
- bf16: tensor cores take bf16 from compute capability 8.0 (NVIDIA A100 Tensor Core GPU Architecture
  whitepaper); the T4 datasheet lists FP32, FP16, INT8 and INT4 only. PyTorch's SDPA takes bf16 in its fused
  kernels only from sm_80 (`check_dtypes_low_precision`, below).
- Usable memory: what `torch.cuda.get_device_properties(0).total_memory` reports, i.e. what the driver leaves
  to the process, as PyTorch prints it in its out-of-memory message ("GPU 0 has a total capacity of X GiB").
  Recent drivers keep about 0.45 GiB more of nvidia-smi's total than older ones did (T4: 14.75 GiB in 2023,
  googlecolab/colabtools#3439; 14.56 GiB since 2025), so the smallest recent figure is used:
  - t4: 14.56 GiB on Colab (facebookresearch/tribev2#28) and on GCP (Zheng-Chong/CatVTON#133);
  - l4: 22.03 GiB (ArcInstitute/evo2#190);
  - a10g: derived, not reported: nvidia-smi shows 23,028 MiB (NVIDIA/TensorRT-LLM#7818, driver 570), less
    the 475 MiB the L4, the other 24 GB GDDR6 card, loses between nvidia-smi (23,034 MiB,
    GoogleCloudPlatform/pubsec-declarative-toolkit#655) and PyTorch (22.03 GiB): 22,553 MiB = 22.02 GiB (an
    older driver gave 22.20 GiB, XavierXiao/Dreambooth-Stable-Diffusion#18);
  - a100-40gb: 39.50 GiB (TianheWu/CoSeR#10); a100-80gb: 79.14 GiB (lianqi1008/Control-GIC#6);
  - h100: 79.11 GiB (vllm-project/vllm#27508).
- SDPA kernel: PyTorch's `select_sdp_backend` (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp) takes
  flash attention, then the memory-efficient kernel, then the math path, each when its checks pass; see
  `sdpa_kernel`. cuDNN attention goes first on sm_90 when PyTorch's cuDNN is newer than 9.15
  (`check_prefer_cudnn_attention`), but only for a dropout that is a multiple of 1/16 (`check_cudnn_dropout`:
  not GPT-2's 0.1); it keeps what flash keeps and is traced as flash.
"""

import re
from dataclasses import dataclass

__all__ = ["Gpu", "GPUS", "gpu_card", "sdpa_kernel", "check_properties", "identify"]

_GiB = 1 << 30
_MiB = 1 << 20
FLASH_RANGE = ((8, 0), (12, 1))  # check_flash_attention_hardware_support
EFFICIENT_RANGE = ((5, 0), (12, 1))  # check_mem_efficient_hardware_support
KERNEL_WORDS = {"flash": "flash", "efficient": "memory-efficient", "math": "math"}
MEMORY_TOLERANCE = (0.97, 1.10)  # drivers move the total by ~1.5% (T4 14.56-14.75 GiB); ECC off adds 8.7% (15.83)


@dataclass(frozen=True)
class Gpu:
    """One card: `usable_bytes` is what PyTorch can get there (the default memory budget)."""

    name: str  # the --gpu spelling
    card: str
    memory: str  # on the datasheet
    usable_bytes: int
    capability: tuple[int, int]
    bf16: bool
    device_pattern: str  # matches torch.cuda.get_device_properties(...).name
    usable_source: str

    def kernel(self, dtype: str) -> str:
        """The SDPA kernel a training step takes here for `dtype` (head dim 64, no mask)."""
        return sdpa_kernel(self.capability, dtype)

    def describe(self) -> str:
        cc = ".".join(map(str, self.capability))
        half = "bf16" if self.bf16 else "fp16"
        kernels = (f"{KERNEL_WORDS[self.kernel(half)]} for {half} and fp32" if self.kernel(half) == self.kernel("fp32")
                   else f"{KERNEL_WORDS[self.kernel(half)]} for {half}, {KERNEL_WORDS[self.kernel('fp32')]} for fp32")
        return (f"{self.card} ({self.memory}): {self.usable_bytes / _GiB:.2f} GiB usable, compute capability {cc}, "
                f"{'bf16' if self.bf16 else 'no bf16'}; SDPA kernel in training: {kernels}")


def _gib(value: float) -> int:
    return int(value * _GiB)


GPUS = {g.name: g for g in (
    Gpu("t4", "NVIDIA T4", "16 GB GDDR6", _gib(14.56), (7, 5), False, r"\bT4\b", "reported"),
    Gpu("l4", "NVIDIA L4", "24 GB GDDR6", _gib(22.03), (8, 9), True, r"\bL4\b", "reported"),
    Gpu("a10g", "NVIDIA A10G", "24 GB GDDR6", (23028 - 475) * _MiB, (8, 6), True, r"\bA10G\b", "derived"),
    Gpu("a100-40gb", "NVIDIA A100 40GB", "40 GB HBM2e", _gib(39.50), (8, 0), True, r"\bA100\b", "reported"),
    Gpu("a100-80gb", "NVIDIA A100 80GB", "80 GB HBM2e", _gib(79.14), (8, 0), True, r"\bA100\b", "reported"),
    Gpu("h100", "NVIDIA H100 80GB", "80 GB HBM3", _gib(79.11), (9, 0), True, r"\bH100\b", "reported"),
)}


def gpu_card(name) -> Gpu:
    """The card called `name` (any case); ValueError listing the names otherwise."""
    card = GPUS.get(str(name).strip().lower())
    if card is None:
        raise ValueError(f"expected a card among {', '.join(GPUS)}, given {name!r}")
    return card


def _in(capability, bounds) -> bool:
    return bounds[0] <= tuple(capability) <= bounds[1]


def _gemm_alignment(capability, half: bool) -> int:
    """`minimum_gemm_alignment` of sdp_utils.cpp: the head dim the memory-efficient kernel needs to divide."""
    major = capability[0]
    tensor_cores = major >= 8 or (major >= 7 and half)
    alignment = 4 if major >= 8 else 1
    return max(alignment, 128 // (16 if half else 32)) if tensor_cores else alignment


def sdpa_kernel(capability, dtype: str, head_dim: int = 64, head_dim_v: int | None = None, has_mask: bool = False,
                dropout: float = 0.0, training: bool = True, same_lengths: bool = True) -> str:
    """"flash", "efficient" or "math": what `select_sdp_backend` picks on a card of `capability`.

    Flash (`can_use_flash_attention`): sm_80 to sm_121, fp16 (and bf16 from sm_80), no attention mask, one head
    dim for q, k and v of at most 256, and on sm_86-89 and sm_120-121 no training with a head dim in (192, 224],
    nor in (224, 256] with dropout. The memory-efficient kernel (`can_use_mem_efficient_attention`): sm_50 to
    sm_121, fp16 and fp32 (and bf16 from sm_80), masks allowed, head dims divisible by the GEMM alignment.
    """
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    half = dtype in ("fp16", "bf16")
    low_precision = ("fp16", "bf16") if capability[0] >= 8 else ("fp16",)
    consumer_sm = _in(capability, ((8, 6), (8, 9))) or _in(capability, ((12, 0), (12, 1)))
    head_dim_trains = not (training and consumer_sm) or head_dim <= 192 or (dropout == 0 and head_dim > 224)
    if (_in(capability, FLASH_RANGE) and dtype in low_precision and not has_mask and head_dim == head_dim_v
            and head_dim <= 256 and head_dim_trains and same_lengths):
        return "flash"
    efficient_dtypes = ("fp16", "fp32", "bf16") if capability[0] >= 8 else ("fp16", "fp32")
    alignment = _gemm_alignment(capability, half)
    if (_in(capability, EFFICIENT_RANGE) and dtype in efficient_dtypes and head_dim % alignment == 0
            and head_dim_v % alignment == 0):
        return "efficient"
    return "math"


def identify(props) -> Gpu | None:
    """The card of the table that `props` (name, total_memory, major, minor) is, or None."""
    for card in GPUS.values():
        if not _mismatch(card, props):
            return card
    return None


def _mismatch(card: Gpu, props) -> bool:
    low, high = MEMORY_TOLERANCE
    return (not re.search(card.device_pattern, props.name) or (props.major, props.minor) != card.capability
            or not low * card.usable_bytes <= props.total_memory <= high * card.usable_bytes)


def check_properties(name: str, props) -> Gpu:
    """The card `name`, if `props` (from `torch.cuda.get_device_properties`) is that card; else ValueError."""
    card = gpu_card(name)
    if _mismatch(card, props):
        found = identify(props)
        hint = f"pass --gpu {found.name}" if found else "pass the --gpu of this card"
        raise ValueError(
            f"--gpu {card.name}: expected an {card.card} (compute capability {'.'.join(map(str, card.capability))}, "
            f"about {card.usable_bytes / _GiB:.2f} GiB), found {props.name} (compute capability "
            f"{props.major}.{props.minor}, {props.total_memory / _GiB:.2f} GiB); {hint}, or leave --gpu out")
    return card
