# B samples per prompt, L prompt tokens
"""Sampled continuations of prompts, in the text-generation pipeline's shape.

`generate_texts` returns one list per prompt of `{"generated_text": prompt + continuation}`, as
`transformers.pipeline("text-generation")(prompts, max_length=..., num_return_sequences=...)` does.
`max_length` counts the prompt's tokens too, as in that pipeline.

The command line is train/commands/generate.py:
`leanfit generate --model DIR|id|smollm2-135m --prompt "You are a" --json`.
"""

from pathlib import Path

import torch

__all__ = ["DEFAULT_PROMPTS", "read_prompts", "read_prompt_entries", "check_prompt_lengths", "generate_texts",
           "format_samples"]

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts.txt"


THEME_SEPARATOR = "||"


def read_prompt_entries(path) -> list[dict]:
    """A UTF-8 prompts file, one prompt per line with an optional "|| theme, words" suffix (used by `evaluate`),
    as [{"prompt": str, "themes": [str]}, ...]."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file not found: {path} (expected a text file, one prompt per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"prompts file {path} is not valid UTF-8 (expected a UTF-8 text file)") from None
    entries = []
    for line in lines:
        prompt, _, themes = line.partition(THEME_SEPARATOR)
        if prompt.strip():
            entries.append({"prompt": prompt.strip(), "themes": [w.strip() for w in themes.split(",") if w.strip()]})
    if not entries:
        raise ValueError(f"prompts file {path} has no prompts (expected one prompt per line)")
    return entries


def read_prompts(path) -> list[str]:
    """The prompts of a prompts file, without their theme lists."""
    return [entry["prompt"] for entry in read_prompt_entries(path)]


def check_prompt_lengths(tokenizer, prompts, max_length: int, flag: str = "--max-length"):
    """Raises ValueError when a prompt has `max_length` tokens or more (the samples count the prompt's tokens)."""
    for prompt in prompts:
        n = len(tokenizer(prompt)["input_ids"])
        if n >= max_length:
            raise ValueError(f"{flag} {max_length} counts the prompt's tokens: the prompt {prompt!r} has {n}, "
                             f"so expected {flag} {n + 1} or more")


def _check(prompts, max_length, num_return_sequences, temperature, top_k, top_p):
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
    for name, value in (("max_length", max_length), ("num_return_sequences", num_return_sequences)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0: off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


@torch.no_grad()
def generate_texts(model, tokenizer, prompts, max_length=30, num_return_sequences=10, temperature=1.0,
                   top_k=50, top_p=1.0, seed=0):
    """Samples `num_return_sequences` continuations of each prompt.

    Args:
        model: a causal LM; it is put in eval mode for the call and restored after.
        tokenizer: its tokenizer.
        prompts: list of prompt strings.
        max_length: total tokens per sample, prompt included (as in the text-generation pipeline).
        num_return_sequences: samples per prompt.
        temperature, top_k, top_p: sampling settings (top_k=0 and top_p=1 turn those filters off).
        seed: seeds the sampling; the caller's RNG state is left as it was.
    Returns:
        one list per prompt of {"generated_text": prompt + continuation}.
    Example:
        >>> generate_texts(model, tokenizer, ["You are a"], max_length=30, num_return_sequences=10)
        [[{'generated_text': 'You are a ...'}, ...]]
    """
    _check(prompts, max_length, num_return_sequences, temperature, top_k, top_p)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for prompt in prompts:
                enc = tokenizer(prompt, return_tensors="pt").to(device)
                n = enc["input_ids"].shape[1]
                if n >= max_length:
                    raise ValueError(
                        f"max_length counts the prompt's tokens: expected more than {n} for prompt {prompt!r}, "
                        f"got {max_length}"
                    )
                out = model.generate(
                    **enc, do_sample=True, max_length=max_length, num_return_sequences=num_return_sequences,
                    temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=tokenizer.pad_token_id,
                )  # (B, <= max_length)
                texts = tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)
                results.append([{"generated_text": prompt + text} for text in texts])
    finally:
        model.train(was_training)
    return results


def format_samples(prompts, results) -> str:
    lines = []
    for prompt, samples in zip(prompts, results, strict=True):
        lines.append(f"## {prompt}")
        lines += [f"{i + 1}. {' '.join(s['generated_text'].split())}" for i, s in enumerate(samples)]
        lines.append("")
    return "\n".join(lines)
