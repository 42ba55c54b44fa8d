import contextlib
import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F

from leanfit.train.commands.finetune import main
from leanfit.train.config import TrainConfig
from leanfit.train.lm_loss import causal_lm_loss
from leanfit.train.model.loading import load_model
from leanfit.train.recipe import finetune
from leanfit.train.recipe.context import Hooks
from leanfit.train.recipe.finetune import run
from leanfit.train.recipe.outputs import WRITERS
from leanfit.train.step import accumulate_gradients, lr_factor, make_loss_fn, validation_loss
from leanfit.train.units import CUDA_CONTEXT_BYTES
from tests.fake_cuda import H100_TOTAL_BYTES
from tests.fake_cuda import install as install_fake_cuda
from tests.helpers import assert_close
from tests.tiny_lm import tiny_model_dir, tiny_run_config

GRAD_TOL = {torch.float32: (1e-6, 1e-4)}
OUTPUTS = ["metrics.jsonl", "loss.png", "checkpoint", "checkpoints", "run.json", "samples.md", "samples.jsonl"]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def model_and_blocks(kind, device, n=4, t=12):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind)).to(device)
    torch.manual_seed(3)
    return model, torch.randint(0, model.config.vocab_size, (n, t + 1), device=device)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("impl", ["chunked", "naive", "hf"])
def test_accumulation_2x2_equals_1x4_and_the_full_batch_mean(kind, impl, device):
    model, blocks = model_and_blocks(kind, device)
    loss_fn = make_loss_fn(impl)

    def grads(micro):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, micro, loss_fn)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_1x4, g_1x4 = grads([blocks])
    loss_2x2, g_2x2 = grads([blocks[:2], blocks[2:]])
    loss_4x1, g_4x1 = grads([blocks[i: i + 1] for i in range(4)])
    model.zero_grad(set_to_none=True)
    logits = model(blocks[:, :-1]).logits
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), blocks[:, 1:].reshape(-1))
    ref.backward()
    assert_close("loss 1x4", ref.float(), loss_1x4, table=GRAD_TOL)
    assert_close("loss 2x2", loss_1x4, loss_2x2, table=GRAD_TOL)
    for name, p in model.named_parameters():
        assert_close(f"grad 1x4 {name}", p.grad, g_1x4[name], table=GRAD_TOL)
        assert_close(f"grad 2x2 {name}", g_1x4[name], g_2x2[name], table=GRAD_TOL)
        assert_close(f"grad 4x1 {name}", g_1x4[name], g_4x1[name], table=GRAD_TOL)



def labelled_loss(model, blocks, num_items):  # blocks (B, T): token ids, -100 where the label is ignored
    return causal_lm_loss(model, blocks.clamp(min=0), labels=blocks, impl="chunked", reduction="sum",
                          num_items=num_items)


def ignoring_blocks(blocks):
    """`blocks` with -100 labels in uneven amounts: row 0 keeps 2 of its 12 targets, row 2 loses 4, row 3 2."""
    blocks = blocks.clone()
    blocks[0, 3:] = -100
    blocks[2, 5:9] = -100
    blocks[3, -2:] = -100
    return blocks


def full_batch_grads(model, blocks):
    """The fp64 mean token loss of `blocks` as one batch, and the gradients it gives."""
    model.zero_grad(set_to_none=True)
    logits = model(blocks.clamp(min=0)[:, :-1]).logits
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), blocks[:, 1:].reshape(-1))
    ref.backward()
    return ref, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("split", [(1, 3), (3, 1), (2, 1, 1)], ids=["1+3", "3+1", "2+1+1"])
def test_uneven_accumulation_with_ignored_labels_equals_the_full_batch_mean(split, device):
    """Micro-batches of different sizes and different counts of -100 labels: each summed loss is divided by the
    step's count of target tokens, not by the number of micro-batches or by the first one's count."""
    model, blocks = model_and_blocks("llama", device)
    blocks = ignoring_blocks(blocks)
    ref, ref_grads = full_batch_grads(model, blocks)
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, list(torch.split(blocks, split)), labelled_loss)
    assert_close("loss", ref.float(), loss, table=GRAD_TOL)
    for name, p in model.named_parameters():
        assert_close(f"grad {name}", ref_grads[name], p.grad, table=GRAD_TOL)


def dropout_model_and_blocks(kind="gpt2", n=5, t=12):
    """A tiny model with dropout 0.5, in train mode, and (n, t+1) token blocks; their fp64 mean token loss in
    eval mode, computed explicitly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind, dropout=0.5))
    torch.manual_seed(5)
    blocks = torch.randint(0, model.config.vocab_size, (n, t + 1))
    with torch.no_grad():
        logits = model.eval()(blocks[:, :-1]).logits
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), blocks[:, 1:].reshape(-1))
    return model.train(), blocks, ref


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_validation_loss_on_a_model_with_dropout_is_the_eval_mode_loss(kind):
    model, blocks, ref = dropout_model_and_blocks(kind)
    loss = validation_loss(model, blocks, 2, make_loss_fn("chunked"))
    assert_close("validation loss", ref.float(), torch.tensor(loss), table=GRAD_TOL)
    assert model.training, "validation puts the model back in train mode"

def test_lr_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(iters=20, warmup=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(config.iters)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert lr_factor(config.iters, config) == pytest.approx(0.1)
    constant = TrainConfig(iters=20, warmup=0, schedule="constant")
    assert {lr_factor(s, constant) for s in range(20)} == {1.0}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_loss_falls_on_a_repeated_text_and_every_output_is_written(tmp_path, corpus, prompts, kind):
    config = tiny_run_config(tmp_path, corpus, prompts, kind=kind, iters=30, eval_every=10, lr=1e-2, warmup=3)
    with pytest.warns(UserWarning, match="high for fine-tuning"):
        summary = run(config)
    out = tmp_path / "run"
    assert summary["status"] == "complete" and summary["steps"] == 30
    assert summary["val_ppl_end"] < 0.5 * summary["val_ppl_start"]
    for name in OUTPUTS:
        assert (out / name).exists(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    metrics = read_metrics(out)
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in train] == list(range(1, 31))
    assert [m["step"] for m in evals] == [0, 10, 20, 30]
    assert {"loss", "lr", "tokens_per_s", "peak_mem_mb"} <= set(train[0])
    assert math.isclose(evals[0]["val_ppl"], summary["val_ppl_start"])
    assert sum(m["loss"] for m in train[-5:]) / 5 < sum(m["loss"] for m in train[:5]) / 5 - 1.0
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["iters"] == 30 and saved["summary"]["status"] == "complete"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["You are a", "You are an"]
    assert all(len(s["samples"]) == 2 for s in samples)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reloaded_checkpoint_gives_the_same_logits(tmp_path, corpus, prompts):
    from transformers import AutoModelForCausalLM

    held = {}
    hooks = Hooks(writers={"complete": [*WRITERS["complete"], lambda ctx: held.update(model=ctx.model)]})
    run(tiny_run_config(tmp_path, corpus, prompts, kind="llama", iters=3, lr=5e-4), hooks=hooks)
    ids = torch.randint(0, 300, (2, 10))
    held["model"].eval()
    with torch.no_grad():
        ref = held["model"](ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint")(ids).logits
        loaded, _ = load_model(str(tmp_path / "run" / "checkpoint"))
        ours = loaded(ids).logits
    assert_close("from_pretrained logits", ref, plain)
    assert_close("load_model logits", ref, ours)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_after_sigint_equals_an_uninterrupted_run(tmp_path, corpus, prompts, dtype):
    common = dict(dropout=0.1, iters=8, eval_every=3, lr=1e-3 if dtype == "fp32" else 5e-4, dtype=dtype)
    whole = tiny_run_config(tmp_path, corpus, prompts, out=str(tmp_path / "whole"), **common)
    cut = tiny_run_config(tmp_path, corpus, prompts, out=str(tmp_path / "cut"), **common)
    with pytest.warns(UserWarning) if dtype == "fp32" else contextlib.nullcontext():
        run(whole)

    def interrupt(ctx, record):
        if ctx.step == 4:
            signal.raise_signal(signal.SIGINT)

    with pytest.warns(UserWarning) if dtype == "fp32" else contextlib.nullcontext():
        first = run(cut, hooks=Hooks(on_step=[interrupt]))
    assert first["status"] == "interrupted" and first["steps"] == 4
    for name in ["metrics.jsonl", "loss.png", "checkpoint", "checkpoints", "run.json"]:
        assert (tmp_path / "cut" / name).exists(), name
    assert not (tmp_path / "cut" / "samples.md").exists()
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["summary"]["status"] == "interrupted"

    assert main(["--resume", str(tmp_path / "cut")]) == 0
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [(m["kind"], m["step"]) for m in a] == [(m["kind"], m["step"]) for m in b]
    for key in ("loss", "lr", "grad_norm"):
        ref = torch.tensor([m[key] for m in a if m["kind"] == "train"], dtype=torch.float64)
        out = torch.tensor([m[key] for m in b if m["kind"] == "train"], dtype=torch.float64)
        assert_close(f"resumed {key}", ref, out, table={torch.float64: (1e-6, 1e-5)})
    assert (tmp_path / "cut" / "samples.md").read_text() == (tmp_path / "whole" / "samples.md").read_text()


def test_dry_setup_hook_stops_before_any_output(tmp_path, corpus, prompts):
    def stop(ctx):
        ctx.stop = True

    summary = run(tiny_run_config(tmp_path, corpus, prompts, lr=1e-4), hooks=Hooks(on_setup=[stop]))
    assert summary["status"] == "stopped" and not (tmp_path / "run").exists()


class ModelLoading(Exception):
    """Raised in place of loading the weights: setup got that far."""


def test_memory_budget_setup_on_a_simulated_80gb_card_reaches_model_loading(tmp_path, corpus, prompts, monkeypatch):
    def load(config, model_ref, device):
        raise ModelLoading(device)

    config = tiny_run_config(tmp_path, corpus, prompts, device="cuda", memory_budget="15GiB")
    fake_cuda = install_fake_cuda(monkeypatch)  # after the tiny model is written (it forks every device's RNG)
    monkeypatch.setattr(finetune, "load_for_training", load)
    with pytest.raises(ModelLoading) as loading:
        run(config)
    assert loading.value.args == (torch.device("cuda", 0),)
    fraction = (15 * 2**30 - CUDA_CONTEXT_BYTES) / H100_TOTAL_BYTES
    assert fake_cuda.named("set_per_process_memory_fraction") == [(0, (fraction,))]
    assert not (tmp_path / "run").exists()
