"""leanfit.train.hf: a patched model trains under `Trainer` and TRL's `SFTTrainer` as the unpatched one does (every
logged loss and the final weights within 1e-5, fp32), holds less memory at a 32k vocabulary, generates the same
tokens, and refuses bad use with one clear error."""

import json
import warnings

import pytest
import torch

from leanfit.train.hf import MemoryReportCallback, is_patched, patch_model, unpatch
from leanfit.train.memory.tensor_counter import TensorCounter
from tests.helpers import assert_close
from tests.tiny_lm import tiny_tokenizer

VOCAB, SEQ, STEPS = 4096, 32, 5
WITHIN_1E5 = {torch.float32: (1e-5, 0.0)}


def tiny_config(kind, vocab=VOCAB):
    """2 layers, hidden 64: gpt2 (tied head), llama, gemma2 (softcapped logits), phi (a bias on the head)."""
    import transformers as tf

    common = dict(vocab_size=vocab, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if kind == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if kind == "gemma2":
        return tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0,
                               sliding_window=16)
    if kind == "phi":
        return tf.PhiConfig(**common, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if kind == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if kind == "cohere":
        return tf.CohereConfig(**common, num_key_value_heads=2, logit_scale=0.5)
    if kind == "mixtral":
        return tf.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=2)
    raise ValueError(kind)


def tiny_model(kind, seed=0, vocab=VOCAB):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, vocab), attn_implementation="eager")


def examples(n=16, seed=1):
    """Sequences of SEQ tokens whose tails (a different length each) are padding, ignored by the loss."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        mask = (torch.arange(SEQ) < SEQ - 3 * (i % 4)).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def train_args(out, batch, accum, **kw):
    return dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=batch,
                gradient_accumulation_steps=accum, learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0, **kw)


def run_trainer(model, out, batch=2, accum=1, callbacks=()):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(**train_args(out, batch, accum))
    trainer = Trainer(model=model, args=args, train_dataset=examples(), callbacks=list(callbacks))
    trainer.train()
    return losses_and_weights(trainer)


def losses_and_weights(trainer):
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == STEPS
    return torch.tensor(losses), {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def assert_same_run(got, want):
    assert_close("logged losses", want[0], got[0], table=WITHIN_1E5)
    assert got[1].keys() == want[1].keys()
    for name, w in want[1].items():
        assert_close(name, w, got[1][name], table=WITHIN_1E5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trainer_patched_equals_unpatched(tmp_path, kind):
    want = run_trainer(tiny_model(kind), tmp_path / "ref")
    got = run_trainer(patch_model(tiny_model(kind)), tmp_path / "patched")
    assert_same_run(got, want)
    assert not torch.equal(got[1][next(iter(got[1]))], tiny_model(kind).state_dict()[next(iter(got[1]))])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gemma2", "phi"], ids=["softcap", "bias"])
def test_trainer_patched_equals_unpatched_with_a_softcap_or_a_bias(tmp_path, kind):
    model = tiny_model(kind)
    assert model.config.model_type != "phi" or model.get_output_embeddings().bias is not None
    want = run_trainer(model, tmp_path / "ref")
    assert_same_run(run_trainer(patch_model(tiny_model(kind)), tmp_path / "patched"), want)


@pytest.mark.slow
def test_gradient_accumulation_2x2_equals_1x4(tmp_path):
    """num_items_in_batch: two micro-batches with different counts of valid tokens sum to the 4-row batch's mean."""
    want = run_trainer(tiny_model("llama"), tmp_path / "ref", batch=4, accum=1)
    got = run_trainer(patch_model(tiny_model("llama")), tmp_path / "patched", batch=2, accum=2)
    assert_same_run(got, want)


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))


@pytest.mark.slow
@pytest.mark.parametrize("order", ["patch-then-peft", "peft-then-patch"])
def test_trainer_with_lora(tmp_path, order):
    torch.manual_seed(5)
    want = run_trainer(lora(tiny_model("llama")), tmp_path / "ref")
    torch.manual_seed(5)
    model = lora(patch_model(tiny_model("llama"))) if order == "patch-then-peft" else \
        patch_model(lora(tiny_model("llama")))
    assert is_patched(model)
    assert_same_run(run_trainer(model, tmp_path / "patched"), want)


def one_step_grads(model, ids, labels):
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2", "phi", *(pytest.param(k, marks=pytest.mark.slow)
                                                                   for k in ("qwen2", "cohere"))])
def test_loss_and_gradients_match_the_model_s_own_for_each_architecture(kind):
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 20:] = -100
    model = tiny_model(kind)
    want = one_step_grads(model, ids, labels)
    out = patch_model(model)(input_ids=ids, labels=labels)
    assert out.logits is None
    got = one_step_grads(model, ids, labels)
    assert_close("loss", want[0], got[0])
    assert got[1].keys() == want[1].keys()
    for name, g in want[1].items():
        assert_close(name, g, got[1][name])
    model.eval()
    assert model(input_ids=ids, labels=labels).logits.shape == (2, SEQ, VOCAB)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))
    model = tiny_model("llama")
    want = one_step_grads(model, ids, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    got = one_step_grads(patch_model(model), ids, ids)
    assert_close("loss", want[0], got[0])
    for name, g in want[1].items():
        assert_close(name, g, got[1][name])


def test_num_items_in_batch_divides_the_summed_loss():
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    model = tiny_model("llama")
    model.train()
    logits = model(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), ids[:, 1:].reshape(-1),
                                            reduction="sum") / 100
    got = patch_model(model)(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(100)).loss
    assert_close("loss", ref, got.double(), dtype=torch.float32)


def test_generation_is_unchanged_and_unpatch_restores_the_forward():
    model = tiny_model("llama").eval()
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    want = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    patch_model(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0), want)
    assert want.shape == (1, 16)
    model.train()
    assert model(input_ids=prompt, labels=prompt).logits is None
    unpatch(model)
    assert not is_patched(model) and "forward" not in vars(model)
    assert model(input_ids=prompt, labels=prompt).logits is not None


def peak_of_one_step(model, ids):
    model.train()
    counter = TensorCounter()
    counter.claim(list(model.parameters()), "parameters")
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.peak


def test_a_patched_step_holds_less_memory_at_a_32k_vocabulary():
    ids = torch.randint(0, 32768, (4, SEQ), generator=torch.Generator().manual_seed(0))
    unpatched = peak_of_one_step(tiny_model("llama", vocab=32768), ids)
    patched = peak_of_one_step(patch_model(tiny_model("llama", vocab=32768)), ids)
    logits_bytes = 4 * SEQ * 32768 * 4
    assert patched < unpatched - logits_bytes, (patched, unpatched)


def test_bad_use_is_one_clear_error_each(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"architecture 'mixtral' .* is not supported; expected one of gpt2"):
        patch_model(tiny_model("mixtral"))
    model = patch_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="already patched; call unpatch"):
        patch_model(model)
    with pytest.raises(ValueError, match="impl 'triton' runs on CUDA"):
        patch_model(tiny_model("llama"), impl="triton")
    with pytest.raises(ValueError, match="expected impl in"):
        patch_model(tiny_model("llama"), impl="fast")
    with pytest.raises(ValueError, match="expected a transformers causal LM"):
        patch_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="is not patched"):
        unpatch(tiny_model("llama"))


def test_memory_report_callback_prints_the_estimate_and_writes_the_report(tmp_path, capsys):
    callback = MemoryReportCallback(block_size=SEQ, budget="1MiB")
    run_trainer(patch_model(tiny_model("llama")), tmp_path, callbacks=[callback])
    printed = capsys.readouterr().out
    assert "model LlamaConfig: " in printed and "micro-batch 2 x 32 tokens" in printed
    assert "loss chunked, adamw" in printed
    assert callback.warning in printed and "does not fit 1.0 MiB" in callback.warning
    report = json.loads((tmp_path / "memory_report.json").read_text())
    assert [s["step"] for s in report["steps"]] == list(range(STEPS))
    assert set(report["steps"][-1]["phases"]) == {"forward_backward", "optimizer_step"}
    assert report["peak"]["bytes"] == sum(report["peak"]["breakdown"].values()) > 0
    assert (tmp_path / "memory.png").stat().st_size > 0


def sft_dataset():
    from datasets import Dataset

    text = ("It was the best of times, it was the worst of times. The Count said: I am not a vampire. "
            "You are an Englishman, and you are a guest. Jonathan Harker wrote in his journal. ")
    return Dataset.from_dict({"text": [text[i:i + 40 + 7 * (i % 5)] for i in range(0, 160, 8)]})


def run_sft(model, out, packing):
    trl = pytest.importorskip("trl", reason="TRL is not installed (`pip install -e .[dev]` brings it)")
    config = trl.SFTConfig(**train_args(out, 2, 1), packing=packing, max_length=SEQ, dataset_text_field="text")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=sft_dataset(),
                                 processing_class=tiny_tokenizer())
        trainer.train()
    return losses_and_weights(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["no-packing", "packing"])
def test_sft_trainer_trains_a_patched_model_as_an_unpatched_one(tmp_path, packing):
    """TRL 1.16's SFTTrainer wraps the forward with its own fused LM head (`add_fused_lm_head`) and trains through
    it, so its loss is TRL's, not leanfit's: this proves the patch is compatible (same losses and weights), and that
    TRL's wrapper hands every other call (labels, no `fused_lm_head`) to leanfit's forward."""
    want = run_sft(tiny_model("llama"), tmp_path / "ref", packing)
    model = patch_model(tiny_model("llama"))
    got = run_sft(model, tmp_path / "patched", packing)
    assert_same_run(got, want)
    assert is_patched(model)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(6))
    assert model.train()(input_ids=ids, labels=ids).logits is None
