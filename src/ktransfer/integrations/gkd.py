"""``TransferGKDTrainer``: TRL's ``GKDTrainer`` with ktransfer's divergences in place of ``generalized_jsd_loss``.

Everything of GKD stays (the ChatML collator, on-policy sampling with probability ``lmbda``, ``seq_kd``); only the
loss changes. With the defaults (``objective="jsd"``, ``beta`` = ``GKDConfig.beta``, ``divergence_weight=1``,
temperature 1, as GKDTrainer's loss is called) the loss equals stock GKD's, β = 0 and β = 1 included; any other kind,
a top-k support or an NLL mix (``divergence_weight < 1``) is one keyword away. ``GKDConfig.lmbda`` stays GKD's
on-policy fraction; the divergence weight was called ``lam`` before (still accepted, with a deprecation line).
``GKDConfig.temperature`` stays GKD's sampling temperature; pass ``temperature=`` for the loss's own.
"""

from __future__ import annotations

import contextlib
import os

from ktransfer.integrations import TransferLossMixin, divergence_weight_of, pop_transfer_options

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
try:  # TRL >= 1.0 keeps GKD under trl.experimental
    from trl.experimental.gkd import GKDTrainer
except ImportError:  # older TRL
    from trl import GKDTrainer


class TransferGKDTrainer(TransferLossMixin, GKDTrainer):
    """``GKDTrainer`` whose loss is ``ktransfer.hf_loss`` (student = learner p, teacher = q).

    Args:
        *args, **kwargs: those of ``GKDTrainer`` (``model``, ``teacher_model``, ``args`` a ``GKDConfig``, ...).
        objective: ``"jsd"`` (default: GKD's generalized JSD with ``beta = args.beta`` unless ``beta=`` is given),
            ``"kd"``, ``"ka"``, ``"half"``, any kind of ``ktransfer.KINDS``, or ``"nll"``.
        divergence_weight: weight ``w`` of the divergence (``lam=`` is its deprecated old name; not GKD's ``lmbda``);
            ``1 - w`` weighs the NLL of the batch's labels (the reference completion,
            or the sampled one on on-policy steps). Default 1: divergence only, as GKD.
        top_k, support, tail, renormalize, temperature, beta, alpha, label_smoothing, vocab_size, chunk_size: as in
            ``ktransfer.transfer_loss``.
    """

    def __init__(self, *args, objective: str = "jsd", divergence_weight: float | None = None, **kwargs):
        weight = divergence_weight_of(kwargs, divergence_weight, 1.0, "TransferGKDTrainer")
        options = pop_transfer_options(kwargs)
        with _same_vocab_size_for_trl(kwargs.get("model", args[0] if args else None), kwargs.get("teacher_model"),
                                      options.get("vocab_size")):
            super().__init__(*args, **kwargs)
        if objective == "jsd":
            options.setdefault("beta", self.beta)
        self.init_transfer(None, objective, weight, options)

    def transfer_inputs(self, model, inputs: dict) -> dict:
        """What GKDTrainer feeds both models: ``input_ids`` and ``attention_mask``."""
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


@contextlib.contextmanager
def _same_vocab_size_for_trl(model, teacher, vocab_size):
    """While ``GKDTrainer.__init__`` runs: a teacher whose output layer is padded (832 rows for the learner's 800)
    shows the learner's ``vocab_size`` to TRL's equality check, when ``vocab_size=`` is given (the loss then reads
    the first ``vocab_size`` logits of both models); its config is restored afterwards. Without ``vocab_size=``, or
    for a teacher given by name, TRL's own check stands."""
    configs = [getattr(m, "config", None) for m in (model, teacher)]
    if vocab_size is None or any(c is None or not hasattr(c, "get_text_config") for c in configs):
        yield
        return
    learner_cfg, teacher_cfg = (c.get_text_config() for c in configs)
    saved = teacher_cfg.vocab_size
    if min(learner_cfg.vocab_size, saved) < vocab_size:
        raise ValueError(f"vocab_size={vocab_size} exceeds a model's vocabulary (learner {learner_cfg.vocab_size}, "
                         f"teacher {saved} rows)")
    teacher_cfg.vocab_size = learner_cfg.vocab_size
    try:
        yield
    finally:
        teacher_cfg.vocab_size = saved
