"""Prefix sources (``ktransfer.training.prefixes``): the on-policy batch holds the learner's own samples (checked
against an
independent ``generate`` call), masks cover exactly the sampled tokens, no gradient flows through sampling (the
gradient equals that of a second computation on the samples held fixed), ``mixed`` at fraction 0 / 1 is reference /
learner training, the normalisation rule under accumulation, config errors, and exact resume.

Tiny models (``model.preset=tiny``) on 200 Multi30k pairs with a 500-token BPE, one thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from ktransfer.models.family import CAUSAL, SEQ2SEQ, load_model
from ktransfer.training.config import ConfigError, load_config
from ktransfer.training.prefixes import SampleSettings, batch_generator, draw
from ktransfer.training.train import collate_batch, compute_loss, setup, train


def overrides(shared_data: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=200", "data.max_eval_samples=4",
        "data.vocab_size=500", "data.max_tokens=300", "model.preset=tiny", "eval.max_length=24", "eval.beam=1",
        "optim.lr=1e-3", "train.num_threads=1", "train.log_every=1", "train.seed=3", "train.epochs=1",
        f"train.out_dir={out_dir}", *extra,
    ]


@pytest.fixture(scope="module")
def teacher(shared_data, tmp_path_factory) -> Path:
    """A tiny teacher trained with NLL for 3 epochs (its samples end with </s> often enough)."""
    out = tmp_path_factory.mktemp("teacher")
    train(load_config(None, overrides(shared_data, out, "train.epochs=3", "model.dropout=0.1")))
    return out / "checkpoints" / "best"


def learner_config(shared_data, out_dir, teacher, *extra):
    return load_config(None, overrides(shared_data, out_dir, "objective.kind=kd", f"model.teacher={teacher}",
                                       "objective.prefix=learner", "objective.sample_max_length=20",
                                       "model.dropout=0", *extra))


def first_batch(run) -> dict:
    return collate_batch(run, run.data.train_ids, run.data.sampler.epoch_batches(0)[0])


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("items", "key"), [
    (["objective.prefix=learner"], "objective.prefix"),  # objective nll: nothing to distil
    (["objective.prefix=mixed"], "objective.prefix"),
    (["objective.prefix=sampled"], "objective.prefix"),
    (["objective.on_policy_fraction=1.5"], "objective.on_policy_fraction"),
    (["objective.on_policy_fraction=-0.1"], "objective.on_policy_fraction"),
    (["objective.sample_temperature=0"], "objective.sample_temperature"),
    (["objective.sample_top_p=0"], "objective.sample_top_p"),
    (["objective.sample_top_p=1.2"], "objective.sample_top_p"),
    (["objective.sample_max_length=0"], "objective.sample_max_length"),
])
def test_config_errors_name_the_key(items, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, items)
    assert e.value.key == key and key in str(e.value)


def test_config_accepts_prefixes():
    assert load_config(None, []).objective.prefix == "reference"
    cfg = load_config(None, ["objective.kind=ka", "model.teacher=t", "objective.prefix=mixed",
                             "objective.on_policy_fraction=0.25", "objective.sample_top_p=0.9"])
    ob = cfg.objective
    assert (ob.prefix, ob.on_policy_fraction, ob.sample_top_p, ob.sample_max_length) == ("mixed", 0.25, 0.9, None)
    assert SampleSettings.from_config(cfg).max_new_tokens == cfg.eval.max_length
    with pytest.raises(ConfigError, match="objective.kind=nll"):
        load_config(None, ["objective.prefix=learner"])


# --------------------------------------------------------------------------------------------------------------
# Sampling and masks
# --------------------------------------------------------------------------------------------------------------
def test_samples_are_the_learners_and_masks_cover_them(teacher):
    """The on-policy batch equals an independent sampler with the same uniforms that recomputes the learner's whole
    forward pass at every step (``tests/sampling_reference.py``); labels hold exactly the tokens up to each sample's
    first </s>; sampling leaves the RNG and the model's mode alone."""
    from sampling_reference import naive_sample

    from ktransfer.models.generation import suppressed_ids
    from ktransfer.models.sampling import row_limits

    model, tokenizer = load_model(teacher)
    model.train()
    from ktransfer.data.batching import collate
    from ktransfer.data.corpora import read_split

    pairs = read_split("multi30k-de-en", "valid", "de", "en")[:12]
    src = [tokenizer.encode(s) + [tokenizer.eos_id] for s, _ in pairs]
    tgt = [tokenizer.encode(t) + [tokenizer.eos_id] for _, t in pairs]
    batch = collate(src, tgt, tokenizer.pad_id, model.config.decoder_start_token_id)
    settings = SampleSettings(temperature=0.8, top_p=0.95, max_new_tokens=30, seed=1234, length_scale=1.0,
                              length_margin=4)
    rng = torch.get_rng_state()
    out = SEQ2SEQ.on_policy_batch(model, tokenizer, batch, settings)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    for key in ("decoder_input_ids", "labels"):
        assert out[key].dtype == torch.int64 and not out[key].requires_grad and out[key].grad_fn is None
    assert out["input_ids"] is batch["input_ids"]

    model.eval()

    def last_logits(rows):
        width = max(map(len, rows)) + 1
        dec = torch.tensor([[tokenizer.pad_id, *r] + [tokenizer.pad_id] * (width - 1 - len(r)) for r in rows])
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         decoder_input_ids=dec).logits[:, -1]

    limits = row_limits(batch["labels"], 30, 1.0, 4).tolist()
    ref = naive_sample(last_logits, len(src), limits, eos_id=tokenizer.eos_id, seed=1234, temperature=0.8,
                       top_p=0.95, suppressed=suppressed_ids(model, tokenizer))
    for b, row in enumerate(ref):
        n = len(row)
        assert n == limits[b] or row[-1] == tokenizer.eos_id
        assert tokenizer.eos_id not in row[:-1] and tokenizer.pad_id not in row
        assert out["labels"][b, :n].tolist() == row
        assert (out["labels"][b, n:] == -100).all()
        assert out["decoder_input_ids"][b, :n].tolist() == [tokenizer.pad_id, *row[:-1]]
    assert int((out["labels"] != -100).sum()) == sum(map(len, ref))
    assert any(row[-1] == tokenizer.eos_id for row in ref)  # the mask is exercised
    assert any(len(row) == lim and row[-1] != tokenizer.eos_id for row, lim in zip(ref, limits, strict=True))

    # another seed gives other samples (the seed is used)
    other = SEQ2SEQ.on_policy_batch(model, tokenizer, batch, SampleSettings(**{**settings.__dict__, "seed": 7}))
    assert not torch.equal(other["labels"][:, :4], out["labels"][:, :4])


def test_mixed_coin_frequency_and_determinism():
    ids = torch.arange(12).reshape(3, 4)
    draws = [draw(batch_generator(5, step, ids), "mixed", 0.3) for step in range(400)]
    frac = sum(use for use, _ in draws) / len(draws)
    assert 0.22 < frac < 0.38  # Bernoulli(0.3), 400 draws: sd 0.023
    assert draws == [draw(batch_generator(5, step, ids), "mixed", 0.3) for step in range(400)]
    assert len({seed for _, seed in draws}) == 400
    # other sources at the same step: another stream
    assert draw(batch_generator(5, 0, ids + 1), "mixed", 0.3) != draws[0]
    # the seed does not depend on the prefix: mixed at 1 samples what learner samples
    assert draw(batch_generator(5, 9, ids), "mixed", 1.0) == (True, draw(batch_generator(5, 9, ids), "learner", 0)[1])
    assert draw(batch_generator(5, 9, ids), "mixed", 0.0)[0] is False


# --------------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------------
def _kl(q_logits, p_logits, mask):
    """Forward KL(q || p) per position, mean over ``mask``, from log_softmax (float64)."""
    logq, logp = q_logits.double().log_softmax(-1), p_logits.double().log_softmax(-1)
    per = (logq.exp() * (logq - logp)).sum(-1)
    return per[mask].mean()


def test_gradient_is_that_of_the_divergence_on_fixed_samples(teacher, shared_data, tmp_path):
    """``compute_loss`` with prefix=learner: value and gradient equal (1-lam)*CE(reference) + lam*KL(q||p) on the
    samples held fixed, computed separately in float64 with plain torch; with ``num_tokens`` = N the loss scales
    by n_ref / N (each micro-batch weighted by its share of reference tokens)."""
    lam = 0.3
    run = setup(learner_config(shared_data, tmp_path / "run", teacher, f"objective.divergence_weight={lam}"))
    batch = first_batch(run)
    out = compute_loss(run, batch)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    run.model.zero_grad(set_to_none=True)

    # the same samples, drawn again from the same (seed, step, batch)
    _, seed = draw(batch_generator(run.cfg.train.seed, run.state.step, batch["input_ids"]), "learner", 0.5)
    fixed = SEQ2SEQ.on_policy_batch(run.model, run.tokenizer, batch, SampleSettings.from_config(run.cfg, seed=seed))
    ref_logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=batch["decoder_input_ids"]).logits
    smp_logits = run.model(input_ids=fixed["input_ids"], attention_mask=fixed["attention_mask"],
                           decoder_input_ids=fixed["decoder_input_ids"]).logits
    with torch.no_grad():
        t_logits = run.teacher(input_ids=fixed["input_ids"], attention_mask=fixed["attention_mask"],
                               decoder_input_ids=fixed["decoder_input_ids"]).logits
    nll = torch.nn.functional.cross_entropy(ref_logits.double().flatten(0, 1), batch["labels"].flatten())
    kl = _kl(t_logits, smp_logits, fixed["labels"] != -100)
    expected = (1 - lam) * nll + lam * kl
    expected.backward()
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-4)
    assert float(out.nll) == pytest.approx(float(nll), rel=1e-4)
    # float32 logits from a stacked, padded forward vs separate ones: equal up to about 1e-8 per token
    assert float(out.divergence) == pytest.approx(float(kl), rel=1e-4, abs=1e-7) and float(kl) > 0
    assert got.keys() == {n for n, p in run.model.named_parameters() if p.grad is not None}
    for name, p in run.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert all(p.grad is None for p in run.teacher.parameters())

    n_ref = int((batch["labels"] != -100).sum())
    scaled = compute_loss(run, batch, 3 * n_ref)
    assert float(scaled.loss) == pytest.approx(float(expected) / 3, rel=1e-4)
    assert float(scaled.divergence) == pytest.approx(float(kl) / 3, rel=1e-4)


def test_mixed_at_0_and_1_and_validation(teacher, shared_data, tmp_path):
    """mixed(0) gives the reference loss, mixed(1) the learner loss, on the same batch; learner and reference
    differ; without gradients (validation) every prefix source gives the reference loss."""
    run = setup(learner_config(shared_data, tmp_path / "run", teacher, "objective.divergence_weight=0.5"))
    batch = first_batch(run)
    ob = run.cfg.objective

    def loss(prefix, fraction=0.5):
        ob.prefix, ob.on_policy_fraction = prefix, fraction
        return float(compute_loss(run, batch).loss)

    rng = torch.get_rng_state()
    reference, learner = loss("reference"), loss("learner")
    assert reference != learner
    assert torch.equal(torch.get_rng_state(), rng)  # the coin and the samples draw from their own generators
    assert loss("mixed", 0.0) == reference
    assert loss("mixed", 1.0) == learner
    run.model.eval()
    with torch.no_grad():
        assert loss("learner") == loss("reference")


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(checkpoint / "model.safetensors")


def test_resume_is_exact_with_learner_prefixes(teacher, shared_data, tmp_path, monkeypatch):
    """2 steps, stop, resume to 4 steps: the weights of 4 uninterrupted steps (samples depend on (seed, step,
    batch) only, and the dropout stream is not moved by sampling)."""
    from ktransfer.models.seq2seq import Seq2SeqFamily

    extra = ("objective.prefix=mixed", "objective.on_policy_fraction=0.5", "model.dropout=0.1",
             "objective.sample_max_length=12")
    train(learner_config(shared_data, tmp_path / "resumed", teacher, *extra, "train.max_steps=2"))
    train(learner_config(shared_data, tmp_path / "resumed", teacher, *extra, "train.max_steps=4"))
    real, sampled = Seq2SeqFamily.on_policy_batch, []
    monkeypatch.setattr(Seq2SeqFamily, "on_policy_batch", lambda *a, **k: sampled.append(1) or real(*a, **k))
    train(learner_config(shared_data, tmp_path / "straight", teacher, *extra, "train.max_steps=4"))
    assert 0 < len(sampled) < 4  # both prefix sources were used
    log = (tmp_path / "straight/train.log").read_text(encoding="utf-8")  # the source and its settings, at start
    assert ("prefixes: mixed (objective.prefix), on-policy: the learner's samples on a batch with probability 0.5 "
            "(objective.on_policy_fraction), the reference otherwise; temperature 1, top-p 1, top-k all") in log
    assert "at most min(12, ceil(1.5 x the reference's tokens) + 4) tokens per sample" in log
    a, b = weights(tmp_path / "resumed/checkpoints/last"), weights(tmp_path / "straight/checkpoints/last")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_causal_learner_uses_causal_samples(shared_data, tmp_path):
    """A decoder-only learner (``ktransfer.models.causal``): the loss is (1-lam)*NLL(reference) + lam*KL on the batch
    that
    ``CausalFamily.on_policy_batch`` samples with the same settings, computed again here with plain torch."""
    def cfg(out, *extra):
        return load_config(None, [
            f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=100", "data.max_eval_samples=4",
            "data.vocab_size=500", "data.max_tokens=400", "model.preset=gpt2-tiny", "eval.max_length=12",
            "train.num_threads=1", "train.seed=2", f"train.out_dir={out}", *extra])

    train(cfg(tmp_path / "teacher", "train.max_steps=2"))
    lam = 0.4
    best = tmp_path / "teacher/checkpoints/best"
    run = setup(cfg(tmp_path / "run", "objective.kind=kd", f"model.teacher={best}", "objective.prefix=learner",
                    f"objective.divergence_weight={lam}", "objective.sample_max_length=8",
                    "model.dropout=0"))
    assert run.family is CAUSAL
    batch = first_batch(run)
    out = compute_loss(run, batch)
    _, seed = draw(batch_generator(run.cfg.train.seed, run.state.step, batch["input_ids"]), "learner", 0.5)
    sampled = CAUSAL.on_policy_batch(run.model, run.tokenizer, batch, SampleSettings.from_config(run.cfg, seed=seed))
    V = run.tokenizer.vocab_size
    with torch.no_grad():
        ref = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :V]
        smp = run.model(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits[..., :V]
        tea = run.teacher(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits[..., :V]
    nll = torch.nn.functional.cross_entropy(ref.double().flatten(0, 1), batch["labels"].flatten())
    kl = _kl(tea, smp, sampled["labels"] != -100)
    assert float(out.loss) == pytest.approx(float((1 - lam) * nll + lam * kl), rel=1e-4)
    # float32 logits from a stacked, padded forward vs separate ones: equal up to about 1e-8 per token
    assert float(out.divergence) == pytest.approx(float(kl), rel=1e-4, abs=1e-7) and float(kl) > 0


def test_lam_1_runs_only_the_sampled_rows(teacher, shared_data, tmp_path):
    """At lam = 1 the NLL has no weight: the learner runs once (over the sampled rows), the loss is the KL on the
    samples computed again with plain torch, and the reported nll is 0."""
    run = setup(learner_config(shared_data, tmp_path / "run", teacher, "objective.divergence_weight=1"))
    batch = first_batch(run)
    calls = []

    def hook(_module, _args, kwargs):  # the training forwards (sampling runs without gradients)
        if torch.is_grad_enabled():
            calls.append(kwargs["decoder_input_ids"].shape)

    handle = run.model.register_forward_pre_hook(hook, with_kwargs=True)
    out = compute_loss(run, batch)
    handle.remove()
    _, seed = draw(batch_generator(run.cfg.train.seed, run.state.step, batch["input_ids"]), "learner", 0.5)
    fixed = SEQ2SEQ.on_policy_batch(run.model, run.tokenizer, batch, SampleSettings.from_config(run.cfg, seed=seed))
    assert calls == [fixed["decoder_input_ids"].shape]
    with torch.no_grad():
        smp = run.model(input_ids=fixed["input_ids"], attention_mask=fixed["attention_mask"],
                        decoder_input_ids=fixed["decoder_input_ids"]).logits
        tea = run.teacher(input_ids=fixed["input_ids"], attention_mask=fixed["attention_mask"],
                          decoder_input_ids=fixed["decoder_input_ids"]).logits
    assert float(out.loss) == pytest.approx(float(_kl(tea, smp, fixed["labels"] != -100)), rel=1e-4)
    assert float(out.nll) == 0.0
