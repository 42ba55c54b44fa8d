# arch: compute capability as major * 10 + minor (75 T4, 80 A100, 90 H100); None under the interpreter
"""Which GPU a launch is built for, and one launch path that the compile gate can record.

The launchers pick their tiles, warps and stages from the target's compute capability (`device_arch`).
Every Triton launch in `kernels/` goes through `launch(cfg, *args)`; inside `record_launches()` the call is
recorded instead of run, so `bench/compile_gate.py` can compile exactly what a launcher would launch (same
arguments, same constexprs, same options) for a GPU this machine does not have.

Per-block shared-memory limits (opt-in maximum, CUDA C++ Programming Guide, "Technical Specifications per
Compute Capability"): 64 KiB on sm_75, 163 KiB on sm_80 and sm_87, 99 KiB on sm_86, sm_89 and sm_120,
227 KiB on sm_90 and sm_100.
"""

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

__all__ = ["KernelConfig", "SHARED_LIMIT", "device_arch", "device_sms", "indexed_device", "launch", "record_launches",
           "shared_limit"]

SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def shared_limit(arch: int) -> int:
    """Bytes of shared memory one block may use on `arch` (the nearest listed architecture at or below)."""
    known = [a for a in SHARED_LIMIT if a <= arch]
    return SHARED_LIMIT[max(known)] if known else SHARED_LIMIT[75]


def indexed_device(device) -> torch.device:
    """`device` (a torch.device or its name) with an index: index-less "cuda" becomes cuda:<current device>.

    Some `torch.cuda` calls (`set_per_process_memory_fraction`, `set_device`) refuse an index-less "cuda"; every
    call in leanfit gets an indexed device, so none depends on which ones accept it.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def device_arch(device: torch.device) -> int | None:
    """The compute capability of a CUDA device as one int, or None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(indexed_device(device))
    return major * 10 + minor


def device_sms(device: torch.device) -> int | None:
    """The number of SMs of a CUDA device (a persistent grid's upper bound), or None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(indexed_device(device)).multi_processor_count


@dataclass(frozen=True)
class KernelConfig:
    """One launch: the kernel, its grid, and its constexprs with the compiler options (num_warps, ...)."""

    kernel: object
    grid: tuple
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedLaunch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


_RECORDER: contextvars.ContextVar = contextvars.ContextVar("leanfit_launch_recorder", default=None)


def launch(cfg: KernelConfig, *args, **flags) -> bool:
    """Runs `cfg.kernel[cfg.grid](*args, **flags, **cfg.meta)` and returns True, or records it inside
    `record_launches()` and returns False (a launcher that reads results back then stops)."""
    kwargs = {**flags, **cfg.meta}
    recorder = _RECORDER.get()
    if recorder is None:
        cfg.kernel[cfg.grid](*args, **kwargs)
        return True
    if recorder[1]:
        recorder[0].append(RecordedLaunch(cfg.kernel, cfg.grid, args, kwargs))
    return False


@contextlib.contextmanager
def record_launches(keep: bool = True):
    """Collects the launches made inside the block (as `RecordedLaunch`) instead of running them. With
    `keep=False` they are dropped, so that nothing holds their tensors: for measuring what the launchers
    allocate, on `meta` tensors."""
    recorded: list = []
    token = _RECORDER.set((recorded, keep))
    try:
        yield recorded
    finally:
        _RECORDER.reset(token)
