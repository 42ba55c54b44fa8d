# B batch (streams), T window, H hidden, V vocab
"""One `leanfit lstm` training step (embedding, LSTM, linear cross-entropy, backward, clipping, AdamW) with our
LSTM against `torch.nn.LSTM` in the same model.

Providers: `reference` (lstm_core's plain-op LSTM) and `torch` (nn.LSTM: its CPU kernel, cuDNN on CUDA) on
any device; `triton` (the fused kernel) on CUDA. Time is pytest-benchmark's; `tokens_per_s` follows from its
median. Peak memory is measured once per case outside the timed rounds, after a warm-up step, with the run's own
profiler (leanfit.train.memory.profiler.MemoryProfiler: the tracked tensor peak on the CPU, the allocator's
peak on CUDA), as `peak_mib`.

The smoke run (`--benchmark-disable`) uses a small shape; LEANFIT_BENCH_FULL=1 (or a GPU) adds the `cpu`
preset's shape, and a GPU the `gpu` preset's.
"""

import os

import pytest
import torch

from leanfit.train.charlm.config import PRESETS
from leanfit.train.charlm.model import CharLM, ModelShape
from leanfit.train.memory.profiler import MemoryProfiler
from leanfit.train.optim import make_optimizer

FULL = os.environ.get("LEANFIT_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCAB = 96


def _case(preset):
    p = PRESETS[preset]
    return ModelShape(VOCAB, p["embed"], p["hidden"], p["layers"]), p["batch_size"], p["block_size"]


CASES = {"small-L1-H32-B4-T16": (ModelShape(VOCAB, 16, 32, 1), 4, 16)}
if FULL or DEVICE.type == "cuda":
    CASES["cpu-preset-L1-H256-B32-T64"] = _case("cpu")
if DEVICE.type == "cuda":
    CASES["gpu-preset-L2-H1024-B64-T256"] = _case("gpu")
PROVIDERS = ["reference", "torch"] + (["triton"] if DEVICE.type == "cuda" else [])


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(step, model, optimizer):
    prof = MemoryProfiler(model, optimizer, DEVICE)
    with prof.step(0):
        with prof.phase("step"):
            step()
    prof.close()
    return prof.peak["bytes"] / 2**20


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_charlm_train_step(benchmark, case, provider):
    shape, batch, window = CASES[case]
    torch.manual_seed(0)
    model = CharLM(shape, provider).to(DEVICE)
    x, y = torch.randint(0, VOCAB, (2, batch, window), device=DEVICE)
    state = tuple(torch.zeros(shape.layers, batch, shape.hidden, device=DEVICE) for _ in range(2))
    optimizer = make_optimizer(model, "adamw", DEVICE.type, lr=1e-3)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda")

    def step():
        with autocast:
            loss, _ = model.loss(x, y, state)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()

    step()
    benchmark.extra_info.update(peak_mib=peak_mib(step, model, optimizer), tokens=batch * window,
                                device=str(DEVICE), case=case, provider=provider)
    benchmark.pedantic(step, rounds=1 if benchmark.disabled else 10, warmup_rounds=0 if benchmark.disabled else 2)
    if not benchmark.disabled and benchmark.stats:
        benchmark.extra_info["tokens_per_s"] = batch * window / benchmark.stats.stats.median
