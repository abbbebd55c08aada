"""Joint BPE: special ids, exact round trip on real de/en/th sentences, unknown characters, JSON round trip."""

from __future__ import annotations

import unicodedata

import pytest
import torch

from ktransfer.models.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


def _lines(path, n):
    return path.read_text(encoding="utf-8").split("\n")[:n]


def _expected(text: str) -> str:
    """What decode(encode(text)) must give: NFKC, whitespace runs collapsed, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


@pytest.fixture(scope="module")
def thai_tokenizer(shared_data):
    folder = shared_data / "th-en-lowres"
    return train_tokenizer(_lines(folder / "train.th", 1500) + _lines(folder / "train.en", 1500), vocab_size=3000)


def test_special_ids_and_vocab_size(small_tokenizer):
    tok = small_tokenizer
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert [tok.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert tok.vocab_size == len(tok) == 2000


@pytest.mark.parametrize("lang", ["de", "en"])
def test_round_trip_multi30k(small_tokenizer, shared_data, lang):
    lines = _lines(shared_data / "multi30k-de-en" / f"train.{lang}", 3000)
    ids = small_tokenizer.encode_batch(lines)
    assert all(small_tokenizer.unk_id not in row for row in ids)  # every character was seen in training
    assert small_tokenizer.decode_batch(ids) == [_expected(s) for s in lines]
    assert small_tokenizer.decode(small_tokenizer.encode(lines[0])) == _expected(lines[0])
    # sub-words, not characters: the vocabulary compresses the text
    assert sum(map(len, ids)) < 0.4 * sum(map(len, lines))


def test_round_trip_thai_without_spaces(thai_tokenizer, shared_data):
    lines = _lines(shared_data / "th-en-lowres" / "train.th", 1500)
    thai = [s for s in lines if any("\u0e00" <= c <= "\u0e7f" for c in s)]
    assert len(thai) > 1000
    ids = thai_tokenizer.encode_batch(thai)
    assert thai_tokenizer.decode_batch(ids) == [_expected(s) for s in thai]
    # a Thai run without spaces is split into several sub-words, and no piece crosses a space
    word = max(thai[0].split(), key=len)
    assert len(thai_tokenizer.encode(word)) > 1


def test_normalisation_nfkc_and_whitespace(small_tokenizer):
    text = "  Ein\tMann\u00a0 mit  \ufb01sch\u3000Hut. \n"
    assert small_tokenizer.normalize(text) == "Ein Mann mit fisch Hut."
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == "Ein Mann mit fisch Hut."
    assert small_tokenizer.encode("") == [] and small_tokenizer.encode("   ") == []


def test_unknown_characters_become_unk(small_tokenizer):
    ids = small_tokenizer.encode("Ein Hund \u2603 läuft")  # a snowman never occurs in multi30k
    assert small_tokenizer.unk_id in ids
    assert small_tokenizer.decode(ids) == "Ein Hund läuft"  # unk is a special id: skipped when decoding


def test_special_tokens_in_text_stay_special(small_tokenizer):
    """A tokenizer's own special tokens typed in the text are its special ids (as a chat template needs)."""
    ids = small_tokenizer.encode("ein </s> <pad> Hund")
    assert small_tokenizer.eos_id in ids and small_tokenizer.pad_id in ids
    assert small_tokenizer.decode(ids) == "ein Hund"


def test_decode_skips_special_and_ignored_ids(small_tokenizer):
    tok = small_tokenizer
    a, b = tok.encode("Ein Hund rennt."), tok.encode("Zwei Katzen")
    assert tok.decode([*a, tok.eos_id, tok.pad_id, -100]) == "Ein Hund rennt."
    width = max(len(a), len(b)) + 1
    batch = torch.full((2, width), tok.pad_id)
    batch[0, : len(a)] = torch.tensor(a)
    batch[1, : len(b)] = torch.tensor(b)
    batch[:, -1] = tok.eos_id
    assert tok.decode_batch(batch) == ["Ein Hund rennt.", "Zwei Katzen"]
    assert tok.decode(torch.tensor(a)) == "Ein Hund rennt."


def test_save_load_as_file_and_as_hugging_face_folder(small_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    text = "Eine Frau mit einem roten Hut sitzt auf einer Bank."
    path = tmp_path / "run" / "tokenizer.json"
    small_tokenizer.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left
    for loaded in (Tokenizer.load(path), load_tokenizer(path)):
        assert loaded.decode(loaded.encode(text)) == text
        assert loaded.fingerprint() == small_tokenizer.fingerprint()
        assert (loaded.pad_id, loaded.eos_id, loaded.unk_id) == (0, 1, 2)
    small_tokenizer.save(tmp_path / "folder")
    hf = AutoTokenizer.from_pretrained(tmp_path / "folder")  # what any transformers user does
    assert hf(text, add_special_tokens=False)["input_ids"] == small_tokenizer.encode(text)
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
    assert load_tokenizer(tmp_path / "folder").fingerprint() == small_tokenizer.fingerprint()


def test_bad_file_and_folder(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a valid tokenizer file"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


def test_train_arguments_checked():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], vocab_size=3)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(["a b"], min_frequency=0)


def test_training_is_deterministic():
    texts = ["ein kleiner Hund", "ein großer Hund", "zwei kleine Katzen", "a small dog", "two small cats"] * 20
    assert train_tokenizer(texts, vocab_size=60).fingerprint() == train_tokenizer(texts, vocab_size=60).fingerprint()
