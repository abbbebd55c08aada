"""``TransferTrainer``: a ``transformers.Trainer`` whose loss is ktransfer's ``(1 - lam) NLL + lam D(p, q)``."""

from __future__ import annotations

from transformers import Trainer

from ktransfer.integrations import TransferLossMixin, pop_transfer_options


class TransferTrainer(TransferLossMixin, Trainer):
    """``transformers.Trainer`` distilling ``teacher_model`` into ``model`` with ``ktransfer.hf_loss``.

    Args:
        *args, **kwargs: those of ``transformers.Trainer`` (``model``, ``args``, ``train_dataset``,
            ``data_collator``, ...); batches must carry ``labels`` as the model takes them (``-100`` = not a target).
        teacher_model: the frozen teacher (same tokenizer; its gradients are switched off); None for ``"nll"``.
        objective: ``"kd"`` (KL(q || p)), ``"ka"`` (KL(p || q)), ``"half"``, any kind of ``ktransfer.KINDS``, or
            ``"nll"``.
        lam: weight of the divergence; ``1 - lam`` weighs the NLL of the labels.
        top_k, support, tail, renormalize, temperature, beta, alpha, label_smoothing, vocab_size, chunk_size: as in
            ``ktransfer.transfer_loss`` (keyword arguments).
    """

    def __init__(self, *args, teacher_model=None, objective: str = "kd", lam: float = 0.5, **kwargs):
        options = pop_transfer_options(kwargs)
        super().__init__(*args, **kwargs)
        self.init_transfer(teacher_model, objective, lam, options)
