"""A storage layer for `torch.distributed.checkpoint` (DCP) that never pickles: safetensors and JSON.

DCP's own `FileSystemWriter` keeps the checkpoint's index in a pickle file (`.metadata`), and its planner
unpickles non-tensor values without restriction: loading a folder someone hands you would run their code. Here each
rank writes the chunks it owns into `rank-NNNNN.safetensors`, and the coordinator writes the index,
`index.json`: for every tensor its dtype, global size and chunks (offsets, sizes, file, key). DCP's planners
still do the work (deduplicating replicated tensors, resharding on load to any world size); this layer only
stores bytes. Only tensors are stored: a non-tensor value is refused (keep it in JSON beside the checkpoint).

Example:
    >>> dcp.save(flat_tensors, storage_writer=SafeWriter(folder))
    >>> dcp.load(flat_tensors_to_fill, storage_reader=SafeReader(folder))
"""

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from .atomic import fsync_path

__all__ = ["SafeWriter", "SafeReader", "INDEX", "DcpFormatError"]

INDEX = "index.json"
SCHEMA = "leanfit.dcp/1"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16,
                                                       torch.int64, torch.int32, torch.int16, torch.int8,
                                                       torch.uint8, torch.bool)}


class DcpFormatError(ValueError):
    """An index or shard file that is not what `SafeWriter` writes."""


def _key(index: MetadataIndex) -> str:
    return index.fqn + "@" + ",".join(map(str, index.offset or ()))


class _Folder:
    """A storage in one folder; DCP's `checkpoint_id`, when given, is the folder."""

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)

    def reset(self, checkpoint_id=None):
        if checkpoint_id:
            self.path = Path(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        return True


class SafeWriter(_Folder, StorageWriter):
    """Writes each rank's chunks into one safetensors file, fsync'ed; the coordinator writes `index.json`."""

    def set_up_storage_writer(self, is_coordinator, *args, **kwargs):
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan):
        self.path.mkdir(parents=True, exist_ok=True)
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise TypeError(f"{item.index.fqn}: only tensors are stored here, given a non-tensor value (keep it "
                                f"in the JSON beside the checkpoint)")
        return plan

    def prepare_global_plan(self, plans):
        return [dataclasses.replace(plan, storage_data=f"rank-{i:05d}.safetensors") for i, plan in enumerate(plans)]

    def write_data(self, plan, planner):
        tensors, results = {}, []
        for item in plan.items:
            tensor = planner.resolve_data(item).detach()
            if tensor.device.type == "cpu":  # a view may share its storage with another chunk: safetensors refuses that
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            else:
                tensor = tensor.to("cpu").contiguous()
            key = _key(item.index)
            tensors[key] = tensor
            results.append(WriteResult(index=item.index, size_in_bytes=tensor.nbytes,
                                       storage_data={"file": plan.storage_data, "key": key}))
        if tensors:
            path = self.path / plan.storage_data
            save_file(tensors, str(path))
            fsync_path(path)
        future = Future()
        future.set_result(results)
        return future

    def finish(self, metadata, results):
        where = {r.index: r.storage_data for rank in results for r in rank}
        tensors = {}
        for fqn, md in metadata.state_dict_metadata.items():
            chunks = [{"offsets": list(c.offsets), "sizes": list(c.sizes),
                       **where[MetadataIndex(fqn, c.offsets)]} for c in md.chunks]
            tensors[fqn] = {"dtype": str(md.properties.dtype).removeprefix("torch."), "size": list(md.size),
                            "chunks": chunks}
        path = self.path / INDEX
        tmp = path.with_name(f".{INDEX}.tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA, "tensors": tensors}), encoding="utf-8")
        fsync_path(tmp)
        os.replace(tmp, path)

    def storage_meta(self):
        return StorageMeta(checkpoint_id=str(self.path))


def _file_name(name, where):
    if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors") \
            or name.startswith("."):
        raise DcpFormatError(f"{where}: expected a shard file name like rank-00000.safetensors, given {name!r}")
    return name


def read_index(path) -> dict:
    """The index of a `SafeWriter` folder: {fqn: {"dtype", "size", "chunks"}}, checked; DcpFormatError else."""
    index_path = Path(path) / INDEX
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DcpFormatError(f"{index_path} is missing or not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("tensors"), dict):
        raise DcpFormatError(f"{index_path}: expected a {SCHEMA} index")
    for fqn, md in data["tensors"].items():
        if md.get("dtype") not in _DTYPES or not isinstance(md.get("chunks"), list):
            raise DcpFormatError(f"{index_path}: tensor {fqn!r} has dtype {md.get('dtype')!r} (expected one of "
                                 f"{', '.join(_DTYPES)}) or no chunk list")
        for chunk in md["chunks"]:
            _file_name(chunk.get("file"), index_path)
    return data["tensors"]


class SafeReader(_Folder, StorageReader):
    """Reads what `SafeWriter` wrote; each rank reads only the slices of the chunks its tensors overlap."""

    def read_metadata(self, *args, **kwargs):
        tensors = read_index(self.path)
        state, storage = {}, {}
        for fqn, md in tensors.items():
            chunks = []
            for c in md["chunks"]:
                chunk = ChunkStorageMetadata(torch.Size(c["offsets"]), torch.Size(c["sizes"]))
                chunks.append(chunk)
                storage[MetadataIndex(fqn, chunk.offsets)] = (c["file"], c["key"])
            state[fqn] = TensorStorageMetadata(TensorProperties(dtype=_DTYPES[md["dtype"]]), torch.Size(md["size"]),
                                               chunks)
        return Metadata(state_dict_metadata=state, storage_data=storage, storage_meta=StorageMeta())

    def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs):
        self.storage = metadata.storage_data

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner):
        per_file = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise DcpFormatError(f"{item.dest_index.fqn}: expected a tensor, the target holds a non-tensor value")
            per_file.setdefault(self.storage[item.storage_index][0], []).append(item)
        for name, items in per_file.items():
            path = self.path / name
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
                raise DcpFormatError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
            with handle as f:
                for item in items:
                    box = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths, strict=True))
                    key = self.storage[item.storage_index][1]
                    source = f.get_slice(key)[box] if box else f.get_tensor(key)
                    target = planner.resolve_tensor(item).detach()
                    if target.shape != source.shape:
                        raise DcpFormatError(f"{path}: chunk of {item.storage_index.fqn} has shape "
                                             f"{tuple(source.shape)}, expected {tuple(target.shape)}")
                    target.copy_(source)
                    planner.commit_tensor(item, target)
        future = Future()
        future.set_result(None)
        return future
