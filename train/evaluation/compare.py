"""The comparison report: several runs side by side (the learning-rate pitfall) in one report.md / report.html.

Configuration differences, overlaid loss curves, perplexity and the probe before and after, and samples; the
blocks and their rendering are report.py's.
"""

import json
from pathlib import Path

from ..checkpointing.atomic import atomic_path
from .report import (
    eval_blocks,
    eval_points,
    flatten,
    fmt,
    read_run,
    samples_blocks,
    setting,
    study_blocks,
    train_points,
    write_blocks,
)

__all__ = ["write_comparison_report"]


def _comparison_plot(runs, path):
    import matplotlib  # deferred: matplotlib takes a second to import and only the comparison plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, run in runs.items():
        train, evals = train_points(run["metrics"]), eval_points(run["metrics"])
        if train:
            line, = ax.plot(*zip(*train), label=f"{label} train", alpha=0.8)
            if evals:
                ax.plot(*zip(*evals), "o--", color=line.get_color(), label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_comparison_report(out_dir, runs):
    """Writes report.md and report.html in `out_dir` comparing several runs (e.g. two learning rates).

    Args:
        out_dir: where the report goes (created if missing).
        runs: {label: run folder}, in display order; each run folder as `finetune --out` leaves it.

    Returns:
        (md_path, html_path).

    Example:
        >>> write_comparison_report("runs/lr", {"lr 5e-5": "runs/lr-5e-5", "lr 1e-2": "runs/lr-1e-2"})
    """
    if not runs:
        raise ValueError("expected at least one run to compare, got none")
    loaded = {}
    for label, run_dir in runs.items():
        if not Path(run_dir).is_dir():
            raise ValueError(f"run {label!r}: expected a run folder, got {str(run_dir)!r} which is not a folder")
        loaded[label] = read_run(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = [("h1", "Run comparison: " + ", ".join(loaded))]
    configs = {k: flatten((r["config"] or {}).get("config", r["config"])) for k, r in loaded.items()}
    keys = list(dict.fromkeys(k for c in configs.values() for k in c))
    differ = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs.values()}) > 1]
    blocks += [("h2", "Configuration differences"),
               ("table", ["setting"] + list(loaded), [[k] + [setting(configs[r].get(k)) for r in loaded]
                                                     for k in differ]) if differ
               else ("p", "The runs share their configuration.")]
    blocks.append(("h2", "Loss curves"))
    if any(train_points(r["metrics"]) for r in loaded.values()):
        plot = out_dir / "comparison_loss.png"
        _comparison_plot(loaded, plot)
        blocks.append(("img", plot, "training and validation loss of each run"))
        rows = []
        for label, r in loaded.items():
            train, evals = train_points(r["metrics"]), eval_points(r["metrics"])
            rows.append([label, fmt(train[0][1]) if train else "-", fmt(train[-1][1]) if train else "-",
                         fmt(evals[-1][1]) if evals else "-"])
        blocks.append(("table", ["run", "first train loss", "last train loss", "last validation loss"], rows))
    first = next(iter(loaded.values()))
    labelled = [("before (pretrained)", first["before"])] + [(f"after, {k}", r["after"]) for k, r in loaded.items()]
    blocks += eval_blocks(labelled)
    blocks += study_blocks(labelled)
    blocks += samples_blocks(labelled, [(f"after, {k}", r["samples"]) for k, r in loaded.items()])
    return write_blocks(out_dir, blocks, "leanfit run comparison")
