# W world size (ranks)
"""The recipe under torchrun: joining the process group, which rank writes what, and sharded checkpoint units.

`start_parallel(config, checked)` (in `finetune.run`, after the checks, which every rank makes) joins the
process group torchrun set up: nccl on CUDA (rank r on cuda:LOCAL_RANK), gloo on the CPU, with a timeout
(`LEANFIT_DIST_TIMEOUT` seconds, default `TIMEOUT_S`), so a rank that stops answering fails the job
instead of hanging it. Without torchrun, and with `--parallel none`, nothing changes.

What each rank does (`Parallel.call` follows `ROUTES`; other writers run on rank 0 alone):
- rank 0 writes the run's files (metrics, plots, run.json, samples, evaluations, reports) and prints; the
  other ranks' stdout is /dev/null, their warnings and progress bar are off;
- a checkpoint unit (`write_sharded_unit`) is written by every rank into one hidden folder that rank 0
  creates (`checkpoint.begin_unit`): each rank writes its optimizer shards through DCP
  (train/checkpointing/sharded_state.py), rank 0 the weights (a plain HF folder: under FSDP2 gathered to rank 0 first),
  tokenizer and train state with every rank's RNG, then the manifest, and publishes the unit by one rename;
- validation runs on every rank (each one's forward is needed under FSDP2); the evaluations and the samples
  run on rank 0, on a plain copy of the model: DDP's replica, or under FSDP2 the gathered weights in a model
  kept on rank 0's CPU between uses;
- memory_report.json, written by rank 0, lists every rank's peak (`ranks`).

A failing rank prints one line (`leanfit finetune: error: rank R: ...`), and `commands.finetune.rank_main` keeps
the traceback for torchrun's summary (TORCHELASTIC_ERROR_FILE); torchrun then stops the other ranks.
"""

import atexit
import copy
import gc
import os
import shutil
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from ..checkpointing.checkpoint import SaveError, begin_unit, save_unit
from ..checkpointing.sharded_state import save_optimizer
from ..memory.profiler import rss_peak_bytes
from ..parallel import Parallel
from .context import _eval_before, rng_state, train_state
from .outputs import write_eval_after, write_memory_report, write_metrics, write_samples, write_unit

__all__ = ["start_parallel", "close_process_group", "write_sharded_unit", "plain_model", "ROUTES", "COLLECTIVE",
           "TIMEOUT_S", "OPTIMIZER_DIR"]

TIMEOUT_S = 1800  # a collective waits this long for the slowest rank: rank 0 evaluates and generates alone
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
OPTIMIZER_DIR = "optimizer"  # in a unit: the optimizer's DCP shards
FAULT_ENV = "LEANFIT_TEST_RANK_FAULT"  # tests: "raise@R:S" or "hang@R:S", rank R after step S


def _timeout() -> float:
    text = os.environ.get("LEANFIT_DIST_TIMEOUT", str(TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"LEANFIT_DIST_TIMEOUT: expected a number of seconds > 0, given {text!r}")
    return seconds


def _rank_device(device: torch.device, local_rank: int, world: int) -> torch.device:
    if device.type != "cuda":
        return device
    if device.index is not None and world > 1:
        raise ValueError(f"--device {device}: every rank would use that one GPU; expected --device cuda or auto "
                         f"(rank r takes cuda:LOCAL_RANK)")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} needs cuda:{index}, and {torch.cuda.device_count()} GPU(s) are "
                         f"visible: expected --nproc-per-node at most the GPUs of this node")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def close_process_group():
    if dist.is_initialized():
        gc.collect()  # FSDP's and DDP's pending work objects go while the interpreter can still free them
        dist.destroy_process_group()


def start_parallel(config, checked) -> Parallel:
    """Joins torchrun's process group for `config.parallel` (ddp, fsdp2); sets `checked.device` to this rank's
    device and `checked.parallel`. Returns the `Parallel` (one process when `config.parallel` is "none").

    Raises:
        ValueError for --parallel without torchrun, several processes without --parallel, or a device the ranks
        cannot share.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.parallel == "none":
        if world > 1:
            raise ValueError(f"started by torchrun with {world} processes: expected --parallel ddp or fsdp2 (without "
                             f"it each process would train alone into the same folder)")
        return checked.parallel
    if not dist.is_initialized() and "LOCAL_RANK" not in os.environ:
        raise ValueError(f"--parallel {config.parallel} runs under torchrun: expected `torchrun --nproc-per-node N "
                         f"-m leanfit.train.commands.finetune ...` or `leanfit launch --nproc-per-node N finetune ...`,"
                         f" given one process")
    device = _rank_device(checked.device, int(os.environ.get("LOCAL_RANK", "0")), world)
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS[device.type], timeout=timedelta(seconds=_timeout()),
                                device_id=device if device.type == "cuda" else None)
        atexit.register(close_process_group)
    par = Parallel(kind=config.parallel, rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                   routes=ROUTES, collective=COLLECTIVE)
    checked.device, checked.parallel = device, par
    if not par.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - this rank's stdout for the rest of the process
        warnings.simplefilter("ignore")
    return par


def _inject_fault(ctx):
    spec = os.environ.get(FAULT_ENV)
    if not spec or ctx.parallel.cache.get("fault_done"):
        return
    action, _, where = spec.partition("@")
    rank, _, step = where.partition(":")
    if ctx.parallel.rank == int(rank) and ctx.step == int(step):
        ctx.parallel.cache["fault_done"] = True
        if action == "hang":
            while not ctx.stop_requested:  # until torchrun's SIGTERM, once another rank has failed
                time.sleep(0.05)
            sys.exit(143)
        raise RuntimeError(f"injected failure on rank {rank} after step {step}")


def _each_step(fn, ctx):
    _inject_fault(ctx)
    if ctx.parallel.is_main:
        fn(ctx)


def _new_plain(model):
    from transformers import AutoModelForCausalLM  # deferred: transformers loads in a second

    plain = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=torch.float32)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def _load_full(plain, full: dict):
    """Loads gathered weights; a key may be missing only where it is tied to a loaded one."""
    missing, unexpected = plain.load_state_dict(full, strict=False)
    params = dict(plain.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in full if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise RuntimeError(f"the gathered weights do not fit the model: missing {untied}, unexpected {unexpected}")


def plain_model(ctx):
    """Rank 0's plain HF model with the current weights, None on the other ranks (every rank calls it: under
    FSDP2 the weights are gathered to rank 0's CPU once per step)."""
    par = ctx.parallel
    model = par.hf_model(ctx.model)
    if par.kind == "ddp":
        return model if par.is_main else None
    if par.cache.get("step") != ctx.step:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # deferred

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        par.cache["step"] = ctx.step
        if par.is_main:
            par.cache["model"] = par.cache.get("model") or _new_plain(model)
            _load_full(par.cache["model"], full)
    return par.cache.get("model") if par.is_main else None


def _with_plain_model(fn, ctx):
    if fn is _eval_before and ctx.step > 0:
        return
    plain = plain_model(ctx)
    if plain is None:
        return
    trained = ctx.model
    ctx.model = plain.to(ctx.device)
    try:
        fn(ctx)
    finally:
        ctx.model = trained
        if ctx.parallel.kind == "fsdp2":
            plain.to("cpu")


def _merged_memory_report(fn, ctx):
    par, prof = ctx.parallel, ctx.profiler
    mine = None if prof is None else {"rank": par.rank, "device": str(ctx.device), "peak_bytes": prof.peak["bytes"],
                                      "step": prof.peak["step"], "phase": prof.peak["phase"],
                                      "breakdown": prof.peak["breakdown"], "rss_peak_bytes": rss_peak_bytes()}
    ranks = par.gather(mine)
    if par.is_main and prof is not None:
        prof.extra = {"parallel": par.kind, "world_size": par.world_size, "ranks": ranks}
        fn(ctx)


def _begin(out, state):
    try:
        tmp = begin_unit(out, state)
    except SaveError as e:
        return "error", str(e)
    return "ok", None if tmp is None else str(tmp)


def write_sharded_unit(fn, ctx):
    """`outputs.write_unit` over several ranks (see the module doc); every rank calls it. After an
    out-of-memory error it writes nothing (the other ranks are not in step); the last unit stays."""
    par = ctx.parallel
    if ctx.status == "out of memory":
        return
    state = train_state(ctx)
    rngs = par.gather(rng_state(ctx.device))
    plain = plain_model(ctx)
    kind, tmp = par.broadcast(_begin(ctx.out, state) if par.is_main else None)
    if kind == "error":
        raise SaveError(tmp)
    if tmp is not None:
        error = None
        try:
            entry = save_optimizer(tmp, par.hf_model(ctx.model), ctx.optimizer, OPTIMIZER_DIR)
        except (OSError, SafetensorError, CheckpointException) as e:
            error = f"could not save checkpoint step {ctx.step}: the optimizer shards failed ({str(e).splitlines()[0]})"
        if par.is_main and error is None:
            state.update(optimizer=entry, rng_ranks=rngs, world_size=par.world_size, parallel=par.kind)
            try:
                save_unit(ctx.out, plain, ctx.tokenizer, state, keep_last=ctx.config.keep_last, tmp=Path(tmp))
            except SaveError as e:
                error = str(e)
        elif par.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        error = par.broadcast(error)
        if error:
            raise SaveError(error)
    ctx.last_save = time.time()


ROUTES = {write_metrics: _each_step, write_unit: write_sharded_unit, write_memory_report: _merged_memory_report,
          write_samples: _with_plain_model, write_eval_after: _with_plain_model, _eval_before: _with_plain_model}
COLLECTIVE = {write_unit: 0, write_memory_report: 0, write_samples: 1, write_eval_after: 1}
