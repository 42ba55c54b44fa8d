# B batch, T time, H hidden, V vocab
"""`patch_model`: a transformers causal LM whose training forward computes its loss without the (B, T, V) logits.

The patched `forward(input_ids, labels=..., ...)` runs the base model to its final hidden states and hands them to
`leanfit.train.lm_loss.head_loss` (the head's weight, bias, logit scale and softcap; `linear_cross_entropy`), with
HF's label shift and `ignore_index=-100`, summed over `num_items_in_batch` when the Trainer passes it. It returns
`loss` and `logits=None`. Without labels, or in eval mode, the original forward runs: generation and evaluation
are unchanged. The forward is replaced on the instance of the transformers model (inside a PEFT wrapper, the model
PEFT wraps), so PEFT applied before or after the patch, and gradient checkpointing, see the same forward.
"""

import functools
import os

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..lm_loss import base_model_of, head_loss, lm_head_params, unwrap_peft

__all__ = ["SUPPORTED", "PATCH_IMPLS", "patch_model", "unpatch", "is_patched"]

# model_type: the head is a plain linear layer (with its bias where it has one), scaled by `logit_scale` (Cohere) or
# `logits_scaling` (Granite), softcapped by `final_logit_softcapping` (Gemma 2), on the base model's last hidden state
SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "cohere", "granite")
PATCH_IMPLS = ("auto", "chunked", "triton")
_LOSS_KEYS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "return_dict")
_ORIGINAL = "_leanfit_original_forward"


def _target(model):
    inner = unwrap_peft(model)
    if not isinstance(inner, torch.nn.Module) or not hasattr(inner, "config"):
        raise ValueError(f"patch_model: expected a transformers causal LM (or a PEFT model of one), "
                         f"given {type(model).__name__}")
    return inner


def _check_architecture(model):
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"patch_model: architecture {model_type!r} ({type(model).__name__}) is not supported; "
                         f"expected one of {', '.join(SUPPORTED)}")
    lm_head_params(model)


def _check_impl(model, impl):
    if impl not in PATCH_IMPLS:
        raise ValueError(f"patch_model: expected impl in {PATCH_IMPLS}, given {impl!r}")
    device = next(model.parameters()).device
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"patch_model: impl 'triton' runs on CUDA (or with TRITON_INTERPRET=1), the model is on "
                         f"{device}; expected impl 'auto' or 'chunked'")


def _targets(hidden, kwargs):
    # hidden: (B, T, H) -> the positions that predict and their next tokens, as HF's ForCausalLMLoss shifts them
    shift = kwargs.get("shift_labels")
    if shift is not None:
        return hidden, shift
    return hidden[:, :-1], kwargs["labels"][:, 1:]


def _loss_forward(model, impl, chunk_size, input_ids, kwargs):
    base_kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_KEYS}
    out = base_model_of(model)(input_ids=input_ids, **base_kwargs)
    hidden, target = _targets(out[0], kwargs)
    loss = head_loss(model, hidden, target, impl=impl, chunk_size=chunk_size,
                     num_items=kwargs.get("num_items_in_batch"),
                     reduction="sum" if kwargs.get("num_items_in_batch") is not None else "mean")
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None))


def _patched_forward(model, original, impl, chunk_size):
    @functools.wraps(type(model).forward)
    def forward(input_ids=None, *args, **kwargs):
        has_labels = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None
        if args or not (has_labels and model.training):
            return original(input_ids, *args, **kwargs)
        return _loss_forward(model, impl, chunk_size, input_ids, kwargs)

    return forward


def patch_model(model, *, impl: str = "auto", chunk_size: int | None = None):
    """Makes `model`'s training forward compute the causal-LM loss without the logits; returns `model`.

    Args:
        model: a transformers causal LM of an architecture in `SUPPORTED`, or a PEFT model of one (the output
            head without an adapter).
        impl: the `linear_cross_entropy` path: "auto" (Triton on CUDA, else chunked), "chunked", "triton".
        chunk_size: rows per chunk of the chunked path (default: `linear_cross_entropy`'s).

    Raises:
        ValueError: an architecture outside `SUPPORTED`, a model already patched, an `impl` the model's device
            cannot run, a bad `chunk_size`.

    Example:
        >>> model = patch_model(AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M"))
        >>> Trainer(model=model, args=args, train_dataset=ds).train()
    """
    inner = _target(model)
    if is_patched(inner):
        raise ValueError(f"patch_model: {type(inner).__name__} is already patched; call unpatch(model) first")
    _check_architecture(inner)
    _check_impl(inner, impl)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"patch_model: expected chunk_size None or a positive int, given {chunk_size!r}")
    original = inner.forward
    inner.forward = _patched_forward(inner, original, impl, chunk_size)
    setattr(inner, _ORIGINAL, original)
    return model


def is_patched(model) -> bool:
    """Whether `patch_model` has patched `model` (or the model inside its PEFT wrapper)."""
    return _ORIGINAL in vars(unwrap_peft(model))


def unpatch(model):
    """Restores the forward `patch_model` replaced; returns `model`. ValueError when it is not patched."""
    inner = _target(model)
    if not is_patched(inner):
        raise ValueError(f"unpatch: {type(inner).__name__} is not patched")
    delattr(inner, _ORIGINAL)
    del inner.forward
    return model
