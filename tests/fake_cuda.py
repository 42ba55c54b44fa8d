"""A CUDA card on the CPU: stand-ins for the `torch.cuda` calls leanfit makes with a device (use the `fake_cuda`
fixture of tests/conftest.py).

Each stand-in checks its device as `torch.cuda.set_per_process_memory_fraction` does
(`torch.cuda._utils._get_device_index(device)`, optional=False): an index-less "cuda" raises torch's ValueError,
even in the calls whose real version would take it, so that every call in leanfit is seen to pass an indexed
device. No device (None) stands for the current one, as in torch. Every call is recorded in `FakeCuda.calls`.
"""

from dataclasses import dataclass, field

import torch
from torch.cuda._utils import _get_device_index

H100_TOTAL_BYTES = 85_031_714_816  # what torch reports for an H100 80GB HBM3


@dataclass(frozen=True)
class FakeProperties:
    name: str = "NVIDIA H100 80GB HBM3"
    total_memory: int = H100_TOTAL_BYTES
    major: int = 9
    minor: int = 0
    multi_processor_count: int = 132


@dataclass
class FakeCuda:
    """One card at index 0; `calls` holds (function name, device index, other arguments) per call."""

    card: FakeProperties = field(default_factory=FakeProperties)
    calls: list = field(default_factory=list)

    def index(self, name: str, device, *args) -> int:
        index = 0 if device is None else _get_device_index(device, optional=False)
        if index != 0:
            raise ValueError(f"{name}: expected device 0 (the one card), given {device!r}")
        self.calls.append((name, index, args))
        return index

    def set_per_process_memory_fraction(self, fraction, device=None):
        self.index("set_per_process_memory_fraction", device, fraction)
        if not isinstance(fraction, float) or not 0 <= fraction <= 1:
            raise ValueError(f"expected a float fraction in [0, 1], given {fraction!r}")

    def get_device_properties(self, device=None):
        self.index("get_device_properties", device)
        return self.card

    def get_device_capability(self, device=None):
        self.index("get_device_capability", device)
        return self.card.major, self.card.minor

    def get_device_name(self, device=None):
        self.index("get_device_name", device)
        return self.card.name

    def mem_get_info(self, device=None):
        self.index("mem_get_info", device)
        return self.card.total_memory, self.card.total_memory

    def memory_stats(self, device=None):
        self.index("memory_stats", device)
        return {}

    def set_device(self, device):
        self.index("set_device", device)

    def synchronize(self, device=None):
        self.index("synchronize", device)

    def reset_peak_memory_stats(self, device=None):
        self.index("reset_peak_memory_stats", device)

    def memory_allocated(self, device=None):
        self.index("memory_allocated", device)
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated
    max_memory_reserved = memory_allocated

    def named(self, name: str) -> list:
        """The calls of the stand-in `name`: [(device index, other arguments), ...]."""
        return [(index, args) for called, index, args in self.calls if called == name]


DEVICE_CALLS = ("set_per_process_memory_fraction", "get_device_properties", "get_device_capability", "get_device_name",
                "mem_get_info", "memory_stats", "set_device", "synchronize", "reset_peak_memory_stats",
                "memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved")


def install(monkeypatch) -> FakeCuda:
    """Makes this process see one CUDA card (`FakeCuda`) until the test ends."""
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in DEVICE_CALLS:
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake
