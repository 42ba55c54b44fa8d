# T time, B batch, I input, H hidden
"""LSTM timings: `lstm_core` (reference) against `nn.LSTM` (torch), forward and forward+backward.

Every provider includes the input projection (x W_ih^T) in its time. Tokens per second
(T*B per call) goes in `extra_info`. `scripts/bench.sh` runs this for real; the test
suite runs it once with `--benchmark-disable` as a smoke check.
"""

import pytest
import torch

from lstm_core import LSTM

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
