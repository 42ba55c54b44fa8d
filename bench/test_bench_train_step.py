# B batch, T block (tokens), H hidden, V vocab
"""One fine-tuning step (forward, loss, backward, AdamW), chunked loss vs the HF default loss.

Providers: `hf`, `model(blocks, labels=blocks).loss` (full (B, T, V) logits); `chunked`,
`leanfit.train.lm_loss.causal_lm_loss(..., impl="chunked")`; `triton` on GPU. All go through
`leanfit.train.step.accumulate_gradients` and `optimizer_step` with `leanfit.train.optim.make_optimizer`, the
code the `finetune` job runs.

Time is pytest-benchmark's; peak memory is measured once per case outside the timed rounds, after a warm-up
step (so the optimizer state exists), as `peak_mib`: on the CPU the tracked tensor peak of
torch.distributed._tools.mem_tracker.MemTracker, on GPU torch.cuda.max_memory_allocated.

The smoke run (`--benchmark-disable`) uses a small random Llama; LEANFIT_BENCH_FULL=1 adds the SmolLM2-135M
shape (random weights; the config of leanfit.train.model.architectures).
"""

import os

import pytest
import torch

from leanfit.train.model.architectures import architecture_config
from leanfit.train.optim import make_optimizer
from leanfit.train.step import accumulate_gradients, make_loss_fn, optimizer_step

FULL = os.environ.get("LEANFIT_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {"small-llama-B4-T128-H128-V8192": ("small", 4, 128)}
if FULL or DEVICE.type == "cuda":
    CASES["smollm2-135m-B4-T128"] = ("smollm2-135m", 4, 128)
PROVIDERS = ["hf", "chunked"] + (["triton"] if DEVICE.type == "cuda" else [])


def build(name):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "small":
        config = LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    else:
        config = architecture_config(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(DEVICE)
    model.train()
    return model


def peak_mib(step, model, optimizer):
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")
    return max(kinds["Total"] for kinds in snapshot.values()) / 2**20


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_train_step(benchmark, case, provider):
    name, batch, block = CASES[case]
    model = build(name)
    blocks = torch.randint(0, model.config.vocab_size, (batch, block), device=DEVICE)
    loss_fn = make_loss_fn(provider)
    with torch.no_grad():
        ref = make_loss_fn("hf")(model, blocks, blocks[:, 1:].numel())
        assert torch.allclose(loss_fn(model, blocks, blocks[:, 1:].numel()).float(), ref.float(), rtol=1e-4)
    optimizer = make_optimizer(model, "adamw", DEVICE.type, lr=1e-5)
    params = list(model.parameters())

    def step():
        accumulate_gradients(model, [blocks], loss_fn)
        optimizer_step(optimizer, params, 1.0)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    step()
    benchmark.extra_info.update(peak_mib=peak_mib(step, model, optimizer), tokens=batch * block,
                                device=str(DEVICE), case=case, provider=provider)
    benchmark.pedantic(step, rounds=1 if benchmark.disabled else 5, warmup_rounds=0 if benchmark.disabled else 1)
    if not benchmark.disabled and benchmark.stats:
        benchmark.extra_info["tokens_per_s"] = batch * block / benchmark.stats.stats.median
