"""A learner whose output layer is padded beyond its tokenizer (rows V..V+7, e.g. embeddings rounded up to a
multiple of 8) gets the same loss on every path the teacher's signal can take: live teacher (plain), fused output
head, teacher cache, and on-policy prefixes with the samples held fixed (the "sample" is the reference itself, so
the on-policy loss must equal the plain one). The padding rows carry a large bias: a path that left them in the
softmax would give another loss (the fused path once did: it passed no vocabulary size).
"""

from __future__ import annotations

import pytest
import torch

from ktransfer.models.checkpoint import save_checkpoint
from ktransfer.models.family import build_model
from ktransfer.models.seq2seq import Seq2SeqFamily
from ktransfer.training.config import load_config
from ktransfer.training.train import compute_loss, setup, training_batch

PAD_ROWS = 8


@pytest.fixture(scope="module")
def models(small_tokenizer, tmp_path_factory):
    """(teacher folder, padded learner folder): tiny random Marian models on the same 2,000-token BPE."""
    root = tmp_path_factory.mktemp("padded")
    torch.manual_seed(1)
    teacher = build_model("tiny", small_tokenizer)
    with torch.no_grad():
        teacher.final_logits_bias.normal_(0.0, 3.0)  # a peaked q
    save_checkpoint(root / "teacher", model=teacher.eval(), tokenizer=small_tokenizer, config=None)
    torch.manual_seed(2)
    learner = build_model("tiny", small_tokenizer)
    V = small_tokenizer.vocab_size
    learner.resize_token_embeddings(V + PAD_ROWS, mean_resizing=False)
    with torch.no_grad():
        learner.final_logits_bias[:, V:] = 4.0  # padding rows that would take most of a softmax they entered
    assert learner.lm_head.weight.shape[0] == V + PAD_ROWS
    save_checkpoint(root / "learner", model=learner, tokenizer=small_tokenizer, config=None)
    return root / "teacher", root / "learner"


def _loss(shared_data, out, teacher, learner, *extra):
    cfg = load_config(None, [
        f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=24", "data.max_eval_samples=4",
        "data.max_tokens=300", "eval.max_length=12", "train.num_threads=1", "train.seed=3", f"train.out_dir={out}",
        f"model.teacher={teacher}", f"model.init={learner}", "model.dropout=0", "objective.kind=kd",
        "objective.divergence_weight=0.6", "objective.top_k=6", "objective.temperature=1.5", *extra])
    run = setup(cfg)
    assert run.model.lm_head.weight.shape[0] == run.tokenizer.vocab_size + PAD_ROWS
    batch = training_batch(run, run.data.sampler.epoch_batches(0)[0])
    return compute_loss(run, batch)  # a training batch: train mode, gradients on


def test_padded_learner_gets_the_same_loss_on_every_path(shared_data, models, tmp_path, monkeypatch):
    teacher, learner = models
    # on-policy with the samples held fixed: the learner "samples" the reference completion
    monkeypatch.setattr(Seq2SeqFamily, "on_policy_batch",
                        lambda self, model, tokenizer, batch, settings: {k: v for k, v in batch.items()
                                                                         if k != "example_index"})
    plain = _loss(shared_data, tmp_path / "plain", teacher, learner)
    paths = {"fused": ("train.fused_head=true",), "cache": (f"train.teacher_cache={tmp_path / 'teacher-cache'}",),
             "on_policy": ("objective.prefix=learner",)}
    for name, extra in paths.items():
        got = _loss(shared_data, tmp_path / name, teacher, learner, *extra)
        for field in ("loss", "nll", "divergence"):
            torch.testing.assert_close(getattr(got, field), getattr(plain, field), rtol=1e-5, atol=1e-6,
                                       msg=f"{name} {field}")

    # the padding rows matter: the softmax over all V + 8 rows gives another loss (what the old fused path did)
    from ktransfer.losses.spec import LossSpec

    run = setup(load_config(None, [f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=24",
                                   "data.max_eval_samples=4", "data.max_tokens=300", "eval.max_length=12",
                                   f"train.out_dir={tmp_path / 'unsliced'}", f"model.teacher={teacher}",
                                   f"model.init={learner}", "model.dropout=0", "objective.kind=nll"]))
    assert run.signals.spec == LossSpec(objective="nll", lam=0.5, vocab_size=run.tokenizer.vocab_size)
    batch = training_batch(run, run.data.sampler.epoch_batches(0)[0])
    sliced = compute_loss(run, batch)
    object.__setattr__(run.signals.spec, "vocab_size", None)  # the spec is frozen: a deliberate break for the check
    unsliced = compute_loss(run, batch)
    assert float(unsliced.nll) > float(sliced.nll) + 0.1
