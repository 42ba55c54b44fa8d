"""What `leanfit lstm` writes, and `run`, which ties the checks, the loop and the writers together.

The folder holds the same files as a `finetune` run: metrics.jsonl, loss.png, run.json, checkpoints/ and the
checkpoint link (checkpointing/checkpoint.py units: model.safetensors, config.json, vocab.json, train_state),
samples.md and samples.jsonl, memory_report.json and memory.png (memory/profiler.py), report.md and report.html
(evaluation/report.py). Every file is replaced atomically.
"""

import json
import shutil
import time
from pathlib import Path

import torch

from ..checkpointing.atomic import atomic_path, atomic_write_json, atomic_write_text
from ..checkpointing.checkpoint import EXPORT, UNITS, clean_stale, remove_unit_outputs, save_unit
from ..evaluation.report import (
    fmt,
    loss_blocks,
    memory_blocks,
    read_run,
    run_settings,
    samples_blocks,
    setting,
    write_blocks,
)
from ..memory.profiler import MemoryProfiler
from .config import LSTMConfig, to_dict
from .loop import Run, build, eval_record, prepare, sample, train, train_state

__all__ = ["run", "summary", "FILES", "RUN_SCHEMA"]

RUN_SCHEMA = "leanfit.lstm-run/1"
FILES = ("metrics.jsonl", "loss.png", "run.json", f"{UNITS}/", EXPORT, "samples.md", "samples.jsonl",
         "memory_report.json", "memory.png", "report.md", "report.html")


def clear_outputs(out: Path):
    """--overwrite: removes a previous run's own files from `out`, nothing else."""
    remove_unit_outputs(out)
    for name in FILES:
        path = out / name.rstrip("/")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_file() or path.is_symlink():
            path.unlink()


def write_metrics(run: Run):
    atomic_write_text(run.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in run.metrics))


def write_loss_plot(run: Run):
    import matplotlib  # deferred: matplotlib takes a second to import and only this writer needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m for m in run.metrics if m["kind"] == "train"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in steps], [m["bpc"] for m in steps], label="train", lw=1)
    ax.plot([m["step"] for m in run.evals()], [m["val_bpc"] for m in run.evals()], "o-", label="validation")
    ax.axhline(run.corpus_info["unigram_bits"], color="gray", ls="--", label="unigram entropy")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per character")
    ax.set_title(f"LSTM {run.config.layers} x {run.config.hidden} on {Path(run.corpus_info['path']).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(run.out / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_unit(run: Run):
    save_unit(run.out, run.model, run.vocab, train_state(run), keep_last=run.config.keep_last)


def write_samples(run: Run):
    c = run.config
    gen = torch.Generator().manual_seed(c.seed)
    run.samples = [{"prompt": p, "samples": [sample(run.model, run.vocab, p, c.max_length, c.temperature, c.top_k,
                                                    gen) for _ in range(c.num_return_sequences)]}
                   for p in run.prompts]
    atomic_write_text(run.out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n"
                                                         for s in run.samples))
    lines = [f"# Samples after {run.step} steps\n", f"temperature {c.temperature}, top-k {c.top_k or 'all'}, "
             f"{c.max_length} characters, seed {c.seed}\n"]
    for s in run.samples:
        lines += [f"## {s['prompt']!r}\n"] + [f"```\n{t}\n```\n" for t in s["samples"]]
    atomic_write_text(run.out / "samples.md", "\n".join(lines))


def summary(run: Run) -> dict:
    evals = run.evals()
    return {"status": run.status, "out": str(run.out), "steps": run.step, "device": str(run.device),
            "backend": run.backend, "parameters": sum(p.numel() for p in run.model.parameters()),
            "unigram_bits": run.corpus_info["unigram_bits"],
            "val_bpc_start": evals[0]["val_bpc"] if evals else None,
            "val_bpc_end": evals[-1]["val_bpc"] if evals else None,
            "seconds": time.time() - run.started, "corpus": run.corpus_info}


def write_run_json(run: Run):
    atomic_write_json(run.out / "run.json", {"schema": RUN_SCHEMA, "run_id": run.run_id,
                                             "config": to_dict(run.config), "summary": summary(run),
                                             "resumes": run.resumes})


def write_memory(run: Run):
    if run.profiler is not None:
        run.profiler.close()
        run.profiler.save(str(run.out))


def _bpc_blocks(run: Run) -> list:
    rows = [[m["step"], fmt(m["val_bpc"])] for m in run.evals()]
    text = (f"Unigram entropy of the training text: {run.corpus_info['unigram_bits']:.3f} bits per character "
            f"({run.corpus_info['vocab_size']} symbols); a model that learned nothing beyond letter frequencies "
            f"scores that.")
    return [("h2", "Bits per character"), ("p", text), ("table", ["step", "validation bits per character"], rows)]


def write_report(run: Run):
    files = read_run(run.out)
    config = run_settings(files["config"])
    blocks = [("h1", f"LSTM language model: {run.out.name}"), ("h2", "Configuration"),
              ("table", ["setting", "value"], [[k, setting(v)] for k, v in config.items()])]
    blocks += _bpc_blocks(run) + loss_blocks(files) + memory_blocks(files)
    blocks += samples_blocks([], [("after training", files["samples"])])
    write_blocks(run.out, blocks, f"leanfit lstm: {run.out.name}")


WRITERS = (write_metrics, write_loss_plot, write_unit, write_samples, write_run_json, write_memory, write_report)


def _save(run: Run):
    write_unit(run)
    write_metrics(run)


def run(config: LSTMConfig, overwrite: bool = False, resume: str | None = None, flags: dict | None = None,
        on_step=None) -> dict:
    """Checks, trains, writes every file; returns `summary`. ValueError (before anything is written) for bad
    input. Ctrl-C (or SIGTERM) stops after the current step and saves a unit and the files of an interrupted run
    (no samples)."""
    r = prepare(config, overwrite, resume, flags)
    if resume is None and overwrite and r.out.is_dir():
        clear_outputs(r.out)
    r.out.mkdir(parents=True, exist_ok=True)
    clean_stale(r.out)
    build(r)
    if not r.evals():
        r.metrics.append(eval_record(r))
    if r.resume_state is None:
        write_run_json(r)
    r.profiler = MemoryProfiler(r.model, r.optimizer, r.device, out_dir=str(r.out))
    r.status = train(r, _save, on_step or (lambda run, record: None))
    writers = WRITERS[1:] if r.status == "complete" else (write_loss_plot, write_run_json, write_memory, write_report)
    for writer in writers:
        writer(r)
    return summary(r)
