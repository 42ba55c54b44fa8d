# B batch, T block (tokens)
"""Builds a model on `meta` and traces one steady-state training step under MemTracker (see train/estimate.py)."""

import contextlib
import warnings

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from .meta_trace import AutocastEmulation, SdpaStandIn, run_backward, unpacked_sequences

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KINDS = {"Parameter": "parameters", "Buffer": "parameters", "Gradient": "gradients", "Optstate": "optimizer_state",
          "Activation": "activations", "Temp": "temporaries", "Other": "temporaries"}


class _PeakTracker(MemTracker):
    """MemTracker without the per-module peak bookkeeping on every op (quadratic in the module count)."""

    def _update_peak_stats(self, peak_state):
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                self._peak_mem[dev] = dev_snap["Total"]
                self._peak_mem_snap[dev] = dict(dev_snap)


def build_meta_model(config, dtype="float32", attn_implementation="sdpa", grad_checkpointing=False):
    """The causal LM of `config` on the `meta` device, in train mode."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 dtype=_DTYPES[dtype])
    model.train()
    if grad_checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_optimizer(params, name, device_kind, lr=1e-4, weight_decay=0.0, traced=False):
    """The optimizer as fine-tuning builds it: fused on CUDA, foreach on the CPU.

    `traced=True` gives the version the estimate runs on `meta`, where fused kernels do not exist: the
    single-tensor loop stands in for fused (both hold only one parameter's temporaries at a time, where
    foreach would hold a temporary as large as all the optimizer state).
    """
    params = list(params)
    if device_kind == "cuda":
        kind = {"foreach": False} if traced else {"fused": True}
    else:
        kind = {"foreach": True}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kind)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kind)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, **kind)
    raise ValueError(f"optimizer: expected adamw, adam or sgd, given {name!r}")


def loss_fn(model, input_ids, impl):
    from .lm_loss import causal_lm_loss

    return causal_lm_loss(model, input_ids, impl=impl, all_targets_valid=True)


def _warm_optimizer(model, opt, step_fn):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    step_fn()
    for p in model.parameters():
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


def trace_step(cfg, top=5):
    """Peak breakdown {category: bytes}, top modules and parameter count of one traced step of `cfg`."""
    from .optim_backward import OptimizerInBackward
    from .presets import load_config

    model = build_meta_model(load_config(cfg.model), cfg.dtype, cfg.attn_implementation, cfg.grad_checkpointing)
    ids = torch.zeros(cfg.batch_size, cfg.block_size, dtype=torch.long, device="meta")
    if cfg.optimizer_in_backward:
        opt = OptimizerInBackward(model, lambda ps: make_optimizer(ps, cfg.optimizer, cfg.device_kind, traced=True))
        _warm_optimizer(model, opt, opt.step_all)
        states = opt.optimizers
    else:
        opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.device_kind, traced=True)
        _warm_optimizer(model, opt, opt.step)
        states = [opt]
    mt = _PeakTracker()
    mt.track_external(model, *states, ids)
    autocast = AutocastEmulation(_DTYPES[cfg.autocast], cfg.device_kind) if cfg.autocast else contextlib.nullcontext()
    with warnings.catch_warnings(), unpacked_sequences(), SdpaStandIn(cfg.device_kind), \
            autocast, mt:
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        loss = loss_fn(model, ids, cfg.loss_impl)
        if cfg.autocast:
            autocast.clear_cache()
        run_backward(loss)
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = mt.get_tracker_snapshot("peak").get(torch.device("meta"), {})
    breakdown = dict.fromkeys(("parameters", "gradients", "optimizer_state", "activations", "temporaries"), 0)
    for kind, n in peak.items():
        if kind != "Total":
            breakdown[_KINDS[str(getattr(kind, "value", kind))]] += n
    n_params = sum(p.numel() for p in model.parameters())
    return {"breakdown": breakdown, "top_modules": _top_modules(mt, top), "n_params": n_params}
