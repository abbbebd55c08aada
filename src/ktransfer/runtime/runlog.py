"""Human-readable run logs: timestamped lines appended to a file and mirrored to stderr (rank 0 alone)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ktransfer.runtime import distributed


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path``; an OSError (disk full, ...) names the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


class RunLog:
    """A log file (``train.log``, ``reproduce.log``: timestamped lines, appended) mirrored to stderr; callable with a
    message. Not ``enabled`` (default: ranks other than 0 of a process group): says nothing."""

    def __init__(self, path: Path, *, enabled: bool | None = None):
        self.path = path
        self.enabled = distributed.is_main() if enabled is None else enabled

    def __call__(self, message: str) -> None:
        from tqdm import tqdm

        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        append_text(self.path, line + "\n")
        tqdm.write(line, file=sys.stderr)
