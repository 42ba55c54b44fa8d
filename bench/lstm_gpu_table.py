"""Prints time ratios against cuDNN from a pytest-benchmark JSON of `bench/test_bench_lstm.py`.

Usage: python bench/lstm_gpu_table.py BENCH_JSON

Two tables, one row per shape, dtype and mode, with each provider's median milliseconds:
- `test_bench_lstm_gpu`: reference, triton (variant="auto"), cudnn; triton/cudnn and reference/triton;
- `test_bench_lstm_variants_gpu`: the persistent and tiled variants against cudnn; persistent/cudnn (the
  persistent kernel's goal: <= 1.0 in fp16 forward+backward at B16 T1024 H768, <= 0.5 in bf16) and
  tiled/persistent;
- `test_bench_lstm_issue_shapes_gpu`: issue 25's six shapes, `variant="auto"` against cudnn (targets: <= 1.0
  everywhere, <= 0.4 at B16 T1024 H768; `kernels/README.md` predicts each);
and the peak memory of one call of the Triton provider and of cuDNN.
"""

import json
import sys

# (test name, providers, ratios, the provider whose peak memory is shown beside cuDNN's)
TABLES = (
    ("test_bench_lstm_gpu", ("reference", "triton", "cudnn"), (("triton", "cudnn"), ("reference", "triton")),
     "triton"),
    ("test_bench_lstm_variants_gpu", ("persistent", "tiled", "cudnn"), (("persistent", "cudnn"),
                                                                         ("tiled", "persistent")), "persistent"),
    ("test_bench_lstm_issue_shapes_gpu", ("auto", "cudnn"), (("auto", "cudnn"),), "auto"),
)


def _collect(data, name):
    rows = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not bench.get("name", "").startswith(name + "[") or "provider" not in info:
            continue
        key = (info["shape"], info["dtype"], info["mode"])
        rows.setdefault(key, {})[info["provider"]] = (bench["stats"]["median"] * 1e3, info.get("peak_mem_mb"))
    return rows


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(data, name="test_bench_lstm_gpu"):
    _, providers, ratios, shown = next(t for t in TABLES if t[0] == name)
    rows = _collect(data, name)
    head = ["shape", "dtype", "mode", *(f"{p} ms" for p in providers), *(f"{a}/{b}" for a, b in ratios),
            f"{shown} MiB", "cudnn MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (shape, dtype, mode), by in sorted(rows.items()):
        ms = {p: by[p][0] if p in by else None for p in providers}
        mem = {p: by[p][1] if p in by else None for p in providers}
        cells = [shape, dtype, mode, *(_fmt(ms[p], ".3f") for p in providers)]
        cells += [_fmt(ms[a] / ms[b] if ms[a] and ms[b] else None, ".2f") for a, b in ratios]
        cells += [_fmt(mem[shown], ".1f"), _fmt(mem["cudnn"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append(f"(no {name} entries)")
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
    print("\n\n".join(table(data, name) for name, *_ in TABLES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
