"""``ktransfer.integrations``: the Trainer and GKDTrainer subclasses against the stock trainers they replace.

References: a stock ``transformers.Trainer`` (the model's own loss) for ``objective="nll"`` under gradient
accumulation, ``hf_loss`` on the recorded batch for a distillation step, and TRL's stock ``GKDTrainer`` (on-policy
sampling included) for beta = 0, 0.5 and 1. Tiny GPT-2 / Marian models built offline (``hf_tiny``), SGD so that a
wrong loss scale would show in the weights, a few steps each.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import hf_tiny
import pytest
import torch

import ktransfer
from ktransfer.integrations import TRANSFER_OPTIONS

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def tok(shared_data):
    return hf_tiny.tokenizer(shared_data)


class _Recorder:
    """Mixed into a trainer: keeps each training step's loss and a copy of its inputs."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", [])
        self.seen.append(({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}, num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses = getattr(self, "losses", []) + [float(loss)]
        return loss


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
                use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1)
    return TrainingArguments(**{**base, **kw})


def _collator(tok):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)


def test_transfer_trainer_nll_equals_stock_trainer_under_gradient_accumulation(tok, shared_data, tmp_path):
    from transformers import Trainer

    from ktransfer.integrations.hf_trainer import TransferTrainer

    data = hf_tiny.causal_dataset(tok, shared_data, 16)
    runs = []
    for cls, extra in ((Trainer, {}), (TransferTrainer, {"objective": "nll"})):
        model = hf_tiny.gpt2(tok, 0)
        trainer = type("T", (_Recorder, cls), {})(model=model, args=_args(tmp_path), train_dataset=data,
                                                  data_collator=_collator(tok), **extra)
        trainer.train()
        runs.append((trainer.losses, model.transformer.h[0].mlp.c_fc.weight.detach()))
    (stock_losses, stock_w), (our_losses, our_w) = runs
    assert len(our_losses) == 6 and our_losses == pytest.approx(stock_losses, rel=1e-5)
    torch.testing.assert_close(our_w, stock_w, rtol=1e-5, atol=1e-7)


def test_transfer_trainer_step_is_hf_loss_of_the_batch_seq2seq(tok, shared_data, tmp_path):
    from ktransfer.integrations.hf_trainer import TransferTrainer

    data = [{"input_ids": r["input_ids"], "labels": r["labels"][::-1]}
            for r in hf_tiny.causal_dataset(tok, shared_data, 8)]
    learner, teacher = hf_tiny.marian(tok, 0), hf_tiny.marian(tok, 1)
    start = copy.deepcopy(learner)
    trainer = type("T", (_Recorder, TransferTrainer), {})(
        model=learner, teacher_model=teacher, args=_args(tmp_path, gradient_accumulation_steps=1, max_steps=2),
        train_dataset=data, data_collator=_collator(tok), objective="ka", divergence_weight=0.3, top_k=4,
        temperature=2.0)
    trainer.train()
    inputs, n = trainer.seen[0]
    labels = inputs.pop("labels")
    dec = start.prepare_decoder_input_ids_from_labels(labels=labels)
    out, t_out = start(**inputs, decoder_input_ids=dec), teacher(**inputs, decoder_input_ids=dec)
    ref = ktransfer.hf_loss(out, t_out, labels, objective="ka", lam=0.3, top_k=4, temperature=2.0,
                            num_items_in_batch=n)
    assert int(n) == int((labels != -100).sum())  # seq2seq: every label is a target, nothing shifted
    assert trainer.losses[0] == pytest.approx(float(ref.loss.detach()), rel=1e-5)
    with pytest.raises(ValueError, match=r"unknown objective 'kl'"):
        TransferTrainer(model=start, teacher_model=teacher, args=_args(tmp_path), objective="kl")


# --------------------------------------------------------------------------------------------------------------
# TRL's GKDTrainer
# --------------------------------------------------------------------------------------------------------------
def _gkd(tok, shared_data, tmp_path, cls, n=16, teacher_scale=1.0, **kw):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDConfig
    except ImportError:
        from trl import GKDConfig

    names = ("objective", "divergence_weight", "lam", *TRANSFER_OPTIONS)
    loss_kw = {k: kw.pop(k) for k in list(kw) if k in names and k != "beta"}
    args = GKDConfig(**{**dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                max_steps=3, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                                report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0, lmbda=0.5,
                                max_new_tokens=6, disable_tqdm=True, logging_steps=1), **kw})
    learner, teacher = hf_tiny.gpt2(tok, 0), hf_tiny.gpt2(tok, 1, n_layer=3, n_embd=48)
    with torch.no_grad():
        teacher.transformer.wte.weight.mul_(teacher_scale)  # tied to the head: a more peaked teacher
    trainer = type("T", (_Recorder, cls), {})(model=learner, teacher_model=teacher, args=args, processing_class=tok,
                                              train_dataset=hf_tiny.chat_dataset(shared_data, n), **loss_kw)
    trainer.train()
    return trainer, learner


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_transfer_gkd_trainer_equals_stock_gkd(tok, shared_data, tmp_path, beta):
    trl = pytest.importorskip("trl")
    del trl
    from ktransfer.integrations.gkd import GKDTrainer, TransferGKDTrainer

    stock, stock_model = _gkd(tok, shared_data, tmp_path, GKDTrainer, beta=beta)
    ours, our_model = _gkd(tok, shared_data, tmp_path, TransferGKDTrainer, beta=beta)
    assert len(ours.losses) == 6 and min(ours.losses) > 0
    assert ours.losses == pytest.approx(stock.losses, rel=1e-4)
    for (a, _), (b, _) in zip(stock.seen, ours.seen, strict=True):  # same on-policy samples
        assert torch.equal(a["input_ids"], b["input_ids"])
    torch.testing.assert_close(our_model.lm_head.weight, stock_model.lm_head.weight, rtol=1e-4, atol=1e-6)


def test_transfer_gkd_trainer_trains_top_k_ka(tok, shared_data, tmp_path):
    """A kind GKD does not have: KL(p || q) on the learner's top-8 tokens, mixed with NLL (lam 0.5). Its first step
    is hf_loss of the batch (not the full-vocabulary KA), and the loss goes down over 8 steps on one batch."""
    pytest.importorskip("trl")
    from ktransfer.integrations.gkd import TransferGKDTrainer

    trainer, _ = _gkd(tok, shared_data, tmp_path, TransferGKDTrainer, n=4, teacher_scale=3.0, lmbda=0.0,
                      gradient_accumulation_steps=1, max_steps=8, optim="adamw_torch", learning_rate=1e-2,
                      objective="ka", divergence_weight=0.5, top_k=8)
    inputs, n = trainer.seen[0]
    start = hf_tiny.gpt2(tok, 0)
    x = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out, t_out = start(**x), trainer.teacher_model(**x)
        top8 = ktransfer.hf_loss(out, t_out, inputs["labels"], objective="ka", lam=0.5, top_k=8,
        num_items_in_batch=n)
        full = ktransfer.hf_loss(out, t_out, inputs["labels"], objective="ka", lam=0.5, num_items_in_batch=n)
    losses = trainer.losses
    assert losses[0] == pytest.approx(float(top8.loss), rel=1e-5) and abs(float(full.loss - top8.loss)) > 1e-3
    assert all(x == x for x in losses) and losses[-1] < 0.8 * losses[0], losses


def test_divergence_weight_keyword_and_its_deprecated_name_lam(tok, shared_data, tmp_path, caplog):
    """``divergence_weight=`` is the trainers' name of the weight of D (TRL's ``lmbda`` is GKD's on-policy fraction);
    ``lam=`` still works for this release with one deprecation line, and both at once is an error."""
    import logging

    from ktransfer.integrations.hf_trainer import TransferTrainer

    caplog.set_level(logging.WARNING)
    kw = dict(model=hf_tiny.marian(tok, 0), teacher_model=hf_tiny.marian(tok, 1), args=_args(tmp_path),
              data_collator=_collator(tok), objective="ka")
    assert TransferTrainer(**kw).transfer_spec.lam == 0.5  # the default
    new = TransferTrainer(**kw, divergence_weight=0.3)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    old = TransferTrainer(**kw, lam=0.3)
    assert old.transfer_spec == new.transfer_spec and new.transfer_spec.lam == 0.3
    (line,) = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert "TransferTrainer(lam=...): lam is deprecated" in line and "use divergence_weight" in line
    with pytest.raises(TypeError, match="both divergence_weight= and lam="):
        TransferTrainer(**kw, divergence_weight=0.3, lam=0.3)
    if importlib.util.find_spec("trl") is not None:
        from ktransfer.integrations.gkd import TransferGKDTrainer

        trainer, _ = _gkd(tok, shared_data, tmp_path / "gkd", TransferGKDTrainer, n=4, max_steps=1, lam=0.7,
                          objective="kd")
        assert trainer.transfer_spec.lam == 0.7
        assert any("TransferGKDTrainer(lam=...): lam is deprecated" in r.getMessage() for r in caplog.records)
