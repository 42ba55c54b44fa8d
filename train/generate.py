# B samples per prompt, L prompt tokens
"""Sampled continuations of prompts, in the text-generation pipeline's shape.

`generate_texts` returns one list per prompt of `{"generated_text": prompt + continuation}`, as
`transformers.pipeline("text-generation")(prompts, max_length=..., num_return_sequences=...)` does.
`max_length` counts the prompt's tokens too, as in that pipeline.

CLI: `leanfit generate --model DIR|id|smollm2-135m --prompt "You are a" --json`.
"""

import json
import sys
from pathlib import Path

import torch

from .cli_cache import CACHE_HELP
from .cli_common import OneLineParser, fail, non_negative_int, positive_float, positive_int, seed_int
from .models import load_model, load_tokenizer

__all__ = ["DEFAULT_PROMPTS", "read_prompts", "read_prompt_entries", "generate_texts", "main"]

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "prompts.txt"


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


def build_parser():
    p = OneLineParser(prog="leanfit generate", description="Sample continuations of prompts from a causal LM.",
                      epilog=CACHE_HELP)
    p.add_argument("--model", default="smollm2-135m",
                   help="a checkpoint folder, a cached hub id, or smollm2-135m (embedded) (default: smollm2-135m)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompts-file", help="a UTF-8 file with one prompt per line "
                   "(default, when no --prompt: the embedded prompts)")
    p.add_argument("--max-length", type=positive_int, default=30,
                   help="tokens per sample, prompt included (default: 30)")
    p.add_argument("--num-return-sequences", type=positive_int, default=10, help="samples per prompt (default: 10)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-k", type=non_negative_int, default=50,
                   help="keep the k likeliest tokens, 0: all (default: 50)")
    p.add_argument("--top-p", type=positive_float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0)")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--json", action="store_true", help="print the pipeline-shaped JSON instead of text")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here (expected cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return device


def format_samples(prompts, results) -> str:
    lines = []
    for prompt, samples in zip(prompts, results, strict=True):
        lines.append(f"## {prompt}")
        lines += [f"{i + 1}. {' '.join(s['generated_text'].split())}" for i, s in enumerate(samples)]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prog = "leanfit generate"
    try:
        if args.top_p > 1:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
        prompts = list(args.prompt)
        if args.prompts_file or not prompts:
            prompts += read_prompts(args.prompts_file or DEFAULT_PROMPTS)
        device = resolve_device(args.device)
        check_prompt_lengths(load_tokenizer(args.model), prompts, args.max_length)
        model, tokenizer = load_model(args.model, device=device)
        results = generate_texts(
            model, tokenizer, prompts, max_length=args.max_length, num_return_sequences=args.num_return_sequences,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        )
    except ValueError as e:
        return fail(prog, e)
    print(json.dumps(results, indent=2, ensure_ascii=False) if args.json else format_samples(prompts, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
