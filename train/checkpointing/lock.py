"""One writer per run folder: an advisory `fcntl.flock` on `.leanfit.lock`, held while the run lives.

The kernel drops the lock when the holding process ends, however it ends (a `kill -9` included), so a lock is
never stale. The file names the holder (pid and start time) for the refusal message; a run that ends removes it
(and the run folder, when the lock made it and nothing else was written). A process that got the lock of a file
removed meanwhile sees that the path no longer names its file, and locks the new one.
"""

import fcntl
import json
import os
import time
from pathlib import Path

__all__ = ["LOCK", "RunLock", "lock_run", "check_unlocked"]

LOCK = ".leanfit.lock"


class RunLock:
    """A held lock on a run folder; `release()` (or process exit) frees it."""

    def __init__(self, fd: int, path: Path, made_folder: bool):
        self.fd, self.path, self.made_folder = fd, path, made_folder

    def release(self):
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if self.made_folder and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(info['pid'])}, started {info['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "an unknown process"


def _busy(folder: Path, holder: str) -> ValueError:
    return ValueError(f"{folder} is in use by another leanfit run ({holder}); wait for it to end, or choose "
                      f"another --out")


def check_unlocked(folder):
    """ValueError naming the holder when another process holds the run folder's lock; writes nothing."""
    path = Path(folder) / LOCK
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(Path(folder), _holder(fd)) from None
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def lock_run(folder) -> RunLock:
    """Takes the run folder's lock (making the folder if needed).

    Raises:
        ValueError naming the holder's pid and start time when another process holds it.
    """
    folder = Path(folder)
    made_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _busy(folder, holder) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed this file as it ended: lock the one now at `path`
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": started}).encode("utf-8"), 0)
    return RunLock(fd, path, made_folder)
