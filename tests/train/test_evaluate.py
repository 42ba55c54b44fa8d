"""Perplexity, the a/an probe, distinct-n, prompt studies and the `evaluate` CLI's bad input."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from leanfit.train.commands.evaluate import format_table, main
from leanfit.train.evaluation.evaluate import (
    block_nll,
    distinct_n,
    evaluate_model,
    perplexity,
    read_prompts,
    samples_logprob,
)
from leanfit.train.evaluation.probe import (
    article_probe,
    article_token_classes,
    article_token_ids,
    builtin_contexts,
    classify_word_start,
    heldout_contexts,
)
from tests.train.test_finetune import dropout_model_and_blocks


@pytest.fixture(scope="module")
def pretrained():
    from leanfit.train.model.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tokenizer(pretrained):
    return pretrained[1]


def tiny_llama(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("letters,expected", [
    ("apple", "vowel"), ("dog", "consonant"), ("hour", "vowel"), ("Honest", "vowel"), ("honey", "consonant"),
    ("heir", "vowel"), ("house", "consonant"), ("university", "consonant"), ("unimportant", "vowel"),
    ("unusual", "vowel"), ("European", "consonant"), ("one", "consonant"), ("onion", "vowel"),
    ("FBI", "vowel"), ("UN", "consonant"), ("X", "vowel"), ("NASAS", "consonant"), ("year", "consonant"),
])
def test_classify_word_start(letters, expected):
    assert classify_word_start(letters) == expected


@pytest.mark.parametrize("bad", ["", "8ball", "é", "a-b"])
def test_classify_word_start_rejects_non_letters(bad):
    with pytest.raises(ValueError, match="ASCII letters"):
        classify_word_start(bad)


@pytest.mark.slow
def test_token_classes_on_embedded_tokenizer(tokenizer):
    vowel_ids, consonant_ids = article_token_classes(tokenizer)
    vowel, consonant = set(vowel_ids.tolist()), set(consonant_ids.tolist())
    assert not vowel & consonant
    expected = {
        "Ġapple": "vowel", "Ġhour": "vowel", "Ġhonest": "vowel", "Ġeagle": "vowel", "ĠFBI": "vowel",
        "ĠX": "vowel", "Ġun": "vowel", "Ġuniversity": "consonant", "Ġhouse": "consonant",
        "Ġone": "consonant", "ĠEuropean": "consonant", "Ġdog": "consonant", "Ġyear": "consonant",
        "apple": None, "Ġ": None, "Ġ(": None, "ing": None,
    }
    for token, cls in expected.items():
        i = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer.convert_ids_to_tokens(i) == token, f"{token} is not in the vocabulary"
        got = "vowel" if i in vowel else "consonant" if i in consonant else None
        assert got == cls, f"{token}: expected {cls}, got {got}"
    for i in list(vowel)[:200] + list(consonant)[:200]:
        assert tokenizer.convert_ids_to_tokens(i).startswith("Ġ")


class _ArticleStub(torch.nn.Module):
    """Puts almost all next-token mass on `after_an` when the last input is " an", else on `after_a`."""

    def __init__(self, vocab, an_ids, after_a, after_an):
        super().__init__()
        self.vocab, self.an_ids, self.after_a, self.after_an = vocab, an_ids, after_a, after_an
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        is_an = torch.isin(input_ids, torch.tensor(self.an_ids))
        logits[..., self.after_a] = torch.where(is_an, 0.0, 30.0)
        logits[..., self.after_an] = torch.where(is_an, 30.0, 0.0)
        return SimpleNamespace(logits=logits)


@pytest.mark.slow
@pytest.mark.parametrize("right", [True, False], ids=["right", "wrong"])
def test_probe_metrics_on_stub(tokenizer, right):
    an_ids = [i for i, a in article_token_ids(tokenizer).items() if a == "an"]
    vowel_tok, consonant_tok = tokenizer.convert_tokens_to_ids(["Ġapple", "Ġdog"])
    a_target, an_target = (consonant_tok, vowel_tok) if right else (vowel_tok, consonant_tok)
    stub = _ArticleStub(len(tokenizer), an_ids, a_target, an_target)
    contexts = ["You are a", "Without a word, long after midnight, she handed me an", "It was a",
                "It was an", "Then I saw an"]
    result = article_probe(stub, tokenizer, contexts, batch_size=2)
    assert (result["a"]["n"], result["an"]["n"], result["n"]) == (2, 3, 5)
    expected = 1.0 if right else 0.0
    for article in ("a", "an"):
        assert result[article]["accuracy"] == expected
        assert result[article]["mean_mass_correct"] == pytest.approx(expected, abs=1e-6)
    assert result["balanced_accuracy"] == expected


@pytest.mark.slow
def test_probe_rejects_context_without_article(tokenizer):
    with pytest.raises(ValueError, match="article"):
        article_probe(tiny_llama(len(tokenizer)), tokenizer, ["You are the"])


@pytest.mark.slow
def test_probe_separates_pretrained_from_random(pretrained):
    from transformers import AutoModelForCausalLM

    model, tokenizer = pretrained
    contexts = builtin_contexts()[:24]
    good = article_probe(model, tokenizer, contexts, batch_size=24)
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    bad = article_probe(random_model, tokenizer, contexts, batch_size=24)
    assert good["balanced_accuracy"] >= 0.9, good
    assert good["balanced_accuracy"] - bad["balanced_accuracy"] >= 0.3, (good, bad)
    assert good["an"]["mean_mass_correct"] - bad["an"]["mean_mass_correct"] >= 0.3, (good, bad)


@pytest.mark.slow
def test_heldout_contexts(tokenizer):
    ids = tokenizer(" It was a dark night and an owl sat on a branch of an old oak; a", add_special_tokens=False)[
        "input_ids"]
    blocks = torch.tensor([ids, ids])
    articles = article_token_ids(tokenizer)
    contexts = heldout_contexts(blocks, tokenizer, max_per_article=100, min_context=3)
    found = [(len(c), articles[c[-1]]) for c in contexts]
    positions = [i + 1 for i, t in enumerate(ids[:-1]) if t in articles and i >= 3]
    assert sorted(n for n, _ in found) == sorted(positions * 2)
    assert all(c == ids[: len(c)] for c in contexts)
    capped = heldout_contexts(blocks, tokenizer, max_per_article=1, min_context=3)
    assert sorted(articles[c[-1]] for c in capped) == ["a", "an"]


def _tiny_gpt2(vocab=97, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=24, n_layer=2, n_head=2, n_positions=64)).eval()


def test_perplexity_matches_exp_mean_nll(device):
    model = _tiny_gpt2().to(device)
    blocks = torch.randint(0, 97, (5, 18))
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            logits = model(input_ids=block[None, :-1].to(device)).logits[0].double().cpu()  # (T, V)
            targets = block[1:]
            total += (torch.logsumexp(logits, -1) - logits[torch.arange(len(targets)), targets]).sum().item()
            count += len(targets)
    reference = math.exp(total / count)
    for batch_size in (1, 2, 5, 8):
        assert perplexity(model, blocks, batch_size=batch_size) == pytest.approx(reference, rel=1e-5)
    assert block_nll(model, blocks, 2)[1] == 5 * 17


@pytest.mark.parametrize("shape", [(0, 5), (3, 1), (6,)])
def test_perplexity_rejects_bad_blocks(shape):
    with pytest.raises(ValueError, match="expected blocks"):
        perplexity(_tiny_gpt2(), torch.zeros(shape, dtype=torch.long), 2)


def test_distinct_n_on_hand_made_strings():
    texts = ["The cat sat", "the cat ran", "dog"]
    assert distinct_n(texts, 1) == pytest.approx(5 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["one two"], 3) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="positive integer"):
        distinct_n(texts, 0)


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("You are a\n\n  Jonathan stood at the door || count, castle ,wolves\nYou are an ||\n")
    assert read_prompts(path) == [
        {"prompt": "You are a", "themes": []},
        {"prompt": "Jonathan stood at the door", "themes": ["count", "castle", "wolves"]},
        {"prompt": "You are an", "themes": []},
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(empty)


@pytest.mark.slow
def test_samples_logprob_matches_hf_loss(tokenizer):
    model = tiny_llama(len(tokenizer))
    prompt, conts = "You are a", [" vampire of the night.", " very kind man"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    total, count = 0.0, 0
    for cont in conts:
        ids = torch.tensor([prompt_ids + tokenizer(cont, add_special_tokens=False)["input_ids"]])
        labels = ids.clone()
        labels[:, : len(prompt_ids)] = -100
        n = ids.shape[1] - len(prompt_ids)
        with torch.no_grad():
            total -= model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    assert samples_logprob(model, tokenizer, prompt, conts) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_evaluate_model_and_prompt_study(tokenizer):
    model = tiny_llama(len(tokenizer))
    blocks = torch.tensor(tokenizer(" It was an old house and a cold night." * 12, add_special_tokens=False)[
        "input_ids"][:96]).view(6, 16)
    prompts = [{"prompt": "It was", "themes": ["house", "night"]}, {"prompt": "You are an", "themes": []}]
    result = evaluate_model(model, tokenizer, blocks, prompts, batch_size=4, heldout_per_article=5,
                            max_length=12, num_return_sequences=3, label="tiny")
    json.dumps(result)
    assert result["perplexity"] == pytest.approx(perplexity(model, blocks, 6), rel=1e-6)
    assert result["probe"]["builtin"]["n"] == len(builtin_contexts())
    assert result["probe"]["heldout"]["n"] >= 2
    assert [p["prompt"] for p in result["prompts"]] == ["It was", "You are an"]
    for p in result["prompts"]:
        assert len(p["samples"]) == 3 and all(s.startswith(p["prompt"]) for s in p["samples"])
        conts = [s[len(p["prompt"]):] for s in p["samples"]]
        assert p["distinct_1"] == pytest.approx(distinct_n(conts, 1))
    first = result["prompts"][0]
    hits = sum(bool({"house", "night"} & set(re.findall(r"\w+", s[len("It was"):].lower())))
               for s in first["samples"])
    assert first["theme_share"] == pytest.approx(hits / 3)
    assert result["prompts"][1]["theme_share"] is None
    assert "perplexity" in format_table([result, result])


def _cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_cli_before_after(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It was an old house on a hill, and a cold wind blew over an empty field. " * 30)
    out = tmp_path / "eval.json"
    code, stdout, err = _cli(capsys, "--model", tiny_dir, "--baseline", tiny_dir, "--corpus", corpus,
                             "--block-size", 32, "--val-fraction", 0.25, "--json", out, "--heldout-contexts", 4)
    assert code == 0, err
    assert "diff" in stdout.splitlines()[0] and "perplexity" in stdout
    saved = json.loads(out.read_text())
    assert saved["model"]["perplexity"] == pytest.approx(saved["baseline"]["perplexity"])
    assert saved["model"]["val_blocks"] >= 1


def _assert_one_line_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[-1], lines


@pytest.mark.slow
def test_cli_missing_model(tmp_path, capsys):
    code, _, err = _cli(capsys, "--model", tmp_path / "no-such-model", "--eval-blocks", 1)
    _assert_one_line_error(code, err, "no-such-model")


def test_cli_empty_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("")
    out = tmp_path / "eval.json"
    code, _, err = _cli(capsys, "--prompts", prompts, "--json", out)
    _assert_one_line_error(code, err, "no prompts")
    assert not out.exists()


@pytest.mark.slow
def test_cli_corpus_too_short(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "short.txt"
    corpus.write_text("Too short.")
    code, _, err = _cli(capsys, "--model", tiny_dir, "--corpus", corpus, "--block-size", 64)
    _assert_one_line_error(code, err, "block")


@pytest.mark.parametrize("flag,value", [("--block-size", 0), ("--val-fraction", 1.5), ("--batch-size", -1)])
def test_cli_bad_numbers(capsys, flag, value):
    code, _, err = _cli(capsys, flag, value)
    _assert_one_line_error(code, err, flag)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_perplexity_of_a_model_with_dropout_is_the_eval_mode_one(kind):
    model, blocks, ref = dropout_model_and_blocks(kind)
    total, count = block_nll(model, blocks, batch_size=2)
    assert count == blocks[:, 1:].numel()
    assert math.isclose(total / count, ref.item(), rel_tol=1e-5)
    assert math.isclose(perplexity(model, blocks, batch_size=2), math.exp(ref.item()), rel_tol=1e-5)
    assert model.training, "evaluation puts the model back in train mode"
