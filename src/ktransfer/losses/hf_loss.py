"""Eq. 12 on Hugging Face model outputs, with the labels lined up the way the model family needs.

A Hugging Face causal LM is trained with ``labels = input_ids`` (``-100`` on tokens that are not targets): its logits
at position t predict token t + 1, and the model shifts the labels inside its own loss. A seq2seq model (Marian, BART,
T5) feeds the right-shifted labels to its decoder, so its logits at t already predict ``labels[t]``. ``transfer_loss``
scores ``logits[..., t, :]`` against ``labels[..., t]`` as given; handing it a causal model's unshifted labels scores
every position against the token it has just read (a wrong NLL and divergence mask, with no error). ``hf_loss`` does
the shift once, where the family needs it:

    causal:   labels'[t] = labels[t + 1] for t < T - 1, labels'[T - 1] = ignore_index     (logits untouched)
    seq2seq:  labels' = labels

The shifted labels keep the logits' shape, so the ``[B, T, V]`` logits are never sliced or copied (the last position,
which predicts past the sequence, is simply not counted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ktransfer.losses.objectives import TransferLoss, check_token_count, spec_loss
from ktransfer.losses.spec import LossSpec


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Causal LM labels ``[..., T]`` lined up with the logits: ``out[..., t] = labels[..., t + 1]``, last = ignore.

    This is the shift Hugging Face's ``ForCausalLMLoss`` applies, so that ``logits[..., t, :]`` (the prediction after
    reading tokens ``0..t``) is scored against the next token. Returns a new tensor of the same shape.
    """
    if labels.dim() == 0:
        raise ValueError("labels must have a position dimension, got a 0-dimensional tensor")
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def labels_need_shift(outputs, model=None, labels_shifted: bool | None = None) -> bool:
    """Whether ``labels`` must be shifted for ``outputs``: decided from ``labels_shifted`` if given, else from
    ``model.config.is_encoder_decoder`` (``model`` may be a model, a DDP wrapper or a config), else from the output's
    class (``*CausalLM*`` outputs are causal, ``Seq2Seq*`` outputs are not).

    Raises:
        ValueError: none of the three says which family the outputs come from (raw logits and no ``model``).
    """
    if labels_shifted is not None:
        if not isinstance(labels_shifted, bool):
            raise ValueError(f"labels_shifted must be True, False or None, got {labels_shifted!r}")
        return not labels_shifted
    if model is not None:
        config = getattr(getattr(model, "module", model), "config", model)
        flag = getattr(config, "is_encoder_decoder", None)
        if not isinstance(flag, bool):
            raise ValueError(f"cannot read is_encoder_decoder from {type(model).__name__}: pass labels_shifted=True "
                             "(labels already line up with the logits) or False (Hugging Face causal labels)")
        return not flag
    name = type(outputs).__name__
    if name.startswith("Seq2Seq"):
        return False
    if "CausalLM" in name:
        return True
    raise ValueError(f"cannot tell how labels line up with {name} logits: pass model= (its config's "
                     "is_encoder_decoder decides) or labels_shifted=True/False. Hugging Face causal LMs take "
                     "unshifted labels (logits at t predict token t + 1), seq2seq models aligned ones")


def _logits(outputs, who: str):
    if outputs is None or isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{who} has no logits tensor ({type(outputs).__name__}): pass the model's output or its "
                         "logits [B, T, V]")
    return logits


def hf_loss(
    learner_outputs,
    teacher_outputs,
    labels: torch.Tensor,
    *,
    objective: str = "kd",
    lam: float = 0.5,
    model=None,
    labels_shifted: bool | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    spec: LossSpec | None = None,
    **options,
) -> TransferLoss:
    """``transfer_loss`` on Hugging Face outputs and their ``labels``, shifted once where the model family needs it.

    Args:
        learner_outputs: the learner's output (anything with ``.logits`` ``[B, T, V]``) or its logits.
        teacher_outputs: the frozen teacher's output or logits on the same inputs; None for ``objective="nll"``.
        labels: ``[B, T]`` as the model takes them (``-100`` = not a target): unshifted for causal LMs (as
            ``model(input_ids, labels=input_ids)``), decoder targets for seq2seq.
        objective, lam: as in ``transfer_loss`` (``"kd"``, ``"ka"``, ``"half"``, a divergence kind, or ``"nll"``).
        model: the learner (or its config): ``config.is_encoder_decoder`` decides whether to shift.
        labels_shifted: True when ``labels`` already line up with the logits (ktransfer's own causal batches,
            seq2seq), False for Hugging Face causal labels. Overrides ``model``. With neither, the output's class
            decides (``CausalLMOutput*`` shift, ``Seq2SeqLMOutput`` not); raw logits with neither raise.
        num_items_in_batch: the number of target tokens the loss is normalised by, as ``transformers.Trainer``
            passes it to ``compute_loss`` (all micro-batches of a gradient-accumulation step, and all processes with
            ``average_tokens_across_devices``); None = the tokens of this batch.
        ignore_index: label value of positions that are not counted.
        spec: the loss settings as one ``ktransfer.losses.spec.LossSpec`` (then ``objective``, ``lam`` and
            ``options`` are not read).
        **options: the other keyword arguments of ``transfer_loss`` (``top_k``, ``support``, ``tail``,
            ``renormalize``, ``temperature``, ``beta``, ``alpha``, ``label_smoothing``, ``vocab_size``,
            ``chunk_size``: ``ktransfer.losses.spec.OPTIONS``).

    Returns:
        ``TransferLoss``: ``loss`` (sum over counted positions / count), ``nll``, ``divergence``, ``num_tokens``.

    Raises:
        ValueError: the family cannot be decided, labels do not match the logits' ``[B, T]``, or any error of
            ``transfer_loss``.
    """
    if spec is None:
        spec = LossSpec.of(objective, lam, **options)
    z = _logits(learner_outputs, "learner_outputs")
    u = _logits(teacher_outputs, "teacher_outputs")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(z.shape[:-1]):
        raise ValueError(f"labels {list(labels.shape)} must have the logits' positions {list(z.shape[:-1])} "
                         "(pass the labels as the model takes them: hf_loss shifts causal labels itself)")
    check_token_count(num_items_in_batch, "num_items_in_batch")
    if labels_need_shift(learner_outputs, model, labels_shifted):
        labels = shift_labels(labels, ignore_index)
    return spec_loss(spec, z, u, labels, ignore_index=ignore_index, num_tokens=num_items_in_batch)
