# B micro-batch (sequences per rank), A grad-accum steps, W world size (ranks)
"""How one run is spread over processes: one (`none`), data parallel (`ddp`) or fully sharded (`fsdp2`).

A `Parallel` is what the recipe asks about ranks; with `kind="none"` (the default, no torchrun) every method is
the one-process behaviour, so nothing changes there. Under torchrun (train/recipe/distributed.py starts it):

- Data: each rank takes its own B blocks of every global batch of B·W (`data.BlockLoader(rank, world_size)`),
  so one optimizer step sees B·A·W sequences.
- Loss: DDP and FSDP2 average the gradients over the ranks, so each rank divides its summed token loss by the
  step's global target count (all-reduced) over W; the gradient is then that of the global mean, and 2 ranks
  × B equal 1 rank × 2B.
- The loss runs as the forward of `LossModule`, which holds the HF model: DDP's reducer and FSDP2's hooks act
  around a module's forward, and the chunked loss reads the output embedding's weight outside `lm_head`'s
  forward (train/lm_loss.py). Inside `LossModule.forward` the root unit is all-gathered, so that weight is whole.
- FSDP2 shards each transformer block (the model's `_no_split_modules` classes), then the root: embeddings,
  final norm and head are one unit, so a tied embedding stays one parameter. With `--dtype bf16|fp16` the
  mixed-precision policy computes in that dtype and reduces in fp32; the sharded master weights stay fp32.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .checkpointing.sharded_state import is_sharded, load_full_optimizer, load_optimizer
from .dtypes import torch_dtype

__all__ = ["KINDS", "Parallel", "LossModule", "transformer_blocks"]

KINDS = ("none", "ddp", "fsdp2")


class LossModule(torch.nn.Module):
    """`loss_fn(model, blocks, num_items)` as the forward of a module that holds `model` (see the module doc)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, blocks, num_items):  # blocks: (B, T)
        return self.loss_fn(self.model, blocks, num_items)


def _call_module(module, blocks, num_items):
    return module(blocks, num_items)


def transformer_blocks(model) -> list:
    """The repeated blocks of a HF causal LM: the modules whose class is in its `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"--parallel fsdp2: cannot find the transformer blocks of {type(model).__name__} (expected "
                         f"modules of its _no_split_modules classes, given {sorted(names)})")
    return blocks


@dataclass
class Parallel:
    """The run's layout over processes, and the few collective steps the recipe needs."""

    kind: str = "none"
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    routes: dict = field(default_factory=dict)  # {writer: its replacement under this layout} (recipe/distributed.py)
    collective: dict = field(default_factory=dict)  # {writer: 0 or 1}: every rank calls these, lowest first
    cache: dict = field(default_factory=dict)  # rank 0's plain copy of the model and its step (recipe/distributed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def wrap(self, model, loss_fn, config):
        """(the module to train, its loss function): `model` itself, or `LossModule` under DDP or FSDP2."""
        if not self.active:
            return model, loss_fn
        torch.manual_seed(config.seed + self.rank)  # rank r's dropout and sampling RNG starts from seed + r
        module = LossModule(model, loss_fn)
        if self.kind == "ddp":
            ids = [self.device] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                                             gradient_as_bucket_view=True), _call_module
        from torch.distributed.device_mesh import init_device_mesh  # deferred: only FSDP2 runs need a mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy() if config.dtype == "fp32" else MixedPrecisionPolicy(
            param_dtype=torch_dtype(config.dtype), reduce_dtype=torch.float32)
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        return module, _call_module

    def grad_scaler(self, device):
        """The fp16 gradient scaler; under FSDP2 one whose inf/NaN check is agreed by every rank."""
        if self.kind == "fsdp2":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # deferred: FSDP2 only

            return ShardedGradScaler(device.type)
        return torch.amp.GradScaler(device.type)

    def hf_model(self, module):
        """The HF model inside what `wrap` returned."""
        if not self.active:
            return module
        inner = module.module if self.kind == "ddp" else module
        return inner.model

    def _sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(value)
        return value

    def global_count(self, n: int) -> int:
        """The sum of `n` over the ranks."""
        return int(self._sum(torch.tensor(n, dtype=torch.int64, device=self.device)))

    def loss_divisor(self, global_count: int) -> float:
        """What each rank divides its summed loss by, given the step's global target count (see the module doc)."""
        return global_count / self.world_size if self.active else global_count

    def mean(self, loss: torch.Tensor) -> float:
        """The mean over the ranks of a per-rank loss (each rank's share of the global mean, times W)."""
        return float(self._sum(loss.detach().clone())) / self.world_size

    def no_sync(self, module):
        """DDP: a context without the gradient all-reduce, for every micro-batch but the last; else None."""
        return module.no_sync if self.kind == "ddp" else None

    def agree(self, stop: bool, due: bool) -> tuple[bool, bool]:
        """(has any rank been asked to stop, is any rank's save due): every rank then takes the same branch."""
        if not self.active:
            return stop, due
        flags = torch.tensor([int(stop), int(due)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object from this run's own processes) on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, value) -> list | None:
        """[value of rank 0, rank 1, ...] on rank 0, None elsewhere."""
        if not self.active:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out if self.is_main else None

    def barrier(self):
        if self.active:
            dist.barrier()

    def call(self, fn, ctx, main_only: bool = True):
        """Runs `fn(ctx)` as this layout wants it: its route (train/recipe/distributed.py), else on rank 0 alone (or on
        every rank with `main_only=False`)."""
        route = self.routes.get(fn)
        if route is not None:
            return route(fn, ctx)
        if self.is_main or not main_only:
            return fn(ctx)
        return None

    def order(self, writers) -> list:
        """`writers` with those every rank calls first, so that no rank waits while rank 0 works alone."""
        return sorted(writers, key=lambda w: self.collective.get(w, 2)) if self.active else list(writers)

    def load_optimizer(self, module, optimizer, entry, unit):
        """Puts a unit's optimizer state (sharded by DCP, or one process's `state_dict()`) into `optimizer`."""
        model = self.hf_model(module)
        if is_sharded(entry):
            load_optimizer(unit, model, optimizer, entry)
        elif self.active:
            load_full_optimizer(model, optimizer, entry)
        else:
            optimizer.load_state_dict(entry)

    def rank_rng(self, state: dict) -> dict | None:
        """This rank's RNG state in a unit's train state; None where the unit's run had fewer ranks."""
        ranks = state.get("rng_ranks") or [state["rng"]]
        return ranks[self.rank] if self.rank < len(ranks) else None
