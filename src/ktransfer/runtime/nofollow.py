"""Writes under a run, cache or output folder never follow a symbolic link out of it.

A folder the user names (``train.out_dir``, ``--out``) may itself be a link (``runs -> /scratch/runs``); an entry
*inside* it that ktransfer writes (``RUN/.lock``, ``train.log``, ``metrics.jsonl``, ``tokenizer/``,
``checkpoints/``, ``eval/``, hypothesis and score files, temporary files) must not be: such a link would make a
write land on a file elsewhere (truncate it, overwrite it). Files are opened with ``O_NOFOLLOW`` and folders are
checked with ``lstat``; a link is refused with an ``OSError`` (``ELOOP``) whose filename is the link, so the command
line prints one line naming it, and nothing outside is touched.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

WHY = "is a symbolic link; ktransfer does not write through a link inside a run or output folder (remove it)"


def link_error(path) -> OSError:
    """The error for a link at ``path`` (``ELOOP``, naming it)."""
    return OSError(errno.ELOOP, WHY, str(path))


def refuse_link(path) -> None:
    """Raise ``link_error`` when ``path`` exists and is a symbolic link."""
    if Path(path).is_symlink():
        raise link_error(path)


def refuse_links_below(root, path) -> None:
    """Refuse a link at ``path`` or at any folder between ``root`` (which may be a link) and it.

    Raises:
        OSError: ``ELOOP``, naming the first link.
    """
    root, path = Path(root), Path(path)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = (path.name,)
        root = path.parent
    current = root
    for part in parts:
        current = current / part
        refuse_link(current)


def refuse_links_in(folder) -> None:
    """Refuse ``folder`` when it, or any entry directly in it, is a link (a folder about to be written whole, such as
    ``RUN/tokenizer``)."""
    folder = Path(folder)
    refuse_link(folder)
    if folder.is_dir():
        for entry in folder.iterdir():
            refuse_link(entry)


def open_fd(path, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_NOFOLLOW)``; a link is ``link_error`` (not the bare ``ELOOP``), any other
    OSError names the path."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP or Path(path).is_symlink():
            raise link_error(path) from None
        raise OSError(e.errno, e.strerror, str(path)) from e


def append_text(path, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing), never through a link; an OSError names the file."""
    fd = open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            fd = -1
            f.write(text)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        if fd >= 0:
            os.close(fd)


def write_text(path, text: str) -> None:
    """Replace the content of ``path`` with ``text`` (truncating it in place), never through a link."""
    fd = open_fd(path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        if fd >= 0:
            os.close(fd)


def write_new(path, text: str) -> None:
    """Write ``text`` to a file that must not exist yet (``O_EXCL``: a temporary name an attacker cannot plant a
    link at)."""
    fd = open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
