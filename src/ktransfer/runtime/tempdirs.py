"""Folders built whole beside their destination, and what a killed build leaves behind.

A folder a command builds (a teacher cache, an exported model) is written under ``.NAME.tmp-PID-XXXX`` beside
``NAME`` and renamed into place once complete. ``building(NAME, busy)`` holds ``.NAME.lock`` (an ``fcntl.flock``, with
the holder's PID) while it is built: a second process building the same folder stops at once with ``busy``'s message
naming the first one's PID, and the temporary folders of builds whose process is dead (killed midway: the OS freed
their lock) are removed (``sweep``). A live process's temporary folder is never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ktransfer.runtime import runlock


def lock_path(target) -> Path:
    """``.NAME.lock`` beside ``target``."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def temp_folder(target) -> Path:
    """A new empty ``.NAME.tmp-PID-XXXX`` beside ``target`` (its parent created)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))


def sweep(target) -> list[Path]:
    """Remove the ``.NAME.tmp-PID...`` entries beside ``target`` whose process is dead; returns them."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)(?:-.*)?")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None or int(found.group(1)) == os.getpid() or runlock.alive(int(found.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def building(target, busy: Callable[[str], str]) -> Iterator[list[Path]]:
    """Hold ``.NAME.lock`` beside ``target`` while it is built; yields the dead builds' leftovers it removed.

    Raises:
        runlock.RunFolderBusy: another live process builds ``target``: ``busy(holder)`` is the message.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(target)
    fd = runlock.lock_file(lock, busy)
    try:
        yield sweep(target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before closing: a process that opened it meanwhile finds the inode gone and retries
        os.close(fd)
