"""The paper's fine-tuning objective (Eq. 12): a mix of NLL on the reference and a divergence to a frozen teacher.

    loss = (1 - lam) * NLL(labels) + lam * D(p, q),

both terms means over the positions whose label is not ``ignore_index`` (or sums divided by ``num_tokens``). NLL and
the divergence are computed in one chunked sweep over the learner's logits (``ktransfer.divergences``): the learner's
log-normaliser is shared, and no ``[N, V]`` temporary beyond the gradient is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ktransfer.divergences import KINDS, _check_options, _flatten, _Fused, _Spec, _terms

ALIASES = {"kd": "forward_kl", "ka": "reverse_kl"}
OBJECTIVES = ("nll", "kd", "ka", *KINDS)
_DIVERGENCE_OPTIONS = ("support", "beta", "alpha", "renormalize", "chunk_size")


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
    **divergence_options,
) -> TransferLoss:
    """Eq. 12 of the paper: ``(1 - lam) * NLL + lam * D``; ``objective="nll"`` gives plain NLL.

    Args:
        learner_logits: ``[..., V]`` learner logits (receives the gradient).
        teacher_logits: ``[..., V]`` frozen teacher logits; may be None for ``objective="nll"``.
        labels: ``[...]`` integer reference tokens; ``ignore_index`` marks positions that are not counted.
        objective: ``"nll"``, ``"kd"`` (forward_kl), ``"ka"`` (reverse_kl), ``"half"``, or any kind in ``KINDS``.
        lam: weight of the divergence, 0 <= lam <= 1 (ignored for ``nll``).
        top_k, temperature: as in ``ktransfer.divergence``; the temperature applies to the divergence only (NLL is
            always on the untempered learner).
        label_smoothing: epsilon of the NLL term, as in ``torch.nn.functional.cross_entropy``.
        num_tokens: global number of counted positions (gradient accumulation, several processes); replaces the
            local count as the denominator of both means.
        **divergence_options: ``support``, ``beta``, ``alpha``, ``renormalize``, ``chunk_size`` of ``divergence``.

    Raises:
        ValueError: unknown objective or option, missing teacher, labels of the wrong shape or out of range.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid objectives: {', '.join(OBJECTIVES)}")
    unknown = sorted(set(divergence_options) - set(_DIVERGENCE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown divergence option(s) {unknown}; valid: {', '.join(_DIVERGENCE_OPTIONS)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if tuple(labels.shape) != tuple(learner_logits.shape[:-1]):
        raise ValueError(
            f"labels shape {list(labels.shape)} must equal the logits shape without the vocabulary dimension, "
            f"{list(learner_logits.shape[:-1])} (logits {list(learner_logits.shape)})"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    kind = ALIASES.get(objective, objective)
    opts = {"support": None, "beta": 0.5, "alpha": 0.1, "renormalize": False, "chunk_size": None, **divergence_options}
    if kind == "nll":
        teacher_logits, lam = None, 0.0
    elif teacher_logits is None:
        raise ValueError(f"objective {objective!r} needs teacher_logits (only 'nll' trains without a teacher)")
    check_kind = "forward_kl" if kind == "nll" else kind
    _check_options(check_kind, tuple(learner_logits.shape),
                   tuple(teacher_logits.shape) if teacher_logits is not None else tuple(learner_logits.shape),
                   top_k, opts["support"], temperature, opts["beta"], opts["alpha"], "mean", opts["chunk_size"])

    mask = labels != ignore_index
    V = learner_logits.shape[-1]
    flat_labels = labels.reshape(-1).to(learner_logits.device)
    counted = flat_labels[mask.reshape(-1)]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= V):
        bad = counted[(counted < 0) | (counted >= V)][0]
        raise ValueError(f"label {int(bad)} is outside the vocabulary [0, {V}) (ignore_index is {ignore_index})")
    z2, u2, rows = _flatten(learner_logits, teacher_logits, mask)
    safe_labels = flat_labels.clamp(0, V - 1)  # ignored positions are never gathered; clamp keeps indexing legal

    count = torch.as_tensor(counted.numel() if num_tokens is None else num_tokens, dtype=torch.float64,
                            device=z2.device)
    inv = torch.where(count > 0, 1.0 / count.clamp_min(1e-12), torch.zeros_like(count))
    N = z2.shape[0]
    div_scale = (lam * inv).expand(N)
    nll_scale = ((1.0 - lam) * inv).expand(N)
    spec = _Spec(_terms(kind, top_k, opts["support"]) if kind != "nll" else (), top_k, float(temperature),
                 float(opts["beta"]), float(opts["alpha"]), bool(opts["renormalize"]), float(label_smoothing))
    loss, div_sum, nll_sum = _Fused.apply(z2, u2, safe_labels, rows, spec, div_scale, nll_scale, "total",
                                          opts["chunk_size"])
    return TransferLoss(loss=loss, nll=(nll_sum * inv).to(loss.dtype), divergence=(div_sum * inv).to(loss.dtype),
                        num_tokens=count)
