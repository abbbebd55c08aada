"""The paper's fine-tuning objective (Eq. 12): a mix of NLL on the reference and a divergence to a frozen teacher.

    loss = (1 - lam) * NLL(labels) + lam * D(p, q),

both terms means over the positions whose label is not ``ignore_index`` (or sums divided by ``num_tokens``). NLL and
the divergence are computed in one chunked sweep over the learner's logits (``ktransfer.losses.divergences``): the
learner's log-normaliser is shared, and no ``[N, V]`` temporary beyond the gradient is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ktransfer.losses.divergences import FusedSweep, SweepSpec, check_options, slice_vocab, terms_of
from ktransfer.losses.spec import ALIASES, DIVERGENCE_OPTIONS, OBJECTIVES, LossSpec

__all__ = ["ALIASES", "OBJECTIVES", "LossPlan", "LossSpec", "TransferLoss", "plan_loss", "spec_loss", "transfer_loss"]


@dataclass
class TransferLoss:
    """Result of ``transfer_loss``.

    Attributes:
        loss: scalar to call ``backward()`` on.
        nll: mean NLL over counted positions (detached, for logging; label smoothing included).
        divergence: mean divergence over counted positions (detached; 0 for ``objective="nll"``).
        num_tokens: the count the means divide by (``num_tokens`` when given, else the local count).
    """

    loss: torch.Tensor
    nll: torch.Tensor
    divergence: torch.Tensor
    num_tokens: torch.Tensor


def transfer_loss(
    learner_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    objective: str,
    lam: float = 0.5,
    top_k: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    num_tokens: int | torch.Tensor | None = None,
    vocab_size: int | None = None,
    **divergence_options,
) -> TransferLoss:
    """Eq. 12 of the paper: ``(1 - lam) * NLL + lam * D``; ``objective="nll"`` gives plain NLL.

    Args:
        learner_logits: ``[..., V]`` learner logits (receives the gradient).
        teacher_logits: ``[..., V]`` frozen teacher logits; may be None for ``objective="nll"``.
        labels: ``[...]`` integer reference tokens, aligned with the logits: ``logits[..., t, :]`` is scored against
            ``labels[..., t]``; ``ignore_index`` marks positions that are not counted. A Hugging Face causal LM's
            ``labels`` are *not* aligned (its logits at t predict token t + 1): use ``ktransfer.hf_loss``, or
            ``ktransfer.shift_labels`` first.
        objective: ``"nll"``, ``"kd"`` (forward_kl), ``"ka"`` (reverse_kl), ``"half"``, or any kind in ``KINDS``.
        lam: weight of the divergence, 0 <= lam <= 1 (ignored for ``nll``).
        top_k, temperature: as in ``ktransfer.divergence``; the temperature applies to the divergence only (NLL is
            always on the untempered learner).
        label_smoothing: epsilon of the NLL term, as in ``torch.nn.functional.cross_entropy``.
        num_tokens: global number of counted positions (gradient accumulation, several processes); replaces the
            local count as the denominator of both means.
        vocab_size: score only the ids ``[0, vocab_size)`` of both logits
            (``ktransfer.losses.divergences.slice_vocab``), for models whose output layers are padded to different
            sizes; labels must lie below it.
        **divergence_options: ``support``, ``tail``, ``renormalize``, ``beta``, ``alpha``, ``chunk_size`` of
            ``divergence`` (every option: ``ktransfer.losses.spec.OPTIONS``). The settings become one
            ``LossSpec``; ``spec_loss`` takes one directly.

    Raises:
        ValueError: unknown objective or option, missing teacher, labels of the wrong shape or out of range.
    """
    unknown = sorted(set(divergence_options) - set(DIVERGENCE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown divergence option(s) {unknown}; valid: {', '.join(DIVERGENCE_OPTIONS)}")
    spec = LossSpec.of(objective, lam, top_k=top_k, temperature=temperature, label_smoothing=label_smoothing,
                       vocab_size=vocab_size, **divergence_options)
    return spec_loss(spec, learner_logits, teacher_logits, labels, num_tokens=num_tokens, ignore_index=ignore_index)


def spec_loss(spec: LossSpec, learner_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
              labels: torch.Tensor, *, num_tokens: int | torch.Tensor | None = None,
              ignore_index: int = -100) -> TransferLoss:
    """``transfer_loss`` with its settings in one ``LossSpec`` (logits sliced to ``spec.vocab_size``)."""
    _refuse_model_output(learner_logits, teacher_logits)
    learner_logits, teacher_logits = slice_vocab(learner_logits, teacher_logits, spec.vocab_size)
    plan = plan_loss(spec, tuple(learner_logits.shape),
                     None if teacher_logits is None else tuple(teacher_logits.shape), labels, learner_logits.device,
                     ignore_index=ignore_index, num_tokens=num_tokens)
    V = learner_logits.shape[-1]
    z2 = learner_logits.reshape(-1, V)
    u2 = teacher_logits.detach().reshape(-1, V) if plan.spec.terms else None
    loss, div_sum, nll_sum = FusedSweep.apply(z2, u2, plan.labels, plan.rows, plan.spec, plan.div_scale,
                                              plan.nll_scale, "total", plan.chunk_size)
    return plan.result(loss, div_sum, nll_sum)


def _refuse_model_output(*xs) -> None:
    """A Hugging Face ``ModelOutput`` passed where logits belong: point to ``hf_loss`` (which shifts causal labels)."""
    for x in xs:
        if x is not None and not isinstance(x, torch.Tensor):
            hint = " (a Hugging Face model output: use ktransfer.hf_loss(outputs, teacher_outputs, labels, ...), " \
                "which aligns causal labels)" if hasattr(x, "logits") else ""
            raise ValueError(f"logits must be tensors, got {type(x).__name__}{hint}")


def check_token_count(num_tokens, name: str = "num_tokens") -> None:
    """Refuse a given token count (the denominator of the means) that is not a finite number > 0: 0, -3 or NaN
    would silently give a loss of 0 or of the wrong sign. None (count locally) passes.

    Raises:
        ValueError: naming the argument and its value.
    """
    if num_tokens is None:
        return
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"{name} must be one number, got a tensor of shape {list(num_tokens.shape)}")
        num_tokens = num_tokens.item()
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, float)) or not math.isfinite(num_tokens) \
            or num_tokens <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (the count of target tokens), got {num_tokens!r}")


@dataclass
class LossPlan:
    """Everything a fused sweep needs, validated: flat labels ``[N]``, selected rows, per-row gradient scales."""

    spec: SweepSpec
    labels: torch.Tensor
    rows: torch.Tensor | None
    div_scale: torch.Tensor
    nll_scale: torch.Tensor
    count: torch.Tensor
    inv: torch.Tensor
    chunk_size: int | None

    def result(self, loss, div_sum, nll_sum) -> TransferLoss:
        return TransferLoss(loss=loss, nll=(nll_sum * self.inv).to(loss.dtype),
                            divergence=(div_sum * self.inv).to(loss.dtype), num_tokens=self.count)


def plan_loss(spec: LossSpec, learner_shape, teacher_shape, labels, device, *, ignore_index: int = -100,
              num_tokens=None) -> LossPlan:
    """Validate ``spec`` against the shapes and labels and work out the rows and scales; shared by the fused linear
    path (``spec.vocab_size`` is applied by the caller: these are the shapes after slicing)."""
    if tuple(labels.shape) != tuple(learner_shape[:-1]):
        raise ValueError(
            f"labels shape {list(labels.shape)} must equal the logits shape without the vocabulary dimension, "
            f"{list(learner_shape[:-1])} (logits {list(learner_shape)})"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    kind, lam, top_k = spec.kind, spec.lam, spec.top_k
    if kind == "nll":
        lam = 0.0
    elif teacher_shape is None:
        raise ValueError(f"objective {spec.objective!r} needs teacher_logits (only 'nll' trains without a teacher)")
    check_options("forward_kl" if kind == "nll" else kind, tuple(learner_shape),
                  tuple(learner_shape) if kind == "nll" else tuple(teacher_shape),
                  top_k, spec.support, spec.temperature, spec.beta, spec.alpha, "mean", spec.chunk_size,
                  spec.tail and kind != "nll", spec.renormalize)

    V = learner_shape[-1]
    mask = (labels != ignore_index).reshape(-1).to(device)
    flat_labels = labels.reshape(-1).to(device)
    counted = flat_labels[mask]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= V):
        bad = counted[(counted < 0) | (counted >= V)][0]
        raise ValueError(f"label {int(bad)} is outside the vocabulary [0, {V}) (ignore_index is {ignore_index})")
    rows = None if bool(mask.all()) else mask.nonzero().squeeze(-1)
    check_token_count(num_tokens)
    count = torch.as_tensor(counted.numel() if num_tokens is None else num_tokens, dtype=torch.float64, device=device)
    inv = torch.where(count > 0, 1.0 / count.clamp_min(1e-12), torch.zeros_like(count))
    N = flat_labels.numel()
    terms = terms_of(kind, top_k, spec.support, spec.beta) if kind != "nll" else ()
    sweep = SweepSpec(terms, top_k, float(spec.temperature), float(spec.beta), float(spec.alpha),
                      bool(spec.renormalize), float(spec.label_smoothing), tail=bool(spec.tail))
    return LossPlan(spec=sweep, labels=flat_labels.clamp(0, V - 1),  # ignored rows are never gathered
                 rows=rows, div_scale=(lam * inv).expand(N), nll_scale=((1.0 - lam) * inv).expand(N), count=count,
                 inv=inv, chunk_size=spec.chunk_size)
