"""Corpora: resolving, strict reading, check, encoding, token batching, collation, downloading (local server)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import tarfile
import threading
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktransfer.cli import main
from ktransfer.data import batching, corpora, download
from ktransfer.data.batching import TokenBatchSampler, collate
from ktransfer.data.corpora import CorpusError
from ktransfer.data.download import DownloadError


def _write_split(folder, split, src_lines, tgt_lines, src="de", tgt="en"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.{src}").write_text("".join(f"{s}\n" for s in src_lines), encoding="utf-8")
    (folder / f"{split}.{tgt}").write_text("".join(f"{t}\n" for t in tgt_lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# Resolving and reading
# --------------------------------------------------------------------------------------------------------------
def test_resolve_by_name_and_path(shared_data):
    assert corpora.resolve_corpus("multi30k-de-en") == shared_data / "multi30k-de-en"
    assert corpora.resolve_corpus(shared_data / "th-en-lowres") == shared_data / "th-en-lowres"
    assert "multi30k-de-en" in corpora.list_corpora()
    assert corpora.language_pair("multi30k-de-en") == ("de", "en")
    assert corpora.language_pair("th-en-lowres") == ("th", "en")


def test_resolve_not_found_says_where_and_what_exists(shared_data):
    with pytest.raises(CorpusError) as e:
        corpora.resolve_corpus("no-such-corpus")
    message = str(e.value)
    assert str(shared_data / "no-such-corpus") in message and "multi30k-de-en" in message


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("KTRANSFER_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert corpora.data_dir() == tmp_path / ".cache" / "ktransfer" / "data"


def test_read_multi30k():
    train = corpora.read_split("multi30k-de-en", "train", "de", "en")
    assert len(train) == 29000
    assert train[0] == ("Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
                        "Two young, White males are outside near many bushes.")
    assert len(corpora.read_split("multi30k-de-en", "test2016", "de", "en")) == 1000


def test_mismatched_line_counts(tmp_path):
    _write_split(tmp_path, "train", ["a", "b", "c"], ["x", "y"])
    with pytest.raises(CorpusError) as e:
        corpora.read_split(tmp_path, "train", "de", "en")
    message = str(e.value)
    assert f"{tmp_path / 'train.de'} has 3 lines" in message and f"{tmp_path / 'train.en'} has 2 lines" in message
    assert f"{tmp_path / 'train.de'}:3" in message


def test_invalid_utf8_names_file_line_and_offset(tmp_path):
    _write_split(tmp_path, "train", ["eins", "zwei", "drei"], ["one", "two", "three"])
    (tmp_path / "train.en").write_bytes(b"one\ntwo\nth\xffree\n")
    with pytest.raises(CorpusError) as e:
        corpora.read_split(tmp_path, "train", "de", "en")
    message = str(e.value)
    assert f"{tmp_path / 'train.en'}:3:" in message and "byte offset 10" in message and "0xff" in message


def test_missing_side_and_empty_split(tmp_path):
    _write_split(tmp_path, "train", ["a"], ["b"])
    (tmp_path / "train.en").unlink()
    with pytest.raises(CorpusError, match=r"train\.en: no such file"):
        corpora.read_split(tmp_path, "train", "de", "en")
    _write_split(tmp_path, "valid", [], [])
    with pytest.raises(CorpusError, match="'valid' is empty"):
        corpora.read_split(tmp_path, "valid", "de", "en")


def test_lines_split_on_newline_only(tmp_path):
    # U+2028 and \r inside a line must not shift the alignment; a missing final newline is fine
    (tmp_path / "t.de").write_bytes("a\u2028b\r\nc".encode())
    (tmp_path / "t.en").write_bytes(b"x\ny\n")
    assert corpora.read_split(tmp_path, "t", "de", "en") == [("a\u2028b", "x"), ("c", "y")]


# --------------------------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------------------------
def test_cli_check_multi30k(capsys):
    assert main(["data", "check", "multi30k-de-en"]) == 0
    out = capsys.readouterr().out
    train_row = next(line for line in out.splitlines() if line.startswith("train "))
    assert "29000" in train_row
    assert "valid" in out and "1014" in out and "test2016" in out and "dup" in out


def test_check_reports_empty_duplicate_and_bad_splits(tmp_path, capsys):
    corpus = tmp_path / "toy-de-en"
    _write_split(corpus, "train", ["ein Hund", "", "ein Hund", "zwei Katzen"], ["a dog", "x", "a dog", "two cats"])
    _write_split(corpus, "valid", ["a", "b"], ["c"])
    _, src, tgt, stats, errors = corpora.check_corpus(corpus)
    assert (src, tgt) == ("de", "en")
    (train,) = stats
    assert (train.pairs, train.empty_pairs, train.duplicate_pairs, train.src_tokens_max) == (4, 1, 1, 2)
    assert "valid" in errors and "has 2 lines" in errors["valid"]
    assert main(["data", "check", str(corpus)]) == 1
    out = capsys.readouterr().out
    assert "valid: ERROR" in out


# --------------------------------------------------------------------------------------------------------------
# encode_pairs
# --------------------------------------------------------------------------------------------------------------
def test_encode_pairs_appends_eos_and_reports_drops(small_tokenizer):
    pairs = [("Ein Hund.", "A dog."), ("", "Empty source"), ("Zwei Hunde " * 30, "Two dogs"), ("Ja", "Yes")]
    logged = []
    src, tgt = batching.encode_pairs(pairs, small_tokenizer, max_length=20, log=logged.append)
    assert len(src) == len(tgt) == 2
    assert all(row[-1] == small_tokenizer.eos_id for row in src + tgt)
    assert src[0][:-1] == small_tokenizer.encode("Ein Hund.")
    assert len(logged) == 1 and "kept 2 of 4" in logged[0] and "1 with an empty side" in logged[0]
    assert "1 longer than 20" in logged[0]
    logged.clear()
    batching.encode_pairs(pairs[:1], small_tokenizer, max_length=None, log=logged.append)
    assert logged == []


# --------------------------------------------------------------------------------------------------------------
# Token batching
# --------------------------------------------------------------------------------------------------------------
def _cost(batch, src, tgt):
    return max(len(batch) * max(src[i] for i in batch), len(batch) * max(tgt[i] for i in batch))


lengths = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=300)


@settings(max_examples=60, deadline=None)
@given(lengths, st.integers(1, 400), st.integers(0, 2**31), st.integers(0, 5), st.integers(1, 50))
def test_batches_cover_each_example_once_within_budget(pairs, max_tokens, seed, epoch, chunk):
    src, tgt = [s for s, _ in pairs], [t for _, t in pairs]
    sampler = TokenBatchSampler(src, tgt, max_tokens, seed=seed, chunk_size=chunk)
    batches = sampler.epoch_batches(epoch)
    assert sorted(i for b in batches for i in b) == list(range(len(pairs)))
    for b in batches:
        assert b and (_cost(b, src, tgt) <= max_tokens or len(b) == 1)  # an over-long example travels alone
    again = TokenBatchSampler(src, tgt, max_tokens, seed=seed, chunk_size=chunk)
    assert again.epoch_batches(epoch) == batches
    plain = TokenBatchSampler(src, tgt, max_tokens, shuffle=False).epoch_batches(epoch)
    assert sorted(i for b in plain for i in b) == list(range(len(pairs)))


def test_epochs_differ_and_batches_are_length_bucketed():
    import numpy as np

    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 80, 5000), rng.integers(1, 80, 5000)
    sampler = TokenBatchSampler(src, tgt, max_tokens=1024, seed=1)
    e0, e1 = sampler.epoch_batches(0), sampler.epoch_batches(1)
    assert e0 != e1 and sampler.epoch_batches(0) == e0
    assert TokenBatchSampler(src, tgt, max_tokens=1024, seed=2).epoch_batches(0) != e0
    padded = sum(_cost(b, src, tgt) for b in e0)
    assert padded < 1.25 * max(src.sum(), tgt.sum()) * 2  # little padding: similar lengths share a batch
    sampler.set_epoch(1)
    assert list(sampler) == e1 and len(sampler) == len(e1)


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="3 source lengths but 2"):
        TokenBatchSampler([1, 2, 3], [1, 2], 10)
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBatchSampler([1], [1], 0)
    with pytest.raises(ValueError, match=">= 1"):
        TokenBatchSampler([0], [1], 10)


# --------------------------------------------------------------------------------------------------------------
# collate
# --------------------------------------------------------------------------------------------------------------
def test_collate_shapes_padding_and_shift():
    src = [[5, 6, 7, 1], [8, 1]]
    tgt = [[9, 1], [10, 11, 12, 1]]
    batch = collate(src, tgt, pad_id=0, decoder_start_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [8, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[9, 1, -100, -100], [10, 11, 12, 1]]
    assert batch["decoder_input_ids"].tolist() == [[0, 9, 0, 0], [0, 10, 11, 12]]
    assert all(t.dtype.is_floating_point is False and t.dtype.itemsize == 8 for t in batch.values())
    shifted = collate([[3, 1]], [[4, 5, 1]], pad_id=7, decoder_start_id=2)
    assert shifted["decoder_input_ids"].tolist() == [[2, 4, 5]]
    with pytest.raises(ValueError, match="row 0 is empty"):
        collate([[1]], [[]], pad_id=0, decoder_start_id=0)


# --------------------------------------------------------------------------------------------------------------
# Downloading, against a server on 127.0.0.1
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves the folder ``tmp_path / 'served'`` at the returned base URL."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _serve_multi30k(served):
    checksums = {}
    for stem, n in (("train", 5), ("val", 2), ("test_2016_flickr", 3)):
        for lang in ("de", "en"):
            body = gzip.compress("".join(f"{stem} {lang} Satz {i}\n" for i in range(n)).encode(), mtime=0)
            (served / f"{stem}.{lang}.gz").write_bytes(body)
            checksums[f"{stem}.{lang}.gz"] = hashlib.sha256(body).hexdigest()
    return checksums


def test_download_multi30k_from_mirror(server, tmp_path):
    served, url = server
    checksums = _serve_multi30k(served)
    dest = tmp_path / "data"
    folder = download.download_corpus("multi30k", dest, base_url=url, checksums=checksums, log=lambda m: None)
    assert folder == dest / "multi30k-de-en"
    assert sorted(p.name for p in dest.iterdir()) == ["multi30k-de-en"]  # no temporary folder left
    assert corpora.read_split(folder, "train", "de", "en")[4] == ("train de Satz 4", "train en Satz 4")
    assert len(corpora.read_split(folder, "valid", "de", "en")) == 2
    assert len(corpora.read_split(folder, "test2016", "de", "en")) == 3
    with pytest.raises(DownloadError, match="already exist"):
        download.download_corpus("multi30k", dest, base_url=url, checksums=checksums, log=lambda m: None)


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    served, url = server
    checksums = _serve_multi30k(served)
    checksums["val.en.gz"] = hashlib.md5(b"something else").hexdigest()
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"checksum mismatch for .*val\.en\.gz: md5 is"):
        download.download_corpus("multi30k", dest, base_url=url, checksums=checksums, log=lambda m: None)
    assert list(dest.iterdir()) == []


def test_download_builtin_checksums_reject_other_files(server, tmp_path):
    served, url = server
    _serve_multi30k(served)  # not the real files: the built-in MD5 table must refuse them
    dest = tmp_path / "data"
    assert main(["data", "download", "multi30k", "--dest", str(dest), "--base-url", url]) == 1
    assert list(dest.iterdir()) == []


def test_download_sacrebleu_test_set(server, tmp_path, capsys):
    served, url = server
    sgm = {
        "test/newstest2016-deen-src.de.sgm": ["Ein Satz.", "Noch  ein Satz."],
        "test/newstest2016-deen-ref.en.sgm": ["A sentence.", "Another sentence."],
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, segs in sgm.items():
            body = '<srcset setid="newstest2016">\n<doc sysid="ref" docid="d1" genre="news" origlang="de">\n'
            body += "".join(f'<seg id="{i + 1}">{s}</seg>\n' for i, s in enumerate(segs)) + "</doc>\n</srcset>\n"
            info = tarfile.TarInfo(name)
            info.size = len(body.encode())
            tar.addfile(info, io.BytesIO(body.encode()))
    (served / "test.tgz").write_bytes(buffer.getvalue())
    md5 = hashlib.md5(buffer.getvalue()).hexdigest()
    dest = tmp_path / "data"
    args = ["data", "download", "wmt16:de-en", "--dest", str(dest), "--base-url", url, "--checksum", f"test.tgz={md5}"]
    assert main(args) == 0
    assert corpora.read_split(dest / "wmt16-de-en", "test", "de", "en") == [
        ("Ein Satz.", "A sentence."), ("Noch ein Satz.", "Another sentence.")]
    # add it as a split of another, existing corpus
    _write_split(dest / "news-de-en", "train", ["x"], ["y"])
    assert main([*args, "--corpus", "news-de-en", "--split", "valid"]) == 0
    assert corpora.corpus_layout(dest / "news-de-en") == {"train": ["de", "en"], "valid": ["de", "en"]}
    assert sorted(p.name for p in dest.iterdir()) == ["news-de-en", "wmt16-de-en"]
    capsys.readouterr()
    assert main([*args, "--corpus", "news-de-en", "--split", "valid"]) == 1  # present: needs --force
    assert "already exist" in capsys.readouterr().err


def test_download_unknown_names():
    with pytest.raises(DownloadError, match="unknown corpus"):
        download.download_corpus("europarl")
    with pytest.raises(DownloadError, match="no pair 'de-xx'"):
        download.download_corpus("wmt16:de-xx")
    with pytest.raises(DownloadError, match="no test set 'wmt99'"):
        download.download_corpus("wmt99:de-en")


# --------------------------------------------------------------------------------------------------------------
# A corpus missing from $KTRANSFER_DATA is downloaded on first use (``download.ensure_corpus``)
# --------------------------------------------------------------------------------------------------------------
def _mirror_of_shared(served, shared_data, lines=(300, 40, 40)):
    """Gzipped Multi30k files (the first lines of each split of the shared copy) in ``served``; their SHA-256."""
    checksums, source = {}, shared_data / "multi30k-de-en"
    for (split, stem), n in zip(download.MULTI30K_SPLITS.items(), lines, strict=True):
        for lang in ("de", "en"):
            text = "".join(line + "\n" for line in (source / f"{split}.{lang}").read_text(
                encoding="utf-8").splitlines()[:n])
            body = gzip.compress(text.encode("utf-8"), mtime=0)
            (served / f"{stem}.{lang}.gz").write_bytes(body)
            checksums[f"{stem}.{lang}.gz"] = hashlib.sha256(body).hexdigest()
    return checksums


def test_missing_corpus_is_downloaded_on_first_use(server, shared_data, tmp_path, monkeypatch, capsys):
    """A name that ``ktransfer data download`` knows, missing from $KTRANSFER_DATA: fetched (checksums verified) by
    the first command that needs it, one line says where; the reproduce run then trains on it."""
    served, url = server
    checksums = _mirror_of_shared(served, shared_data)
    monkeypatch.setattr(download, "MULTI30K_URL", url)  # the canonical URL, here a mirror on 127.0.0.1
    monkeypatch.setattr(download, "MULTI30K_MD5", checksums)
    data = tmp_path / "fresh" / "data"  # does not exist yet
    monkeypatch.setenv("KTRANSFER_DATA", str(data))
    run = tmp_path / "run"
    assert main(["reproduce", "quick", "--out", str(run), "data.vocab_size=300", "stop_after=bpe"]) == 0
    err = capsys.readouterr().err
    folder = data / "multi30k-de-en"
    assert f"downloaded corpus multi30k-de-en (checksums verified) into {folder}" in err
    assert sorted(p.name for p in data.iterdir()) == ["multi30k-de-en"]  # no temporary folder left
    for split, n in (("train", 300), ("valid", 40), ("test2016", 40)):
        got = corpora.read_split(folder, split, "de", "en")
        assert got == corpora.read_split(shared_data / "multi30k-de-en", split, "de", "en")[:n]
    assert (run / "tokenizer.json").is_file() and json.loads((run / "stages.json").read_text())["bpe"]["done"]
    for f in served.iterdir():  # present now: a second use downloads nothing
        f.unlink()
    assert download.ensure_corpus("multi30k-de-en") == folder
    assert "downloaded" not in capsys.readouterr().err


def test_missing_corpus_without_network_is_one_line(tmp_path, monkeypatch, capsys):
    """No network (a closed port on 127.0.0.1 as the canonical URL): one line naming the folder to fill and the
    command that fills it from a mirror, rc != 0, and nothing written (no data folder, no run folder)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(download, "MULTI30K_URL", f"http://127.0.0.1:{port}/multi30k")
    data = tmp_path / "fresh" / "data"
    monkeypatch.setenv("KTRANSFER_DATA", str(data))
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["reproduce", "quick", "--out", str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"corpus 'multi30k-de-en' is not in {data}" in lines[0] and "could not be downloaded" in lines[0]
    assert "`ktransfer data download multi30k-de-en --base-url MIRROR`" in lines[0]
    assert not (tmp_path / "fresh").exists() and not run.exists()
    with pytest.raises(CorpusError, match="could not be downloaded"):  # the API, for train's data.corpus too
        download.ensure_corpus("multi30k-de-en")
    with pytest.raises(CorpusError, match="not found"):  # a name no download knows: resolve_corpus's message
        download.ensure_corpus("no-such-corpus")
    assert not (tmp_path / "fresh").exists()


def test_ensure_corpus_with_a_file_mirror(shared_data, tmp_path, monkeypatch):
    """A file:// folder as the mirror, with its checksums given: the API ``train`` and ``reproduce`` use."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    checksums = _mirror_of_shared(mirror, shared_data, lines=(50, 5, 5))
    monkeypatch.setenv("KTRANSFER_DATA", str(tmp_path / "data"))
    logged = []
    folder = download.ensure_corpus("multi30k-de-en", base_url=mirror.as_uri(), checksums=checksums,
                                    log=logged.append)
    assert folder == tmp_path / "data" / "multi30k-de-en" and logged == [
        f"downloaded corpus multi30k-de-en (checksums verified) into {folder}"]
    assert corpora.read_split(folder, "train", "de", "en") == corpora.read_split(
        shared_data / "multi30k-de-en", "train", "de", "en")[:50]
    checksums["train.en.gz"] = "0" * 64
    monkeypatch.setenv("KTRANSFER_DATA", str(tmp_path / "other"))
    with pytest.raises(CorpusError, match="checksum mismatch"):
        download.ensure_corpus("multi30k-de-en", base_url=mirror.as_uri(), checksums=checksums)
    assert not (tmp_path / "other").exists()
