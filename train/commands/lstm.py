"""`leanfit lstm`: train a character-level LSTM language model (train/charlm/) on a corpus, then sample."""

import sys
import warnings
from pathlib import Path

from ..charlm.config import DTYPES, PRESETS, LSTMConfig
from ..charlm.data import VOCABS
from ..charlm.outputs import FILES, run
from ..checkpointing.checkpoint import SaveError
from .common import (
    OneLineParser,
    fail,
    flag_type,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)

__all__ = ["build_parser", "parse", "main"]


def _unit_interval(text) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise ValueError(f"expected a number in [0, 1), got {text!r}")
    return value


def build_parser() -> OneLineParser:
    d = LSTMConfig()
    p = OneLineParser(prog="leanfit lstm", description="Train a character-level LSTM language model on a corpus "
                      "(truncated backpropagation through time), then sample from it.")

    def opt(flag, help_, **kw):
        default = getattr(d, flag.lstrip("-").replace("-", "_"), None)
        shown = kw.pop("none", "none") if default is None else default
        p.add_argument(flag, default=None, help=f"{help_} (default: {shown})", **kw)

    opt("--corpus", "a .txt file or a folder of them", none="the embedded Dracula")
    opt("--encoding", "the corpus encoding")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset (cpu: about a minute on 2 cores; "
                   "gpu: 2 x 1,024, windows of 256, batch 64); other flags override it (default: none)")
    opt("--vocab", "char (the corpus's characters) or byte (UTF-8 bytes, 256 symbols)", choices=VOCABS)
    opt("--embed", "embedding size", type=positive_int)
    opt("--hidden", "LSTM hidden size", type=positive_int)
    opt("--layers", "LSTM layers", type=positive_int)
    opt("--dropout", "dropout between LSTM layers and before the head, in [0, 1)",
        type=flag_type(_unit_interval, "dropout"))
    opt("--backend", "the LSTM: auto (triton on CUDA, reference elsewhere), reference (lstm_core's loop) or "
        "triton (the fused kernel; CUDA or TRITON_INTERPRET=1)", choices=("auto", "reference", "triton"))
    opt("--block-size", "characters per truncated-BPTT window", type=positive_int)
    opt("--batch-size", "parallel streams (the state carries along each)", type=positive_int)
    opt("--iters", "optimizer steps in all (one window each)", type=positive_int)
    opt("--lr", "peak learning rate (AdamW)", type=positive_float)
    opt("--warmup", "linear warmup steps", type=non_negative_int)
    opt("--schedule", "learning-rate schedule after warmup", choices=("cosine", "constant"))
    opt("--min-lr-ratio", "cosine floor as a fraction of --lr", type=non_negative_float)
    opt("--weight-decay", "decoupled weight decay on matrices", type=non_negative_float)
    opt("--clip", "clip the global gradient norm to this, 0: off", type=non_negative_float)
    opt("--dtype", "autocast: auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16", choices=DTYPES)
    opt("--eval-every", "validate every this many steps", type=positive_int)
    opt("--eval-windows", "validate on the first this many held-out windows, 0: all", type=non_negative_int)
    opt("--val-fraction", "fraction of the text held out, the end, for validation",
        type=flag_type(_fraction, "fraction"))
    opt("--seed", "seed of the initial weights, dropout and sampling", type=seed_int)
    opt("--device", "cpu, cuda, cuda:N or auto")
    opt("--out", "output folder")
    opt("--resume", "continue the run in this folder from its newest complete checkpoint (the corpus, vocabulary, "
        "model shape, window and batch cannot change)")
    opt("--prompts", "after training, continue these prompts, one per line", none="three Dracula openings")
    opt("--max-length", "characters per sample, prompt included", type=positive_int)
    opt("--num-return-sequences", "samples per prompt", type=positive_int)
    opt("--temperature", "sampling temperature", type=positive_float)
    opt("--top-k", "sample from the k likeliest characters, 0: all", type=non_negative_int)
    opt("--save-every", "a checkpoint unit every this many steps, and at the end", type=positive_int)
    opt("--keep-last", "checkpoint units kept (the newest)", type=positive_int)
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="a fresh run may replace the outputs of the run already in --out (default: refuse a "
                        "non-empty --out)")
    return p


def _fraction(text) -> float:
    value = _unit_interval(text)
    if value == 0:
        raise ValueError(f"expected a number in (0, 1), got {text!r}")
    return value


def parse(argv) -> tuple[LSTMConfig, dict, str | None, bool]:
    """(config, the flags given, the folder to resume or None, overwrite?) from the command line."""
    flags = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    preset, overwrite, resume = flags.pop("preset", None), bool(flags.pop("overwrite", False)), flags.pop("resume",
                                                                                                          None)
    if overwrite and resume:
        raise ValueError("--overwrite is for a fresh run; a resumed run continues its own folder")
    if preset and resume:
        raise ValueError("--preset is for a fresh run; a resumed run keeps its own settings")
    return LSTMConfig(**{**PRESETS.get(preset, {}), **flags}), flags, resume, overwrite


def _print_step(run, record):
    every = max(1, run.config.iters // 20)
    if record["step"] % every == 0 or record["step"] == run.config.iters:
        evals = run.evals()
        val = f"  val {evals[-1]['val_bpc']:.3f} bpc" if evals and evals[-1]["step"] == record["step"] else ""
        print(f"step {record['step']:>5}/{run.config.iters}  {record['bpc']:.3f} bpc  "
              f"{record['tokens_per_s']:,.0f} chars/s{val}", flush=True)


def print_summary(s: dict):
    print(f"\n{s['status']}: {s['steps']} steps on {s['device']} ({s['backend']} LSTM, {s['parameters']:,} "
          f"parameters), {s['seconds']:.0f} s")
    if s["val_bpc_start"] is not None:
        print(f"validation bits per character: {s['val_bpc_start']:.3f} at the start -> {s['val_bpc_end']:.3f} at "
              f"the end (unigram entropy of the corpus: {s['unigram_bits']:.3f})")
    out = Path(s["out"])
    print(f"outputs in {out}/: {' '.join(f for f in FILES if (out / f.rstrip('/')).exists())}")


def main(argv=None) -> int:
    prog = "leanfit lstm"
    try:
        config, flags, resume, overwrite = parse(argv)
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
            s = run(config, overwrite=overwrite, resume=resume, flags=flags, on_step=_print_step)
    except ValueError as e:
        return fail(prog, e)
    except (FloatingPointError, SaveError) as e:
        fail(prog, e)
        return 1
    print_summary(s)
    samples = (Path(s["out"]) / "samples.md")
    if samples.is_file():
        print("\n" + samples.read_text(encoding="utf-8").split("\n## ", 2)[1].strip()[:600])
    return 130 if s["status"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
