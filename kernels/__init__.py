"""Fused Triton kernels, each beside its pure-PyTorch reference.

Public names load lazily, so importing `kernels` does not import Triton.
"""

import importlib

_EXPORTS = {
    "fused_lstm": ".lstm",
    "linear_cross_entropy": ".lce",
    "naive_linear_cross_entropy": ".lce.naive",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
