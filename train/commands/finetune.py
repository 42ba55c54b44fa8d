"""`leanfit finetune`: its flags (one per `TrainConfig` field), what it prints, and `main` (also under torchrun)."""

import os
import sys
import warnings
from pathlib import Path

from .. import config as cfg
from ..checkpointing.checkpoint import SaveError
from ..gpus import GPUS, gpu_card
from ..recipe.distributed import close_process_group
from ..recipe.finetune import OutOfMemory, run
from ..recipe.outputs import FILES
from ..recipe.settings import ResumePoint, merge_settings
from ..units import parse_bytes
from .cache import CACHE_HELP
from .common import (
    OneLineParser,
    dtype_flag,
    fail,
    flag_type,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)

__all__ = ["build_parser", "parse_args", "print_summary", "print_dry_run", "main", "rank_main"]

LORA_OPTIONS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
PATH_FLAGS = ("out", "resume", "corpus", "prompts", "model")  # "~/runs/a" is the home folder's, not a folder "~"


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
    config, _, dry_run, overwrite = parse(argv)
    return config, dry_run, overwrite


def parse(argv) -> tuple[cfg.TrainConfig, ResumePoint | None, bool, bool]:
    """(the run's config, its resume point, dry run?, overwrite?) from the command line."""
    flags = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    flags.update({k: os.path.expanduser(flags[k]) for k in PATH_FLAGS if k in flags})
    preset = flags.pop("preset", None)
    dry_run = bool(flags.pop("dry_run", False))
    overwrite = bool(flags.pop("overwrite", False))
    if overwrite and flags.get("resume"):
        raise ValueError("--overwrite is for a fresh run; a resumed run continues its own folder")
    given = [f"--{k.replace('_', '-')}" for k in LORA_OPTIONS if k in flags]
    if given and not (flags.get("lora") or flags.get("qlora") or flags.get("resume")):
        raise ValueError(f"{', '.join(given)}: LoRA options, expected --lora or --qlora with them")
    return *merge_settings(flags, preset), dry_run, overwrite


def print_summary(s: dict):
    out = Path(s["out"])
    print(f"\n{s['status']}: {s['steps']} steps on {s['device']}, {s['seconds']:.0f} s")
    if s["val_ppl_start"] is not None:
        end = "at the end" if s.get("val_step_end") == s["steps"] else f"at step {s.get('val_step_end')}"
        print(f"validation perplexity: {s['val_ppl_start']:.2f} at the start -> {s['val_ppl_end']:.2f} {end}")
    written = [f for f in FILES.get(s["status"], ()) if os.path.lexists(out / f.rstrip("/"))]
    print(f"outputs in {out}/: {' '.join(written)}")


def print_dry_run(s: dict):
    c = s["config"]
    lora = f", {'QLoRA' if c['qlora'] else 'LoRA'} rank {c['lora_rank']} on {c['lora_targets']}" if c["lora"] else ""
    print(f"dry run: nothing loaded or written; the run would use micro-batch {c['batch_size']} x "
          f"{c['block_size']} tokens, grad-accum {c['grad_accum']}, loss {c['loss']}, dtype {c['dtype']}, "
          f"grad checkpointing {'on' if c['grad_checkpointing'] else 'off'}, optimizer in backward "
          f"{'on' if c['optimizer_in_backward'] else 'off'}{lora}")


def rank_main(main):
    """Runs `main()` in a process torchrun started and ends the process with its exit code; any error `main`
    lets through becomes one line on stderr (the traceback goes to torchrun's error file) and exit code 1.

    The process ends by `os._exit` once its streams are flushed and its process group is destroyed: collective
    work objects that Python would free while the interpreter shuts down can abort the process there (SIGABRT),
    which torchrun reports as a failed rank. Without torchrun it returns `main()`.
    """
    if "LOCAL_RANK" not in os.environ:
        return main()
    try:
        code = main()
    except Exception as e:  # noqa: BLE001 - every error of a rank becomes its one line and its exit code
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler  # deferred: on failure only

            ErrorHandler().record_exception(e)
        fail("leanfit finetune", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        code = 1
    else:
        close_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    prog = "leanfit finetune"
    try:
        config, point, dry_run, overwrite = parse(argv)
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
            s = run(config, dry_run=dry_run, overwrite=overwrite, resume=point)
    except ValueError as e:
        return fail(prog, e)
    except (FloatingPointError, OutOfMemory, SaveError) as e:
        fail(prog, e)
        return 1
    except KeyboardInterrupt:
        fail(prog, KeyboardInterrupt("interrupted (the newest complete checkpoint, if any, is kept; --resume "
                                     "continues from it)"))
        return 130
    if s["status"] == "dry-run":
        print_dry_run(s)
        return 0
    print_summary(s)
    return 130 if s["status"] == "interrupted" else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(rank_main(main))
