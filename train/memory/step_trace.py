# B batch, T block (tokens)
"""Builds a model on `meta` and traces one steady-state training step under MemTracker (see estimate.py)."""

import contextlib
import warnings

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from ...kernels.launch import record_launches
from ..dtypes import torch_dtype
from ..gpus import GPUS
from ..lm_loss import causal_lm_loss
from ..model.architectures import load_config
from ..model.lora import lora_meta_model
from ..optim import make_optimizer
from .meta_trace import AutocastEmulation, SdpaStandIn, run_backward, unpacked_sequences

__all__ = ["build_meta_model", "trace_step", "traced_step"]

_KINDS = {"Parameter": "parameters", "Buffer": "parameters", "Gradient": "gradients", "Optstate": "optimizer_state",
          "Activation": "activations", "Temp": "temporaries", "Other": "temporaries"}


class _NoHook:
    def remove(self):
        pass


class _PeakTracker(MemTracker):
    """MemTracker without the per-module peak bookkeeping on every op (quadratic in the module count), and for
    frozen parameters (LoRA's base), on which it would register gradient hooks that torch refuses."""

    def skip_frozen(self, model):
        for p in model.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())

    def _update_peak_stats(self, peak_state):
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                self._peak_mem[dev] = dev_snap["Total"]
                self._peak_mem_snap[dev] = dict(dev_snap)


def build_meta_model(config, dtype="fp32", attn_implementation="sdpa", grad_checkpointing=False):
    """The causal LM of `config` on the `meta` device, in train mode."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 dtype=torch_dtype(dtype))
    model.train()
    if grad_checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _warm_optimizer(model, step_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    step_fn()
    for p in params:
        p.grad = None


def _top_modules(mt, top):
    kept = []
    for stats in mt.memory_tracking.values():
        if stats.mod_fqn.count(".") > 2 or "Pre-Forward" not in stats.snapshots:
            continue
        pre, post = stats.snapshots["Pre-Forward"][0], stats.snapshots.get("Post-Forward", [{}])[0]
        grown = sum(post.get(d, {}).get("Total", 0) - pre.get(d, {}).get("Total", 0) for d in post)
        kept.append((stats.mod_fqn, int(grown)))
    kept.sort(key=lambda kv: -kv[1])
    return kept[1:top + 1] if len(kept) > 1 else kept


def traced_step(spec, tracker, forward, opt):
    """`forward()` (which returns the loss), the backward and `opt`'s step of `spec`, under `tracker` and the
    stand-ins of train/memory/meta_trace.py; returns the SDPA stand-in, which counts the attention kernels."""
    autocast = AutocastEmulation(torch_dtype(spec.autocast), spec.device_kind) if spec.autocast \
        else contextlib.nullcontext()
    sdpa = SdpaStandIn(spec.device_kind, GPUS[spec.gpu].capability if spec.gpu else None)
    with warnings.catch_warnings(), unpacked_sequences(), sdpa, autocast, tracker:
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        loss = forward()
        if spec.autocast:
            autocast.clear_cache()
        run_backward(loss)
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
    return sdpa


def trace_step(spec, top=5):
    """Peak breakdown {category: bytes}, top modules, parameter count and attention calls by kernel of one
    traced step of `spec`."""
    model = build_meta_model(load_config(spec.model), spec.dtype, spec.attn_implementation, spec.grad_checkpointing)
    if spec.lora:
        model = lora_meta_model(model, spec.lora_rank, spec.lora_alpha, spec.lora_dropout, spec.lora_targets,
                                spec.quantize, torch_dtype(spec.autocast or spec.dtype))
    ids = torch.zeros(spec.batch_size, spec.block_size, dtype=torch.long, device="meta")
    opt = make_optimizer(model, spec.optimizer, spec.device_kind, in_backward=spec.optimizer_in_backward, traced=True)
    if spec.optimizer_in_backward:
        _warm_optimizer(model, opt.step_all)
        states = opt.optimizers
    else:
        _warm_optimizer(model, opt.step)
        states = [opt]
    mt = _PeakTracker()
    mt.skip_frozen(model)
    mt.track_external(model, *states, ids)
    kernels = record_launches(keep=False) if spec.traced_loss in ("triton", "hybrid") else contextlib.nullcontext()
    with kernels:
        sdpa = traced_step(spec, mt, lambda: causal_lm_loss(model, ids, impl=spec.traced_loss, all_targets_valid=True),
                           opt)
    peak = mt.get_tracker_snapshot("peak").get(torch.device("meta"), {})
    breakdown = dict.fromkeys(("parameters", "gradients", "optimizer_state", "activations", "temporaries"), 0)
    for kind, n in peak.items():
        if kind != "Total":
            breakdown[_KINDS[str(getattr(kind, "value", kind))]] += n
    n_params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"breakdown": breakdown, "top_modules": _top_modules(mt, top), "n_params": n_params,
            "n_trainable": n_trainable, "attention": dict(sdpa.kernels)}
