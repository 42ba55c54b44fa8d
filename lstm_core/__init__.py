"""A hand-written LSTM in plain tensor ops, a drop-in for `torch.nn.LSTM`."""

from .checks import LSTMError
from .functional import lstm_cell, lstm_layer
from .modules import BACKENDS, LSTM, LSTMCell

__all__ = ["lstm_cell", "lstm_layer", "LSTMCell", "LSTM", "LSTMError", "BACKENDS"]
