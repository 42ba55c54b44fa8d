"""Optimizer step in the backward against the usual step after backward."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from leanfit.train.lm_loss import causal_lm_loss
from leanfit.train.optim_backward import OptimizerInBackward, check_optimizer_in_backward
from tests.helpers import assert_close


def tiny_model(device):
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(config).to(device).train()


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_matches_normal_step_after_a_few_steps(name, device):
    make = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9)}[name]
    ref_model = tiny_model(device)
    model = copy.deepcopy(ref_model)
    ref_opt = make(list(ref_model.parameters()))
    opt = OptimizerInBackward(model, make)
    batches = [torch.randint(0, 97, (3, 17), device=device) for _ in range(4)]
    for ids in batches:
        causal_lm_loss(ref_model, ids, impl="naive").backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        causal_lm_loss(model, ids, impl="naive").backward()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad()
    moved = sum((p - q).abs().sum().item() for p, q in zip(model.parameters(), tiny_model(device).parameters()))
    assert moved > 0
    table = {torch.float32: (1e-5, 1e-4)}
    for (name_, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert_close(name_, q, p, table=table)


def test_state_dict_round_trip(device):
    model = tiny_model(device)
    opt = OptimizerInBackward(model, lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    causal_lm_loss(model, torch.randint(0, 97, (2, 9), device=device), impl="naive").backward()
    other = OptimizerInBackward(copy.deepcopy(model), lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    other.load_state_dict(opt.state_dict())
    for a, b in zip(opt.optimizers, other.optimizers):
        sa, sb = next(iter(a.state.values())), next(iter(b.state.values()))
        assert_close("exp_avg", sa["exp_avg"], sb["exp_avg"])


@pytest.mark.parametrize("kwargs,match", [({"grad_accum_steps": 4}, "accumulation steps 1, given 4"),
                                          ({"clip_grad_norm": 1.0}, "no gradient clipping"),
                                          ({"grad_scaler": True}, "no gradient scaler")])
def test_refuses_accumulation_and_clipping(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_optimizer_in_backward(**kwargs)


def test_accepts_plain_setting():
    check_optimizer_in_backward(grad_accum_steps=1, clip_grad_norm=None)
