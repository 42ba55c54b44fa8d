"""The `leanfit finetune` command line: its flags (one per `TrainConfig` field) and what it prints."""

import os
from pathlib import Path

from . import config as cfg
from .cli_cache import CACHE_HELP
from .cli_common import (
    OneLineParser,
    dtype_flag,
    flag_type,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)
from .gpus import GPUS, gpu_card
from .outputs import FILES
from .settings import merge_settings
from .units import parse_bytes

__all__ = ["build_parser", "parse_args", "print_summary", "print_dry_run"]

LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def _block_size(text) -> int:
    value = int(text) if text.strip().isdigit() else 0
    if value < 2:
        raise ValueError(f"expected an integer >= 2 (tokens per sequence), got {text!r}")
    return value


def _size(text) -> str:
    parse_bytes(text)
    return text


def build_parser() -> OneLineParser:
    d = cfg.TrainConfig()
    p = OneLineParser(prog="leanfit finetune",
                      description="Fine-tune a causal LM on a text corpus, then sample from it.", epilog=CACHE_HELP)
    add = p.add_argument

    def opt(flag, help_, **kw):
        name = flag.lstrip("-").replace("-", "_")
        default = getattr(d, name)
        shown = kw.pop("none", "none") if default is None else default
        add(flag, default=None, help=f"{help_} (default: {shown})", **kw)

    opt("--model", "hub id, checkpoint folder, or smollm2-135m (the embedded SmolLM2-135M-Instruct)")
    opt("--corpus", "a .txt file or a folder of them", none="the embedded Dracula")
    opt("--encoding", "the corpus encoding")
    add("--preset", choices=sorted(cfg.PRESETS),
        help="start from a run preset of train/config.py; other flags override it (default: none)")
    opt("--block-size", "tokens per sequence, as the model sees them", type=flag_type(_block_size, "block size"))
    opt("--batch-size", "sequences per micro-batch", type=positive_int)
    opt("--grad-accum", "micro-batches per optimizer step", type=positive_int)
    opt("--iters", "optimizer steps in all", type=positive_int)
    opt("--lr", "peak learning rate", type=positive_float)
    opt("--warmup", "linear warmup steps", type=non_negative_int)
    opt("--schedule", "learning-rate schedule after warmup", choices=cfg.CHOICES["schedule"])
    opt("--min-lr-ratio", "cosine floor as a fraction of --lr", type=non_negative_float)
    opt("--weight-decay", "decoupled weight decay on matrices", type=non_negative_float)
    opt("--clip", "clip the global gradient norm to this, 0: off", type=non_negative_float)
    opt("--optimizer", "the optimizer", choices=cfg.CHOICES["optimizer"])
    opt("--dtype", "autocast dtype: fp32 (none), bf16 (needs compute capability >= 8.0), fp16 (adds a gradient "
        "scaler); float32, bfloat16, float16 also accepted", type=dtype_flag)
    opt("--loss", "loss: chunked/triton/auto (linear cross-entropy), naive (full logits), hf (the model's own)",
        choices=cfg.CHOICES["loss"])
    add("--grad-checkpointing", action="store_true", default=None,
        help="recompute activations in the backward (default: off)")
    opt("--eval-every", "validate every this many steps", type=positive_int)
    opt("--eval-blocks", "validate on the first this many held-out blocks, 0: all", type=non_negative_int)
    opt("--val-fraction", "fraction of blocks held out, last ones, for validation", type=non_negative_float)
    opt("--seed", "seed of the initial RNG, the data order and sampling", type=seed_int)
    opt("--device", "cpu, cuda, cuda:N or auto")
    opt("--out", "output folder")
    opt("--resume", "continue the run in this folder from its newest complete checkpoint, which gives every "
        "setting not passed here (the model, corpus and block size cannot change)")
    opt("--prompts", "after training, sample continuations of these prompts, one per line",
        none="the embedded prompts")
    opt("--max-length", "tokens per sample, prompt included", type=positive_int)
    opt("--num-return-sequences", "samples per prompt", type=positive_int)
    opt("--eval-contexts", "a/an probe before and after training: held-out contexts per article, 0: built-in only",
        type=non_negative_int)
    add("--no-eval-study", dest="eval_study", action="store_false", default=None,
        help="skip the prompt study (distinct-n, log-likelihood, theme share) before and after training")
    opt("--memory-budget", "fit this size (e.g. 15GiB): the estimate picks the micro-batch, accumulation "
        "(same tokens per step), chunked loss, checkpointing, autocast; on CUDA it also caps the allocator",
        type=flag_type(_size, "size"))
    opt("--save-every", "a checkpoint unit every this many steps (500) or minutes (10min), and at the end")
    opt("--keep-last", "checkpoint units kept (the newest)", type=positive_int)
    add("--overwrite", action="store_true", default=None,
        help="a fresh run may replace the outputs of the run already in --out (default: refuse a non-empty --out)")
    add("--dry-run", action="store_true", default=None,
        help="print the memory plan (estimate, or the --memory-budget choice) and stop: no weights, no output")
    add("--memory-snapshot", action="store_true", default=None,
        help="CUDA: record the allocator history into memory_snapshot.pickle (pytorch.org/memory_viz)")
    add("--optimizer-in-backward", action="store_true", default=None,
        help="step each parameter in the backward and free its gradient; needs --grad-accum 1 and --clip 0")
    add("--lora", action="store_true", default=None,
        help="train LoRA adapters (PEFT) on the frozen base, held in --dtype (default: off, a full fine-tune)")
    opt("--lora-rank", "LoRA: the adapters' rank r", type=positive_int)
    opt("--lora-alpha", "LoRA: the adapters' output is scaled by alpha / r", type=positive_float)
    opt("--lora-dropout", "LoRA: dropout on each adapter's input, in [0, 1)", type=non_negative_float)
    opt("--lora-targets", "LoRA: module names to adapt, comma-separated (e.g. q_proj,v_proj), or all-linear for "
        "every linear layer but the head")
    add("--qlora", action="store_true", default=None,
        help="LoRA on a 4-bit NF4 base (bitsandbytes; CUDA only) (default: off)")
    opt("--parallel", "under torchrun: ddp (a replica per rank) or fsdp2 (parameters, gradients and optimizer state "
        "sharded over the ranks); --batch-size is then per rank, a step takes batch x grad-accum x ranks sequences",
        choices=cfg.CHOICES["parallel"])
    opt("--gpu", f"the card this runs on ({', '.join(GPUS)}; `leanfit info --gpu` lists them): its usable memory "
        "is the default --memory-budget, its dtypes and attention kernel shape the plan, and a run on another "
        "card is refused", type=flag_type(lambda text: gpu_card(text).name, "gpu"))
    return p


def parse_args(argv) -> tuple[cfg.TrainConfig, bool, bool]:
    """(the run's config, dry run?, overwrite?) from the command line; ValueError on a bad combination."""
    flags = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    preset = flags.pop("preset", None)
    dry_run = bool(flags.pop("dry_run", False))
    overwrite = bool(flags.pop("overwrite", False))
    if overwrite and flags.get("resume"):
        raise ValueError("--overwrite is for a fresh run; a resumed run continues its own folder")
    given = [f"--{k.replace('_', '-')}" for k in LORA_OPTIONS if k in flags]
    if given and not (flags.get("lora") or flags.get("qlora") or flags.get("resume")):
        raise ValueError(f"{', '.join(given)}: LoRA options, expected --lora or --qlora with them")
    return merge_settings(flags, preset), dry_run, overwrite


def print_summary(s: dict):
    out = Path(s["out"])
    print(f"\n{s['status']}: {s['steps']} steps on {s['device']}, {s['seconds']:.0f} s")
    if s["val_ppl_start"] is not None:
        print(f"validation perplexity: {s['val_ppl_start']:.2f} at the start -> {s['val_ppl_end']:.2f} at the end")
    written = [f for f in FILES.get(s["status"], ()) if os.path.lexists(out / f.rstrip("/"))]
    print(f"outputs in {out}/: {' '.join(written)}")


def print_dry_run(s: dict):
    c = s["config"]
    lora = f", {'QLoRA' if c['qlora'] else 'LoRA'} rank {c['lora_rank']} on {c['lora_targets']}" if c["lora"] else ""
    print(f"dry run: nothing loaded or written; the run would use micro-batch {c['batch_size']} x "
          f"{c['block_size']} tokens, grad-accum {c['grad_accum']}, loss {c['loss']}, dtype {c['dtype']}, "
          f"grad checkpointing {'on' if c['grad_checkpointing'] else 'off'}, optimizer in backward "
          f"{'on' if c['optimizer_in_backward'] else 'off'}{lora}")
