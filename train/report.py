"""The run report: `report.md` (for a terminal) and `report.html` (for a browser, PNGs inlined), no server.

`write_report(out_dir)` reads what `finetune` left in `out_dir`, each part optional:
run.json (configuration), metrics.jsonl and loss.png (loss curves), memory_report.json and memory.png
(memory), eval_before.json and eval_after.json (`evaluate.evaluate_model` results: perplexity, the
a/an probe, prompt studies), samples.jsonl (generations after training).

`write_comparison_report(out_dir, runs)` puts several runs side by side (the learning-rate pitfall):
configuration differences, overlaid loss curves, perplexity and the probe before and after, and samples.

Both build one list of blocks (heading, paragraph, table, image, preformatted text) and render it twice.
"""

import base64
import html
import json
import sys
from pathlib import Path

from .atomic import atomic_path, atomic_write_text
from .cli_common import OneLineParser, fail
from .units import format_bytes

__all__ = ["write_report", "write_comparison_report", "read_run"]

SAMPLES_SHOWN = 5


def _parse(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _read_json(path):
    path = Path(path)
    return _parse(path, path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_jsonl(path):
    path = Path(path)
    if not path.is_file():
        return []
    return [_parse(path, line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_run(run_dir):
    """Loads the files of one run folder into a dict; a missing file gives None (or [] for .jsonl)."""
    d = Path(run_dir)
    return {
        "dir": d,
        "config": _read_json(d / "run.json"),
        "metrics": _read_jsonl(d / "metrics.jsonl"),
        "memory": _read_json(d / "memory_report.json"),
        "before": _read_json(d / "eval_before.json"),
        "after": _read_json(d / "eval_after.json"),
        "samples": _read_jsonl(d / "samples.jsonl"),
        "loss_png": d / "loss.png" if (d / "loss.png").is_file() else None,
        "memory_png": d / "memory.png" if (d / "memory.png").is_file() else None,
    }


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.3e}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value)


def _flat(d, prefix=""):
    out = {}
    for key, value in (d or {}).items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _run_settings(run_json):
    """run.json flattened: finetune's {"config": ..., "summary": ...} gives config keys bare, then summary.*."""
    if not run_json:
        return {}
    if isinstance(run_json.get("config"), dict):
        rest = {k: v for k, v in run_json.items() if k != "config"}
        return {**_flat(run_json["config"]), **_flat(rest)}
    return _flat(run_json)


def _setting(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return _fmt(value)


def _train_points(metrics):
    return [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m and "val_loss" not in m]


def _eval_points(metrics):
    return [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m and "step" in m]


def _loss_blocks(run):
    blocks = [("h2", "Loss curves")]
    train, evals = _train_points(run["metrics"]), _eval_points(run["metrics"])
    if train:
        steps = [m for m in run["metrics"] if "loss" in m and "val_loss" not in m]
        rates = [m["tokens_per_s"] for m in steps if isinstance(m.get("tokens_per_s"), (int, float))]
        blocks.append(("p", f"{len(train)} training steps; loss {train[0][1]:.4f} at step {train[0][0]} -> "
                            f"{train[-1][1]:.4f} at step {train[-1][0]}"
                            + (f"; mean {sum(rates) / len(rates):,.0f} tokens/s" if rates else "") + "."))
    if evals:
        blocks.append(("table", ["step", "validation loss", "validation perplexity"],
                       [[s, _fmt(v), _fmt(2.718281828459045 ** v)] for s, v in evals]))
    if run["loss_png"]:
        blocks.append(("img", run["loss_png"], "training and validation loss"))
    if len(blocks) == 1:
        blocks.append(("p", "No metrics.jsonl or loss.png in this run."))
    return blocks


def _bytes(n):
    return format_bytes(n) if isinstance(n, (int, float)) else _fmt(n)


def _memory_blocks(run):
    if run["memory"] is None and run["memory_png"] is None:
        return []
    blocks = [("h2", "Memory")]
    memory = run["memory"] or {}
    peak = memory.get("peak")
    if isinstance(peak, dict) and isinstance(peak.get("breakdown"), dict):
        total = peak.get("bytes") or 1
        blocks.append(("p", f"Peak {_bytes(peak.get('bytes'))} on {memory.get('device', '?')} at step "
                            f"{peak.get('step', '?')}, phase {peak.get('phase', '?')}; process peak RSS "
                            f"{_bytes(memory.get('rss_peak_bytes'))}."))
        blocks.append(("table", ["at the peak", "memory", "share"],
                       [[k, _bytes(v), f"{100 * v / total:.1f}%"] for k, v in peak["breakdown"].items()]))
        phases = memory.get("phases") or {}
        if phases:
            blocks.append(("table", ["phase", "peak", "reserved peak"],
                           [[k, _bytes(v.get("peak_bytes")), _bytes(v.get("reserved_peak_bytes"))]
                            for k, v in phases.items() if isinstance(v, dict)]))
        if peak.get("top_modules"):
            blocks.append(("table", ["module at the peak", "memory"],
                           [[m[0], _bytes(m[1])] for m in peak["top_modules"][:8]]))
    elif memory:
        scalars = _flat({k: v for k, v in memory.items() if not isinstance(v, list)})
        blocks.append(("table", ["quantity", "value"], [[k, _fmt(v)] for k, v in scalars.items()]))
    if run["memory_png"]:
        blocks.append(("img", run["memory_png"], "memory over steps and the breakdown at the peak"))
    return blocks


def _probe_cells(probe):
    if probe is None:
        return ["-"] * 5
    return [_fmt(probe["balanced_accuracy"]), _fmt(probe["a"]["accuracy"]), _fmt(probe["an"]["accuracy"]),
            _fmt(probe["a"]["mean_mass_correct"]), _fmt(probe["an"]["mean_mass_correct"])]


PROBE_COLS = ["balanced acc.", "acc. after a", "acc. after an", "mass correct (a)", "mass correct (an)"]


def _eval_blocks(labelled):
    """Perplexity and probe tables for [(label, evaluate_model result or None)]."""
    labelled = [(k, r) for k, r in labelled if r is not None]
    if not labelled:
        return [("h2", "Perplexity"), ("p", "No eval_before.json or eval_after.json in this run.")]
    blocks = [("h2", "Perplexity"),
              ("table", ["model", "validation perplexity", "loss (nats/token)", "tokens"],
               [[k, _fmt(r["perplexity"]), _fmt(r["val_loss"]), _fmt(r["val_tokens"])] for k, r in labelled])]
    first, last = labelled[0][1]["perplexity"], labelled[-1][1]["perplexity"]
    if len(labelled) > 1 and first and last:
        blocks.append(("p", f"Perplexity {first:.3f} -> {last:.3f} ({last / first - 1:+.1%})."))
    blocks.append(("h2", "The a/an probe"))
    blocks.append(("p", "Mass on tokens that begin a vowel-sound word against a consonant-sound word, after "
                        "\" a\" and \" an\" (rule in train/probe.py). Balanced accuracy is the mean of the two "
                        "per-article accuracies; a model that ignores the article scores about 0.5."))
    for source in ("builtin", "heldout"):
        rows = [[k] + _probe_cells(r["probe"][source]) for k, r in labelled if r["probe"].get(source)]
        if rows:
            n = next(r["probe"][source]["n"] for _, r in labelled if r["probe"].get(source))
            title = "built-in contexts" if source == "builtin" else "contexts from the held-out text"
            blocks += [("h3", f"{title} ({n})"), ("table", ["model"] + PROBE_COLS, rows)]
    return blocks


def _study_blocks(labelled):
    labelled = [(k, r) for k, r in labelled if r is not None and r.get("prompts")]
    if not labelled:
        return []
    rows = []
    for k, r in labelled:
        for p in r["prompts"]:
            rows.append([p["prompt"], k, _fmt(p["distinct_1"]), _fmt(p["distinct_2"]), _fmt(p["mean_logprob"]),
                         _fmt(p["theme_share"])])
    rows.sort(key=lambda row: row[0])
    return [("h2", "Prompt studies"),
            ("table", ["prompt", "model", "distinct-1", "distinct-2", "mean log-lik.", "theme share"], rows)]


def _jsonl_texts(line):
    found = line.get("samples", line.get("generations", line.get("generated", [])))
    return [s["generated_text"] if isinstance(s, dict) else str(s) for s in found]


def _samples_blocks(labelled, fallback=()):
    """Samples per prompt from the eval results' prompt studies, else from [(label, samples.jsonl lines)]."""
    blocks = [("h2", "Samples")]
    by_prompt = {}
    for k, r in labelled:
        for p in (r or {}).get("prompts", []):
            by_prompt.setdefault(p["prompt"], []).append((k, p["samples"]))
    if not by_prompt:
        for k, lines in fallback:
            for line in lines:
                by_prompt.setdefault(str(line.get("prompt", "")), []).append((k, _jsonl_texts(line)))
    if not by_prompt:
        return blocks + [("p", "No samples in this run.")]
    for prompt, groups in by_prompt.items():
        blocks.append(("h3", repr(prompt)))
        for k, texts in groups:
            shown = "\n".join("- " + t.replace("\n", " ") for t in texts[:SAMPLES_SHOWN])
            blocks.append(("pre", f"[{k}]\n{shown}"))
    return blocks


def _report_blocks(run):
    blocks = [("h1", f"Run report: {run['dir'].name}")]
    blocks.append(("h2", "Configuration"))
    config = _run_settings(run["config"])
    blocks.append(("table", ["setting", "value"], [[k, _setting(v)] for k, v in config.items()]) if config
                  else ("p", "No run.json in this run."))
    blocks += _loss_blocks(run)
    blocks += _memory_blocks(run)
    labelled = [("before", run["before"]), ("after", run["after"])]
    blocks += _eval_blocks(labelled)
    blocks += _study_blocks(labelled)
    blocks += _samples_blocks(labelled, [("after training", run["samples"])])
    return blocks


def _md_cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks, base_dir):
    """Markdown: pipe tables and image links relative to `base_dir` (terminal-readable as plain text)."""
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + block[1])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        elif kind == "img":
            path = Path(block[1])
            rel = path.relative_to(base_dir) if path.is_relative_to(base_dir) else path
            out.append(f"![{block[2]}]({rel.as_posix()})")
        elif kind == "pre":
            out.append("```\n" + block[1] + "\n```")
        out.append("")
    return "\n".join(out)


CSS = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
       "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:0.2em 0.5em}"
       "td{text-align:right}td:first-child{text-align:left}pre{background:#f5f5f5;padding:0.5em;"
       "white-space:pre-wrap}img{max-width:100%}")


def render_html(blocks, title):
    """A standalone HTML page; images are inlined as base64 data URIs."""
    esc = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{esc(block[1])}</p>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in block[1]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in block[2]]
            out.append("</table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode("ascii")
            out.append(f"<p><img alt='{esc(block[2])}' src='data:image/png;base64,{data}'></p>")
        elif kind == "pre":
            out.append(f"<pre>{esc(block[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def _write(out_dir, blocks, title):
    out_dir = Path(out_dir)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, render_markdown(blocks, out_dir))
    atomic_write_text(html_path, render_html(blocks, title))
    return md_path, html_path


def write_report(out_dir):
    """Writes report.md and report.html for the run in `out_dir` from the files it holds.

    Args:
        out_dir: a `finetune --out` folder.

    Returns:
        (md_path, html_path).

    Example:
        >>> md, page = write_report("runs/finetune")
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"expected a run folder, got {str(out_dir)!r} which is not a folder")
    run = read_run(out_dir)
    return _write(out_dir, _report_blocks(run), f"leanfit run report: {out_dir.name}")


def _comparison_plot(runs, path):
    import matplotlib  # deferred: matplotlib takes a second to import and only the comparison plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, run in runs.items():
        train, evals = _train_points(run["metrics"]), _eval_points(run["metrics"])
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
    configs = {k: _flat((r["config"] or {}).get("config", r["config"])) for k, r in loaded.items()}
    keys = list(dict.fromkeys(k for c in configs.values() for k in c))
    differ = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs.values()}) > 1]
    blocks += [("h2", "Configuration differences"),
               ("table", ["setting"] + list(loaded), [[k] + [_setting(configs[r].get(k)) for r in loaded]
                                                     for k in differ]) if differ
               else ("p", "The runs share their configuration.")]
    blocks.append(("h2", "Loss curves"))
    if any(_train_points(r["metrics"]) for r in loaded.values()):
        plot = out_dir / "comparison_loss.png"
        _comparison_plot(loaded, plot)
        blocks.append(("img", plot, "training and validation loss of each run"))
        rows = []
        for label, r in loaded.items():
            train, evals = _train_points(r["metrics"]), _eval_points(r["metrics"])
            rows.append([label, _fmt(train[0][1]) if train else "-", _fmt(train[-1][1]) if train else "-",
                         _fmt(evals[-1][1]) if evals else "-"])
        blocks.append(("table", ["run", "first train loss", "last train loss", "last validation loss"], rows))
    first = next(iter(loaded.values()))
    labelled = [("before (pretrained)", first["before"])] + [(f"after, {k}", r["after"]) for k, r in loaded.items()]
    blocks += _eval_blocks(labelled)
    blocks += _study_blocks(labelled)
    blocks += _samples_blocks(labelled, [(f"after, {k}", r["samples"]) for k, r in loaded.items()])
    return _write(out_dir, blocks, "leanfit run comparison")


def main(argv=None):
    """`python -m leanfit.train.report RUN_DIR` or `python -m leanfit.train.report --compare OUT LABEL=RUN_DIR ...`."""
    p = OneLineParser(prog="python -m leanfit.train.report", description="Write report.md and report.html for runs.")
    p.add_argument("runs", nargs="+", help="a run folder, or with --compare, LABEL=RUN_DIR pairs")
    p.add_argument("--compare", metavar="OUT", help="write one comparison report into OUT")
    args = p.parse_args(argv)
    try:
        if args.compare:
            pairs = [r.split("=", 1) if "=" in r else (Path(r).name, r) for r in args.runs]
            paths = write_comparison_report(args.compare, dict(pairs))
        else:
            if len(args.runs) != 1:
                raise ValueError(f"expected one run folder without --compare, got {len(args.runs)}")
            paths = write_report(args.runs[0])
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        return fail(p.prog, e)
    print("\n".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
