"""What a run is made of once ``ktransfer.training.setup`` built it: ``Run`` and the ``TrainState`` it saves.

``Run`` holds the config and run folder, the two models with their tokenizer and family, the encoded data
(``RunData``), the optimiser and schedule, the train state, the run log and metrics file, how the processes share
the work (``ktransfer.training.parallel.Parallel``) and where the teacher's signal comes from
(``ktransfer.training.signals.Signals``). ``ktransfer.training.loop`` and ``ktransfer.training.validation`` read and
update it; nothing below the training layer sees it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ktransfer.data.batching import ExampleBatchSampler, TokenBatchSampler
from ktransfer.models import family as models
from ktransfer.models.tokenizer import Tokenizer
from ktransfer.runtime.runlog import RunLog
from ktransfer.training.config import RunConfig
from ktransfer.training.metrics import MetricsFile
from ktransfer.training.parallel import Parallel


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; ``last`` was saved before raising."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (with the RNG states) so that a resume continues exactly."""

    epoch: int = 0  # current epoch, 0-based (== train.epochs when all are done)
    batch: int = 0  # batches of `epoch` already used
    step: int = 0  # optimizer updates done (skipped non-finite steps excluded)
    tokens: int = 0  # target tokens trained on
    best: float | None = None  # best validation value (BLEU with train.valid_bleu, else loss)
    best_epoch: int | None = None
    best_step: int | None = None  # the update after which the best validation came
    valid_step: int | None = None  # the update of the latest validation (train.eval_every)
    schedule_steps: int | None = None  # total updates of a linear / cosine schedule, fixed at the start
    bad_validations: int = 0  # validations since the best one (early stopping)
    nonfinite: int = 0  # consecutive non-finite steps
    metrics_lines: int = 0  # lines of metrics.jsonl written up to this state
    elapsed: float = 0.0  # seconds spent training (validation included)
    stopped: str | None = None  # why training ended: epochs, max_steps, early_stopping, nonfinite, signal:NAME
    processes: int = 1  # processes that trained last (a resume keeps optim.accumulate x processes: runfolder)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class RunData:
    """The encoded examples of a run and how training batches them."""

    format: str  # ktransfer.data.formats: parallel, prompt_completion, chat, text
    train_ids: tuple[list[list[int]], list[list[int]]]  # (source, target) or (prompt, response) ids: family.encode
    valid_ids: tuple[list[list[int]], list[list[int]]]
    valid_pairs: list[tuple[str, str]]  # (prompt, completion) text of the validation (subset): BLEU, examples
    sampler: TokenBatchSampler | ExampleBatchSampler  # the training batches of each epoch (data.batch_size)


@dataclass
class Run:
    """Everything ``setup`` built; ``train`` and its helpers read and update it."""

    cfg: RunConfig
    out_dir: Path
    device: torch.device
    tokenizer: Tokenizer
    model: torch.nn.Module  # the learner itself (checkpoints, validation, translation)
    family: models.ModelFamily  # seq2seq or causal: encoding, batches, aligned logits and labels, generation
    teacher: torch.nn.Module | None
    data: RunData
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState
    log: RunLog
    metrics: MetricsFile  # metrics.jsonl (and TensorBoard when installed)
    parallel: Parallel  # one process, DDP or FSDP: wrapping, sums over processes, full state for checkpoints
    signals: Any  # ktransfer.training.signals.Signals: the loss of a training and of a validation batch
    stop_signal: list[int] = field(default_factory=list)  # filled by the SIGINT/SIGTERM handler
    on_epoch_end: Any = None  # optional callable(run) run after each validation, before `last` is saved
    clock: float = field(default_factory=time.perf_counter)  # when state.elapsed was last brought up to date

    def trained_model(self) -> torch.nn.Module:
        """What training steps run forward/backward through: the DDP wrapper when there is one, else the learner."""
        return self.parallel.trained(self.model)

    def elapsed(self) -> float:
        """Seconds of training in this run folder so far, resumed sessions included."""
        now = time.perf_counter()
        self.state.elapsed, self.clock = self.state.elapsed + now - self.clock, now
        return self.state.elapsed


def collate_batch(run: Run, ids, idx: list[int]) -> dict:
    """The padded tensors (``family.collate``) of examples ``idx`` of ``ids`` (``family.encode`` output), on the
    device."""
    src, tgt = ids
    batch = run.family.collate([src[i] for i in idx], [tgt[i] for i in idx], run.model, run.tokenizer)
    return {k: v.to(run.device) for k, v in batch.items()}
