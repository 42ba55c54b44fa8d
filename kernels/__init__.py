"""Fused Triton kernels, each beside its pure-PyTorch reference.

Public names load lazily, so importing `kernels` does not import Triton.
"""

import importlib

_EXPORTS = {
    "fused_lstm": "kernels.lstm",
    "linear_cross_entropy": "kernels.lce",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
