# B micro-batch (per rank), T block (tokens), W world size (ranks)
"""One rank's FSDP2 training step, traced with no weights, no GPU and no other process (see train/memory/estimate.py).

FSDP2 refuses parameters on `meta`, so the model is built under `FakeTensorMode` (tensors with shapes and no
data), and a fake process group of W ranks (`backend="fake"`, collectives that move nothing) stands in for the
others. The model is sharded as `parallel.Parallel.wrap` shards it (each block, then `LossModule` as the root,
the mixed-precision policy of the autocast dtype), the optimizer state is created, and one steady-state step
runs under `FSDPMemTracker`, a MemTracker that also files FSDP's own buffers. Its peak, for rank 0, is the
per-rank peak: this rank's shards of the parameters, gradients and optimizer state, the all-gathered units
(unsharded parameters and all-gather buffers: the largest unit and the one prefetched), the unsharded
gradients and reduce-scatter buffers, and the activations of its own micro-batch. The breakdown files FSDP's
buffers under `all_gather` (unsharded parameters, all-gather buffers) and `reduce_scatter` (unsharded
gradients, reduce-scatter buffers).

A process can hold one default process group: under torchrun (a real one) the trace runs in a fresh Python
process (`python -m leanfit.train.memory.fsdp_trace`, a StepConfig as JSON on stdin, the result as JSON on stdout).
"""

import json
import subprocess
import sys
import warnings
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ..dtypes import torch_dtype
from ..lm_loss import causal_lm_loss
from ..model.architectures import load_config
from ..optim import make_optimizer
from ..parallel import LossModule, transformer_blocks
from .step_trace import _PeakTracker, _warm_optimizer, traced_step

__all__ = ["trace_fsdp_step", "FSDP_KINDS"]

FSDP_KINDS = {"Sharded Param": "parameters", "Buffer": "parameters", "Sharded Grad": "gradients",
              "OptState": "optimizer_state", "Unsharded Param": "all_gather",
              "All Gather": "all_gather", "Unsharded Grad": "reduce_scatter",
              "Reduce Scatter": "reduce_scatter", "Activation": "activations", "Temp": "temporaries",
              "Inputs": "temporaries"}


def _tracker_class():
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker  # deferred: pulls in FSDP internals

    return type("FSDPPeakTracker", (FSDPMemTracker,), {"_update_peak_stats": _PeakTracker._update_peak_stats})


def _loss(model, ids, num_items, impl):
    return causal_lm_loss(model, ids, impl=impl, reduction="sum", num_items=num_items, all_targets_valid=True)


def _trace(spec):
    from torch._subclasses.fake_tensor import FakeTensorMode  # deferred: tracing internals
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    config = load_config(spec.model)
    mesh = init_device_mesh("cpu", (spec.world_size,))
    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=spec.attn_implementation,
                                                 dtype=torch_dtype(spec.dtype))
        model.train()
        if spec.grad_checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        impl = "chunked" if spec.traced_loss in ("triton", "hybrid") else spec.traced_loss  # CPU ranks: no Triton
        module = LossModule(model, lambda m, ids, n: _loss(m, ids, n, impl))
        policy = MixedPrecisionPolicy(param_dtype=torch_dtype(spec.autocast), reduce_dtype=torch.float32) \
            if spec.autocast else MixedPrecisionPolicy()
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        opt = make_optimizer(module, spec.optimizer, spec.device_kind, traced=True)
        _warm_optimizer(module, opt.step)
        ids = torch.zeros(spec.batch_size, spec.block_size, dtype=torch.long)
        mt = _tracker_class()(module, opt)
        mt.track_inputs((ids,))
        targets = float(spec.batch_size * (spec.block_size - 1) * spec.world_size)
        sdpa = traced_step(spec, mt, lambda: module(ids, targets), opt)
        peak = next(iter(mt.get_tracker_snapshot("peak").values()), {})
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    breakdown = dict.fromkeys(("parameters", "gradients", "optimizer_state", "all_gather",
                               "reduce_scatter", "activations", "temporaries"), 0)
    for kind, n in peak.items():
        if kind != "Total":
            breakdown[FSDP_KINDS[str(getattr(kind, "value", kind))]] += int(n)
    return {"breakdown": breakdown, "top_modules": [], "n_params": n_params, "n_trainable": n_trainable,
            "attention": dict(sdpa.kernels)}


def _in_fresh_process(spec) -> dict:
    if not isinstance(spec.model, str):
        raise ValueError(f"an FSDP2 estimate inside a running process group needs the model by name, given a "
                         f"{type(spec.model).__name__}")
    given = json.dumps({**asdict(spec), "traced_loss": spec.traced_loss})
    done = subprocess.run([sys.executable, "-m", "leanfit.train.memory.fsdp_trace"], input=given,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the FSDP2 estimate's process failed (exit code {done.returncode}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def trace_fsdp_step(spec) -> dict:
    """`step_trace.trace_step`'s result for one rank of an FSDP2 run of `spec.world_size` ranks."""
    if dist.is_initialized():
        return _in_fresh_process(spec)
    from torch.testing._internal.distributed.fake_pg import FakeStore  # deferred: registers the fake backend

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=spec.world_size)
    try:
        return _trace(spec)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    print(json.dumps(trace_fsdp_step(SimpleNamespace(**json.loads(sys.stdin.read())))))
