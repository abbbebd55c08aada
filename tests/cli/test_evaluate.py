"""Evaluation: sacreBLEU scores with signatures, batched beam search, evaluate() files, translate/evaluate CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch

from ktransfer.evaluation.evaluate import DecodeSettings, evaluate, score, translate
from ktransfer.models.family import resolve_source

REPO_ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def multi30k_test(shared_data):
    folder = shared_data / "multi30k-de-en"
    de = (folder / "test2016.de").read_text(encoding="utf-8").split("\n")[:200]
    en = (folder / "test2016.en").read_text(encoding="utf-8").split("\n")[:200]
    return de, en


@pytest.fixture(scope="module")
def random_model(small_tokenizer):
    """A ``tiny`` model with large random weights, so that different sources give different translations."""
    from ktransfer.models.family import build_model

    torch.manual_seed(0)
    model = build_model("tiny", small_tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and p.requires_grad:  # not the sinusoidal tables (never saved: transformers makes them)
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def checkpoint(random_model, small_tokenizer, tmp_path_factory):
    from ktransfer.models.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("run") / "checkpoints" / "best"
    config = {"data": {"corpus": "multi30k-de-en", "src_lang": "de", "tgt_lang": "en"}}
    save_checkpoint(path, model=random_model, tokenizer=small_tokenizer, config=config)
    return path


# --- score ----------------------------------------------------------------------------------------------------------
def _perturb(sentences):
    """Plausible system output: drop the last word of every third sentence, swap two words of every fifth."""
    out = []
    for i, s in enumerate(sentences):
        w = s.split()
        if i % 3 == 0 and len(w) > 2:
            w = w[:-1]
        if i % 5 == 0 and len(w) > 3:
            w[1], w[2] = w[2], w[1]
        out.append(" ".join(w))
    return out


def test_score_equals_sacrebleu_on_real_sentences(multi30k_test):
    _, refs = multi30k_test
    hyps = _perturb(refs)
    got = score(hyps, refs)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert 0 < got["bleu"] < 100 and 0 < got["chrf"] < 100
    assert got["sentences"] == len(refs)
    assert got["bleu_signature"] == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    assert got["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert "decode_signature" not in got
    json.dumps(got)  # JSON-ready


def test_perfect_hypotheses_score_100(multi30k_test):
    _, refs = multi30k_test
    got = score(refs, refs, decoding=DecodeSettings(beam=4, length_penalty=0.6, max_length=100))
    assert got["bleu"] == pytest.approx(100.0)
    assert got["chrf"] == pytest.approx(100.0)
    assert got["decode_signature"].startswith("beam:4|lp:0.6|maxlen:100|")


def test_score_rejects_misaligned_input():
    with pytest.raises(ValueError, match="3 hypotheses but 2 references"):
        score(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="0 hypotheses"):
        score([], [])


def test_decode_settings_validate_and_sign():
    assert DecodeSettings().signature().startswith("beam:6|lp:1.0|maxlen:256|early:yes")
    assert DecodeSettings(beam=1).signature() != DecodeSettings(beam=2).signature()
    for bad in ({"beam": 0}, {"max_length": 0}, {"length_penalty": float("nan")}, {"beam": 2.5}):
        with pytest.raises(ValueError):
            DecodeSettings(**bad)


# --- translate --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beam", [1, 4])
def test_batched_translation_equals_one_by_one(random_model, small_tokenizer, multi30k_test, beam):
    sources = multi30k_test[0][:20]
    batched = translate(random_model, small_tokenizer, sources, beam=beam, max_length=12, batch_size=6)
    alone = [translate(random_model, small_tokenizer, [s], beam=beam, max_length=12)[0] for s in sources]
    assert batched == alone
    assert len(set(batched)) > 3  # the sources matter: a real test of order, not 20 copies of one string


def test_translate_keeps_input_order(random_model, small_tokenizer, multi30k_test):
    sources = multi30k_test[0][:16]
    forward = translate(random_model, small_tokenizer, sources, beam=2, max_length=10, batch_size=5)
    backward = translate(random_model, small_tokenizer, sources[::-1], beam=2, max_length=10, batch_size=3)
    assert backward == forward[::-1]


def test_translate_empty_sources_and_mode(random_model, small_tokenizer):
    random_model.train()
    out = translate(random_model, small_tokenizer, ["", "Ein Hund.", "   "], beam=2, max_length=8)
    assert out[0] == "" and out[2] == "" and out[1] != ""
    assert random_model.training  # restored after decoding in eval mode
    assert translate(random_model, small_tokenizer, [], beam=2) == []
    with pytest.raises(ValueError, match="batch_size"):
        translate(random_model, small_tokenizer, ["x"], batch_size=0)


def test_translate_ignores_the_models_generation_config(random_model, small_tokenizer, multi30k_test):
    sources = multi30k_test[0][:6]
    want = translate(random_model, small_tokenizer, sources, beam=3, max_length=10)
    saved = random_model.generation_config
    changed = saved.__class__.from_dict({**saved.to_dict(), "no_repeat_ngram_size": 1, "num_beams": 1})
    random_model.generation_config = changed
    try:
        assert translate(random_model, small_tokenizer, sources, beam=3, max_length=10) == want
        assert random_model.generation_config is changed
    finally:
        random_model.generation_config = saved


def test_max_length_is_capped_by_positions(random_model, small_tokenizer):
    # 10_000 > max_position_embeddings: capped instead of an index error in the positional table
    out = translate(random_model, small_tokenizer, ["Ein Mann."], beam=1, max_length=10_000)
    assert isinstance(out[0], str)


# --- checkpoints and evaluate -----------------------------------------------------------------------------------------
def test_resolve_source(checkpoint, tmp_path):
    run = checkpoint.parent.parent
    assert resolve_source(run) == checkpoint
    assert resolve_source(checkpoint) == checkpoint
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        resolve_source(tmp_path / "nothing")
    (tmp_path / "run" / "checkpoints" / "last").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last" / "training_state.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no best checkpoint.*checkpoints/last exists"):
        resolve_source(tmp_path / "run")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoints/best"):
        resolve_source(tmp_path / "plain")


def test_evaluate_files_mode_writes_hypotheses_and_scores(checkpoint, random_model, small_tokenizer, multi30k_test,
                                                          tmp_path):
    de, en = multi30k_test
    src, ref = tmp_path / "part.de", tmp_path / "part.en"
    src.write_text("\n".join(de[:15]) + "\n", encoding="utf-8")
    ref.write_text("\n".join(en[:15]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = evaluate(checkpoint, src_file=src, ref_file=ref, beam=2, max_length=10, batch_size=4, out_dir=out)
    hyps = (out / "hyp.part.en").read_text(encoding="utf-8").split("\n")[:-1]
    assert hyps == translate(random_model, small_tokenizer, de[:15], beam=2, max_length=10)
    saved = json.loads((out / "scores.part.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(result))
    assert result["sentences"] == 15 and result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [en[:15]]).score)
    assert result["decode_signature"].startswith("beam:2|lp:1.0|maxlen:10|")
    assert result["sentences_per_s"] > 0 and result["time_s"] > 0
    assert result["checkpoint"] == str(checkpoint)


def test_evaluate_corpus_mode_default_languages_and_out_dir(checkpoint, multi30k_test, tmp_path):
    corpus = tmp_path / "mini-de-en"
    corpus.mkdir()
    de, en = multi30k_test
    (corpus / "test2016.de").write_text("\n".join(de[:8]) + "\n", encoding="utf-8")
    (corpus / "test2016.en").write_text("\n".join(en[:8]) + "\n", encoding="utf-8")
    result = evaluate(checkpoint.parent.parent, corpus=corpus, split="test2016", beam=1, max_length=8)
    out = checkpoint.parent.parent / "eval" / "best"  # default: RUN/eval/CHECKPOINT_NAME
    assert (out / "hyp.test2016.en").is_file() and (out / "scores.test2016.json").is_file()
    assert (result["src_lang"], result["tgt_lang"], result["sentences"]) == ("de", "en", 8)


def test_evaluate_line_count_mismatch_names_files_and_counts(checkpoint, tmp_path):
    src, ref = tmp_path / "a.de", tmp_path / "a.en"
    src.write_text("eins\nzwei\ndrei\n", encoding="utf-8")
    ref.write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{src} has 3 lines but reference file {ref} has 2 lines"):
        evaluate(checkpoint, src_file=src, ref_file=ref, out_dir=tmp_path / "o")


# --- CLIs -------------------------------------------------------------------------------------------------------------
def test_evaluate_cli(checkpoint, multi30k_test, tmp_path, capsys):
    from ktransfer.cli import main

    de, en = multi30k_test
    (tmp_path / "t.de").write_text("\n".join(de[:5]) + "\n", encoding="utf-8")
    (tmp_path / "t.en").write_text("\n".join(en[:5]) + "\n", encoding="utf-8")
    argv = ["evaluate", str(checkpoint), "--src", str(tmp_path / "t.de"), "--ref", str(tmp_path / "t.en"),
            "--beam", "2", "--max-length", "8", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "BLEU = " in printed and "nrefs:1|case:mixed" in printed and "beam:2|" in printed
    assert (tmp_path / "o" / "scores.t.json").is_file()

    assert main(["evaluate", str(tmp_path / "missing"), "--src", "x", "--ref", "y"]) == 2
    assert f"no such model folder: {tmp_path / 'missing'}" in capsys.readouterr().err


def test_translate_cli_stdin_to_stdout(checkpoint, random_model, small_tokenizer, multi30k_test):
    lines = [*multi30k_test[0][:6], "", "Ein Hund läuft.", ""]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "ktransfer", "translate", str(checkpoint), "--beam", "2", "--max-length", "8",
         "--batch-size", "3"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, encoding="utf-8", env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)  # one line out per line in
    assert out[:-1] == translate(random_model, small_tokenizer, lines, beam=2, max_length=8)
    assert out[6] == "" and out[8] == ""
