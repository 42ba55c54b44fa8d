"""Atomic file and folder writes: each output appears complete under its final name, or not at all.

A file is written to a temporary sibling and moved into place with `os.replace`, which is atomic on
POSIX and Windows. A folder (a `save_pretrained` checkpoint) is written to a temporary sibling folder and
swapped with an existing folder of the same name in one step (Linux `renameat2(RENAME_EXCHANGE)`), so a kill
leaves the old folder or the new one under the name; elsewhere the old one is moved aside first. The old
folder is removed afterwards.
"""

import ctypes
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["fsync_path", "atomic_write_text", "atomic_write_json", "atomic_dir", "atomic_path", "check_writable"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path):
    """Flushes a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, sync: bool = False):
    """Yields a temporary path next to `path`; moves it to `path` when the block ends without error (with `sync`:
    the file is flushed to the disk before the move and the folder after it, so a power cut leaves the old file
    or the new one, never an empty one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        if sync:
            fsync_path(tmp)
        os.replace(tmp, path)
        if sync:
            fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str, sync: bool = False):
    with atomic_path(path, sync) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path, obj, sync: bool = False):
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n", sync)


@contextmanager
def atomic_dir(path):
    """Yields an empty temporary folder next to `path`; it replaces `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where that is not available."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def check_writable(path, what: str, folder: bool = False):
    """Raises ValueError (naming `what`, e.g. "--json") unless `path` can be written: as a folder or a file,
    existing or to be made inside the nearest folder that exists. Writes nothing."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kinds = ("file", "folder") if folder else ("folder", "file")
        raise ValueError(f"{what} {path} is a {kinds[0]} (expected a {kinds[1]})")
    home = path if path.is_dir() else path.parent
    while not home.exists():
        home = home.parent
    if not home.is_dir() or not os.access(home, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write in {home} (expected a writable folder)")
