"""The run report: `report.md` (for a terminal) and `report.html` (for a browser, PNGs inlined), no server.

`write_report(out_dir)` reads what `finetune` left in `out_dir`, each part optional:
run.json (configuration), metrics.jsonl and loss.png (loss curves), memory_report.json and memory.png
(memory), eval_before.json and eval_after.json (`evaluate.evaluate_model` results: perplexity, the
a/an probe, prompt studies), samples.jsonl (generations after training).

`compare.write_comparison_report(out_dir, runs)` puts several runs side by side (the learning-rate pitfall):
configuration differences, overlaid loss curves, perplexity and the probe before and after, and samples.

Both build one list of blocks (heading, paragraph, table, image, preformatted text) and render it twice.
"""

import base64
import html
import json
from pathlib import Path

from ..checkpointing.atomic import atomic_write_text
from ..units import format_bytes

__all__ = ["write_report", "read_run", "write_blocks", "loss_blocks", "memory_blocks", "samples_blocks",
           "run_settings"]

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


def fmt(value):
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


def flatten(d, prefix=""):
    out = {}
    for key, value in (d or {}).items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_settings(run_json):
    """run.json flattened: finetune's {"config": ..., "summary": ...} gives config keys bare, then summary.*."""
    if not run_json:
        return {}
    if isinstance(run_json.get("config"), dict):
        rest = {k: v for k, v in run_json.items() if k != "config"}
        return {**flatten(run_json["config"]), **flatten(rest)}
    return flatten(run_json)


def setting(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return fmt(value)


def train_points(metrics):
    return [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m and "val_loss" not in m]


def eval_points(metrics):
    return [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m and "step" in m]


def loss_blocks(run):
    blocks = [("h2", "Loss curves")]
    train, evals = train_points(run["metrics"]), eval_points(run["metrics"])
    if train:
        steps = [m for m in run["metrics"] if "loss" in m and "val_loss" not in m]
        rates = [m["tokens_per_s"] for m in steps if isinstance(m.get("tokens_per_s"), (int, float))]
        blocks.append(("p", f"{len(train)} training steps; loss {train[0][1]:.4f} at step {train[0][0]} -> "
                            f"{train[-1][1]:.4f} at step {train[-1][0]}"
                            + (f"; mean {sum(rates) / len(rates):,.0f} tokens/s" if rates else "") + "."))
    if evals:
        blocks.append(("table", ["step", "validation loss", "validation perplexity"],
                       [[s, fmt(v), fmt(2.718281828459045 ** v)] for s, v in evals]))
    if run["loss_png"]:
        blocks.append(("img", run["loss_png"], "training and validation loss"))
    if len(blocks) == 1:
        blocks.append(("p", "No metrics.jsonl or loss.png in this run."))
    return blocks


def _bytes(n):
    return format_bytes(n) if isinstance(n, (int, float)) else fmt(n)


def memory_blocks(run):
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
        scalars = flatten({k: v for k, v in memory.items() if not isinstance(v, list)})
        blocks.append(("table", ["quantity", "value"], [[k, fmt(v)] for k, v in scalars.items()]))
    if run["memory_png"]:
        blocks.append(("img", run["memory_png"], "memory over steps and the breakdown at the peak"))
    return blocks


def _probe_cells(probe):
    if probe is None:
        return ["-"] * 5
    return [fmt(probe["balanced_accuracy"]), fmt(probe["a"]["accuracy"]), fmt(probe["an"]["accuracy"]),
            fmt(probe["a"]["mean_mass_correct"]), fmt(probe["an"]["mean_mass_correct"])]


PROBE_COLS = ["balanced acc.", "acc. after a", "acc. after an", "mass correct (a)", "mass correct (an)"]


def eval_blocks(labelled):
    """Perplexity and probe tables for [(label, evaluate_model result or None)]."""
    labelled = [(k, r) for k, r in labelled if r is not None]
    if not labelled:
        return [("h2", "Perplexity"), ("p", "No eval_before.json or eval_after.json in this run.")]
    blocks = [("h2", "Perplexity"),
              ("table", ["model", "validation perplexity", "loss (nats/token)", "tokens"],
               [[k, fmt(r["perplexity"]), fmt(r["val_loss"]), fmt(r["val_tokens"])] for k, r in labelled])]
    first, last = labelled[0][1]["perplexity"], labelled[-1][1]["perplexity"]
    if len(labelled) > 1 and first and last:
        blocks.append(("p", f"Perplexity {first:.3f} -> {last:.3f} ({last / first - 1:+.1%})."))
    blocks.append(("h2", "The a/an probe"))
    blocks.append(("p", "Mass on tokens that begin a vowel-sound word against a consonant-sound word, after "
                        "\" a\" and \" an\" (rule in train/evaluation/probe.py). Balanced accuracy is the mean of "
                        "the two per-article accuracies; a model that ignores the article scores about 0.5."))
    for source in ("builtin", "heldout"):
        rows = [[k] + _probe_cells(r["probe"][source]) for k, r in labelled if r["probe"].get(source)]
        if rows:
            n = next(r["probe"][source]["n"] for _, r in labelled if r["probe"].get(source))
            title = "built-in contexts" if source == "builtin" else "contexts from the held-out text"
            blocks += [("h3", f"{title} ({n})"), ("table", ["model"] + PROBE_COLS, rows)]
    return blocks


def study_blocks(labelled):
    labelled = [(k, r) for k, r in labelled if r is not None and r.get("prompts")]
    if not labelled:
        return []
    rows = []
    for k, r in labelled:
        for p in r["prompts"]:
            rows.append([p["prompt"], k, fmt(p["distinct_1"]), fmt(p["distinct_2"]), fmt(p["mean_logprob"]),
                         fmt(p["theme_share"])])
    rows.sort(key=lambda row: row[0])
    return [("h2", "Prompt studies"),
            ("table", ["prompt", "model", "distinct-1", "distinct-2", "mean log-lik.", "theme share"], rows)]


def _jsonl_texts(line):
    found = line.get("samples", line.get("generations", line.get("generated", [])))
    return [s["generated_text"] if isinstance(s, dict) else str(s) for s in found]


def samples_blocks(labelled, fallback=()):
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
    config = run_settings(run["config"])
    blocks.append(("table", ["setting", "value"], [[k, setting(v)] for k, v in config.items()]) if config
                  else ("p", "No run.json in this run."))
    blocks += loss_blocks(run)
    blocks += memory_blocks(run)
    labelled = [("before", run["before"]), ("after", run["after"])]
    blocks += eval_blocks(labelled)
    blocks += study_blocks(labelled)
    blocks += samples_blocks(labelled, [("after training", run["samples"])])
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


def write_blocks(out_dir, blocks, title):
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
    return write_blocks(out_dir, _report_blocks(run), f"leanfit run report: {out_dir.name}")
