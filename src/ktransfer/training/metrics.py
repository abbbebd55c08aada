"""``metrics.jsonl`` (always), the same numbers to TensorBoard or Weights & Biases (``train.report_to``), and the
tokens-per-second window of the progress log."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ktransfer.runtime import nofollow
from ktransfer.runtime.runlog import append_text, kept_records


class MetricsFile:
    """``metrics.jsonl``: one JSON object a line (train steps, validations, skipped steps).

    On resume the file is cut back to the lines the checkpoint had seen, so no line appears twice. Not ``enabled``
    (ranks other than 0): counts the lines, remembers the last validation, touches no file. ``writer``: a
    ``TensorBoard`` or ``Wandb`` report (``reporter``) that receives every number as well, as ``KIND/KEY`` at the
    record's step (None: metrics.jsonl alone).
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
            self.writer.log({f"{record['kind']}/{key}": value for key, value in record.items()  # numbers, no bools
                             if type(value) in (int, float) and key not in ("batch", "step", "time")}, s.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


REPORT_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # train.report_to -> ktransfer's pip extra


def check_report_to(report_to: str) -> str | None:
    """None when ``train.report_to``'s package imports (or it is ``none``), else the one-line reason (before any
    model loads)."""
    try:
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        elif report_to == "wandb":
            import wandb  # noqa: F401
    except ImportError as e:
        return (f"train.report_to={report_to}: {report_to} is not installed ({e}); pip install "
                f"'ktransfer[{REPORT_EXTRAS[report_to]}]', or train.report_to=none (metrics.jsonl is always written)")
    return None


def reporter(report_to: str, out_dir: Path, config: dict):
    """The report of ``train.report_to`` for a run in ``out_dir`` with ``config`` (``config_to_dict``), or None."""
    if report_to == "tensorboard":
        return TensorBoard(out_dir / "tensorboard")
    if report_to == "wandb":
        return Wandb(out_dir, config)
    return None


class TensorBoard:
    """Scalars to ``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """Scalars to a Weights & Biases run named after the run folder, with the run config: project
    ``$WANDB_PROJECT`` (else ``ktransfer``), files under ``$WANDB_DIR`` (else the run folder); ``WANDB_MODE=offline``
    writes them for a later ``wandb sync``. Each session (a resume too) is a W&B run of its own, its steps the
    run's updates."""

    def __init__(self, out_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ktransfer"), name=out_dir.name, config=config,
                              dir=None if os.environ.get("WANDB_DIR") else str(out_dir))

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Throughput:
    """Target tokens per second since it was made."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)
