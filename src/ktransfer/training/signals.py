"""Where the teacher's signal comes from, chosen once in setup: the live teacher, the teacher cache, the fused
output head, or the learner's own samples (on-policy prefixes).

Every source is an object with ``loss(model, batch, num_tokens=None) -> TransferLoss`` that runs the learner
(``model``: the learner or its DDP wrapper) on ``batch`` (``family.collate`` output) and computes the run's
``LossSpec`` (``ktransfer.losses.spec``) against the teacher's signal:

- ``LiveTeacher``: the frozen teacher runs on the same inputs (under ``torch.no_grad``; none for ``nll``);
- ``CachedTeacher``: the teacher's top-k of each training example, read from ``train.teacher_cache`` by the batch's
  ``example_index`` (``training_batch``), stand in for its logits;
- ``FusedHead``: the output layers of both models are fused with the loss (``ktransfer.losses.fused_linear``);
- ``ktransfer.training.prefixes.OnPolicy``: the divergence on prefixes the learner samples (``objective.prefix``).

``Signals.train`` serves training batches, ``Signals.valid`` validation batches (reference prefixes, the live teacher
or the fused head: the cache holds the training data only). Every path slices both models' logits to the
``spec.vocab_size`` ids they share, so a head padded beyond the tokenizer gives the same loss on each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ktransfer.losses.objectives import TransferLoss, spec_loss
from ktransfer.losses.spec import LossSpec


class Signal(Protocol):
    def loss(self, model: torch.nn.Module, batch: dict, num_tokens: int | None = None) -> TransferLoss: ...


@dataclass
class LiveTeacher:
    """The teacher runs on the batch (eval mode, ``torch.no_grad``); ``teacher`` None: plain NLL."""

    spec: LossSpec
    family: Any
    teacher: torch.nn.Module | None
    autocast: Any  # () -> context manager around the forward passes (bf16 autocast)

    def loss(self, model, batch, num_tokens=None) -> TransferLoss:
        inputs, labels = self.family.model_inputs(batch)  # model(**inputs).logits[:, t] is scored against labels[:, t]
        with self.autocast():
            logits = model(**inputs, use_cache=False).logits  # (B, T, V)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(**inputs, use_cache=False).logits  # (B, T, V)
        return spec_loss(self.spec, logits, teacher_logits, labels, num_tokens=num_tokens)


@dataclass
class CachedTeacher:
    """The teacher's cached top-k (``ktransfer.training.teacher_cache``) of the batch's ``example_index`` rows."""

    spec: LossSpec
    family: Any
    cache: Any  # a TeacherCache
    autocast: Any

    def loss(self, model, batch, num_tokens=None) -> TransferLoss:
        from ktransfer.training.teacher_cache import first_targets

        if "example_index" not in batch:
            raise ValueError("a training batch of a teacher-cache run needs the example_index of its rows "
                             "(ktransfer.training.loop.training_batch)")
        inputs, labels = self.family.model_inputs(batch)
        with self.autocast():
            logits = model(**inputs, use_cache=False).logits
        teacher_logits = self.cache.teacher_logits(batch["example_index"], labels.shape[1],
                                                   shift=first_targets(labels), device=logits.device)
        return spec_loss(self.spec, logits, teacher_logits, labels, num_tokens=num_tokens)


@dataclass
class FusedHead:
    """Output layers fused with the loss: the ``[B, T, V]`` logits of learner and teacher are never held."""

    spec: LossSpec
    family: Any
    teacher: torch.nn.Module | None
    autocast: Any

    def loss(self, model, batch, num_tokens=None) -> TransferLoss:
        from ktransfer.losses.fused_linear import fused_model_loss

        inputs, labels = self.family.model_inputs(batch)
        with self.autocast():
            return fused_model_loss(model, self.teacher, inputs, labels, spec=self.spec, num_tokens=num_tokens)


@dataclass
class Signals:
    """The loss of a training batch (``train``) and of a validation batch (``valid``), and the spec both compute."""

    spec: LossSpec
    train: Signal
    valid: Signal


def choose(cfg, spec: LossSpec, *, model, teacher, family, tokenizer, state, device, cache=None) -> Signals:
    """The sources of ``cfg`` (``train.fused_head``, ``train.teacher_cache``, ``objective.prefix``), settled once.

    ``cache``: the opened teacher cache when ``train.teacher_cache`` is set; ``state``: the run's ``TrainState``
    (on-policy sampling seeds depend on its step). Which combinations are allowed is ``ktransfer.training.rules``'s
    business, checked before this.
    """
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
    if cfg.train.fused_head:
        valid = FusedHead(spec, family, teacher, autocast)
    else:
        valid = LiveTeacher(spec, family, teacher, autocast)
    train = valid if cache is None else CachedTeacher(spec, family, cache, autocast)
    if cfg.objective.prefix != "reference":
        from ktransfer.training.prefixes import OnPolicy

        train = OnPolicy(spec, teacher=teacher, learner=model, family=family, tokenizer=tokenizer, cfg=cfg,
                         state=state, reference=train, autocast=autocast)
    return Signals(spec=spec, train=train, valid=valid)
