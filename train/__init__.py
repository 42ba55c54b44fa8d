"""Memory-lean fine-tuning of HuggingFace causal LMs: data, loss, training loop, memory reports."""
