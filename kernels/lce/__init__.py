"""Linear cross-entropy without the `[tokens, vocab]` logits: the reference, the chunked and the Triton path."""

from .interface import IMPLS, linear_cross_entropy
from .naive import naive_linear_cross_entropy

__all__ = ["IMPLS", "linear_cross_entropy", "naive_linear_cross_entropy"]
