"""ktransfer's losses inside Hugging Face trainers: ``transformers.Trainer`` and TRL's ``GKDTrainer``.

Importing this package imports neither ``transformers.Trainer`` nor TRL; the ready trainers live in submodules that do:

- ``ktransfer.integrations.hf_trainer.TransferTrainer``: a ``transformers.Trainer`` that trains ``model`` on
  ``(1 - w) NLL + w D(p, q)`` (``w`` = ``divergence_weight``) with a frozen ``teacher_model``;
- ``ktransfer.integrations.gkd.TransferGKDTrainer``: TRL's ``GKDTrainer`` (on-policy sampling, ``lmbda``, ``seq_kd``
  untouched) with its ``generalized_jsd_loss`` replaced by ktransfer's (same value and gradient for every beta, and
  every other kind, top-k supports and an NLL mix besides).

Both take the loss settings as keyword arguments (``objective``, ``divergence_weight`` (formerly ``lam``, still
accepted for this release with a deprecation line; not TRL's ``lmbda``, the on-policy fraction) and the options of
``ktransfer.losses.spec.OPTIONS``: ``top_k``, ``support``, ``tail``, ``renormalize``, ``temperature``, ``beta``,
``alpha``, ``label_smoothing``, ``vocab_size``, ``chunk_size``), checked once into a ``LossSpec``, and compute the loss
with ``TransferLossMixin.compute_loss``, which any other ``Trainer`` subclass can mix in.
"""

from __future__ import annotations

import torch

from ktransfer.losses.hf_loss import hf_loss
from ktransfer.losses.spec import OPTIONS, LossSpec
from ktransfer.training import aliases

# Keyword arguments of the trainers that are ktransfer loss settings (the rest go to the trainer).
TRANSFER_OPTIONS = OPTIONS


def pop_transfer_options(kwargs: dict) -> dict:
    """Remove the ``TRANSFER_OPTIONS`` keys from ``kwargs`` (in place) and return them as a dict."""
    return {k: kwargs.pop(k) for k in TRANSFER_OPTIONS if k in kwargs}


def divergence_weight_of(kwargs: dict, given: float | None, default: float, source: str) -> float:
    """The divergence weight of a trainer call: ``given`` (``divergence_weight=``), else the deprecated ``lam=`` popped
    from ``kwargs`` (logging one deprecation line), else ``default``.

    Raises:
        TypeError: both ``divergence_weight=`` and ``lam=`` were given.
    """
    if "lam" not in kwargs:
        return default if given is None else given
    if given is not None:
        raise TypeError(f"{source}: got both divergence_weight= and lam= (the deprecated name of divergence_weight=)")
    aliases.canonical("lam", f"{source}(lam=...)", aliases.RENAMED_KEYWORDS)
    return kwargs.pop("lam")


class TransferLossMixin:
    """``compute_loss`` for a ``transformers.Trainer`` subclass: ``ktransfer.hf_loss`` of the model and a
    teacher.

    Put it before the trainer class (``class MyTrainer(TransferLossMixin, Trainer)``) and call ``init_transfer`` at the
    end of ``__init__``. Per batch it runs the model and, without gradient, the teacher on the same inputs
    (``transfer_inputs``), then ``hf_loss(outputs, teacher_outputs, inputs["labels"], model=model, ...)``: causal
    labels are shifted once, ``-100`` is not counted, and the loss is normalised by the trainer's
    ``num_items_in_batch`` when it passes one (the target tokens of the whole gradient-accumulation step, over all
    processes with ``average_tokens_across_devices``; the loss is then multiplied by the number of processes, as
    ``Trainer.compute_loss`` does, since DDP averages gradients), else by this batch's token count.
    """

    def init_transfer(self, teacher_model, objective: str, divergence_weight: float, options: dict) -> None:
        """Store the loss settings; ``teacher_model`` None keeps ``self.teacher_model`` (set by e.g. GKDTrainer).

        Raises:
            ValueError: unknown objective, divergence_weight outside [0, 1], an unknown option, or no teacher for a
                divergence.
        """
        self.transfer_spec = LossSpec.of(objective, divergence_weight, **options)
        if teacher_model is not None:
            teacher_model.requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        if objective != "nll" and getattr(self, "teacher_model", None) is None:
            raise ValueError(f"objective {objective!r} needs a teacher_model")
        self.transfer_options = dict(options)

    def transfer_inputs(self, model, inputs: dict) -> dict:
        """The model's forward arguments: ``inputs`` without ``labels``; for a seq2seq model without
        ``decoder_input_ids``, those made from the labels (``prepare_decoder_input_ids_from_labels``)."""
        out = {k: v for k, v in inputs.items() if k != "labels"}
        core = self.accelerator.unwrap_model(model)
        prepare = getattr(core, "prepare_decoder_input_ids_from_labels", None)
        if getattr(core.config, "is_encoder_decoder", False) and "decoder_input_ids" not in out:
            if prepare is None:  # the model shifts its labels itself (and computes a loss we do not use)
                out["labels"] = inputs["labels"]
            else:
                out["decoder_input_ids"] = prepare(labels=inputs["labels"])
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``(1 - w) NLL + w D`` on this batch (``TransferLoss.loss``), and the model's outputs if asked."""
        model_inputs = self.transfer_inputs(model, inputs)
        outputs = model(**model_inputs)
        teacher_outputs = None
        if self.transfer_spec.needs_teacher:
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_outputs = self.teacher_model(**model_inputs)
        result = hf_loss(outputs, teacher_outputs, inputs["labels"], spec=self.transfer_spec,
                         model=self.accelerator.unwrap_model(model), num_items_in_batch=num_items_in_batch)
        if model.training:  # the parts of the loss, logged beside it (``log``)
            sums = self.__dict__.setdefault("_transfer_parts", {"nll": 0.0, "divergence": 0.0, "batches": 0})
            sums["nll"] += float(result.nll)
            sums["divergence"] += float(result.divergence)
            sums["batches"] += 1
        loss = result.loss
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        """The trainer's log, with ``nll`` and ``divergence`` (their means over the training batches since the last
        log) beside ``loss``."""
        sums = self.__dict__.get("_transfer_parts")
        if "loss" in logs and sums and sums["batches"]:
            logs = {**logs, "nll": round(sums["nll"] / sums["batches"], 6),
                    "divergence": round(sums["divergence"] / sums["batches"], 6)}
            self._transfer_parts = {"nll": 0.0, "divergence": 0.0, "batches": 0}
        return super().log(logs, *args, **kwargs)
