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


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 products in ieee fp32 (nn.LSTM's cuDNN and the fused LSTM follow `cudnn.allow_tf32`, on by default):
    the fp32 tolerances assume it; tests of the TF32 path switch it on themselves."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def fake_cuda(monkeypatch):
    """One simulated 80 GB CUDA card whose stand-ins refuse an index-less device (tests/fake_cuda.py)."""
    from tests.fake_cuda import install

    return install(monkeypatch)
