# B batch, T block (tokens), V vocab
"""One `transformers.Trainer` step (its `training_step`: forward, loss, backward; then the AdamW step), the model
unpatched (HF's loss on the full (B, T, V) logits), patched by `leanfit.train.hf.patch_model`, or patched by
Liger-Kernel's `apply_liger_kernel_to_llama` where Liger is installed and there is a GPU (its kernels are Triton).

`peak_mib` is measured once per case after a warm-up step (the optimizer state exists): on the CPU the peak of
leanfit's `TensorCounter` (every live tensor storage), on a GPU `torch.cuda.max_memory_allocated`. Time is
pytest-benchmark's. The smoke run uses a small random Llama at a 32k vocabulary; LEANFIT_BENCH_FULL=1 (or a GPU)
adds the SmolLM2-135M shape.
"""

import importlib.util
import os
import warnings

import pytest
import torch

from leanfit.train.hf import patch_model
from leanfit.train.memory.tensor_counter import TensorCounter
from leanfit.train.model.architectures import architecture_config

FULL = os.environ.get("LEANFIT_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {"small-llama-B4-T128-V32768": ("small", 4, 128)}
if FULL or DEVICE.type == "cuda":
    CASES["smollm2-135m-B4-T512"] = ("smollm2-135m", 4, 512)
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
PROVIDERS = ["unpatched", "leanfit", "liger"]


def build(name, provider):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = architecture_config(name) if name != "small" else LlamaConfig(
        vocab_size=32768, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(DEVICE)
    if provider == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(fused_linear_cross_entropy=True, rope=False, rms_norm=False, swiglu=False,
                                    cross_entropy=False, model=model)  # this instance only
    return patch_model(model) if provider == "leanfit" else model


def trainer_step(model, batch, block, tmp_path):
    """A Trainer with its AdamW, and one step of it as a function."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=1, report_to=[],
                             use_cpu=DEVICE.type == "cpu", learning_rate=1e-5, save_strategy="no")
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer()
    ids = torch.randint(0, model.config.vocab_size, (batch, block), device=DEVICE)
    inputs = {"input_ids": ids, "labels": ids}
    model.train()

    def step():
        trainer.training_step(model, inputs, num_items_in_batch=torch.tensor(batch * (block - 1), device=DEVICE))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return trainer, step


def peak_mib(step, model, optimizer):
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() / 2**20
    counter = TensorCounter()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    counter.claim(list(model.parameters()), "parameters")
    counter.claim(state, "optimizer_state")
    with counter:
        step()
    return counter.peak / 2**20


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_trainer_step(benchmark, tmp_path, case, provider):
    if provider == "liger" and not (HAS_LIGER and DEVICE.type == "cuda"):
        pytest.skip("Liger-Kernel is not installed, or there is no GPU for its Triton kernels")
    name, batch, block = CASES[case]
    model = build(name, provider)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, step = trainer_step(model, batch, block, tmp_path)
    step()
    benchmark.extra_info.update(peak_mib=peak_mib(step, model, trainer.optimizer), tokens=batch * block,
                                device=str(DEVICE), case=case, provider=provider)
    benchmark.pedantic(step, rounds=1 if benchmark.disabled else 5, warmup_rounds=0 if benchmark.disabled else 1)
    if not benchmark.disabled and benchmark.stats:
        benchmark.extra_info["tokens_per_s"] = batch * block / benchmark.stats.stats.median
