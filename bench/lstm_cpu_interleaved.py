# T time, B batch, I input, H hidden
"""Interleaved CPU timings of `lstm_core.LSTM` against `nn.LSTM`: the median of many alternating calls.

Usage: python bench/lstm_cpu_interleaved.py [--rounds 30] [--threads 1] [--shape NAME ...]

The shapes, providers and timed step are those of `bench/test_bench_lstm.py -k cpu` (imported, not
copied). Each round calls every provider once, in an order that rotates from round to round, so
that a burst of load on a shared machine hits all of them alike; warm-up calls stay out of the
timing. With `lstm_core.functional.lstm_layer_autograd` present, a third provider `loop` runs the
plain autograd loop (the path `lstm_layer` took before its fast path) through the same module.
Prints a Markdown table of median milliseconds and the ratios against `nn.LSTM`.
"""

import argparse
import statistics
import time

import torch
from test_bench_lstm import PROVIDERS, SHAPES, _step

from leanfit.lstm_core import LSTM, functional, modules


class _Loop(LSTM):
    """`lstm_core.LSTM` running every layer through the plain autograd loop."""

    def forward(self, input, hx=None):
        fast, modules.lstm_layer = modules.lstm_layer, functional.lstm_layer_autograd
        try:
            return super().forward(input, hx)
        finally:
            modules.lstm_layer = fast


def providers():
    found = dict(PROVIDERS)
    if hasattr(functional, "lstm_layer_autograd"):
        found["loop"] = lambda I, H: _Loop(I, H)
    return found


def measure(shape, mode, rounds, warmup=3):
    """{provider: median seconds} of `_step` at one shape and mode, the providers interleaved."""
    s = SHAPES[shape]
    torch.manual_seed(0)
    ref = torch.nn.LSTM(s["I"], s["H"])
    models = {}
    for name, make in providers().items():
        models[name] = make(s["I"], s["H"])
        models[name].load_state_dict(ref.state_dict())
    x = torch.randn(s["T"], s["B"], s["I"], requires_grad=mode != "fwd")
    for model in models.values():
        torch.testing.assert_close(model(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
        for _ in range(warmup):
            _step(model, x, mode)
    names, times = list(models), {name: [] for name in models}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            _step(models[name], x, mode)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(providers())
    others = [n for n in names if n != "torch"]
    head = ["shape", "mode", *(f"{n} ms" for n in names), *(f"{n}/torch" for n in others)]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds, medians")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for shape in args.shape:
        for mode in ("fwd", "fwd+bwd"):
            med = measure(shape, mode, args.rounds)
            cells = [shape, mode, *(f"{med[n] * 1e3:.3f}" for n in names)]
            cells += [f"{med[n] / med['torch']:.2f}" for n in others]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
