"""Byte sizes: parsing and printing them, and the device overheads the memory estimate adds (a leaf module).

- `CUBLAS_WORKSPACE_BYTES`: PyTorch gives each cuBLAS handle a workspace from the caching allocator, 32 MiB
  on Hopper and newer, 4 MiB on large Ampere, 1 MiB otherwise (pytorch/pytorch#120925, CUBLASLT_WORKSPACE_SIZE
  and CUBLAS_WORKSPACE_CONFIG override it). Handles are per thread, and the backward runs on autograd's
  device thread, so two are counted. It is allocator memory: it shows in `max_memory_allocated`.
- `CUDA_CONTEXT_BYTES`: the driver context and loaded kernels, outside the allocator (visible only in
  `torch.cuda.mem_get_info`). 512 MiB is a typical figure with lazy module loading (CUDA_MODULE_LOADING=LAZY,
  the default since CUDA 11.7 per the CUDA C Programming Guide, "Lazy Loading"); bench/gpu_capped_runs.py
  measures it on the card. Override with `--cuda-context` or LEANFIT_CUDA_CONTEXT.
- `ALLOCATOR_MARGIN`: reserved-minus-allocated (block rounding and fragmentation), as a fraction of the
  tensor peak. Override with `--allocator-margin` or LEANFIT_ALLOCATOR_MARGIN.
"""

import re

__all__ = ["MiB", "GiB", "CUBLAS_WORKSPACE_BYTES", "CUDA_CONTEXT_BYTES", "ALLOCATOR_MARGIN", "parse_bytes",
           "format_bytes"]

MiB = 1 << 20
GiB = 1 << 30
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB
CUDA_CONTEXT_BYTES = 512 * MiB
ALLOCATOR_MARGIN = 0.05

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": MiB,
          "GIB": GiB, "TIB": 1 << 40}


def parse_bytes(text) -> int:
    """Parses a size such as "15GiB", "14.75GiB", "800MiB", "16GB" or "1024" (bytes) into an int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS and unit != "":
        raise ValueError(f"expected a size like 15GiB, 800MiB or 16GB, given {text!r}")
    return int(float(m.group(1)) * _UNITS.get(unit, 1))


def format_bytes(n) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"
