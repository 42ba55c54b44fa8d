"""Crash consistency that a completed save cannot show: what is durable before a unit is published, how the
sharded state's index comes into place, and resharding with slices that start inside a saved chunk.

The unit and index tests instrument the writer's system calls (`os.open`, `os.fsync`, `os.rename`, `os.replace`)
in this process; the resharding test saves with 2 gloo ranks and loads with 3 (slow: two process groups).
"""

import os
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from transformers import AutoModelForCausalLM, AutoTokenizer

from leanfit.train.checkpointing import checkpoint, dcp_storage
from leanfit.train.checkpointing.dcp_storage import INDEX, DcpFormatError, SafeReader, SafeWriter, read_index
from tests.tiny_lm import tiny_model_dir
from tests.train.crash_worker import state


class Syscalls:
    """Records, in order, the paths fsync'ed and the renames, with what a renamed folder held at that moment."""

    def __init__(self, monkeypatch):
        self.events, self._paths = [], {}
        real_open, real_fsync, real_rename, real_replace = os.open, os.fsync, os.rename, os.replace

        def opened(path, flags, *args, **kwargs):
            fd = real_open(path, flags, *args, **kwargs)
            self._paths[fd] = Path(path).resolve()
            return fd

        def fsynced(fd):
            real_fsync(fd)
            self.events.append(("fsync", self._paths.get(fd)))

        def moved(real):
            def move(src, dst, *args, **kwargs):
                src = Path(src).resolve()
                held = {p.resolve() for p in src.rglob("*")} if src.is_dir() else set()
                self.events.append(("rename", src, Path(dst).resolve(), held))
                return real(src, dst, *args, **kwargs)

            return move

        monkeypatch.setattr(os, "open", opened)
        monkeypatch.setattr(os, "fsync", fsynced)
        monkeypatch.setattr(os, "rename", moved(real_rename))
        monkeypatch.setattr(os, "replace", moved(real_replace))

    def fsynced_before(self, index: int) -> set:
        return {e[1] for e in self.events[:index] if e[0] == "fsync"}

    def rename_to(self, dst: Path) -> int:
        dst = dst.resolve()
        return next(i for i, e in enumerate(self.events) if e[0] == "rename" and e[2] == dst)


@pytest.fixture(scope="module")
def tiny():
    folder = tiny_model_dir("gpt2")
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_every_file_of_a_unit_is_fsynced_before_the_rename_that_publishes_it(tmp_path, tiny, monkeypatch):
    calls = Syscalls(monkeypatch)
    final = checkpoint.save_unit(tmp_path, *tiny, state(2))
    publish = calls.rename_to(final)
    _, tmp, _, held = calls.events[publish]
    assert any(p.name == "model.safetensors" for p in held) and any(p.name == "unit.json" for p in held)
    synced = calls.fsynced_before(publish)
    missing = sorted(str(p.relative_to(tmp)) for p in held | {tmp} if p not in synced)
    assert not missing, f"not fsync'ed before the unit was published: {missing}"
    after = {e[1] for e in calls.events[publish + 1:] if e[0] == "fsync"}
    assert (tmp_path / checkpoint.UNITS).resolve() in after, "the rename itself is made durable (units folder)"


def _save_sharded(folder):
    tensors = {"state/w/exp_avg": torch.randn(7, 3), "state/b/exp_avg": torch.randn(5)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
        dcp.save(tensors, storage_writer=SafeWriter(folder), no_dist=True)
    return tensors


def test_the_sharded_index_is_fsynced_then_renamed_into_place(tmp_path, monkeypatch):
    calls = Syscalls(monkeypatch)
    _save_sharded(tmp_path / "opt")
    publish = calls.rename_to(tmp_path / "opt" / INDEX)
    src = calls.events[publish][1]
    assert src.parent == (tmp_path / "opt").resolve() and src.name != INDEX
    assert src in calls.fsynced_before(publish), "the index is fsync'ed before it is renamed into place"
    shards = {p.resolve() for p in (tmp_path / "opt").glob("rank-*.safetensors")}
    assert shards and shards <= calls.fsynced_before(publish), "the shards are durable before the index names them"


class Killed(Exception):
    """Stands for SIGKILL at one step of the index write: nothing of the write after it runs (DCP reports it as a
    CheckpointException)."""


def _killer_at(step: str, monkeypatch):
    real_write_text, real_fsync, real_replace = Path.write_text, dcp_storage.fsync_path, os.replace

    def write_text(self, text, *args, **kwargs):
        if step == "mid-write" and INDEX in self.name:
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise Killed(step)
        return real_write_text(self, text, *args, **kwargs)

    def fsync(path):
        if step == "before-fsync" and INDEX in Path(path).name:
            raise Killed(step)
        return real_fsync(path)

    def replace(src, dst, *args, **kwargs):
        if step == "before-rename" and Path(dst).name == INDEX:
            raise Killed(step)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(dcp_storage, "fsync_path", fsync)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("step", ["mid-write", "before-fsync", "before-rename"])
def test_a_kill_while_the_index_is_written_leaves_no_index(step, tmp_path, monkeypatch):
    """An index is complete or absent: a reader never finds half of one (the unit holding the folder is then not
    published, and resume takes the previous one)."""
    folder = tmp_path / "opt"
    with monkeypatch.context() as patch:
        _killer_at(step, patch)
        with pytest.raises(CheckpointException, match=f"Killed: {step}"):
            _save_sharded(folder)
    assert not (folder / INDEX).exists()
    with pytest.raises(DcpFormatError, match="is missing"):
        read_index(folder)
    tensors = _save_sharded(folder)
    back = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(back, storage_reader=SafeReader(folder), no_dist=True)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


# Odd sizes: 2 ranks save chunks of 4 + 3 rows (and 3 + 2 elements); 3 ranks load 3 + 3 + 1 rows (2 + 2 + 1), so
# rank 1 starts reading row 3 inside the first chunk and rank 2 row 6 inside the second.
RESHARD = {"w": (7, 3), "b": (5,)}


def _full(name: str) -> torch.Tensor:
    n = torch.Size(RESHARD[name]).numel()
    return torch.arange(n, dtype=torch.float32).reshape(RESHARD[name]) + (1000.0 if name == "b" else 0.0)


def reshard_worker(rank: int, world: int, port: int, folder: str, save: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (world,))
    if save:
        tensors = {name: distribute_tensor(_full(name), mesh, [Shard(0)]) for name in RESHARD}
        dcp.save(tensors, storage_writer=SafeWriter(folder))
    else:
        tensors = {name: distribute_tensor(torch.full(RESHARD[name], float("nan")), mesh, [Shard(0)])
                   for name in RESHARD}
        dcp.load(tensors, storage_reader=SafeReader(folder))
        full = {name: t.full_tensor() for name, t in tensors.items()}
        if rank == 0:
            save_file(full, str(Path(folder) / "loaded.safetensors"))
    dist.barrier()  # no rank tears gloo down while another is still in a collective (a SIGABRT seen once in CI)
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two gloo process groups, 5 processes: about 20 s
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed, gloo")
def test_resharding_2_to_3_ranks_reads_slices_that_start_inside_chunks(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = str(tmp_path / "opt")
    mp.spawn(reshard_worker, args=(2, _free_port(), folder, True), nprocs=2)
    chunks = read_index(folder)
    assert [c["sizes"][0] for c in chunks["w"]["chunks"]] == [4, 3]
    mp.spawn(reshard_worker, args=(3, _free_port(), folder, False), nprocs=3)
    loaded = load_file(str(Path(folder) / "loaded.safetensors"))
    for name in RESHARD:
        assert torch.equal(loaded[name], _full(name)), name
