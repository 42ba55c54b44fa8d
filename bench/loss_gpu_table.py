"""Prints the loss benchmark JSON (pytest-benchmark) as one table per shape: time, peak memory, ratios.

Usage: python bench/loss_gpu_table.py BENCH_JSON
Ratios are against `cce` (the GPU target: triton time and memory <= cce) and `naive`, same shape and run;
the last columns are the errors against fp64 (absolute for the loss, relative RMS for dW).
"""

import json
import sys


def rows(path):
    with open(path) as f:
        data = json.load(f)
    by_shape = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if "provider" not in info:
            continue
        by_shape.setdefault((info["device"], info["shape"]), {})[info["provider"]] = (
            b["stats"]["mean"],
            info["peak_mib"],
            info["above_floor_mib"],
            info.get("loss_err", float("nan")),
            info.get("dw_err", float("nan")),
        )
    return by_shape


def _ratio(prov, mine, ref, i):
    return f"{mine[i] / prov[ref][i]:.2f}" if ref in prov else "-"


def main(argv):
    if len(argv) != 1:
        print("usage: loss_gpu_table.py BENCH_JSON", file=sys.stderr)
        return 2
    for (device, shape), prov in rows(argv[0]).items():
        print(f"\n{device} {shape}")
        print(f"{'provider':<9} {'ms':>9} {'peak MiB':>9} {'>floor MiB':>10} {'t/cce':>6} {'mem/cce':>7} "
              f"{'t/naive':>7} {'mem/naive':>9} {'loss err':>9} {'dW err':>8}")
        for name, (t, peak, above, loss_err, dw_err) in sorted(prov.items(), key=lambda kv: kv[1][0]):
            r = [_ratio(prov, (t, peak), ref, i) for ref in ("cce", "naive") for i in (0, 1)]
            print(f"{name:<9} {t * 1e3:9.1f} {peak:9.0f} {above:10.0f} {r[0]:>6} {r[1]:>7} {r[2]:>7} {r[3]:>9} "
                  f"{loss_err:9.2e} {dw_err:8.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
