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

Sampling (``sample``): ``model.generate(do_sample=True)`` with the learner in eval mode (no dropout; its mode is
restored afterwards) under ``torch.no_grad``: the sampled ids are integer leaves, nothing is differentiated through
them. Temperature and top-p shape the sampling distribution; ``<pad>`` (the decoder's start symbol) is never sampled,
and generation's default top-k of 50 is switched off. Randomness: transformers' ``generate`` draws from the global
RNG and takes no ``torch.Generator``, so the sampler forks the RNG (``torch.random.fork_rng``) and seeds it inside;
the seed and the ``mixed`` coin come from a ``torch.Generator`` seeded by (train.seed, step, the batch's source ids).
Nothing else's random stream moves, and a resumed run draws the same samples as an uninterrupted one.

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
        top_p: nucleus sampling mass (0 < top_p <= 1; 1 = the full distribution).
        max_new_tokens: most tokens sampled per sentence, ``</s>`` included (capped by the model's positions).
        seed: seeds the RNG the sampler forks (``ktransfer.models.generation.seeded_fork``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")

    @classmethod
    def from_config(cls, cfg, seed: int = 0) -> SampleSettings:
        """The settings of a ``RunConfig`` (``objective.sample_*``; the length defaults to ``eval.max_length``)."""
        ob = cfg.objective
        return cls(temperature=ob.sample_temperature, top_p=ob.sample_top_p,
                   max_new_tokens=ob.sample_max_length or cfg.eval.max_length, seed=seed)


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
_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels")  # model inputs (seq2seq or causal), labels


def _stack(a: dict, b: dict, pad_id: int) -> dict:
    """Rows of ``a`` then rows of ``b`` for the keys of ``b`` among ``_KEYS``, each right-padded to the longer of
    the two (labels with -100, attention masks with 0, ids with ``pad_id``)."""
    out = {}
    for key in (k for k in _KEYS if k in b):
        x, y = a[key], b[key]
        fill = IGNORE_INDEX if key == "labels" else 0 if key.endswith("attention_mask") else pad_id
        width = max(x.shape[1], y.shape[1])
        x, y = (torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in (x, y))
        out[key] = torch.cat([x, y], dim=0)
    return out


def on_policy_loss(model, teacher, reference: dict, sampled: dict, spec: LossSpec, *,
                   num_tokens: int | None = None, autocast=None) -> TransferLoss:
    """``(1 - lam) * NLL(reference) + lam * D(sampled)``, normalised as the module docstring says.

    One forward pass of ``model`` over the reference and sampled rows stacked (so DDP sees one forward per
    backward), one of the frozen ``teacher`` over the sampled rows under ``torch.no_grad``.

    Args:
        model: the learner (or its DDP wrapper); teacher: the frozen teacher.
        reference, sampled: batches with the same sources: ``labels`` ``[B, T]`` and ``[B, T']``, -100 = not
            counted; every other key is a model input.
        spec: the run's ``LossSpec`` (objective, lam, top_k, support, tail, renormalize, temperature, beta, alpha,
            label_smoothing, vocab_size: both models' logits are cut to the ids they share, as on every path).
        num_tokens: reference tokens of all micro-batches (accumulation, several processes); None = this batch's.
        autocast: context manager around the forward passes (bf16), default none.

    Returns:
        ``TransferLoss``: ``loss``; ``nll`` = the reference NLL sum / N; ``divergence`` = (n_b / N) * D_b (summed
        over micro-batches by ``train_step``, the reference-token-weighted mean of the D_b); ``num_tokens`` = N.
    """
    pad_id = int(getattr(getattr(model, "module", model).config, "pad_token_id", 0) or 0)
    B, T_ref, T_smp = reference["labels"].shape[0], reference["labels"].shape[1], sampled["labels"].shape[1]
    both = _stack(reference, sampled, pad_id)
    with autocast if autocast is not None else contextlib.nullcontext():
        logits = model(**{k: v for k, v in both.items() if k != "labels"}, use_cache=False).logits  # (2B, T, V)
        with torch.no_grad():
            teacher_logits = teacher(**{k: sampled[k] for k in _KEYS[:3] if k in sampled},
                                     use_cache=False).logits  # (B, T', V)
    nll = spec_loss(spec.replace(objective="nll", top_k=None, support=None, tail=False, renormalize=False),
                    logits[:B, :T_ref], None, reference["labels"],
                    num_tokens=num_tokens)
    div = spec_loss(spec.replace(lam=1.0, label_smoothing=0.0), logits[B:, :T_smp], teacher_logits,
                    sampled["labels"])  # mean over this batch's sampled tokens
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
        return on_policy_loss(model, self.teacher, batch, sampled, self.spec, num_tokens=num_tokens,
                              autocast=self.autocast())
