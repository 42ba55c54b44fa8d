"""The dtype vocabulary: one set of names for every command and config (a leaf module).

Each dtype has a short name (`fp32`, `bf16`, `fp16`), the canonical one, and accepts torch's long name
(`float32`, `bfloat16`, `float16`) as an alias.
"""

import torch

__all__ = ["DTYPES", "dtype_name", "torch_dtype"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(value) -> str:
    """The canonical short name of `value` (a name, an alias or a torch.dtype); ValueError otherwise."""
    if isinstance(value, torch.dtype):
        for name, dtype in DTYPES.items():
            if dtype == value:
                return name
    elif isinstance(value, str):
        name = _ALIASES.get(value.lower(), value.lower())
        if name in DTYPES:
            return name
    accepted = ", ".join(f"{k} ({v})" for v, k in _ALIASES.items())
    raise ValueError(f"expected a dtype among {accepted}, given {value!r}")


def torch_dtype(value) -> torch.dtype:
    return DTYPES[dtype_name(value)]
