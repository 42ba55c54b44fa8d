"""`leanfit evaluate`: perplexity, the a/an probe and prompt studies of one model or two side by side."""

import sys
from pathlib import Path

from ..checkpointing.atomic import atomic_write_json, check_writable
from ..config import TrainConfig
from ..data import DEFAULT_CORPUS, make_blocks, read_corpus, split_blocks
from ..devices import resolve_device
from ..dtypes import torch_dtype
from ..evaluation.evaluate import evaluate_model
from ..evaluation.generate import check_prompt_lengths
from ..evaluation.generate import read_prompt_entries as read_prompts
from ..model.architectures import check_positions, load_config
from ..model.loading import load_model, load_tokenizer, resolve_model
from .cache import CACHE_HELP
from .common import OneLineParser, dtype_flag, fail, non_negative_int, positive_int, seed_int

__all__ = ["format_table", "comparison_rows", "main"]

PROG = "leanfit evaluate"


def _probe_rows(name, probe):
    if probe is None:
        return []
    return [
        (f"a/an {name}: balanced accuracy", probe["balanced_accuracy"]),
        (f"a/an {name}: accuracy after 'a' (n={probe['a']['n']})", probe["a"]["accuracy"]),
        (f"a/an {name}: accuracy after 'an' (n={probe['an']['n']})", probe["an"]["accuracy"]),
        (f"a/an {name}: mean mass on correct class, 'a'", probe["a"]["mean_mass_correct"]),
        (f"a/an {name}: mean mass on correct class, 'an'", probe["an"]["mean_mass_correct"]),
    ]


def result_rows(result):
    """Flattens an `evaluate_model` result into [(metric name, value)] for tables."""
    rows = [("perplexity", result["perplexity"]), ("validation loss (nats/token)", result["val_loss"])]
    rows += _probe_rows("built-in", result["probe"]["builtin"])
    rows += _probe_rows("held-out", result["probe"]["heldout"])
    for p in result["prompts"]:
        short = p["prompt"] if len(p["prompt"]) <= 32 else p["prompt"][:29] + "..."
        rows += [(f"{short!r}: distinct-1", p["distinct_1"]), (f"{short!r}: distinct-2", p["distinct_2"]),
                 (f"{short!r}: mean log-likelihood", p["mean_logprob"])]
        if p["theme_share"] is not None:
            rows.append((f"{short!r}: theme share", p["theme_share"]))
    return rows


def comparison_rows(results):
    """[(metric, value per result...)] for results with the same metrics; a missing value is None."""
    tables = [dict(result_rows(r)) for r in results]
    names = list(dict.fromkeys(name for r in results for name, _ in result_rows(r)))
    return [(name, *[t.get(name) for t in tables]) for name in names]


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def format_table(results, diff=True):
    """A plain-text table of one or more results side by side, with `last - first` when `diff`."""
    header = ["metric"] + [r["model"] for r in results] + (["diff"] if diff and len(results) == 2 else [])
    rows = []
    for name, *values in comparison_rows(results):
        row = [name] + [_fmt(v) for v in values]
        if len(header) > len(row):
            a, b = values
            row.append(_fmt(b - a) if isinstance(a, float) and isinstance(b, float) else "-")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _parser():
    d = TrainConfig()
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0], epilog=CACHE_HELP)

    def add(flag, help_, **kw):
        default = kw.pop("shown", kw.get("default"))
        p.add_argument(flag, help=f"{help_} (default: {default})", **kw)

    add("--model", "model to evaluate: smollm2-135m (embedded), a checkpoint folder, or a cached hub id",
        default=d.model)
    add("--baseline", "a second model, evaluated on the same data and seeds and printed side by side with the "
        "differences", default=None, shown="none")
    add("--corpus", "a .txt file or a folder of them", default=None, shown="the embedded corpus")
    add("--encoding", "the corpus's text encoding", default=d.encoding)
    add("--block-size", "tokens per sequence, as in finetune", type=positive_int, default=d.block_size)
    add("--val-fraction", "held-out fraction of blocks (the last ones), as in finetune", type=float,
        default=d.val_fraction)
    add("--eval-blocks", "use only the first N validation blocks, 0: all", type=non_negative_int, default=0)
    add("--batch-size", "blocks or contexts per forward pass", type=positive_int, default=8)
    add("--heldout-contexts", "at most this many held-out a/an contexts per article, 0: built-in ones only",
        type=non_negative_int, default=100)
    add("--prompts", "prompts file for the prompt study: one prompt per line, optionally ending in "
        "' || theme, words'", default=None, shown="no prompt study")
    add("--max-length", "tokens per sample, prompt included, as in generate", type=positive_int,
        default=d.max_length)
    add("--num-return-sequences", "samples per prompt", type=positive_int, default=d.num_return_sequences)
    add("--seed", "generation seed", type=seed_int, default=d.seed)
    add("--device", "cpu, cuda, cuda:N or auto", default="auto")
    add("--dtype", "autocast dtype: fp32 (none), bf16 or fp16; float32, bfloat16, float16 also accepted",
        type=dtype_flag, default="fp32")
    add("--json", "also write the results as JSON to PATH (a new file, or with --overwrite an existing one)",
        metavar="PATH", default=None, shown="none")
    p.add_argument("--overwrite", action="store_true", help="let --json replace an existing file (default: refuse)")
    return p


def _check(args, names) -> tuple[list | None, str]:
    """Every check before a weight loads: numbers, the --json path, corpus, prompts, models, positions."""
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.json:
        check_writable(args.json, "--json")
        if Path(args.json).exists() and not args.overwrite:
            raise ValueError(f"--json {args.json} already exists (expected a new file): pass --overwrite to replace it")
    prompts = read_prompts(args.prompts) if args.prompts else None
    text = read_corpus(args.corpus or DEFAULT_CORPUS, encoding=args.encoding)
    for name in names:
        ref, _ = resolve_model(name)
        check_positions(args.block_size, load_config(ref))
        if prompts:
            check_prompt_lengths(load_tokenizer(name), [p["prompt"] for p in prompts], args.max_length)
    return prompts, text


def _run(args):
    names = ([args.baseline] if args.baseline else []) + [args.model]
    prompts, text = _check(args, names)
    device = resolve_device(args.device)
    cast = None if args.dtype == "fp32" else torch_dtype(args.dtype)
    results = []
    for name in names:
        model, tokenizer = load_model(name, device=device)
        val = split_blocks(make_blocks(text, tokenizer, args.block_size), args.val_fraction)[1]
        val = val[: args.eval_blocks] if args.eval_blocks else val
        print(f"evaluating {name}: {val.shape[0]} validation blocks of {args.block_size} tokens", file=sys.stderr)
        results.append(evaluate_model(model, tokenizer, val, prompts, batch_size=args.batch_size,
                                      heldout_per_article=args.heldout_contexts, max_length=args.max_length,
                                      num_return_sequences=args.num_return_sequences, seed=args.seed,
                                      label=name, autocast_dtype=cast))
        del model
    return results


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        results = _run(args)
    except (ValueError, OSError) as e:
        return fail(PROG, e)
    print(format_table(results))
    for r in results:
        for p in r["prompts"]:
            print(f"\n[{r['model']}] {p['prompt']!r}")
            for s in p["samples"][:3]:
                print("  " + s.replace("\n", " "))
    if args.json:
        atomic_write_json(args.json, results[0] if len(results) == 1 else {"baseline": results[0],
                                                                          "model": results[1]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
