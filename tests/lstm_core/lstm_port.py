# B batch, T time, I input, H hidden
"""What the ports of PyTorch's own nn.LSTM / nn.LSTMCell tests run on, and where they come from.

The checks are rewritten in this project's style, not copied, from:
- `torch/testing/_internal/common_modules.py` of torch 2.13.0 (the installed wheel; its git commit,
  `torch.version.git_version`, is cf30153c4c131c8164ee7798e5022d810682e2cb): `module_inputs_torch_nn_LSTM`,
  `module_inputs_torch_nn_LSTMCell`, `module_error_inputs_torch_nn_RNN_GRU` (the error inputs nn.LSTM's
  ModuleInfo uses) and `module_error_inputs_torch_nn_LSTMCell`;
- `test/test_modules.py` (pytorch/pytorch 33263640046f558d38b8e4bc306b1ca6abbf0b1f): the checks those inputs drive;
- `test/test_nn.py` (pytorch/pytorch 74f2fa66feec00335f72813782f4802e80bff4cb; the wheel does not ship the
  test folder and this is the copy that could be read): the RNN tests named in each test's docstring.

Every test runs on `torch.nn.LSTM` and on `lstm_core.LSTM` (reference backend); a subset also runs on
`backend="triton"`, where fp64 and `proj_size > 0` are documented limits that must raise `LSTMError`.
"""

import functools

import pytest
import torch

from leanfit.lstm_core import LSTM, LSTMCell
from tests.helpers import TRITON_DEVICE

TRITON_TOL = {torch.float32: (2e-5, 1e-4)}

TRITON = functools.partial(LSTM, backend="triton", device=TRITON_DEVICE)
LSTM_IMPLS = {"nn.LSTM": torch.nn.LSTM, "lstm_core.LSTM": LSTM}
CELL_IMPLS = {"nn.LSTMCell": torch.nn.LSTMCell, "lstm_core.LSTMCell": LSTMCell}


def params(impls):
    return [pytest.param(cls, id=name) for name, cls in impls.items()]


LSTMS = params(LSTM_IMPLS)
LSTMS_AND_TRITON = params(LSTM_IMPLS | {"lstm_core.LSTM-triton": TRITON})
CELLS = params(CELL_IMPLS)


def is_triton(cls):
    return cls is TRITON


def device_of(cls):
    return TRITON_DEVICE if is_triton(cls) else "cpu"


def twin(cls, *args, **kwargs):
    """`(nn.LSTM, cls(...))` with the same weights, on `cls`'s device: `nn.LSTM` is the reference."""
    ours = cls(*args, **kwargs)
    ref = torch.nn.LSTM(*args, **kwargs).to(device_of(cls))
    ref.load_state_dict(ours.state_dict())
    return ref, ours
