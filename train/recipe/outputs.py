"""What a fine-tuning run writes into its folder: one writer per file, and which files each ending writes.

`write_outputs(ctx, status)` writes the files of a "complete", an "interrupted" or an "out of memory" run;
`FILES[status]` names them. Each writer replaces its file atomically (train/checkpointing/atomic.py); the checkpoint is
one unit with everything a resume needs (train/checkpointing/checkpoint.py).
"""

import json
import time
from pathlib import Path

from .. import config as cfg
from ..checkpointing.atomic import atomic_path, atomic_write_json, atomic_write_text
from ..checkpointing.checkpoint import EXPORT, UNITS, save_unit
from ..evaluation.evaluate import finetune_eval_after
from ..evaluation.generate import DEFAULT_PROMPTS, format_samples, generate_texts, read_prompts
from ..evaluation.report import write_report
from ..model.lora import MERGED, export_merged
from .context import train_state

__all__ = ["WRITERS", "FILES", "RUN_SCHEMA", "OWN_FILES", "write_outputs", "summary", "write_metrics",
           "write_run_json", "write_unit"]

RUN_SCHEMA = "leanfit.run/1"


def write_metrics(ctx):
    atomic_write_text(ctx.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in ctx.metrics))


def write_loss_plot(ctx):
    import matplotlib  # deferred: matplotlib takes a second to import and only this writer needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in ctx.metrics if m["kind"] == "train"]
    evals = ctx.evals()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss", lw=1)
    ax.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean token cross-entropy (nats)")
    ax.set_title(f"{ctx.config.model} on {Path(ctx.corpus_info['path']).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(ctx.out / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_unit(ctx):
    """A checkpoint unit of the current step (`checkpoints/step-NNNNNN`), and `checkpoint` pointing at it."""
    save_unit(ctx.out, ctx.model, ctx.tokenizer, train_state(ctx), keep_last=ctx.config.keep_last)
    ctx.last_save = time.time()


def write_merged(ctx):
    """LoRA: `merged/`, the newest unit's adapter merged into its base, a plain HF checkpoint."""
    if ctx.config.lora:
        export_merged(ctx.out / EXPORT, ctx.out / MERGED, ctx.config.dtype)


def write_samples(ctx):
    c = ctx.config
    prompts = read_prompts(c.prompts or DEFAULT_PROMPTS)
    results = generate_texts(ctx.model, ctx.tokenizer, prompts, max_length=c.max_length,
                             num_return_sequences=c.num_return_sequences, seed=c.seed)
    ctx.samples = [{"prompt": p, "samples": r} for p, r in zip(prompts, results, strict=True)]
    atomic_write_text(ctx.out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n"
                                                         for s in ctx.samples))
    header = f"# Samples after {ctx.step} steps of {c.model}\n\nmax_length {c.max_length}, seed {c.seed}\n\n"
    atomic_write_text(ctx.out / "samples.md", header + format_samples(prompts, results))


def summary(ctx) -> dict:
    evals = ctx.evals()
    c = ctx.config
    return {
        "status": ctx.status,
        "out": str(ctx.out),
        "steps": ctx.step,
        "val_ppl_start": evals[0]["val_ppl"] if evals else None,
        "val_ppl_end": evals[-1]["val_ppl"] if evals else None,
        "val_loss_start": evals[0]["val_loss"] if evals else None,
        "val_loss_end": evals[-1]["val_loss"] if evals else None,
        "val_step_end": evals[-1]["step"] if evals else None,
        "tokens_per_step": c.batch_size * c.block_size * c.grad_accum,
        "device": str(ctx.device),
        "corpus": ctx.corpus_info,
        "seconds": time.time() - ctx.started,
    }


def write_run_json(ctx):
    """run.json, flushed to the disk; `outputs` lists the top-level files this ending writes (what a later
    --overwrite may remove; the units are proven by their manifests)."""
    outputs = ["run.json", *(f.rstrip("/") for f in FILES.get(ctx.status, ()) if f.rstrip("/") not in (UNITS, EXPORT))]
    atomic_write_json(ctx.out / "run.json", {"schema": RUN_SCHEMA, "run_id": ctx.run_id,
                                             "config": cfg.to_dict(ctx.config), "summary": summary(ctx),
                                             "resumes": ctx.resumes, "outputs": outputs}, sync=True)


def write_memory_report(ctx):
    """memory_report.json and memory.png (and, with --memory-snapshot on CUDA, memory_snapshot.pickle)."""
    if ctx.profiler is not None:
        ctx.profiler.save(str(ctx.out))
        ctx.profiler.stop_snapshot()


def write_eval_after(ctx):
    """eval_after.json (and perplexity into eval_before.json), then report.md and report.html."""
    finetune_eval_after(ctx, heldout_per_article=ctx.config.eval_contexts, study=ctx.config.eval_study)


def write_reports(ctx):
    write_report(ctx.out)


_CORE = (write_metrics, write_loss_plot, write_unit)
WRITERS = {
    "complete": (*_CORE, write_merged, write_samples, write_run_json, write_memory_report, write_eval_after),
    "interrupted": (*_CORE, write_merged, write_run_json, write_memory_report, write_reports),
    "out of memory": (*_CORE, write_run_json),  # the memory report is written where the OOM is caught
}
_FILES = {
    write_metrics: ("metrics.jsonl",), write_loss_plot: ("loss.png",), write_unit: (f"{UNITS}/", EXPORT),
    write_merged: (f"{MERGED}/",),
    write_samples: ("samples.md", "samples.jsonl"),
    write_run_json: ("run.json",), write_memory_report: ("memory_report.json", "memory.png"),
    write_eval_after: ("eval_before.json", "eval_after.json", "report.md", "report.html"),
    write_reports: ("report.md", "report.html"),
}
FILES = {status: tuple(dict.fromkeys(f for w in writers for f in _FILES[w])) for status, writers in WRITERS.items()}
# What --overwrite may replace: a run's own outputs, nothing else (train_state.pt: an older leanfit's state file).
OWN_FILES = ("run.json", *dict.fromkeys(f.rstrip("/") for names in _FILES.values() for f in names),
             "memory_snapshot.pickle", "train_state.pt")


def write_outputs(ctx, status: str, writers: dict | None = None):
    """Sets `ctx.status` and writes the files of a run that ended so (`writers` overrides `WRITERS` per status)."""
    ctx.status = status
    for writer in ctx.parallel.order((writers or {}).get(status, WRITERS[status])):
        ctx.parallel.call(writer, ctx)
