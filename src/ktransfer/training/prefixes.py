"""Where the learner's prefixes come from: the reference (the paper), the learner's own samples, or a mix of both.

The paper's objective conditions both models on the reference prefix y_<t at every position. With
``objective.prefix=learner`` the divergence is computed on prefixes the learner itself sampled (on-policy
distillation, as in GKD, Agarwal et al. 2024), with ``mixed`` on the learner's samples for a fraction of the batches:

    loss = (1 - lam) * NLL(y | x)  +  lam * D(p, q; x, y~),      y~ ~ p(. | x) sampled without gradient

    NLL(y | x)       = (1 / n_ref) * sum_{t <= |y|}  -log p(y_t | y_<t, x)                 reference tokens
    D(p, q; x, y~)   = (1 / n_smp) * sum_{t <= |y~|} D(p(. | y~_<t, x), q(. | y~_<t, x))  sampled tokens

``|y~|`` counts the sampled tokens up to and including the first ``</s>`` (all of them when a sample reaches the
length limit without one); the NLL stays on the reference (there is no "right answer" for a sample), and the
divergence is on sampled positions only (no NLL on samples).

Normalisation rule. Each term is a token mean over its own tokens: the NLL over the reference tokens of the batch,
the divergence over the sampled tokens of the batch. With gradient accumulation or several processes, ``train_step``
passes ``num_tokens`` = N, the reference tokens of all micro-batches; then a micro-batch b with n_b reference tokens
contributes ``(1 - lam) * sum_b NLL / N + lam * (n_b / N) * D_b``, where D_b is its divergence mean over its own
sampled tokens: each micro-batch's divergence is weighted by its share of reference tokens, the weight its NLL
term has. With one micro-batch this is exactly the formula above. (The sampled-token count of the other
micro-batches is not known when one is processed, so a global sampled-token mean is not available.)

Sampling (``run.family.on_policy_batch``, ``ktransfer.models.sampling``): ancestral sampling on the learner's KV cache,
in eval mode (no dropout; its mode is restored afterwards) under ``torch.no_grad``: the sampled ids are integer
leaves, nothing is differentiated through them. Each token is an inverse-CDF draw with one uniform per row and step;
temperature, top-k and top-p shape the distribution; ``<pad>`` (the decoder's start symbol) is never sampled. Row b
stops at its first ``</s>`` or after ``min(sample_max_length, ceil(sample_length_scale * n_b) + sample_length_margin)``
tokens, ``n_b`` its reference tokens (defaults 2 and 8; the run log states the rule at start). Randomness: the
uniforms come from a CPU ``torch.Generator`` seeded with the seed that, like the ``mixed`` coin, comes from a
``torch.Generator`` seeded by (train.seed, step, the batch's source ids). No global random stream moves, the same
seed gives the same samples on one process or several, and a resumed run draws the samples of an uninterrupted one.

Validation keeps the reference prefix, so validation numbers stay comparable across prefix sources. Sequence-level KD
(Kim & Rush 2016: the teacher's beam-search outputs as the training targets) is the third prefix source; it is a
corpus, built once by ``ktransfer distill-data`` (``ktransfer.evaluation.seqkd``) and used with ``data.corpus=FOLDER``.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from ktransfer.losses.objectives import TransferLoss, spec_loss
from ktransfer.losses.spec import LossSpec

IGNORE_INDEX = -100
PREFIXES = ("reference", "learner", "mixed")


@dataclass(frozen=True)
class SampleSettings:
    """How prefixes are sampled from the learner.

    Attributes:
        temperature: divides the learner's logits before sampling (> 0).
        top_k: sample among the ``top_k`` most likely tokens only (0 = all).
        top_p: nucleus sampling mass (0 < top_p <= 1; 1 = the full distribution).
        max_new_tokens: most tokens sampled per sentence, ``</s>`` included (capped by the model's positions).
        length_scale, length_margin: a row stops after ``ceil(length_scale * n) + length_margin`` tokens, ``n`` its
            reference tokens (and after ``max_new_tokens``); ``length_scale`` None: ``max_new_tokens`` alone.
        seed: seeds the generator of the sampler's uniforms (``ktransfer.models.sampling``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    top_k: int = 0
    length_scale: float | None = None
    length_margin: int = 8

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.length_scale is not None and not self.length_scale > 0:
            raise ValueError(f"length_scale must be > 0 or None, got {self.length_scale!r}")
        if not isinstance(self.length_margin, int) or self.length_margin < 0:
            raise ValueError(f"length_margin must be an integer >= 0, got {self.length_margin!r}")

    @classmethod
    def from_config(cls, cfg, seed: int = 0) -> SampleSettings:
        """The settings of a ``RunConfig`` (``objective.sample_*``; the cap defaults to ``eval.max_length``)."""
        ob = cfg.objective
        return cls(temperature=ob.sample_temperature, top_p=ob.sample_top_p, top_k=ob.sample_top_k,
                   max_new_tokens=ob.sample_max_length or cfg.eval.max_length, length_scale=ob.sample_length_scale,
                   length_margin=ob.sample_length_margin, seed=seed)

    def describe(self) -> str:
        """The length rule in words (the run log states it at start)."""
        from ktransfer.models.sampling import describe

        return describe(self.max_new_tokens, self.length_scale, self.length_margin)


def describe_source(cfg) -> str:
    """The prefix source of a ``RunConfig``'s divergence in words, with the sampling settings when it samples (the run
    log states it at start)."""
    ob = cfg.objective
    if ob.prefix == "reference":
        return "prefixes: reference (objective.prefix): the divergence is computed on the data's targets, no sampling"
    s = SampleSettings.from_config(cfg)
    when = ("on every batch" if ob.prefix == "learner" else
            f"on a batch with probability {ob.on_policy_fraction:g} (objective.on_policy_fraction), the reference "
            "otherwise")
    return (f"prefixes: {ob.prefix} (objective.prefix), on-policy: the learner's samples {when}; temperature "
            f"{s.temperature:g}, top-p {s.top_p:g}, top-k {s.top_k or 'all'} (objective.sample_*); {s.describe()}")


# --------------------------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------------------------
def batch_generator(train_seed: int, step: int, input_ids: torch.Tensor) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from (``train_seed``, ``step``, the batch's source ids ``[B, S]``).

    The source ids tell apart the micro-batches of one step (accumulation, several processes) and a batch retried
    after a skipped non-finite step; the same batch at the same step of a resumed run gets the same generator.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{int(train_seed)}:{int(step)}:{tuple(input_ids.shape)}:".encode())
    h.update(input_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") >> 1)


def draw(generator: torch.Generator, prefix: str, on_policy_fraction: float) -> tuple[bool, int]:
    """``(use the learner's samples?, sampling seed)``: one Bernoulli(on_policy_fraction) coin (always drawn, so
    that ``mixed`` at fraction 1 samples what ``learner`` samples), then the seed; ``prefix`` decides what the coin
    means (``learner``: always True, ``reference``: always False)."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown prefix {prefix!r}; valid: {', '.join(PREFIXES)}")
    coin = float(torch.rand((), generator=generator)) < on_policy_fraction
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return {"reference": False, "learner": True, "mixed": coin}[prefix], seed


# --------------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------------
def on_policy_loss(model, teacher, reference: dict, sampled: dict, spec: LossSpec, *, family=None,
                   num_tokens: int | None = None, autocast=None) -> TransferLoss:
    """``(1 - lam) * NLL(reference) + lam * D(sampled)``, normalised as the module docstring says.

    The learner runs over the reference rows and over the sampled rows separately, each at its own width (no row
    padded to the other's length): the first forward goes through ``model`` (the DDP wrapper, so that DDP sees one
    forward per backward), the second through the module inside it; an encoder-decoder's encoder runs once, its
    output feeding both decoder passes. At ``lam = 1`` the NLL has no weight and the reference rows are not run
    (``nll`` is reported as 0). The frozen ``teacher`` runs once, over the sampled rows, under
    ``torch.no_grad``. Each side's inputs are ``family.model_inputs`` (a causal LM's logits start at the first
    scored column).

    Args:
        model: the learner (or its DDP wrapper); teacher: the frozen teacher.
        reference, sampled: batches with the same sources: ``labels`` ``[B, T]`` and ``[B, T']``, -100 = not
            counted; every other key is a model input.
        spec: the run's ``LossSpec`` (objective, lam, top_k, support, tail, renormalize, temperature, beta, alpha,
            label_smoothing, vocab_size: both models' logits are cut to the ids they share, as on every path).
        family: the model family (``ktransfer.models.family``; default: the learner's).
        num_tokens: reference tokens of all micro-batches (accumulation, several processes); None = this batch's.
        autocast: context manager around the forward passes (bf16), default none.

    Returns:
        ``TransferLoss``: ``loss``; ``nll`` = the reference NLL sum / N; ``divergence`` = (n_b / N) * D_b (summed
        over micro-batches by ``train_step``, the reference-token-weighted mean of the D_b); ``num_tokens`` = N.
    """
    from ktransfer.models.family import family_of
    from ktransfer.models.generation import unwrap

    family = family_of(model) if family is None else family
    ref_inputs, ref_labels = family.model_inputs(reference)
    smp_inputs, smp_labels = family.model_inputs(sampled)
    first, inner = model, unwrap(model)  # the first learner forward goes through the DDP wrapper
    with autocast if autocast is not None else contextlib.nullcontext():
        ref_out = None
        learner_inputs = smp_inputs
        if spec.lam < 1.0:  # at lam = 1 the NLL has no weight: the reference rows are not run
            ref_out, first = first(**ref_inputs, use_cache=False), inner
            encoded = getattr(ref_out, "encoder_last_hidden_state", None)
            if encoded is not None and sampled["input_ids"] is reference["input_ids"]:  # same sources: encode once
                learner_inputs = {k: v for k, v in smp_inputs.items() if k != "input_ids"}
                learner_inputs["encoder_outputs"] = (encoded,)
        logits = first(**learner_inputs, use_cache=False).logits  # (B, T', V)
        with torch.no_grad():
            teacher_logits = teacher(**smp_inputs, use_cache=False).logits  # (B, T', V)
    if ref_out is not None:
        nll = spec_loss(spec.replace(objective="nll", top_k=None, support=None, tail=False, renormalize=False),
                        ref_out.logits, None, ref_labels, num_tokens=num_tokens)
    else:
        zero = logits.new_zeros(())
        nll = TransferLoss(loss=zero, nll=zero, divergence=zero,
                           num_tokens=num_tokens or int((ref_labels != IGNORE_INDEX).sum()))
    div = spec_loss(spec.replace(lam=1.0, label_smoothing=0.0), logits, teacher_logits,
                    smp_labels)  # mean over this batch's sampled tokens
    n_ref = int((reference["labels"] != IGNORE_INDEX).sum())
    weight = n_ref / num_tokens if num_tokens else 1.0  # this micro-batch's share of the reference tokens
    loss = (1.0 - spec.lam) * nll.loss + (spec.lam * weight) * div.loss
    return TransferLoss(loss=loss, nll=nll.nll, divergence=div.divergence * weight, num_tokens=nll.num_tokens)


@dataclass
class OnPolicy:
    """The loss source of ``objective.prefix`` learner / mixed (``ktransfer.training.signals``): per training
    batch, draws from ``batch_generator(train.seed, state.step, input_ids)`` whether to sample (``mixed``) and the
    sampling seed; the family samples with the unwrapped ``learner`` (``family.on_policy_batch``), ``model`` (the
    learner or its DDP wrapper) runs the training forward. A ``mixed`` batch whose coin kept the reference prefix
    goes to ``reference`` (the run's reference-prefix source)."""

    spec: LossSpec
    teacher: torch.nn.Module
    learner: torch.nn.Module
    family: Any
    tokenizer: Any
    cfg: Any  # RunConfig: train.seed, objective.prefix / on_policy_fraction / sample_*, eval.max_length
    state: Any  # TrainState: its step seeds the draws
    reference: Any
    autocast: Any  # () -> context manager

    def loss(self, model, batch: dict, num_tokens: int | None = None) -> TransferLoss:
        ob = self.cfg.objective
        use_learner, seed = draw(batch_generator(self.cfg.train.seed, self.state.step, batch["input_ids"]),
                                 ob.prefix, ob.on_policy_fraction)
        if not use_learner:
            return self.reference.loss(model, batch, num_tokens)
        settings = SampleSettings.from_config(self.cfg, seed=seed)
        sampled = self.family.on_policy_batch(self.learner, self.tokenizer, batch, settings)
        return on_policy_loss(model, self.teacher, batch, sampled, self.spec, family=self.family,
                              num_tokens=num_tokens, autocast=self.autocast())
