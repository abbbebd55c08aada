"""``metrics.jsonl`` (and TensorBoard when it is installed), and the tokens-per-second window of the progress log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ktransfer.runtime import nofollow
from ktransfer.runtime.runlog import append_text, kept_records


class MetricsFile:
    """``metrics.jsonl``: one JSON object a line (train steps, validations, skipped steps).

    On resume the file is cut back to the lines the checkpoint had seen, so no line appears twice. Not ``enabled``
    (ranks other than 0): counts the lines, remembers the last validation, touches no file. ``writer``: a
    TensorBoard ``SummaryWriter`` that receives every number as well (None without tensorboard).
    """

    def __init__(self, path: Path, keep_lines: int = 0, *, enabled: bool = True, writer=None):
        self.path, self.last_valid, self.enabled, self.writer = path, None, enabled, writer
        if not enabled:
            self.lines = keep_lines
            return
        kept = kept_records(path, keep_lines)  # a corrupt line: FILE:LINE
        nofollow.write_text(path, "".join(line for line, _ in kept))  # never through a link
        self.lines = len(kept)
        for _, record in kept:  # the last validation, for a resumed run that has nothing left to do
            if record.get("kind") == "valid":
                self.last_valid = record

    def write(self, state, record: dict) -> None:
        """Append ``record`` with the position of ``state`` (a ``TrainState``); counts it in ``metrics_lines``."""
        s = state
        record = {"kind": record["kind"], "epoch": s.epoch, "batch": s.batch, "step": s.step, "tokens": s.tokens,
                  "time": time.time(), **record}
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}  # JSON
        if record["kind"] == "valid":
            self.last_valid = record
        if self.enabled:
            append_text(self.path, json.dumps(record) + "\n")
        self.lines += 1
        s.metrics_lines = self.lines
        if self.writer is not None:
            for key, value in record.items():
                if type(value) in (int, float) and key not in ("epoch", "batch", "step", "time"):  # bools excluded
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, s.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard(out_dir: Path):
    """A ``SummaryWriter`` writing to ``out_dir/tensorboard``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


class Throughput:
    """Target tokens per second since it was made."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)
