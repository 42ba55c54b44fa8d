# B batch, T time, H hidden, V vocab
"""Next-token loss of a HuggingFace causal LM without materializing its (B, T, V) logits.

`causal_lm_loss(model, input_ids)` equals `model(input_ids, labels=input_ids).loss`, in value and in
every parameter's gradient: it runs the base model to its final hidden states and hands them, with the
output embedding's weight and bias, to `kernels.linear_cross_entropy`. A PEFT model (LoRA) is unwrapped to the
causal LM its adapters were injected into; a frozen head gets no weight gradient.
"""

import torch

from ..kernels.lce import IMPLS as LCE_IMPLS
from ..kernels.lce import linear_cross_entropy
from ..kernels.lce.naive import naive_linear_cross_entropy

__all__ = ["causal_lm_loss", "head_loss", "lm_head_params", "unwrap_peft", "base_model_of", "IMPLS"]

IMPLS = ("naive", *LCE_IMPLS)  # the loss implementations, one list for the whole package


def lm_head_params(model) -> dict:
    """The output head's weight, bias, pre-softmax scale and softcap, read from the model and its config."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"causal_lm_loss: expected a causal LM with an output embedding, given {type(model).__name__}")
    if hasattr(head, "base_layer"):
        raise ValueError(f"causal_lm_loss: expected an output head without an adapter, given {type(head).__name__} "
                         f"(leave the head out of the LoRA target modules)")
    config = model.config
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return {"weight": head.weight, "bias": getattr(head, "bias", None), "scale": scale, "softcap": softcap}


def unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (its `get_base_model()`), else `model`."""
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def base_model_of(model):
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(
            f"causal_lm_loss: expected a causal LM wrapping a base model (e.g. GPT2LMHeadModel), "
            f"given {type(model).__name__}"
        )
    return base


def causal_lm_loss(
    model,
    input_ids: torch.Tensor,  # (B, T)
    labels: torch.Tensor | None = None,  # (B, T), -100 where ignored
    *,
    attention_mask: torch.Tensor | None = None,  # (B, T), 0 at padding
    impl: str = "auto",
    **loss_kwargs,
) -> torch.Tensor:
    """Mean next-token cross-entropy of a HuggingFace causal LM, with no (B, T, V) logits.

    Positions [:, :-1] predict labels[:, 1:] (labels default to input_ids), as in
    `model(input_ids, labels=input_ids).loss`. Config-level `logit_scale` (Cohere), `logits_scaling`
    (Granite) and `final_logit_softcapping` (Gemma 2) are applied.

    Args:
        model: a transformers causal LM (…ForCausalLM / …LMHeadModel), tied head or not, or a PEFT model of one.
        input_ids: token ids, (B, T) with T >= 2.
        labels: targets, (B, T); -100 marks ignored positions. Default: input_ids, with positions where
            attention_mask == 0 set to -100.
        attention_mask: passed to the base model.
        impl: "naive" (the full logits, `naive_linear_cross_entropy`: the HF recipe), or a
            `linear_cross_entropy` impl: "chunked", "triton", "auto".
        **loss_kwargs: passed to the loss (reduction, num_items, chunk_size, label_smoothing, ignore_index,
            all_targets_valid).

    Returns:
        The loss, a 0-dim tensor (or (B, T-1) for reduction="none").

    Example:
        >>> loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], impl="chunked")
        >>> loss.backward()
    """
    if impl not in IMPLS:
        raise ValueError(f"causal_lm_loss: expected impl in {IMPLS}, given {impl!r}")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"causal_lm_loss: expected input_ids of shape (B, T) with T >= 2, given {shape}")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"causal_lm_loss: expected labels of shape {tuple(input_ids.shape)}, given {tuple(labels.shape)}"
        )
    model = unwrap_peft(model)
    out = base_model_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return head_loss(model, out[0][:, :-1], labels[:, 1:], impl=impl, **loss_kwargs)


def head_loss(
    model,
    hidden: torch.Tensor,  # (B, T, H): the base model's final hidden states at the positions that predict
    target: torch.Tensor,  # (B, T): the next tokens, -100 where ignored
    *,
    impl: str = "auto",
    **loss_kwargs,
) -> torch.Tensor:
    """Cross-entropy of `model`'s output head (weight, bias, scale, softcap: `lm_head_params`) on `hidden`
    against `target`, without the logits; `impl` and `loss_kwargs` as in `causal_lm_loss`."""
    head = lm_head_params(model)
    weight, bias = head["weight"], head["bias"]
    if head["scale"] != 1.0:
        hidden = hidden * head["scale"]
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    target = target.to(hidden.device)
    loss = naive_linear_cross_entropy if impl == "naive" else linear_cross_entropy
    return loss(hidden, weight, target, bias=bias, softcap=head["softcap"], impl=impl, **loss_kwargs)
