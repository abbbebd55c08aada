"""One loss specification: the settings of Eq. 12 that every loss path takes.

``LossSpec`` is built once (from keyword options, ``LossSpec.of``, or from a run's ``objective`` section,
``LossSpec.from_config``) and handed to every path that computes the objective: ``transfer_loss`` on logits
(``ktransfer.losses.objectives.spec_loss``), the fused output head (``ktransfer.losses.fused_linear``), the teacher
cache and on-policy prefixes of training, ``hf_loss`` and the Hugging Face trainers of ``ktransfer.integrations``.

The options (``OPTIONS``, besides ``objective`` and ``lam``):

- ``top_k``, ``support``: the top-k support of the divergence (None = all of V; support learner/teacher/union);
- ``tail``: the rest of the vocabulary as one outcome beside the top-k support (needs top_k, not with renormalize);
- ``renormalize``: renormalise p and q over the top-k support;
- ``temperature``: softmax temperature of both models inside the divergence (NLL is on the untempered learner);
- ``beta``: mixture weight of jsd; ``alpha``: skew of skew_forward_kl / skew_reverse_kl;
- ``label_smoothing``: epsilon of the NLL term;
- ``vocab_size``: score only ids ``[0, vocab_size)`` of both models (output layers padded beyond the tokenizer);
- ``chunk_size``: positions per chunk of the sweep (memory, not value).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ktransfer.losses.divergences import KINDS

ALIASES = {"kd": "forward_kl", "ka": "reverse_kl"}
OBJECTIVES = ("nll", "kd", "ka", *KINDS)
# keyword options of transfer_loss / hf_loss / the trainers besides objective and lam, in the order docs list them
OPTIONS = ("top_k", "support", "tail", "renormalize", "temperature", "beta", "alpha", "label_smoothing", "vocab_size",
           "chunk_size")
# of those, the ones transfer_loss takes as **divergence_options
DIVERGENCE_OPTIONS = ("support", "beta", "alpha", "renormalize", "chunk_size", "tail")


@dataclass(frozen=True)
class LossSpec:
    """The objective ``(1 - lam) * NLL + lam * D`` with every option of ``D`` (see the module docstring)."""

    objective: str
    lam: float = 0.5
    top_k: int | None = None
    support: str | None = None
    tail: bool = False
    renormalize: bool = False
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    label_smoothing: float = 0.0
    vocab_size: int | None = None
    chunk_size: int | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid objectives: {', '.join(OBJECTIVES)}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")

    @classmethod
    def of(cls, objective: str, lam: float = 0.5, **options) -> LossSpec:
        """The spec of keyword ``options`` (names in ``OPTIONS``; None for support/beta/alpha keeps the default).

        Raises:
            ValueError: an unknown option, objective, or a value out of range.
        """
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown loss option(s) {unknown}; valid: {', '.join(OPTIONS)}")
        given = {k: v for k, v in options.items() if v is not None or k in ("top_k", "vocab_size", "chunk_size")}
        return cls(objective=objective, lam=lam, **given)

    @classmethod
    def from_config(cls, objective, vocab_size: int | None = None) -> LossSpec:
        """The spec of a run's ``objective`` section (``ktransfer.training.config.ObjectiveConfig``)."""
        ob = objective
        return cls(objective=ob.kind, lam=ob.divergence_weight, top_k=ob.top_k, support=ob.support, tail=ob.tail,
                   renormalize=ob.renormalize, temperature=ob.temperature, beta=ob.beta, alpha=ob.alpha,
                   label_smoothing=ob.label_smoothing, vocab_size=vocab_size)

    @property
    def kind(self) -> str:
        """The divergence kind (``kd`` and ``ka`` resolved), or ``nll``."""
        return ALIASES.get(self.objective, self.objective)

    @property
    def needs_teacher(self) -> bool:
        return self.objective != "nll"

    def options(self) -> dict:
        """The keyword options (``OPTIONS``) of this spec, as ``transfer_loss`` takes them."""
        return {name: getattr(self, name) for name in OPTIONS}

    def replace(self, **changes) -> LossSpec:
        return dataclasses.replace(self, **changes)
