"""leanfit for the training loops people already use: `transformers.Trainer`, TRL's `SFTTrainer`, a plain loop.

`patch_model(model)` makes the model's training forward compute its loss without the (B, T, V) logits;
`unpatch(model)` restores it; `MemoryReportCallback` prints leanfit's memory estimate before training and writes
the memory report (JSON and PNG) into the Trainer's output_dir. docs/hf.md shows all three uses.
"""

from .integrations.callback import MemoryReportCallback
from .integrations.patch import PATCH_IMPLS, SUPPORTED, is_patched, patch_model, unpatch

__all__ = ["patch_model", "unpatch", "is_patched", "MemoryReportCallback", "SUPPORTED", "PATCH_IMPLS"]
