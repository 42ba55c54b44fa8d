"""The rank processes of tests/train/test_distributed.py's gradient and memory test (started by torch.multiprocessing).

Each rank builds the same small GPT-2 (tied embedding), shards it as finetune does (`Parallel.wrap`: each block,
then the loss module as the root), runs the chunked loss on its half of a global batch, and rank 0 writes every
gathered gradient (`grads.safetensors`). Then, after one warm-up step, each rank tracks a steady-state step
with `FSDPMemTracker` and writes its peak (`memory-rank{r}.json`).
"""

import json
import os
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from leanfit.train.lm_loss import causal_lm_loss
from leanfit.train.optim import make_optimizer
from leanfit.train.parallel import Parallel

B, T = 2, 32  # per rank; the global batch is B x 2 sequences of T tokens


def model_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=512, n_embd=64, n_layer=4, n_head=4, n_positions=64, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def build_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(), attn_implementation="sdpa")


def global_batch(world: int) -> torch.Tensor:  # (B * world, T)
    return torch.randint(0, 512, (B * world, T), generator=torch.Generator().manual_seed(7))


def loss_fn(model, blocks, num_items):
    return causal_lm_loss(model, blocks, impl="chunked", reduction="sum", num_items=num_items)


def worker(rank: int, world: int, port: int, out: str):
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    par = Parallel(kind="fsdp2", rank=rank, world_size=world, device=torch.device("cpu"))
    module, call = par.wrap(build_model(), loss_fn, SimpleNamespace(seed=0, dtype="fp32"))
    ids = global_batch(world)[rank * B:(rank + 1) * B]
    count = par.global_count(B * (T - 1))
    call(module, ids, par.loss_divisor(count)).backward()
    grads = {name: p.grad.full_tensor() for name, p in module.model.named_parameters()}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in grads.items()}, str(Path(out) / "grads.safetensors"))
    opt = make_optimizer(module, "adamw", "cpu")

    def step():
        call(module, ids, par.loss_divisor(count)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    tracker = FSDPMemTracker(module, opt)
    tracker.track_inputs((ids,))
    with tracker:
        step()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    (Path(out) / f"memory-rank{rank}.json").write_text(json.dumps({str(getattr(k, "value", k)): v
                                                                   for k, v in peak.items()}))
    dist.destroy_process_group()


def labelled_loss(model, blocks, num_items):  # blocks (B, T): token ids, -100 where the label is ignored
    return causal_lm_loss(model, blocks.clamp(min=0), labels=blocks, impl="chunked", reduction="sum",
                          num_items=num_items)


# Rows of each rank's micro-batches out of a global batch of 6 sequences, and the labels each ignores: the ranks
# hold different numbers of target tokens, and so do their micro-batches.
UNEVEN_SPLITS = {0: (1, 2), 1: (2, 1)}


def uneven_batch() -> torch.Tensor:  # (6, T), -100 where the label is ignored
    blocks = global_batch(3)
    blocks[0, 4:] = -100
    blocks[3, 10:] = -100
    blocks[4, 2:20] = -100
    return blocks


def ddp_accumulation_worker(rank: int, world: int, port: int, out: str):
    """DDP, two micro-batches per rank of uneven sizes and target counts, as the finetune step runs them; rank 0
    writes the averaged gradients (`ddp-grads.safetensors`)."""
    from leanfit.train.step import accumulate_gradients, target_count

    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    par = Parallel(kind="ddp", rank=rank, world_size=world, device=torch.device("cpu"))
    module, call = par.wrap(build_model(), labelled_loss, SimpleNamespace(seed=0, dtype="fp32"))
    rows = uneven_batch()[3 * rank: 3 * (rank + 1)]
    micro = list(torch.split(rows, UNEVEN_SPLITS[rank]))
    count = par.global_count(target_count(micro))
    accumulate_gradients(module, micro, call, num_items=par.loss_divisor(count), no_sync=par.no_sync(module))
    if rank == 0:
        grads = {name: p.grad.contiguous() for name, p in module.module.model.named_parameters()}
        save_file(grads, str(Path(out) / "ddp-grads.safetensors"))
    dist.destroy_process_group()
