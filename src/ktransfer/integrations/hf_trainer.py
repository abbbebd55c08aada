"""``TransferTrainer``: a ``transformers.Trainer`` whose loss is ktransfer's ``(1 - w) NLL + w D(p, q)``, ``w`` =
``divergence_weight``."""

from __future__ import annotations

from transformers import Trainer

from ktransfer.integrations import TransferLossMixin, divergence_weight_of, pop_transfer_options


class TransferTrainer(TransferLossMixin, Trainer):
    """``transformers.Trainer`` distilling ``teacher_model`` into ``model`` with ``ktransfer.hf_loss``.

    Args:
        *args, **kwargs: those of ``transformers.Trainer`` (``model``, ``args``, ``train_dataset``,
            ``data_collator``, ...); batches must carry ``labels`` as the model takes them (``-100`` = not a target).
        teacher_model: the frozen teacher (same tokenizer; its gradients are switched off); None for ``"nll"``.
        objective: ``"kd"`` (KL(q || p)), ``"ka"`` (KL(p || q)), ``"half"``, any kind of ``ktransfer.KINDS``, or
            ``"nll"``.
        divergence_weight: weight ``w`` of the divergence; ``1 - w`` weighs the NLL of the labels (default 0.5;
            ``lam=`` is its deprecated old name).
        top_k, support, tail, renormalize, temperature, beta, alpha, label_smoothing, vocab_size, chunk_size: as in
            ``ktransfer.transfer_loss`` (keyword arguments).
    """

    def __init__(self, *args, teacher_model=None, objective: str = "kd", divergence_weight: float | None = None,
                 **kwargs):
        weight = divergence_weight_of(kwargs, divergence_weight, 0.5, "TransferTrainer")
        options = pop_transfer_options(kwargs)
        super().__init__(*args, **kwargs)
        self.init_transfer(teacher_model, objective, weight, options)
