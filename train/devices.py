"""The one place a device name becomes a `torch.device`: `--device` values, the kind a plan is made for, and the
indexed form every `torch.cuda` call gets."""

import torch

from ..kernels.launch import indexed_device

__all__ = ["resolve_device", "device_kind", "indexed_device"]


def resolve_device(name: str) -> torch.device:
    """The device of a `--device` value (cpu, cuda, cuda:N or auto); ValueError naming what was expected."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here (expected cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return device


def device_kind(name: str) -> str:
    """"cuda" or "cpu" for a --device value; "auto" is what this machine has."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"
