"""One writer per run folder: ``RUN/.lock`` holds an ``fcntl.flock`` and the PID of the process writing the folder.

The OS releases the lock when its holder exits or dies (even by SIGKILL), so a killed run never blocks the next one;
a second process that tries to write the same folder gets ``RunFolderBusy`` naming the PID holding it. Under torchrun,
rank 0 (the one that writes) holds it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ktransfer.runtime import nofollow

LOCK_NAME = ".lock"
_HELD: dict[Path, int] = {}  # resolved folder -> fd of its lock file, in this process


class RunFolderBusy(RuntimeError):
    """Another live process is writing the run folder."""


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def holder(lock: Path, wait: float = 2.0) -> str:
    """The holder's PID as written in ``lock``, waiting up to ``wait`` s while the file holds none or a dead
    process's: a holder writes its own just after it locks, over what an earlier holder left."""
    deadline = time.monotonic() + wait
    while True:
        try:
            pid = lock.read_text(encoding="utf-8").strip()
        except OSError:
            pid = ""
        if pid.isdigit() and alive(int(pid)):
            return f"PID {pid}"
        if time.monotonic() >= deadline:
            return "another process"
        time.sleep(0.01)


def acquire(folder) -> None:
    """Lock ``folder`` (created if missing) for this process; a no-op when this process holds it already.

    Raises:
        RunFolderBusy: another process holds it (the message names its PID).
        OSError: the folder or its lock file cannot be created, or the lock file is a symbolic link (named).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:
        return
    lock = folder / LOCK_NAME
    _HELD[key] = lock_file(lock, lambda who: f"{folder} is being written by {who} (it holds {lock}); wait for it to "
                                             "finish, stop it, or choose another train.out_dir")


def lock_file(lock: Path, busy) -> int:
    """``flock`` the file ``lock`` (created, never through a link) and write this process's PID in it; returns its
    descriptor (closing it releases the lock).

    Raises:
        RunFolderBusy: another process holds it: ``busy(holder)`` is the message (``holder``: "PID N").
    """
    import fcntl

    while True:
        fd = nofollow.open_fd(lock, os.O_RDWR | os.O_CREAT)  # never a link's target
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(busy(holder(lock))) from None
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def holds(folder) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return Path(folder).resolve() in _HELD


def release(folder) -> None:
    """Give up this process's lock on ``folder`` (a no-op if it holds none)."""
    fd = _HELD.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def held(folder, *, enabled: bool = True):
    """``acquire(folder)`` for the duration of the block (``enabled=False``: nothing, e.g. ranks other than 0)."""
    if not enabled:
        yield
        return
    acquired = Path(folder).resolve() not in _HELD
    acquire(folder)
    try:
        yield
    finally:
        if acquired:
            release(folder)
