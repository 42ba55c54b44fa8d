# T time, B batch, I input, H hidden
"""LSTM timings: `lstm_core` (reference) against `nn.LSTM` (torch), forward and forward+backward.

On CUDA, `test_bench_lstm_gpu` times `reference`, `triton` (`LSTM(backend="triton")`,
i.e. `kernels.fused_lstm` with `variant="auto"`) and `cudnn` (`nn.LSTM`) at the issue's shapes in
fp32, bf16 and fp16; `test_bench_lstm_variants_gpu` times the fused variants one by one
(`persistent`, `tiled`) against cuDNN at the shapes the persistent kernel is for (FlashRNN's chart,
B16 T1024 H768, and cuDNN's persistent limit, B64 T512 H1024) in bf16 and fp16;
`test_bench_lstm_issue_shapes_gpu` (first, so a short device budget measures it) times `variant="auto"`
against cuDNN at issue 25's six shapes, each in its dtype and mode, with TF32 as torch's defaults leave it.
Peak memory per call goes in `extra_info` too, and `bench/lstm_gpu_table.py` turns the JSON into ratios against
cuDNN. Those cases are skipped without CUDA: interpreter timings mean nothing.

Every provider includes the input projection (x W_ih^T) in its time. Tokens per second
(T*B per call) goes in `extra_info`. `scripts/bench.sh` runs this for real; the test
suite runs it once with `--benchmark-disable` as a smoke check.
"""

import pytest
import torch

from leanfit.lstm_core import LSTM

SHAPES = {
    "fastrnns-T100-B64-H512": dict(T=100, B=64, I=512, H=512),
    "small-T32-B8-H64": dict(T=32, B=8, I=64, H=64),
}
PROVIDERS = {
    "reference": lambda I, H: LSTM(I, H),
    "torch": lambda I, H: torch.nn.LSTM(I, H),
}


def _step(model, x, mode):
    if mode == "fwd":
        with torch.no_grad():
            return model(x)[0]
    out = model(x)[0]
    out.sum().backward()
    return out


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bench_lstm_cpu(benchmark, shape, provider, mode):
    s = SHAPES[shape]
    torch.manual_seed(0)
    ref = torch.nn.LSTM(s["I"], s["H"])
    model = PROVIDERS[provider](s["I"], s["H"])
    model.load_state_dict(ref.state_dict())
    x = torch.randn(s["T"], s["B"], s["I"], requires_grad=mode != "fwd")
    torch.testing.assert_close(model(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    benchmark.group = f"lstm-cpu-{shape}-{mode}"
    benchmark.extra_info.update(s, provider=provider, mode=mode, device="cpu", input_projection="included",
                                threads=torch.get_num_threads())
    benchmark.pedantic(_step, args=(model, x, mode), rounds=3, warmup_rounds=1)
    if benchmark.stats:
        benchmark.extra_info["tokens_per_s"] = s["T"] * s["B"] / benchmark.stats.stats.mean


GPU_SHAPES = {
    "fastrnns-T100-B64-H512": dict(T=100, B=64, I=512, H=512),
    "flashrnn-T1024-B16-H768": dict(T=1024, B=16, I=768, H=768),
    "smallbatch-T512-B8-H256": dict(T=512, B=8, I=256, H=256),
    "offgrid-T100-B12-H500": dict(T=100, B=12, I=500, H=500),
}
GPU_PROVIDERS = {
    "reference": lambda I, H: LSTM(I, H, backend="reference"),
    "triton": lambda I, H: LSTM(I, H, backend="triton"),
    "cudnn": lambda I, H: torch.nn.LSTM(I, H),
}
GPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_CHECK_TOL = {"fp32": 2e-2, "bf16": 1e-1, "fp16": 5e-2}
GPU_ROUNDS = {"reference": 2, "triton": 5, "cudnn": 5}


def _gpu_step(model, x, grad, mode):
    model.zero_grad(set_to_none=True)
    if mode == "fwd":
        with torch.no_grad():
            out = model(x)[0]
    else:
        out = model(x)[0]
        out.backward(grad)
    torch.cuda.synchronize()
    return out


NO_CUDA = "Triton and cuDNN timings need CUDA; interpreter timings mean nothing"


def _bench_against_cudnn(benchmark, s, dtype, make_model, rounds, group, **info):
    """Checks one provider's output against cuDNN's once, then times `_gpu_step` and records peak memory."""
    dt = GPU_DTYPES[dtype]
    torch.manual_seed(0)
    cudnn = torch.nn.LSTM(s["I"], s["H"]).cuda().to(dt)
    model = make_model(s["I"], s["H"]).cuda().to(dt)
    model.load_state_dict(cudnn.state_dict())
    x = torch.randn(s["T"], s["B"], s["I"], device="cuda", dtype=dt, requires_grad=info["mode"] != "fwd")
    grad = torch.randn(s["T"], s["B"], s["H"], device="cuda", dtype=dt)
    with torch.no_grad():
        expected = cudnn(x)[0].float()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = _gpu_step(model, x, grad, info["mode"]).float()
    peak = torch.cuda.max_memory_allocated() - base
    tol = GPU_CHECK_TOL[dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    benchmark.group = group
    benchmark.extra_info.update(
        s, dtype=dtype, device=torch.cuda.get_device_name(), input_projection="included", peak_mem_mb=peak / 2**20,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        triton_fp32_dot="tf32 (persistent)" if torch.backends.cudnn.allow_tf32 else "ieee", **info,
    )
    benchmark.pedantic(_gpu_step, args=(model, x, grad, info["mode"]), rounds=rounds, warmup_rounds=1)
    if benchmark.stats:
        benchmark.extra_info["tokens_per_s"] = s["T"] * s["B"] / benchmark.stats.stats.mean


# The six shapes of issue 25 with the dtype and mode each is measured in (kernels/README.md predicts each).
ISSUE_CASES = {
    "flashrnn-T1024-B16-H768-bf16-fwd+bwd": (dict(T=1024, B=16, I=768, H=768), "bf16", "fwd+bwd"),
    "wide-T512-B64-H1024-bf16-fwd+bwd": (dict(T=512, B=64, I=1024, H=1024), "bf16", "fwd+bwd"),
    "batch-T128-B128-H512-bf16-fwd": (dict(T=128, B=128, I=512, H=512), "bf16", "fwd"),
    "small-T256-B32-H128-fp32-fwd+bwd": (dict(T=256, B=32, I=128, H=128), "fp32", "fwd+bwd"),
    "tiny-T512-B8-H64-fp32-fwd+bwd": (dict(T=512, B=8, I=64, H=64), "fp32", "fwd+bwd"),
    "inference-T2048-B1-H256-fp32-fwd": (dict(T=2048, B=1, I=256, H=256), "fp32", "fwd"),
}
ISSUE_PROVIDERS = {
    "auto": lambda I, H: LSTM(I, H, backend="triton"),
    "cudnn": lambda I, H: torch.nn.LSTM(I, H),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("provider", list(ISSUE_PROVIDERS))
@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_bench_lstm_issue_shapes_gpu(benchmark, case, provider):
    """cuDNN's default fp32 (TF32 on) against ours with the same switch, as a user gets them."""
    s, dtype, mode = ISSUE_CASES[case]
    _bench_against_cudnn(benchmark, s, dtype, ISSUE_PROVIDERS[provider], 5, f"lstm-issue-{case}", shape=case,
                         provider=provider, mode=mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(GPU_PROVIDERS))
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_bench_lstm_gpu(benchmark, shape, dtype, provider, mode):
    _bench_against_cudnn(benchmark, GPU_SHAPES[shape], dtype, GPU_PROVIDERS[provider], GPU_ROUNDS[provider],
                         f"lstm-gpu-{shape}-{dtype}-{mode}", shape=shape, provider=provider, mode=mode)


VARIANT_SHAPES = {
    "flashrnn-T1024-B16-H768": dict(T=1024, B=16, I=768, H=768),
    "cudnn-persist-T512-B64-H1024": dict(T=512, B=64, I=1024, H=1024),
}
VARIANT_PROVIDERS = {
    "persistent": lambda I, H: LSTM(I, H, backend="triton", variant="persistent"),
    "tiled": lambda I, H: LSTM(I, H, backend="triton", variant="tiled"),
    "cudnn": lambda I, H: torch.nn.LSTM(I, H),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(VARIANT_PROVIDERS))
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(VARIANT_SHAPES))
def test_bench_lstm_variants_gpu(benchmark, shape, dtype, provider, mode):
    _bench_against_cudnn(benchmark, VARIANT_SHAPES[shape], dtype, VARIANT_PROVIDERS[provider], 5,
                         f"lstm-variants-{shape}-{dtype}-{mode}", shape=shape, provider=provider, mode=mode)

