"""The optimizer state of a run spread over ranks: saved sharded with DCP, loaded at any world size.

`save_optimizer(folder, model, optimizer)` (every rank) writes the optimizer's tensors, keyed by parameter name
(`get_optimizer_state_dict`), through DCP into `folder` (dcp_storage.py: safetensors and JSON, no pickle);
each rank writes the shards it holds, a replicated tensor is written once. It returns the rest (the parameter
groups and any non-tensor entry) for the unit's JSON train state. `load_optimizer` reads it back into an
optimizer over a model sharded any way, or not at all (one process, no process group): DCP reads, on each
rank, the slices its own shards cover. `load_full_optimizer` puts a one-process optimizer state
(`optimizer.state_dict()`, keyed by parameter index) into an optimizer over a sharded or replicated model.
`model` is always the plain HF model (inside any wrapper), so parameter names are the same in every layout.
"""

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from .dcp_storage import SafeReader, SafeWriter

__all__ = ["SHARDED", "save_optimizer", "load_optimizer", "load_full_optimizer", "is_sharded"]

SHARDED = "sharded"  # the key of the train state's optimizer entry that names the DCP folder


def _split(osd: dict) -> tuple[dict, dict]:
    """({"state/<param>/<name>": tensor}, {"param_groups": ..., "scalars": {param: {name: value}}})."""
    tensors, scalars = {}, {}
    for name, entries in osd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def is_sharded(optimizer_state) -> bool:
    return isinstance(optimizer_state, dict) and SHARDED in optimizer_state


def save_optimizer(folder, model, optimizer, subfolder: str) -> dict:
    """Writes `optimizer`'s tensors into `folder/subfolder` (collective); returns the train state's entry."""
    tensors, rest = _split(get_optimizer_state_dict(model, optimizer))
    dcp.save(tensors, storage_writer=SafeWriter(Path(folder) / subfolder), no_dist=not dist.is_initialized())
    return {SHARDED: subfolder, **rest}


def load_optimizer(unit, model, optimizer, entry: dict):
    """Fills `optimizer` from the DCP folder a unit's train state names (`save_optimizer`'s entry)."""
    osd = get_optimizer_state_dict(model, optimizer)
    tensors, _ = _split(osd)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
        dcp.load(tensors, storage_reader=SafeReader(Path(unit) / entry[SHARDED]), no_dist=not dist.is_initialized())
    state = {name: dict(entry["scalars"].get(name, {})) for name in osd["state"]}
    for key, tensor in tensors.items():
        name, value = key.removeprefix("state/").rsplit("/", 1)
        state[name][value] = tensor
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": entry["param_groups"]})


def load_full_optimizer(model, optimizer, native: dict):
    """Loads a one-process `optimizer.state_dict()` (keyed by parameter index) into `optimizer`, whose
    parameters follow the same order, however they are sharded or replicated."""
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    state = {order[int(i)]: entries for i, entries in native["state"].items()}
    groups = [{**g, "params": [order[int(i)] for i in g["params"]]} for g in native["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
