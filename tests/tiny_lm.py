"""Tiny random causal LMs and a byte-level BPE tokenizer, built locally (no downloads), saved once per session."""

import functools
import tempfile
from pathlib import Path

TRAIN_TEXT = (
    "It was the best of times, it was the worst of times. The Count said: I am not a vampire. You are an "
    "Englishman, and you are a guest. Jonathan Harker wrote in his journal; Mina read it aloud. "
) * 8


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(kind: str, vocab_size: int, dropout: float = 0.0, eos: int = 0):
    """A 2-layer, 32-wide config; GPT-2 ties its head to the embedding, the Llama one does not."""
    if kind == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                          resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                          bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=False, attention_dropout=dropout,
                           bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    raise ValueError(f"kind must be gpt2 or llama, got {kind!r}")


@functools.lru_cache(maxsize=None)
def tiny_model_dir(kind: str = "gpt2", dropout: float = 0.0) -> Path:
    """A folder with a random tiny `kind` model and the tiny tokenizer, as `save_pretrained` writes them."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer), dropout, tokenizer.eos_token_id))
    path = Path(tempfile.mkdtemp(prefix=f"tiny-{kind}-"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_run_config(tmp_path, corpus, prompts, kind: str = "gpt2", dropout: float = 0.0, **overrides):
    """The tiny fine-tuning run the train tests share: a random `kind` model, 8 steps of 2 x 16 tokens on the CPU
    (32 tokens per step), validation every 4 steps, 2 samples of 12 tokens per prompt; `overrides` change any
    `TrainConfig` field (e.g. `out=`, `iters=`, `lora=True`)."""
    from leanfit.train.config import TrainConfig  # deferred: tiny_lm is imported by subprocess workers too

    values = dict(
        model=str(tiny_model_dir(kind, dropout)), corpus=str(corpus), block_size=16, batch_size=2, iters=8,
        warmup=2, lr=3e-3, eval_every=4, val_fraction=0.2, device="cpu", out=str(tmp_path / "run"),
        prompts=str(prompts), num_return_sequences=2, max_length=12, loss="chunked",
    )
    values.update(overrides)
    return TrainConfig(**values)
