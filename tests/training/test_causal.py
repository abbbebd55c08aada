"""Decoder-only LMs (``ktransfer.models.causal``): the shifted labels score exactly the response, the causal and seq2seq
layouts give the same objective, prompt positions get no gradient, embedding padding is sliced away while other
vocabulary mismatches fail, checkpoints round-trip, on-policy samples are reproducible, and a distillation run of a
gpt2-tiny learner from a gpt2-tiny teacher trains, resumes and is scored with sacreBLEU.

Tiny models (``gpt2-tiny``, ``llama-tiny``), a few hundred Multi30k pairs, one thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ktransfer.data.batching import collate as seq2seq_collate
from ktransfer.data.corpora import read_split
from ktransfer.losses.objectives import transfer_loss
from ktransfer.models import causal
from ktransfer.models.checkpoint import save_checkpoint
from ktransfer.models.family import CAUSAL, build_model, check_compatible, family_of, load_model, shared_logits
from ktransfer.models.generation import DecodeSettings, output_rows
from ktransfer.models.tokenizer import train_tokenizer
from ktransfer.training.config import load_config
from ktransfer.training.prefixes import SampleSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(shared_data) -> list[tuple[str, str]]:
    return read_split(shared_data / "multi30k-de-en", "train", "de", "en")[:200]


def _model(name: str, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(name, tokenizer, dropout=0.0).eval()
    causal.ensure_instruction(model, "de", "en")
    return model


def _examples(model, tokenizer, pairs, n: int):
    return causal.encode_examples(pairs[:n], tokenizer, 200, instruction=causal.instruction(model), log=lambda _: None)


# --------------------------------------------------------------------------------------------------------------
# Data layout and the loss
# --------------------------------------------------------------------------------------------------------------
def test_collate_scores_each_response_token_at_the_position_that_predicts_it(small_tokenizer, pairs):
    tok = small_tokenizer
    prompts, responses = causal.encode_examples(pairs[:6], tok, 200, instruction="Translate German to English:")
    assert prompts[0][:len(tok.encode("Translate German to English:"))] == tok.encode("Translate German to English:")
    batch = causal.collate(prompts, responses, tok.pad_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        assert p[-1] == tok.eos_id and r[-1] == tok.eos_id and tok.decode(r) == tok.normalize(pairs[b][1])
        L = len(p) + len(r)
        assert ids[b, :L].tolist() == p + r and mask[b].tolist() == [1] * L + [0] * (ids.shape[1] - L)
        counted = (labels[b] != -100).nonzero().squeeze(-1).tolist()
        assert counted == list(range(len(p) - 1, L - 1))  # the last prompt token predicts the first response token
        assert all(labels[b, t] == ids[b, t + 1] for t in counted)
        assert labels[b, counted].tolist() == r
    assert causal.prompts_of(batch) == prompts


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_loss_is_mean_response_nll_computed_prefix_by_prefix(name, small_tokenizer, pairs):
    """Batched, right-padded forward + shifted labels == -mean log p(response_j | prompt, response_<j), each term
    from its own unpadded forward on just that prefix, in float64."""
    tok = small_tokenizer
    model = _model(name, tok)
    prompts, responses = _examples(model, tok, pairs, 3)
    batch = causal.collate(prompts, responses, tok.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = transfer_loss(logits, None, batch["labels"], objective="nll")
        terms = []
        for p, r in zip(prompts, responses, strict=True):
            for j, token in enumerate(r):
                prefix = torch.tensor([p + r[:j]])
                last = model(input_ids=prefix).logits[0, -1].double()
                terms.append(-torch.log_softmax(last, -1)[token].item())
    assert int(out.num_tokens) == sum(map(len, responses)) == len(terms)
    assert out.loss.item() == pytest.approx(math.fsum(terms) / len(terms), rel=2e-5)


@pytest.mark.parametrize("objective", ["ka", "kd", "half"])
def test_causal_and_seq2seq_layouts_give_the_same_objective(objective, small_tokenizer, pairs):
    """The response positions of a causal batch, gathered into the seq2seq layout of data.collate (labels = target),
    give the same loss, NLL and divergence."""
    tok = small_tokenizer
    prompts, responses = causal.encode_examples(pairs[:5], tok, 200, instruction="Translate German to English:")
    batch = causal.collate(prompts, responses, tok.pad_id)
    B, L = batch["labels"].shape
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(B, L, tok.vocab_size, generator=gen) * 3
    u = torch.randn(B, L, tok.vocab_size, generator=gen) * 3
    s2s = seq2seq_collate([[5]] * B, responses, tok.pad_id, tok.pad_id)  # the target side is what matters
    T = s2s["labels"].shape[1]
    z2, u2 = torch.zeros(B, T, tok.vocab_size), torch.zeros(B, T, tok.vocab_size)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        z2[b, :len(r)], u2[b, :len(r)] = z[b, len(p) - 1:len(p) - 1 + len(r)], u[b, len(p) - 1:len(p) - 1 + len(r)]
        z2[b, len(r):], u2[b, len(r):] = 1e4, -1e4  # padding: ignored whatever it holds
    a = transfer_loss(z, u, batch["labels"], objective=objective, lam=0.5, top_k=8)
    c = transfer_loss(z2, u2, s2s["labels"], objective=objective, lam=0.5, top_k=8)
    assert int(a.num_tokens) == int(c.num_tokens)
    for x, y in ((a.loss, c.loss), (a.nll, c.nll), (a.divergence, c.divergence)):
        assert x.item() == pytest.approx(y.item(), rel=1e-6) and y.item() > 0


def test_prompt_positions_get_no_gradient_but_condition_the_loss(small_tokenizer, pairs):
    tok = small_tokenizer
    model = _model("gpt2-tiny", tok)
    prompts, responses = _examples(model, tok, pairs, 4)
    batch = causal.collate(prompts, responses, tok.pad_id)
    ignored = batch["labels"] == -100
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    teacher = torch.randn_like(logits)
    z = logits.clone().requires_grad_(True)
    out = transfer_loss(z, teacher, batch["labels"], objective="ka", lam=0.5, top_k=8)
    out.loss.backward()
    assert torch.all(z.grad[ignored] == 0) and torch.all(z.grad[~ignored].abs().sum(-1) > 0)
    # changing the logits (learner and teacher) at ignored positions changes nothing
    z3, t3 = logits.clone(), teacher.clone()
    z3[ignored], t3[ignored] = torch.randn_like(z3[ignored]) * 10, torch.randn_like(t3[ignored]) * 10
    again = transfer_loss(z3, t3, batch["labels"], objective="ka", lam=0.5, top_k=8)
    assert again.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    # but the prompt conditions the response: another source changes the model's loss on the same responses
    other = causal.collate([prompts[1], prompts[0], prompts[3], prompts[2]], responses, tok.pad_id)
    with torch.no_grad():
        z4 = model(input_ids=other["input_ids"], attention_mask=other["attention_mask"]).logits
    assert transfer_loss(z4, None, other["labels"], objective="nll").loss.item() != pytest.approx(
        transfer_loss(logits, None, batch["labels"], objective="nll").loss.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Vocabulary checks
# --------------------------------------------------------------------------------------------------------------
def test_embedding_padding_is_accepted_and_sliced(small_tokenizer, pairs):
    tok = small_tokenizer
    V = tok.vocab_size
    teacher, learner = _model("gpt2-tiny", tok, seed=1), _model("gpt2-tiny", tok, seed=2)
    teacher.resize_token_embeddings(V + 64)  # e.g. 32000 -> 32064: rows no token id reaches
    said = []
    assert check_compatible(teacher, learner, tok, tok, log=said.append) == V
    assert len(said) == 1 and f"{V + 64}" in said[0] and f"0..{V - 1}" in said[0]
    prompts, responses = _examples(learner, tok, pairs, 3)
    batch = causal.collate(prompts, responses, tok.pad_id)
    with torch.no_grad():
        u = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z = learner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert u.shape[-1] == V + 64
    z_cut, u_cut = shared_logits(z, u, V)
    assert u_cut.shape[-1] == V and torch.equal(u_cut, u[..., :V]) and z_cut is z
    a = transfer_loss(z_cut, u_cut, batch["labels"], objective="kd", lam=1.0)
    ref = transfer_loss(z, u[..., :V].contiguous(), batch["labels"], objective="kd", lam=1.0)
    assert a.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    said.clear()
    check_compatible(learner, learner, tok, tok, log=said.append)
    assert said == []  # nothing to say when the sizes agree


def test_other_vocabulary_mismatches_fail_naming_both(small_tokenizer, pairs):
    tok = small_tokenizer
    other_tok = train_tokenizer([x for p in pairs for x in p], vocab_size=400)
    teacher, learner = _model("gpt2-tiny", tok), _model("gpt2-tiny", other_tok)
    with pytest.raises(ValueError, match=r"teacher and learner tokenizers have different vocabularies: id \d+") as e:
        check_compatible(teacher, learner, tok, other_tok, log=None)
    assert f"{tok.vocab_size} vs {other_tok.vocab_size} ids" in str(e.value)
    small = _model("gpt2-tiny", tok)
    small.resize_token_embeddings(tok.vocab_size - 10)
    with pytest.raises(ValueError, match=f"learner model has {tok.vocab_size - 10} output rows"):
        check_compatible(teacher, small, tok, tok)
    marian = build_model("tiny", tok)
    with pytest.raises(ValueError, match=r"the teacher is seq2seq \(MarianMTModel\) but the learner is causal"):
        check_compatible(marian, learner, tok, tok)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints, decoding, on-policy samples
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_checkpoint_round_trip_gives_identical_logits(name, small_tokenizer, pairs, tmp_path):
    tok = small_tokenizer
    model = _model(name, tok, seed=4)
    save_checkpoint(tmp_path / "ck", model=model, tokenizer=tok, config={"model": {"preset": name}})
    assert not list((tmp_path / "ck").glob("*.bin")) and not list((tmp_path / "ck").glob("*.pt"))
    loaded, loaded_tok = load_model(tmp_path / "ck")
    assert type(loaded) is type(model) and loaded_tok.fingerprint() == tok.fingerprint()
    assert causal.instruction(loaded) == "Translate German to English:"
    batch = causal.collate(*_examples(model, tok, pairs, 3), tok.pad_id)
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)
    assert set(safetensors.torch.load_file(tmp_path / "ck/model.safetensors")) <= set(model.state_dict())
    rebuilt = build_model(tmp_path / "ck", tok)  # a checkpoint as model.preset
    assert family_of(rebuilt) is CAUSAL and rebuilt.training


def test_local_hugging_face_folder_with_padded_vocabulary(small_tokenizer, pairs, tmp_path):
    tok = small_tokenizer
    model = _model("llama-tiny", tok, seed=5)
    model.resize_token_embeddings(tok.vocab_size + 64)
    model.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors
    loaded = build_model(tmp_path / "hf", tok, dropout=0.0).eval()
    assert type(loaded) is type(model) and output_rows(loaded) == tok.vocab_size + 64
    batch = causal.collate(*_examples(model, tok, pairs, 2), tok.pad_id)
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)
    with torch.no_grad():  # make the padding rows win every argmax: they must still never be generated
        head = loaded.get_output_embeddings().weight
        head[tok.vocab_size:] = torch.randn(64, head.shape[1], generator=torch.Generator().manual_seed(0)) * 100
        assert int(loaded(input_ids=batch["input_ids"][:1]).logits[0, -1].argmax()) >= tok.vocab_size
    settings = SampleSettings(temperature=1.0, top_p=1.0, max_new_tokens=6, seed=1)
    sampled = CAUSAL.on_policy_batch(loaded, tok, batch, settings)["labels"]
    assert int(sampled.max()) < tok.vocab_size  # (translate suppresses the same ids: generation.suppressed_ids)
    with pytest.raises(ValueError, match="only the dropout override"):
        build_model(tmp_path / "hf", tok, n_layer=3)


def test_on_policy_batch_is_reproducible_and_leaves_the_global_rng_alone(small_tokenizer, pairs):
    tok = small_tokenizer
    model = _model("gpt2-tiny", tok).train()
    batch = causal.collate(*_examples(model, tok, pairs, 4), tok.pad_id)

    def sample(seed):
        settings = SampleSettings(temperature=1.3, top_p=0.95, max_new_tokens=7, seed=seed)
        return CAUSAL.on_policy_batch(model, tok, batch, settings)

    rng = torch.get_rng_state()
    a, b, c = sample(5), sample(5), sample(6)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["input_ids"], c["input_ids"])
    assert causal.prompts_of(a) == causal.prompts_of(batch)
    for row, lab in zip(a["input_ids"], a["labels"], strict=True):
        counted = (lab != -100).nonzero().squeeze(-1)
        assert 1 <= len(counted) <= 7 and torch.equal(lab[counted[:-1]], row[counted[:-1] + 1])
        sampled = lab[counted]
        assert int(sampled.max()) < tok.vocab_size and tok.pad_id not in sampled.tolist()
        assert tok.eos_id not in sampled[:-1].tolist()  # a sample ends at its first </s>


def test_translate_batched_equals_one_by_one_and_skips_empty(small_tokenizer, pairs):
    from ktransfer.evaluation.evaluate import translate

    tok = small_tokenizer
    model = _model("llama-tiny", tok, seed=3)
    sources = [p[0] for p in pairs[:6]] + [""]
    one = translate(model, tok, sources, beam=2, max_length=12, batch_size=1)
    many = CAUSAL.translate(model, tok, sources, DecodeSettings(beam=2, max_length=12), batch_size=7)
    assert one == many and one[-1] == "" and all(h for h in one[:-1])


# --------------------------------------------------------------------------------------------------------------
# Training end to end
# --------------------------------------------------------------------------------------------------------------
def _config(shared_data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=200", "data.max_eval_samples=16",
        "data.vocab_size=500", "data.max_tokens=400", "model.preset=gpt2-tiny", "eval.max_length=16",
        "eval.batch_size=16", "optim.lr=3e-3", "train.num_threads=1", "train.log_every=5", "train.seed=2",
        "train.epochs=1", f"train.out_dir={out}", *extra])


def test_distil_gpt2_tiny_learner_trains_resumes_and_evaluates(shared_data, tmp_path):
    from ktransfer.evaluation.evaluate import evaluate
    from ktransfer.training.train import setup, train

    teacher = tmp_path / "teacher"
    train(_config(shared_data, teacher, "objective.kind=nll", "train.max_steps=10"))
    run = setup(_config(shared_data, tmp_path / "probe", "objective.kind=ka", "objective.top_k=8",
                        f"model.teacher={teacher / 'checkpoints/best'}"))
    assert run.family is CAUSAL and family_of(run.teacher) is CAUSAL
    assert causal.instruction(run.model) == "Translate German to English:"
    from ktransfer.training.train import collate_batch, compute_loss

    run.model.eval()
    batch = collate_batch(run, run.data.valid_ids, list(range(6)))
    with torch.no_grad():  # compute_loss keeps logits from the first scored column on; the full logits agree
        out = compute_loss(run, batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        full = transfer_loss(run.model(**inputs).logits, run.teacher(**inputs).logits, batch["labels"],
                             objective="ka", top_k=8, lam=0.5)
    assert out.loss.item() == pytest.approx(full.loss.item(), rel=1e-5) and int(out.num_tokens) == int(
        full.num_tokens) == sum(len(r) for r in run.data.valid_ids[1][:6])

    learner = [f"model.teacher={teacher / 'checkpoints/best'}", "objective.kind=ka", "objective.top_k=8",
               "objective.divergence_weight=0.5", "train.epochs=2"]
    first = train(_config(shared_data, tmp_path / "learner", *learner, "train.max_steps=10"))
    assert first["stopped"] == "max_steps" and first["step"] == 10
    second = train(_config(shared_data, tmp_path / "learner", *learner, "train.max_steps=20"))
    assert second["step"] == 20 and "resuming from" in (tmp_path / "learner/train.log").read_text()
    straight = train(_config(shared_data, tmp_path / "straight", *learner, "train.max_steps=20"))
    assert straight["step"] == 20
    a = safetensors.torch.load_file(tmp_path / "learner/checkpoints/last/model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "straight/checkpoints/last/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed == uninterrupted
    train_steps = [json.loads(x) for x in (tmp_path / "learner/metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in train_steps if r["kind"] == "train"]
    assert [r["step"] for r in train_steps] == [5, 10, 15, 20]
    for r in [*train_steps, second["valid"]]:  # the teacher term is there (top-8 KA: a partial sum, any sign)
        assert r["divergence"] != 0 and r["loss"] == pytest.approx(0.5 * r["nll"] + 0.5 * r["divergence"], rel=1e-5)

    result = evaluate(tmp_path / "learner", split="valid", limit=12, beam=2, max_length=16, batch_size=8,
                      out_dir=tmp_path / "eval")
    assert 0.0 <= result["bleu"] <= 100.0 and result["bleu_signature"].startswith("nrefs:1")
    hyps = (tmp_path / "eval/hyp.valid.en").read_text().splitlines()
    assert len(hyps) == 12 and result["sentences"] == 12
    from sacrebleu.metrics import BLEU

    refs = [t for _, t in read_split(shared_data / "multi30k-de-en", "valid", "de", "en")[:12]]
    assert result["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)


def test_bf16_autocast_on_a_causal_learner_with_its_own_samples(shared_data, tmp_path):
    """train.bf16 on the causal path: a ka loss under bf16 autocast equals the float32 one to bf16 precision, and a
    short run on the learner's own samples (objective.prefix=learner) trains with finite losses and scores."""
    from ktransfer.training.train import collate_batch, compute_loss, setup, train

    teacher = tmp_path / "teacher"
    train(_config(shared_data, teacher, "objective.kind=nll", "train.max_steps=5"))
    args = ["objective.kind=ka", "objective.top_k=8", "objective.divergence_weight=0.5",
            f"model.teacher={teacher / 'checkpoints/best'}"]
    losses = {}
    for bf16 in ("false", "true"):
        run = setup(_config(shared_data, tmp_path / f"probe-{bf16}", *args, f"train.bf16={bf16}"))
        run.model.eval()
        batch = collate_batch(run, run.data.valid_ids, list(range(8)))
        with torch.no_grad():
            out = compute_loss(run, batch)
        losses[bf16] = (out.loss.item(), out.nll.item(), out.divergence.item())
    for got, want in zip(losses["true"], losses["false"], strict=True):
        assert got == pytest.approx(want, rel=3e-2, abs=3e-2)
    result = train(_config(shared_data, tmp_path / "learner", *args, "train.bf16=true", "objective.prefix=learner",
                           "train.max_steps=6"))
    assert result["step"] == 6 and result["stopped"] == "max_steps"
    records = [json.loads(x) for x in (tmp_path / "learner/metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert math.isfinite(result["valid"]["loss"]) and result["valid"]["divergence"] != 0
