# r LoRA rank, N out features, K in features
"""LoRA through PEFT (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen base and
trainable adapters B (N, r) A (r, K) added to its linear layers, scaled by alpha / r.

- `apply_lora(model, ...)`: PEFT's `get_peft_model` with a `LoraConfig`; the adapters are fp32 whatever the base's
  dtype (PEFT's `autocast_adapter_dtype`), and the base, its head included, is frozen, so neither the optimizer
  nor the loss spends anything on it but its weights.
- `check_lora_targets(model_config, targets)`: the same on a `meta` copy of the model, so unknown target modules
  are refused before any weight loads.
- `load_for_training(config, model_ref, device)`: the model a run trains. LoRA loads the base in `config.dtype`
  (QLoRA: its linear layers in NF4, train/model/quant.py), then new adapters, or a checkpoint unit's when resuming.
- `export_merged(unit, folder, dtype)`: the adapter merged into a fresh copy of the base on the CPU
  (`merge_and_unload`), saved as a plain HF checkpoint.

A LoRA run's checkpoint unit holds the adapter (`adapter_config.json`, `adapter_model.safetensors`, loadable with
`PeftModel.from_pretrained(base, unit)`), the tokenizer and the train state; `merged/` beside the units holds the
merged checkpoint of the last save.
"""

import functools
import warnings
from pathlib import Path

import torch

from ..dtypes import torch_dtype
from .adapters import is_adapter_dir
from .loading import EMBEDDED, load_model, load_tokenizer, save_checkpoint
from .quant import NF4Linear, import_peft, nf4_config

__all__ = ["MERGED", "ALL_LINEAR", "apply_lora", "check_lora_targets", "load_for_training", "export_merged",
           "lora_meta_model"]

MERGED = "merged"
ALL_LINEAR = "all-linear"


def _linear_names(model) -> list[str]:
    head = model.get_output_embeddings()
    kinds = (torch.nn.Linear,)
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if m is not head and (isinstance(m, kinds) or type(m).__name__ == "Conv1D")}
    return sorted(names)


def _targets(targets: str):
    return ALL_LINEAR if targets == ALL_LINEAR else [t for t in targets.split(",") if t]


def apply_lora(model, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0, targets: str = ALL_LINEAR,
               base_ref: str | None = None):
    """`model` wrapped by PEFT with LoRA adapters on `targets` (comma-separated module names or all-linear).

    Raises:
        ValueError naming the targets and the model's linear layers when a target matches nothing or the head.
    """
    peft = import_peft()
    names = _linear_names(model)
    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    wanted = _targets(targets)
    if wanted != ALL_LINEAR and head_names & set(wanted):
        raise ValueError(f"--lora-targets {targets}: the output head ({', '.join(sorted(head_names))}) cannot carry "
                         f"an adapter (the loss reads its weight directly); expected some of {', '.join(names)}")
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=wanted,
                             fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = peft.get_peft_model(model, config)
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"--lora-targets {targets}: {first} (the model's linear layers: {', '.join(names)})") \
            from None
    if base_ref is not None:
        wrapped.peft_config["default"].base_model_name_or_path = base_ref
    return _offline_saves(wrapped)


def _offline_saves(model):
    """PEFT's `save_pretrained` looks the base up (on the hub, for a name that is not a folder) to decide whether
    to save the embeddings; adapters on linear layers never include them, so no lookup is made."""
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    return model


def _meta_model(model_config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype)


def lora_meta_model(model, rank, alpha, dropout, targets, quantize: str | None = None, compute_dtype=None):
    """A `meta` model with LoRA applied as a run applies it; with `quantize="nf4"` its linear layers (the head
    excepted) become `quant.NF4Linear` stand-ins that hold and compute what bitsandbytes' 4-bit layers do."""
    if quantize == "nf4":
        _quantize_linears(model, compute_dtype)
    return apply_lora(model, rank, alpha, dropout, targets)


def _quantize_linears(model, compute_dtype):
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            conv1d = type(child).__name__ == "Conv1D"
            if child is head or not (isinstance(child, torch.nn.Linear) or conv1d):
                continue
            k, n = child.weight.shape if conv1d else child.weight.shape[::-1]
            setattr(module, child_name, NF4Linear(k, n, child.bias is not None, compute_dtype))


def check_lora_targets(model_config, targets: str):
    """Applies LoRA to a `meta` copy of the model (no weights): ValueError when `targets` do not fit it."""
    apply_lora(_meta_model(model_config, torch.float32), targets=targets)


def _base_ref(model: str) -> str:
    """How an adapter names its base: an embedded name or hub id as given, a folder as an absolute path."""
    return model if model in EMBEDDED or not Path(model).is_dir() else str(Path(model).resolve())


def load_for_training(config, model_ref: str, device: torch.device):
    """(model, tokenizer) for a run of `config`: `model_ref` itself for a full fine-tune; for LoRA the base
    `config.model` in `config.dtype` (QLoRA: NF4) with new adapters, or those of `model_ref` when it is a unit."""
    if not config.lora:
        return load_model(model_ref, device=device)
    dtype = torch_dtype(config.dtype)
    quant = nf4_config(dtype) if config.qlora else None
    base, tokenizer = load_model(config.model, device=device, dtype=dtype, quantization_config=quant)
    if is_adapter_dir(model_ref):
        peft = import_peft()
        model = peft.PeftModel.from_pretrained(base, model_ref, is_trainable=True)
        return _offline_saves(model), load_tokenizer(model_ref)
    model = apply_lora(base, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                       base_ref=_base_ref(config.model))
    return model, tokenizer


def export_merged(unit, folder, dtype: str = "fp32") -> Path:
    """Writes the adapter of `unit` merged into its base (loaded afresh on the CPU in `dtype`) to `folder`, a plain
    HF checkpoint, atomically; returns `folder`."""
    model, tokenizer = load_model(str(unit), device="cpu", dtype=torch_dtype(dtype))
    save_checkpoint(model, tokenizer, folder)
    return Path(folder)
