import json

import pytest
import torch

from leanfit.train.commands.generate import main
from leanfit.train.evaluation.generate import generate_texts
from leanfit.train.model.loading import load_model
from tests.tiny_lm import tiny_model_dir


@pytest.fixture(scope="module")
def tiny():
    return load_model(str(tiny_model_dir("gpt2")))


def test_pipeline_shape_prompt_prefix_and_length(tiny):
    model, tokenizer = tiny
    prompts = ["You are a", "It was an"]
    out = generate_texts(model, tokenizer, prompts, max_length=12, num_return_sequences=3)
    assert len(out) == 2 and all(len(samples) == 3 for samples in out)
    for prompt, samples in zip(prompts, out, strict=True):
        for s in samples:
            assert set(s) == {"generated_text"} and s["generated_text"].startswith(prompt)


def test_seeded_and_leaves_the_global_rng_alone(tiny):
    model, tokenizer = tiny
    state = torch.get_rng_state()
    a = generate_texts(model, tokenizer, ["You are"], max_length=10, num_return_sequences=4, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    b = generate_texts(model, tokenizer, ["You are"], max_length=10, num_return_sequences=4, seed=7)
    assert a == b


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "prompts"), (dict(prompts="You are"), "prompts"), (dict(max_length=0), "max_length"),
    (dict(max_length=2), "counts the prompt"), (dict(temperature=0.0), "temperature"), (dict(top_p=1.5), "top_p"),
], ids=["empty", "string", "zero-length", "shorter-than-prompt", "temperature", "top-p"])
def test_bad_arguments(tiny, kwargs, message):
    model, tokenizer = tiny
    args = dict(prompts=["You are a"], max_length=12, num_return_sequences=2) | kwargs
    with pytest.raises(ValueError, match=message):
        generate_texts(model, tokenizer, **args)


def test_cli_json(capsys):
    rc = main(["--model", str(tiny_model_dir("gpt2")), "--prompt", "You are a", "--prompt", "You are an",
               "--num-return-sequences", "2", "--max-length", "10", "--device", "cpu", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [len(x) for x in out] == [2, 2]
    assert out[1][0]["generated_text"].startswith("You are an")


@pytest.mark.slow
def test_embedded_model_loads_converts_and_generates(tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    from leanfit.train.model.loading import embedded_gguf_path, save_checkpoint

    model, tokenizer = load_model("smollm2-135m")
    assert getattr(model.config, "quantization_config", None) is None
    reader = gguf.GGUFReader(embedded_gguf_path())
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
    assert torch.equal(ref.reshape(model.get_input_embeddings().weight.shape), model.get_input_embeddings().weight)
    out = generate_texts(model, tokenizer, ["I am not a vampire. You are"], max_length=16, num_return_sequences=2)
    assert len(out[0]) == 2 and all(s["generated_text"].startswith("I am not a vampire. You are") for s in out[0])
    ids = tokenizer("Jonathan Harker kept a journal", return_tensors="pt")["input_ids"]
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
