# arch: compute capability (75 T4, 80 A100, 90 H100)
"""The compile gate: every Triton kernel the launchers can choose builds for T4, A100 and H100.

`bench.compile_gate` calls the real launchers on meta tensors (configs from their own config functions),
binds the arguments with Triton's JIT binder and compiles each launch with `triton.compile(...,
target=GPUTarget("cuda", arch, 32))`; `ptxas -v` on the PTX gives registers and spill bytes. It runs in a
subprocess without TRITON_INTERPRET (conftest sets it for the interpreter tests; the interpreter has no compiler).
Checked per launch: it compiles; its shared memory fits the architecture's per-block limit; a 16-bit matrix
product uses tensor cores (`MATMUL_KERNELS`); it does not spill, except where `SPILL_EXCEPTIONS` says why. For a
handful of launches the PTX is read too: fp32 dots compile without TF32 (no `tf32` MMA and no `cvt.rna.tf32`),
which the interpreter cannot show. Compiled kernels stay in Triton's cache, so a second run takes seconds.
"""

import json
import os
import subprocess
import sys

import pytest

from bench.compile_gate import ARCHS, cases, ptxas_path

# The kernels whose work is tl.dot: with 16-bit inputs each must compile to tensor-core instructions (mma.sync,
# or wgmma on sm_90) on sm_80 and sm_90, so that a config which silently falls back to scalar FMA cannot land.
# Triton 3.6 emits no mma for sm_75 at all (0 in every 16-bit launch of the gate, fp16 included): on a T4 the
# Triton dots run on FMA, and only cuBLAS's products (the hybrid LCE path's) reach its tensor cores.
MATMUL_KERNELS = ("_lce_fwd_kernel", "_lce_bwd_kernel", "_lstm_fwd_onchip_kernel", "_lstm_bwd_onchip_kernel",
                  "_lstm_fwd_tiled_kernel", "_lstm_bwd_tiled_kernel", "_lstm_fwd_persistent_kernel",
                  "_lstm_bwd_persistent_kernel")


def wants_tensor_cores(row: dict) -> bool:
    """16-bit products on sm_80/90, and fp32 ones the LSTM was asked to run in TF32."""
    tf32 = row["dtype"] == "fp32" and "-tf32" in row["case"] and row["case"].startswith("lstm-")
    return row["kernel"] in MATMUL_KERNELS and (row["dtype"] in ("fp16", "bf16") or tf32) and row["arch"] >= 80


# (case key, kernel) -> why the spill is accepted. Empty: nothing spills.
SPILL_EXCEPTIONS: dict[tuple[str, str], str] = {}
# The gate compiles about 350 distinct kernels (540 launches); cold, on 2 cores, that took 2 minutes.
TIMEOUT_S = 1800

pytestmark = [
    pytest.mark.skipif(any(ptxas_path(arch) is None for arch in ARCHS),
                       reason="the installed triton wheel ships no ptxas (triton/backends/nvidia/bin), so nothing can "
                              "be compiled"),
    pytest.mark.slow,  # about 350 distinct compiles: 2 minutes cold on 2 cores
]
CASES = cases()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_compile") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.compile_gate", "--json", str(out), "--jobs", str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        data = json.load(f)
    by_case: dict[str, list] = {}
    for row in data["rows"]:
        by_case.setdefault(row["case"], []).append(row)
    return by_case


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_kernel_compiles_fits_and_does_not_spill(case, rows):
    launches = rows[case.key]
    assert launches, f"{case.key}: the launcher made no launch"
    for r in launches:
        where = f"{case.key} {r['kernel']} ({r['config']})"
        assert r["error"] is None, f"{where}: does not compile: {r['error']}"
        assert r["shared"] <= r["shared_limit"], (
            f"{where}: needs {r['shared']} B of shared memory, sm_{r['arch']} allows {r['shared_limit']} B per block"
        )
        if wants_tensor_cores(r):
            assert r["mma"], f"{where}: a 16-bit matrix product without tensor-core instructions (no mma in the PTX)"
        if (case.key, r["kernel"]) in SPILL_EXCEPTIONS:
            continue
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
            f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads per thread "
            f"with {r['registers']} registers"
        )



# Compiles the named gate cases (and one fp32 launch forced to TF32, which must show it) and prints, per launch,
# whether its PTX mentions tf32 and whether it uses MMA.
PTX_SCRIPT = """
import dataclasses, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bench.compile_gate import _LAUNCHES, _bind, cases

def ptx(launch, arch):
    signature, constexprs, attrs, options = _bind(launch, arch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__).asm["ptx"]

def facts(text):
    return {"tf32": "tf32" in text, "mma": "mma" in text}

wanted, out = set(sys.argv[1].split(",")), {}
for case in cases():
    if case.key not in wanted:
        continue
    for launch in _LAUNCHES[case.op](case):
        out[f"{case.key}/{launch.kernel.fn.__name__}"] = facts(ptx(launch, case.arch))
        if case.key == sys.argv[2] and "PRECISION" in launch.kwargs and "fwd" in launch.kernel.fn.__name__:
            forced = dataclasses.replace(launch, kwargs={**launch.kwargs, "PRECISION": "tf32"})
            out["forced-tf32"] = facts(ptx(forced, case.arch))
print(json.dumps(out))
"""
FP32_PTX_CASES = ("lstm-sm80-fp32-H64-tiled-plain", "lstm-sm90-fp32-H32-onchip-recompute",
                  "lstm-sm90-fp32-H256-persistent-plain", "lce-sm90-fp32-H576-triton-plain")
TF32_PTX_CASE = "lstm-sm90-fp32-H256-persistent-tf32"
BF16_PTX_CASE = "lstm-sm80-bf16-H256-tiled-plain"


def test_fp32_dots_compile_without_tf32():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    keys = ",".join((*FP32_PTX_CASES, BF16_PTX_CASE, TF32_PTX_CASE))
    proc = subprocess.run([sys.executable, "-c", PTX_SCRIPT, keys, FP32_PTX_CASES[0]], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts.pop("forced-tf32") == {"tf32": True, "mma": True}, "a TF32 dot shows in the PTX"
    for case in FP32_PTX_CASES:
        launches = {k: v for k, v in facts.items() if k.startswith(case + "/")}
        assert len(launches) == 2, (case, sorted(facts))
        for name, f in launches.items():
            assert not f["tf32"], f"{name}: an fp32 dot compiled to TF32"
    tf32 = [f for k, f in facts.items() if k.startswith(TF32_PTX_CASE + "/")]
    assert len(tf32) == 2 and all(f == {"tf32": True, "mma": True} for f in tf32), tf32
    bf16 = [f for k, f in facts.items() if k.startswith(BF16_PTX_CASE + "/")]
    assert len(bf16) == 2 and all(f["mma"] and not f["tf32"] for f in bf16), bf16
