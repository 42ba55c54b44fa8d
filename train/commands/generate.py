"""`leanfit generate`: sample continuations of prompts from a causal LM (flags, text or JSON output)."""

import json
import sys

from ..devices import resolve_device
from ..evaluation.generate import (
    DEFAULT_PROMPTS,
    check_prompt_lengths,
    format_samples,
    generate_texts,
    read_prompts,
)
from ..model.loading import load_model, load_tokenizer
from .cache import CACHE_HELP
from .common import OneLineParser, fail, non_negative_int, positive_float, positive_int, seed_int

__all__ = ["build_parser", "main"]


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
