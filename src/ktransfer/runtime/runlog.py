"""Human-readable run logs: timestamped lines appended to a file and mirrored to stderr (rank 0 alone)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ktransfer.runtime import distributed, nofollow


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path``, never through a symbolic link; an OSError (disk full, a link, ...) names the
    file."""
    nofollow.append_text(path, text)


def kept_records(path: Path, keep_lines: int) -> list[tuple[str, dict]]:
    """The first ``keep_lines`` lines of the JSON-lines file ``path`` (none if it is missing) with their records.

    Raises:
        ValueError: ``FILE:LINE: not a JSON object (...)`` for a corrupt line among them.
    """
    if not path.exists():
        return []
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if number > keep_lines:
                break
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}:{number}: not a JSON object ({str(e)[:80]}); the file is corrupt: restore "
                                 "it or remove that line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: not a JSON object")
            kept.append((line, record))
    return kept


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
