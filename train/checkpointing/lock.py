"""One writer per run folder: an advisory `fcntl.flock` on `.leanfit.lock`, held while the run lives.

The kernel drops the lock when the holding process ends, however it ends (a `kill -9` included), so a lock is
never stale; the file stays, and names the last holder (pid and start time) for the refusal message.
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

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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


def lock_run(folder) -> RunLock:
    """Takes the run folder's lock (making the folder if needed).

    Raises:
        ValueError naming the holder's pid and start time when another process holds it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise _busy(folder, holder) from None
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": started}).encode("utf-8"), 0)
    return RunLock(fd, path)
