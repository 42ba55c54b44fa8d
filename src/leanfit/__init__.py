"""leanfit: a hand-written LSTM, fused Triton kernels and memory-lean fine-tuning for small GPUs.

The repository keeps one folder per part; the install maps each under this one import root:

    lstm_core/  -> leanfit.lstm_core   the drop-in for torch.nn.LSTM, and the kernels' reference
    kernels/    -> leanfit.kernels     fused Triton kernels beside their pure-PyTorch references
    train/      -> leanfit.train       fine-tuning, memory estimate and budget, evaluation, the CLI

Importing `leanfit` imports none of them.
"""

__version__ = "0.1.0"
