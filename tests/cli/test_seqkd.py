"""Sequence-level KD data (``ktransfer.evaluation.seqkd``, ``ktransfer distill-data``): the new corpus is line-aligned
with the
source, each target is the teacher's ``translate`` of its source (an independent call), the other splits are copied,
the manifest records the job, and a killed run resumes without translating or writing any line twice.

A tiny teacher trained for one epoch on 200 Multi30k pairs; 25 sources in chunks of 10.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ktransfer.evaluation.seqkd as seqkd
from ktransfer.data.corpora import read_lines, read_split
from ktransfer.evaluation.evaluate import translate
from ktransfer.models.family import load_model
from ktransfer.training.config import load_config
from ktransfer.training.train import train

SETTINGS = {"beam": 2, "max_length": 16, "batch_size": 4, "limit": 25, "chunk_lines": 10}


@pytest.fixture(scope="module")
def teacher(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    train(load_config(None, [
        f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=200", "data.max_eval_samples=4",
        "data.vocab_size=500", "data.max_tokens=300", "model.preset=tiny", "eval.max_length=24", "eval.beam=1",
        "optim.lr=1e-3", "train.num_threads=1", "train.seed=3", "train.epochs=1", f"train.out_dir={out}"]))
    return out


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("seqkd") / "corpus"
    return out, seqkd.distill_corpus(teacher, out, log=lambda m: None, **SETTINGS)


def test_corpus_is_aligned_and_holds_the_teachers_translations(teacher, distilled, shared_data):
    out, manifest = distilled
    original = shared_data / "multi30k-de-en"
    sources = [s for s, _ in read_split(original, "train", "de", "en")][:25]
    assert read_lines(out / "train.de") == sources
    targets = read_lines(out / "train.en")
    assert len(targets) == 25
    model, tokenizer = load_model(teacher / "checkpoints" / "best")
    expected = translate(model, tokenizer, sources, beam=2, max_length=16, batch_size=7)  # other batching
    assert targets == expected
    assert sum(t != r for t, (_, r) in zip(targets, read_split(original, "train", "de", "en"), strict=False)) > 0
    for split in ("valid", "test2016"):
        for lang in ("de", "en"):
            assert (out / f"{split}.{lang}").read_bytes() == (original / f"{split}.{lang}").read_bytes()
    assert len(read_split(out, "train", "de", "en")) == 25  # a corpus the loader accepts
    assert not list(out.parent.glob(".*partial")) and not (out / ".chunks").exists()
    cfg = load_config(None, [f"data.corpus={out}"])
    assert cfg.data.corpus == str(out)


def test_manifest(teacher, distilled, shared_data):
    out, manifest = distilled
    assert json.loads((out / seqkd.MANIFEST).read_text()) == manifest
    assert manifest["teacher"] == str((teacher / "checkpoints" / "best").resolve())
    assert manifest["corpus"] == str((shared_data / "multi30k-de-en").resolve())
    assert (manifest["split"], manifest["src_lang"], manifest["tgt_lang"]) == ("train", "de", "en")
    assert manifest["decode"]["beam"] == 2 and manifest["decode"]["max_length"] == 16
    assert manifest["decode"]["signature"].startswith("beam:2|lp:1.0|maxlen:16")
    assert manifest["lines"] == 25 and manifest["copied_splits"] == ["test2016", "valid"]
    assert manifest["empty_hypotheses"] == sum(not t for t in read_lines(out / "train.en"))
    # the manifest is not taken for a SPLIT.LANG file
    from ktransfer.data.corpora import corpus_layout

    assert set(corpus_layout(out)) == {"train", "valid", "test2016"}


def test_killed_run_resumes_without_duplicates(teacher, distilled, tmp_path, monkeypatch):
    reference, _ = distilled
    out = tmp_path / "corpus"
    calls, killed = [], []

    class Killed(Exception):
        pass

    def dies_on_second_chunk(model, tokenizer, sources, **kw):
        calls.append(len(sources))
        if len(calls) == 2 and not killed:
            killed.append(True)
            raise Killed  # killed while translating the second chunk
        return translate(model, tokenizer, sources, **kw)

    monkeypatch.setattr(seqkd, "translate", dies_on_second_chunk)
    with pytest.raises(Killed):
        seqkd.distill_corpus(teacher, out, log=lambda m: None, **SETTINGS)
    partial = tmp_path / ".corpus.partial"
    assert not out.exists() and sorted(p.name for p in (partial / ".chunks").glob("0*.json")) == ["0000000000.json"]

    # other settings cannot resume it
    with pytest.raises(ValueError, match="beam: 2 then, 3 now"):
        seqkd.distill_corpus(teacher, out, log=lambda m: None, **{**SETTINGS, "beam": 3})

    calls.clear()
    seqkd.distill_corpus(teacher, out, log=lambda m: None, **SETTINGS)
    assert calls == [10, 5]  # only the chunks that were missing
    for name in ("train.de", "train.en", "valid.en", "test2016.de"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not partial.exists()

    # finished: nothing to do again; another job into the same folder is refused
    calls.clear()
    seqkd.distill_corpus(teacher, out, log=lambda m: None, **SETTINGS)
    assert calls == []
    with pytest.raises(FileExistsError, match="limit: 25 then, 20 now"):
        seqkd.distill_corpus(teacher, out, log=lambda m: None, **{**SETTINGS, "limit": 20})


def test_cli(teacher, tmp_path, capsys):
    from ktransfer.cli import main

    out = tmp_path / "cli"
    assert main(["distill-data", str(teacher), "--out", str(out), "--limit", "6", "--beam", "1", "--max-length",
                 "12", "--no-progress", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["lines"] == 6 and manifest["decode"]["beam"] == 1
    assert len(read_lines(out / "train.en")) == 6
    assert main(["distill-data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such model folder" in capsys.readouterr().err


def test_a_causal_teacher_gives_seq_kd_data_for_its_learner(shared_data, tmp_path):
    """Seq-KD with a decoder-only teacher (gpt2-tiny): the corpus holds the teacher's greedy responses to the
    instruction prompts (its own ``translate``, batched differently), and a causal learner trains on it."""
    base = [f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=200", "data.max_eval_samples=4",
            "data.vocab_size=500", "data.max_tokens=400", "model.preset=gpt2-tiny", "eval.max_length=16",
            "eval.beam=1", "optim.lr=3e-3", "train.num_threads=1", "train.seed=3"]
    teacher = tmp_path / "teacher"
    train(load_config(None, [*base, "train.max_steps=6", f"train.out_dir={teacher}"]))
    out = tmp_path / "corpus"
    seqkd.distill_corpus(teacher, out, log=lambda m: None, beam=1, max_length=12, batch_size=3, limit=7,
                         chunk_lines=4)
    sources = [s for s, _ in read_split(shared_data / "multi30k-de-en", "train", "de", "en")][:7]
    assert read_lines(out / "train.de") == sources
    model, tokenizer = load_model(teacher / "checkpoints" / "best")
    assert read_lines(out / "train.en") == translate(model, tokenizer, sources, beam=1, max_length=12, batch_size=5)
    result = train(load_config(None, [*base, f"data.corpus={out}", "objective.kind=kd",
                                      "objective.divergence_weight=0.5",
                                      f"model.teacher={teacher / 'checkpoints/best'}",
                                      f"data.tokenizer={teacher / 'tokenizer'}", "train.max_steps=2",
                                      f"train.out_dir={tmp_path / 'learner'}"]))
    assert result["step"] == 2
