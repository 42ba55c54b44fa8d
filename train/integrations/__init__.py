"""leanfit inside other training loops: `patch_model` (HF Trainer, TRL, a plain loop) and `MemoryReportCallback`.

The public face is `leanfit.train.hf`; patch.py replaces a causal LM's training forward, callback.py is the
Trainer callback that prints the estimate and writes the memory report.
"""
