"""The fused LSTM recurrence (`fused_lstm`); its reference is `leanfit.lstm_core`. The model is in kernels/README.md."""

from .config import VARIANTS
from .fused import DTYPES, FusedLSTMFunction, fused_lstm

__all__ = ["DTYPES", "VARIANTS", "FusedLSTMFunction", "fused_lstm"]
