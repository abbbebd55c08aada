"""Pre-training with NLL, and distillation of a learner from a frozen teacher, with exact resume: the entry points.

The work is split by job (read in this order):

- ``ktransfer.training.rules``: the rules over pairs of options, checked before anything loads;
- ``ktransfer.training.setup``: ``setup(cfg)`` builds a ``Run`` (``ktransfer.training.run``): run folder, data,
  models and tokenizer (``ktransfer.training.loading``), the loss spec and the source of the teacher's signal
  (``ktransfer.training.signals``), the process layout (``ktransfer.training.parallel``), optimiser and schedule,
  or all of them restored from ``RUN/checkpoints/last``;
- ``ktransfer.training.loop``: ``train(cfg)`` (the epochs), ``train_step``, ``compute_loss``, checkpoints, signals;
- ``ktransfer.training.validation``: validation loss, BLEU, logged examples;
- ``ktransfer.training.metrics``: ``metrics.jsonl``.

Exact resume: a checkpoint holds the weights, the optimiser and schedule, the RNG states (dropout), the epoch and how
many batches of it were used. The batches of an epoch are a function of ``(seed, epoch)``, so a resumed run skips the
used ones and goes on with the same random stream: killed and resumed, it ends with the weights of a run that was
never interrupted.

A run folder::

    RUN/config.yaml  tokenizer/  metrics.jsonl  train.log
    RUN/checkpoints/last/  RUN/checkpoints/best/      (Hugging Face folders + training_state.json)

The model family (``ktransfer.models.family.family_of``: seq2seq or causal) decides how examples become batches and
which logits meet which labels; nothing in training asks which family it holds.
"""

from __future__ import annotations

from ktransfer.training.loading import teacher_dtype
from ktransfer.training.loop import compute_loss, rank_batches, save_checkpoint, train, train_step, training_batch
from ktransfer.training.run import NonFiniteLossError, Run, TrainState, collate_batch
from ktransfer.training.setup import lr_factor, setup
from ktransfer.training.validation import valid_loss, validate

__all__ = ["NonFiniteLossError", "Run", "TrainState", "collate_batch", "compute_loss", "lr_factor", "rank_batches",
           "save_checkpoint", "setup", "teacher_dtype", "train", "train_step", "training_batch", "valid_loss",
           "validate"]
