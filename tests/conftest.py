import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import TRITON_DEVICE  # noqa: E402

DEVICES = [TRITON_DEVICE.type]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def fake_cuda(monkeypatch):
    """One simulated 80 GB CUDA card whose stand-ins refuse an index-less device (tests/fake_cuda.py)."""
    from tests.fake_cuda import install

    return install(monkeypatch)
