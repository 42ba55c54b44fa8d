"""Prints Triton/cuDNN time ratios from a pytest-benchmark JSON of `bench/test_bench_lstm.py`.

Usage: python bench/lstm_gpu_table.py BENCH_JSON

One row per shape, dtype and mode: median milliseconds of each provider (reference,
triton, cudnn), triton/cudnn (the issue's goal is <= 1.0), reference/triton, and the
peak memory of one call. Only `test_bench_lstm_gpu` entries are read.
"""

import json
import sys

PROVIDERS = ("reference", "triton", "cudnn")


def _collect(data):
    rows = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not bench.get("name", "").startswith("test_bench_lstm_gpu") or "provider" not in info:
            continue
        key = (info["shape"], info["dtype"], info["mode"])
        rows.setdefault(key, {})[info["provider"]] = (bench["stats"]["median"] * 1e3, info.get("peak_mem_mb"))
    return rows


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(data):
    rows = _collect(data)
    head = ["shape", "dtype", "mode", *(f"{p} ms" for p in PROVIDERS), "triton/cudnn", "ref/triton",
            "triton MiB", "cudnn MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (shape, dtype, mode), by in sorted(rows.items()):
        ms = {p: by[p][0] if p in by else None for p in PROVIDERS}
        mem = {p: by[p][1] if p in by else None for p in PROVIDERS}
        ratio = ms["triton"] / ms["cudnn"] if ms["triton"] and ms["cudnn"] else None
        speedup = ms["reference"] / ms["triton"] if ms["reference"] and ms["triton"] else None
        cells = [shape, dtype, mode, *(_fmt(ms[p], ".3f") for p in PROVIDERS), _fmt(ratio, ".2f"),
                 _fmt(speedup, ".1f"), _fmt(mem["triton"], ".1f"), _fmt(mem["cudnn"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("(no test_bench_lstm_gpu entries)")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python bench/lstm_gpu_table.py BENCH_JSON", file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"lstm_gpu_table: cannot read {argv[0]}: {e}", file=sys.stderr)
        return 2
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
