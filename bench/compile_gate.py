# arch: compute capability (75 T4, 80 A100, 90 H100); T time, B batch, H hidden, N tokens, V vocab
"""Registers, spills and shared memory of every Triton kernel the launchers can choose, on GPUs we don't have.

    python -m bench.compile_gate [--arch 75,80,90] [--jobs 2] [--json PATH] [--markdown] [-k TEXT]
    python -m bench.compile_gate --from-json PATH [--markdown]

Each case calls a real launcher on `meta` tensors inside `launch.record_launches()`, so the config comes
from the launcher's own config function and the arguments are the ones it would pass. Triton's JIT binder
(`create_function_from_signature`, `JITFunction._pack_args`) turns them into the signature, constexprs and
specialization attributes (divisibility by 16 of pointers and ints) exactly as a launch would; a meta
tensor's `data_ptr()` is 0, as is that of Triton's own `MockTensor` for warm-up compiles, so pointers count
as 16-byte aligned, which the CUDA caching allocator guarantees. The launch is then compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and its PTX is run through the wheel's
`ptxas -v` for registers and spill bytes; `metadata.shared` is the dynamic shared memory the launch asks for.
Identical launches (same kernel, signature, constexprs, attributes, options) are compiled once; Triton's
own cache keeps the compiled kernels between runs.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from leanfit.kernels.launch import record_launches, shared_limit
from leanfit.kernels.lce.chunked import LCEOptions
from leanfit.kernels.lce.fused import lce_triton_backward, lce_triton_forward
from leanfit.kernels.lce.hybrid import hybrid_chunk_rows, hybrid_forward
from leanfit.kernels.lstm.config import lstm_config, lstm_variants
from leanfit.kernels.lstm.fused import recurrence_bwd, recurrence_fwd

__all__ = ["ARCHS", "Case", "Row", "cases", "measure", "ptxas_path"]

ARCHS = (75, 80, 90)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LSTM_H = (32, 64, 100, 256, 512, 768, 1024)
# T and B divisible by 16, as at typical training shapes; with H divisible by 16 too, every address the
# kernels form is then known to be 16-byte aligned.
LSTM_T, LSTM_B = 64, 64
# Output heads (H, V) and the flags their models use: SmolLM2-135M, GPT-2, Gemma-2 2B (final logit softcap 30).
# LCE_EXTRA adds every optional input (bias, softcap, label smoothing, the bias gradient) at GPT-2's head and
# fp32 dW accumulation at Gemma-2's.
LCE_HEADS = {576: (49152, ()), 768: (50257, ()), 2304: (256000, ("softcap",))}
LCE_EXTRA = ((768, ("bias", "softcap", "db")), (2304, ("softcap", "fp32acc")))
# 2,048 tokens (a few sequences) is where the forward splits the vocabulary; the compile does not depend
# on N or on the number of splits. An H100 has 132 SMs.
LCE_N, LCE_SMS = 2048, 132


@dataclass(frozen=True)
class Case:
    """One launcher call: op, target, dtype, width, variant and flags; `key` names it in tests and tables."""

    op: str
    arch: int
    dtype: str
    width: int
    variant: str
    flags: tuple

    @property
    def key(self) -> str:
        flags = "-".join(f for f in self.flags) or "plain"
        return f"{self.op}-sm{self.arch}-{self.dtype}-H{self.width}-{self.variant}-{flags}"


@dataclass
class Row:
    case: str
    kernel: str
    arch: int
    dtype: str
    width: int
    variant: str
    flags: str
    config: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    mma: int | None = None
    shared_limit: int | None = None
    error: str | None = None


def _meta(*shape, dtype):
    return torch.empty(shape, device="meta", dtype=dtype)


def _lstm_launches(case: Case):
    dtype = DTYPES[case.dtype]
    T, B, H = LSTM_T, LSTM_B, case.width
    lengths = _meta(B, dtype=torch.int32)
    recompute = "recompute" in case.flags
    save = "nograd" not in case.flags
    _, fwd_cfg, bwd_cfg = lstm_config(B, H, dtype, case.arch, case.variant, tf32="tf32" in case.flags)
    with record_launches() as launches:
        xw = _meta(T, B, 4 * H, dtype=dtype)
        w_hh = _meta(4 * H, H, dtype=dtype)
        h, c, gates, _ = recurrence_fwd(xw, w_hh, _meta(B, H, dtype=dtype), _meta(B, H, dtype=dtype), lengths, fwd_cfg,
                                        not recompute and save, save)
        if not save:
            return launches
        recurrence_bwd(xw, w_hh, h, c, gates, _meta(T, B, H, dtype=dtype), _meta(B, H, dtype=dtype),
                 _meta(B, H, dtype=dtype), lengths, bwd_cfg)
    return launches


def _lstm_cases(archs):
    for arch in archs:
        for dtype in DTYPES:
            for H in LSTM_H:
                for variant in lstm_variants(H, arch, DTYPES[dtype]):
                    tf32 = (("tf32",), ("tf32", "recompute")) if dtype == "fp32" and variant == "persistent" else ()
                    for flags in ((), ("recompute",), ("nograd",), *tf32):
                        yield Case("lstm", arch, dtype, H, variant, flags)


def _lce_launches(case: Case):
    dtype = DTYPES[case.dtype]
    v = LCE_HEADS[case.width][0]
    n, width = LCE_N, case.width
    opts = LCEOptions(ignore_index=-100, reduction="mean", label_smoothing=0.1 if "bias" in case.flags else 0.0,
                      softcap=30.0 if "softcap" in case.flags else None, chunk_size=n,
                      accumulate="fp32" if "fp32acc" in case.flags else "param")
    hidden, weight = _meta(n, width, dtype=dtype), _meta(v, width, dtype=dtype)
    bias = _meta(v, dtype=dtype) if "bias" in case.flags else None
    target = _meta(n, dtype=torch.int64)
    with record_launches() as launches:
        if case.variant == "hybrid":
            opts = replace(opts, chunk_size=hybrid_chunk_rows(n, width, v))
            hybrid_forward(hidden, weight, bias, target, opts, (True, True, "db" in case.flags))
            return launches[:1]
        _, lse = lce_triton_forward(hidden, weight, bias, target, opts, case.arch, LCE_SMS)
        lce_triton_backward(hidden, weight, bias, target, lse, _meta(n, dtype=torch.float32), opts,
                            (True, True, "db" in case.flags), case.arch)
    return launches


def _lce_cases(archs):
    for arch in archs:
        for dtype in DTYPES:
            heads = [(h, flags) for h, (_, flags) in LCE_HEADS.items()] + list(LCE_EXTRA)
            for width, flags in heads:
                if "fp32acc" in flags and dtype == "fp32":
                    continue
                yield Case("lce", arch, dtype, width, "triton", flags)
                yield Case("lce", arch, dtype, width, "hybrid", flags)


_LAUNCHES = {"lstm": _lstm_launches, "lce": _lce_launches}


def cases(archs=ARCHS) -> list[Case]:
    """Every launcher call the gate compiles, for the given targets."""
    return list(_lstm_cases(archs)) + list(_lce_cases(archs))


def ptxas_path(arch: int = 80) -> str | None:
    """The `ptxas` in the triton wheel that Triton itself uses for `arch`, or None when the wheel has none."""
    try:
        path = get_ptxas(arch).path
    except RuntimeError:
        return None
    return path if path and os.path.exists(path) else None


def _bind(launch, arch: int):
    """Signature, constexprs, attrs and options of `launch` for `arch`, through Triton's JIT binder."""
    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _launch_key(launch, arch: int) -> str:
    signature, constexprs, attrs, options = _bind(launch, arch)
    return repr((launch.kernel.fn.__qualname__, arch, signature, sorted(constexprs.items()), sorted(attrs.items()),
                 sorted(options.__dict__.items())))


_PTXAS_LINE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spill bytes per thread, from `ptxas -v` on the PTX."""
    proc = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={sm_arch_from_capability(arch)}", "-", "-o",
                           os.devnull], input=ptx, capture_output=True, text=True, check=True)
    return {name: int(m.group(1)) for name, rx in _PTXAS_LINE.items() if (m := rx.search(proc.stderr))}


_NOT_CONFIG = ("PRECISION", "PREC", "DOT_F32")


def _config_text(launch) -> str:
    """Constexprs and compiler options of a launch (not its tensors and runtime scalars), and its grid."""
    runtime = {p.name for p in launch.kernel.params if not p.is_constexpr}
    items = [f"{k}={v}" for k, v in launch.kwargs.items() if k not in _NOT_CONFIG and k not in runtime]
    return " ".join(items + [f"grid={'x'.join(map(str, launch.grid))}"])


def _compile(launch, arch: int) -> dict:
    signature, constexprs, attrs, options = _bind(launch, arch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        usage = ptxas_usage(compiled.asm["ptx"], arch)
    except Exception as exc:  # a compile failure is one of the gate's results, reported per launch
        return {"error": f"{type(exc).__name__}: {_first_line(str(exc))}"}
    return {**usage, "shared": compiled.metadata.shared, "mma": tensor_core_ops(compiled.asm["ptx"])}


def tensor_core_ops(ptx: str) -> int:
    """Tensor-core instructions in the PTX: `mma.sync` (sm_75/80) and `wgmma.mma_async` (sm_90)."""
    return len(re.findall(r"^\s*(?:mma\.sync|wgmma\.mma_async)", ptx, re.MULTILINE))


def _first_line(text: str) -> str:
    """The line of a compiler's output that says what went wrong (warnings skipped)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and "warn" not in line.lower()]
    errors = [line for line in lines if re.search(r"error|assert", line, re.IGNORECASE)]
    return (errors or lines[-1:] or ["(no message)"])[0][:200]


def _compile_in_child(launch, arch: int, out_path: str) -> int:
    """Forks a process that compiles `launch` and writes its result to `out_path`; returns its pid. A
    compiler that aborts (LLVM asserts do) then takes only that process down."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        err = os.open(out_path + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(err, 2)
        with open(out_path, "w") as f:
            json.dump(_compile(launch, arch), f)
        code = 0
    finally:
        os._exit(code)


def _collect(out_path: str, status: int) -> dict:
    if os.path.exists(out_path) and os.path.getsize(out_path):
        with open(out_path) as f:
            return json.load(f)
    with open(out_path + ".err", errors="replace") as f:
        message = _first_line(f.read())
    return {"error": f"compiler process died (wait status {status}): {message}"}


def _compile_all(jobs: dict, workers: int) -> dict:
    """Compiles each (launch, arch) of `jobs` in its own forked process, `workers` at a time."""
    results, running, pending = {}, {}, list(jobs.items())
    with tempfile.TemporaryDirectory(prefix="leanfit-resources-") as tmp:
        while pending or running:
            while pending and len(running) < workers:
                key, (launch, arch) = pending.pop(0)
                path = os.path.join(tmp, f"job{len(jobs) - len(pending)}.json")
                running[_compile_in_child(launch, arch, path)] = (key, path)
            pid, status = os.wait()
            key, path = running.pop(pid)
            results[key] = _collect(path, status)
    return results


def measure(selected: list[Case], jobs: int = 1) -> list[Row]:
    """Compiles every launch of every case (each distinct one once) and returns one row per launch."""
    rows, keys, unique = [], [], {}
    for case in selected:
        for launch in _LAUNCHES[case.op](case):
            key = _launch_key(launch, case.arch)
            unique.setdefault(key, (launch, case.arch))
            keys.append(key)
            rows.append(Row(case.key, launch.kernel.fn.__name__, case.arch, case.dtype, case.width, case.variant,
                            "-".join(case.flags) or "-", _config_text(launch), shared_limit=shared_limit(case.arch)))
    results = _compile_all(unique, max(1, jobs))
    for row, key in zip(rows, keys):
        for name, value in results[key].items():
            setattr(row, name, value)
    return rows


def _fmt(value) -> str:
    return "-" if value is None else str(value)


def format_table(rows: list[Row]) -> str:
    """Every launch, one line each, as plain text."""
    cols = ("kernel", "arch", "dtype", "width", "variant", "flags", "config", "registers", "spill_stores",
            "spill_loads", "shared", "shared_limit", "mma", "error")
    lines = [list(cols)] + [[_fmt(getattr(r, c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


_TILE_KEYS = ("BLOCK_H", "BLOCK_N", "BLOCK_K", "BN", "BV", "BH", "BLOCK_V")


def _cell(r: Row) -> str:
    if r.error:
        return "does not compile"
    cfg = dict(item.split("=", 1) for item in r.config.split())
    tiles = "x".join(cfg[k] for k in _TILE_KEYS if k in cfg)
    if "BLOCK_J" in cfg:
        tiles = f"J{cfg['BLOCK_J']} B{cfg['BLOCK_B']} x{cfg['grid']}"
    tiles += f" w{cfg.get('num_warps', 4)}" + (f" s{cfg['num_stages']}" if "num_stages" in cfg else "")
    spill = f"{r.spill_stores}" if r.spill_stores == r.spill_loads else f"{r.spill_stores}/{r.spill_loads}"
    return f"{r.registers} / {spill} / {r.shared // 1024} / {r.mma} ({tiles})"


def format_markdown(rows: list[Row]) -> str:
    """One line per kernel, dtype, variant and flags, one column per architecture: registers / spill bytes per
    thread / shared KiB / tensor-core instructions in the PTX (tiles, warps, stages); widths with identical
    results share a line."""
    archs = sorted({r.arch for r in rows})
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r.kernel, r.dtype, r.variant, r.flags, r.width), {})[r.arch] = _cell(r)
    merged: dict[tuple, list] = {}
    for (kernel, dtype, variant, flags, width), by_arch in cells.items():
        key = (kernel, dtype, variant, flags, tuple(by_arch.get(a, "-") for a in archs))
        merged.setdefault(key, []).append(str(width))
    head = ["kernel", "dtype", "H", "variant", "flags"] + [f"sm_{a}" for a in archs]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, dtype, variant, flags, by_arch), widths in merged.items():
        out.append("| " + " | ".join([kernel.strip("_"), dtype, ", ".join(widths), variant, flags, *by_arch]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 75,80,90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("-k", dest="match", default="", help="only cases whose key contains this text")
    parser.add_argument("--from-json", help="format rows saved by --json instead of compiling")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            rows = [Row(**r) for r in json.load(f)["rows"]]
        print(format_markdown(rows) if args.markdown else format_table(rows))
        return 0
    if triton.knobs.runtime.interpret:
        parser.error("unset TRITON_INTERPRET: the interpreter has no compiler to measure")
    if any(ptxas_path(a) is None for a in ARCHS):
        parser.error("this triton wheel ships no ptxas (triton/backends/nvidia/bin/ptxas)")
    archs = tuple(int(a) for a in args.arch.split(","))
    rows = measure([c for c in cases(archs) if args.match in c.key], jobs=args.jobs)
    print(format_markdown(rows) if args.markdown else format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
