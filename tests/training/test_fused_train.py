"""``train.fused_head``: the model-level fused loss equals the loss on ``model(**inputs).logits`` (value and every
parameter gradient), and a few training steps with the fused head give the weights and validation metrics of the
same steps unfused, for kd and ka, with and without top-k.

A tiny random Marian teacher (``final_logits_bias`` drawn with std 3 so that q is peaked) on real Multi30k pairs.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from ktransfer import transfer_loss
from ktransfer.data.batching import collate, encode_pairs
from ktransfer.data.corpora import read_split
from ktransfer.losses.fused_linear import fused_model_loss, output_head
from ktransfer.training.config import load_config
from ktransfer.training.train import train


def _model(tokenizer, seed, bias_std=0.0):
    from ktransfer.models.family import build_model

    torch.manual_seed(seed)
    model = build_model("tiny", tokenizer)
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, bias_std)
    return model


@pytest.mark.parametrize("objective,top_k,temperature,label_smoothing", [
    ("kd", None, 1.0, 0.0), ("ka", 5, 2.0, 0.1), ("half", 4, 1.0, 0.0), ("nll", None, 1.0, 0.1)])
def test_model_level_fused_loss_equals_unfused(shared_data, small_tokenizer, objective, top_k, temperature,
                                               label_smoothing):
    learner = _model(small_tokenizer, 0, bias_std=1.0).train()  # dropout on: both paths draw the same masks
    teacher = _model(small_tokenizer, 1, bias_std=3.0).eval().requires_grad_(False)
    pairs = read_split(shared_data / "multi30k-de-en", "train", "de", "en")[:6]
    src, tgt = encode_pairs(pairs, small_tokenizer, 64, log=lambda m: None)
    b = collate(src, tgt, small_tokenizer.pad_id, learner.config.decoder_start_token_id)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    kw = dict(objective=objective, lam=0.6, top_k=top_k, temperature=temperature, label_smoothing=label_smoothing)

    torch.manual_seed(7)
    want = transfer_loss(learner(**inputs, use_cache=False).logits, teacher(**inputs, use_cache=False).logits,
                         b["labels"], **kw)
    named = [(n, p) for n, p in learner.named_parameters() if p.requires_grad]  # sinusoidal positions are frozen
    want_grads = torch.autograd.grad(want.loss, [p for _, p in named])
    torch.manual_seed(7)
    got = fused_model_loss(learner, teacher, inputs, b["labels"], **kw)
    got_grads = torch.autograd.grad(got.loss, [p for _, p in named])
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.divergence, want.divergence, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.nll, want.nll, rtol=1e-5, atol=1e-6)
    for (name, _), g, w in zip(named, got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


def test_output_head_refuses_other_models(small_tokenizer):
    from transformers import MarianMTModel

    class Scaled(MarianMTModel):
        def forward(self, *args, **kwargs):  # logits computed otherwise: not a plain linear head
            out = super().forward(*args, **kwargs)
            out.logits = 2 * out.logits
            return out

    model = _model(small_tokenizer, 0)
    body, head, bias = output_head(model)
    assert body is model.model and head is model.lm_head and bias.shape == (model.config.vocab_size,)
    with pytest.raises(ValueError, match="Scaled is not a model whose output layer ktransfer can fuse"):
        output_head(Scaled(model.config))
    with pytest.raises(ValueError, match="Linear is not a model"):
        output_head(torch.nn.Linear(3, 4))


@pytest.fixture(scope="module")
def teacher_dir(small_tokenizer, tmp_path_factory):
    from ktransfer.models.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("teacher") / "ckpt"
    save_checkpoint(out, model=_model(small_tokenizer, 5, bias_std=3.0).eval(), tokenizer=small_tokenizer,
                    config=None)
    return out


@pytest.mark.parametrize("objective,top_k", [("kd", None), ("kd", 6), ("ka", None), ("ka", 6)])
def test_fused_training_equals_unfused(shared_data, teacher_dir, tmp_path, objective, top_k, monkeypatch):
    from ktransfer.losses import fused_linear

    calls = []
    real = fused_linear.fused_spec_loss
    monkeypatch.setattr(fused_linear, "fused_spec_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    results, weights = {}, {}
    for fused in (False, True):
        out = tmp_path / f"fused{fused}"
        cfg = load_config(None, [
            f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=100", "data.max_eval_samples=8",
            "data.max_tokens=300", "model.preset=tiny", "eval.max_length=12", "optim.lr=1e-3",
            "train.num_threads=1", "train.seed=3", "train.epochs=1", "train.max_steps=3", f"train.out_dir={out}",
            f"model.teacher={teacher_dir}", f"objective.kind={objective}", "objective.divergence_weight=0.6",
            f"objective.top_k={'null' if top_k is None else top_k}", "objective.temperature=1.5",
            f"train.fused_head={str(fused).lower()}"])
        calls.clear()
        results[fused] = train(cfg)
        assert bool(calls) == fused  # steps and validation batches went through the fused head, or none did
        weights[fused] = safetensors.torch.load_file(out / "checkpoints/last/model.safetensors")
    assert results[True]["step"] == results[False]["step"] == 3
    for key, w in weights[False].items():
        torch.testing.assert_close(weights[True][key], w, rtol=0, atol=1e-5, msg=key)
    v, w = results[True]["valid"], results[False]["valid"]
    for key in ("loss", "nll", "divergence"):
        assert v[key] == pytest.approx(w[key], rel=1e-5), key
    assert v["bleu"] == w["bleu"] and v["chrf"] == w["chrf"]
