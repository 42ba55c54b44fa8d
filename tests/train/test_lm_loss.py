"""causal_lm_loss against the HF model's own loss (`model(ids, labels=ids).loss`) on tiny random models."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from leanfit.train.lm_loss import causal_lm_loss
from tests.helpers import HAS_TRITON, assert_close, device_for

pytestmark = pytest.mark.gpu  # runs on CUDA when there is one: the GPU lane

TABLE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-6, 2e-5)}
IMPLS = ["naive", "chunked", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _build(family: str):
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=101, bos_token_id=0, eos_token_id=0, **SMALL))
    if family == "gemma2":
        cfg = Gemma2Config(vocab_size=103, head_dim=8, final_logit_softcapping=3.0, bos_token_id=0,
                           eos_token_id=0, pad_token_id=0, **SMALL)
        return Gemma2ForCausalLM(cfg)
    cfg = CohereConfig(vocab_size=89, logit_scale=0.5, bos_token_id=0, eos_token_id=0, pad_token_id=0, **SMALL)
    return CohereForCausalLM(cfg)


FAMILIES = ["gpt2", "llama", "gemma2", "cohere"]


def _grads(model) -> dict:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _hf(model, ids, labels=None, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids if labels is None else labels, **kw).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _ours(model, ids, labels=None, **kw):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, ids, labels, **kw)
    loss.backward()
    return loss.detach(), _grads(model)


def _compare(ref, out, dtype):
    assert_close("loss", ref[0], out[0], table=TABLE)
    assert ref[1].keys() == out[1].keys()
    for k in ref[1]:
        assert_close(f"grad {k}", ref[1][k], out[1][k], dtype=dtype, table=TABLE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_hf_loss_and_every_grad(family, impl):
    model = _build(family).to(device_for(impl))
    ids = torch.randint(0, model.config.vocab_size, (2, 11), device=device_for(impl))
    _compare(_hf(model, ids), _ours(model, ids, impl=impl), torch.float32)


def test_tied_head_gets_the_gradient():
    model = _build("gpt2")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    _, grads = _ours(model, ids, impl="chunked")
    model.zero_grad(set_to_none=True)
    model.transformer(ids)[0].sum().backward()
    assert not torch.equal(grads["transformer.wte.weight"], model.transformer.wte.weight.grad)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_fp64_against_full_logits(family):
    model = _build(family).double()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    ref.backward()
    _compare((ref.detach(), _grads(model)), _ours(model, ids, impl="chunked"), torch.float64)


def test_labels_and_padding_are_ignored():
    model = _build("llama")
    ids = torch.randint(0, model.config.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :4] = -100
    ref = _hf(model, ids, labels, attention_mask=mask)
    _compare(ref, _ours(model, ids, labels, attention_mask=mask, impl="chunked"), torch.float32)
    default_labels = _ours(model, ids.clone(), None, attention_mask=mask, impl="chunked")
    _compare(_hf(model, ids, ids.masked_fill(mask == 0, -100), attention_mask=mask), default_labels, torch.float32)


def test_num_items_accumulates_to_the_full_batch():
    model = _build("gpt2")
    ids = torch.randint(0, model.config.vocab_size, (4, 8))
    labels = ids.clone()
    labels[0, 2:5] = -100
    full = _ours(model, ids, labels, impl="chunked")
    num_items = int((labels[:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        loss = causal_lm_loss(model, ids[rows], labels[rows], impl="chunked", num_items=num_items)
        loss.backward()
        total += loss.detach()
    _compare(full, (total, _grads(model)), torch.float32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(impl="bogus"), "impl"),
        (dict(input_ids=torch.zeros(5, dtype=torch.long)), "input_ids"),
        (dict(input_ids=torch.zeros(2, 1, dtype=torch.long)), "input_ids"),
        (dict(labels=torch.zeros(2, 3, dtype=torch.long)), "labels"),
    ],
    ids=["impl", "1d_ids", "t1", "labels_shape"],
)
def test_bad_input(kwargs, match):
    model = _build("gpt2")
    args = dict(input_ids=torch.zeros(2, 5, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_lm_loss(model, **args)
