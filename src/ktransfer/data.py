"""Parallel corpora on disk: resolve, read and validate, download, check, encode, batch by tokens, collate.

A corpus is a folder of line-aligned ``SPLIT.LANG`` files (``train.de``, ``train.en``, ``valid.de``, ...). A corpus
name resolves under ``$KTRANSFER_DATA`` (default ``~/.cache/ktransfer/data``); a path works wherever a name does.

Reading is strict: sides with different line counts, invalid UTF-8, a missing side or an empty split raise
``CorpusError`` naming the file, the line and the problem. Downloads are written into a temporary folder beside the
destination and renamed into place only once every checksum and every file has been verified.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import itertools
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_ENV = "KTRANSFER_DATA"
DEFAULT_DATA_DIR = "~/.cache/ktransfer/data"
IGNORE_INDEX = -100  # label value ignored by the loss (PyTorch's cross_entropy default)


class CorpusError(ValueError):
    """A corpus is missing or malformed; the message names the file, the line (1-based) and the problem."""


class DownloadError(RuntimeError):
    """A download failed (network, checksum, archive); nothing was left behind."""


# --------------------------------------------------------------------------------------------------------------
# Locating corpora
# --------------------------------------------------------------------------------------------------------------
def data_dir() -> Path:
    """The folder corpus names resolve in: ``$KTRANSFER_DATA``, else ``~/.cache/ktransfer/data``."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR).expanduser()


def list_corpora(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the corpus folders under ``root`` (default ``data_dir()``): folders holding ``SPLIT.LANG`` files."""
    root = Path(root) if root is not None else data_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and corpus_layout(p))


def resolve_corpus(name_or_path: str | os.PathLike) -> Path:
    """The folder of a corpus given by name (under ``data_dir()``) or by path.

    A bare name (no path separator) is looked up under ``data_dir()`` first, then relative to the working folder.

    Raises:
        CorpusError: not found; the message says where it looked and which corpora exist there.
    """
    p = Path(name_or_path).expanduser()
    root = data_dir()
    looked = []
    if not p.is_absolute() and len(p.parts) == 1:
        if (root / p).is_dir():
            return root / p
        looked.append(root / p)
    if p.is_dir():
        return p
    looked.append(p.resolve())
    known = list_corpora(root)
    where = " and ".join(str(x) for x in dict.fromkeys(looked))
    there = ", ".join(known) if known else "none"
    raise CorpusError(
        f"corpus {str(name_or_path)!r} not found: looked for a folder at {where}. "
        f"Corpora in {root} (${DATA_ENV}): {there}. Set ${DATA_ENV}, pass a path, or run `ktransfer data download`."
    )


def corpus_layout(corpus: str | os.PathLike) -> dict[str, list[str]]:
    """``{split: [languages]}`` of the ``SPLIT.LANG`` files in a corpus folder (a path, not resolved by name)."""
    layout: dict[str, list[str]] = {}
    for f in sorted(Path(corpus).iterdir()):
        if f.is_file() and not f.name.startswith(".") and "." in f.name:
            split, lang = f.name.rsplit(".", 1)
            if split and 1 <= len(lang) <= 8 and lang.replace("_", "").replace("-", "").isalpha():
                layout.setdefault(split, []).append(lang)
    return layout


def _split_order(split: str) -> tuple[int, str]:
    rank = 0 if split.startswith("train") else 1 if split.startswith(("valid", "dev", "val")) else 2
    return rank, split


def describe_layout(folder: Path) -> str:
    layout = corpus_layout(folder)
    if not layout:
        return "no SPLIT.LANG files"
    return ", ".join(f"{s}.{{{','.join(ls)}}}" for s, ls in sorted(layout.items(), key=lambda kv: _split_order(kv[0])))


def language_pair(corpus: str | os.PathLike) -> tuple[str, str]:
    """The (source, target) languages of a corpus: from ``SRC-TGT`` in its name (``multi30k-de-en``,
    ``th-en-lowres``), else its only two languages in alphabetical order.

    Raises:
        CorpusError: the pair cannot be told; pass the languages explicitly.
    """
    folder = resolve_corpus(corpus)
    langs = sorted({lang for ls in corpus_layout(folder).values() for lang in ls})
    parts = folder.name.split("-")
    for a, b in itertools.pairwise(parts):
        if a in langs and b in langs and a != b:
            return a, b
    if len(langs) == 2:
        return langs[0], langs[1]
    raise CorpusError(f"{folder}: cannot tell the language pair from languages {langs}; name the source and target")


# --------------------------------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------------------------------
def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file, split on ``\\n`` only, each stripped of surrounding whitespace.

    Raises:
        CorpusError: the file is missing or not valid UTF-8 (names the line and byte offset).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CorpusError(f"{path}: is a folder, not a text file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise CorpusError(
            f"{path}:{line}: invalid UTF-8 at byte offset {e.start} of the file (byte {column} of line {line}): "
            f"{e.reason} (byte 0x{data[e.start]:02x})"
        ) from None
    if not text:
        return []
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return [line.strip() for line in lines]


def split_files(corpus: str | os.PathLike, split: str, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    """Paths of the two sides of ``split`` (not checked)."""
    folder = resolve_corpus(corpus)
    return folder / f"{split}.{src_lang}", folder / f"{split}.{tgt_lang}"


def read_split(corpus: str | os.PathLike, split: str, src_lang: str, tgt_lang: str) -> list[tuple[str, str]]:
    """The ``(source, target)`` pairs of one split, validated; pairs with an empty side are kept (see encode_pairs).

    Raises:
        CorpusError: a side is missing, a file is not valid UTF-8, the sides differ in line count, or the split is
            empty. The message names the file(s), the line and the problem.
    """
    src_path, tgt_path = split_files(corpus, split, src_lang, tgt_lang)
    for path in (src_path, tgt_path):
        if path.is_dir():
            raise CorpusError(f"{path}: is a folder, not a text file (split {split!r} needs a file there)")
        if not path.is_file():
            raise CorpusError(
                f"{path}: no such file: split {split!r} of corpus {path.parent} lacks its {path.suffix[1:]!r} side "
                f"(files there: {describe_layout(path.parent)})"
            )
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        longer = src_path if len(src) > len(tgt) else tgt_path
        raise CorpusError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)} lines: the sides of split {split!r} must "
            f"be line-aligned (first line without a partner: {longer}:{min(len(src), len(tgt)) + 1})"
        )
    if not src:
        raise CorpusError(f"{src_path} and {tgt_path}: split {split!r} is empty (0 lines)")
    return list(zip(src, tgt, strict=True))


def require_nonempty_pairs(pairs: Sequence[tuple[str, str]], corpus, split: str, src_lang: str,
                           tgt_lang: str) -> None:
    """Raise CorpusError when no pair of ``split`` has both sides non-empty (e.g. every target line is empty)."""
    if pairs and not any(s and t for s, t in pairs):
        src_path, tgt_path = split_files(corpus, split, src_lang, tgt_lang)
        empty = [str(p) for p, side in ((src_path, 0), (tgt_path, 1)) if not any(pair[side] for pair in pairs)]
        detail = f"{' and '.join(empty)}: only empty lines" if empty else "each pair has one side empty"
        raise CorpusError(f"split {split!r}: every pair has an empty side ({detail}; {len(pairs)} pairs read): "
                          "nothing to train on")


# --------------------------------------------------------------------------------------------------------------
# Checking: statistics per split
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SplitStats:
    """What ``check`` reports for one split. Tokens are whitespace-separated words; ratio = source / target chars."""

    split: str
    pairs: int
    src_tokens_mean: float
    src_tokens_max: int
    tgt_tokens_mean: float
    tgt_tokens_max: int
    src_chars_mean: float
    src_chars_max: int
    tgt_chars_mean: float
    tgt_chars_max: int
    empty_pairs: int  # pairs with at least one empty side
    duplicate_pairs: int  # pairs equal to an earlier pair of the same split
    ratio_mean: float  # over pairs with both sides non-empty
    ratio_p1: float
    ratio_p99: float


def split_stats(split: str, pairs: Sequence[tuple[str, str]]) -> SplitStats:
    """Length, emptiness, duplication and length-ratio statistics of ``pairs``."""
    st = np.array([len(s.split()) for s, _ in pairs])
    tt = np.array([len(t.split()) for _, t in pairs])
    sc = np.array([len(s) for s, _ in pairs])
    tc = np.array([len(t) for _, t in pairs])
    both = (sc > 0) & (tc > 0)
    ratio = sc[both] / tc[both] if both.any() else np.array([np.nan])
    return SplitStats(
        split=split, pairs=len(pairs),
        src_tokens_mean=float(st.mean()), src_tokens_max=int(st.max()),
        tgt_tokens_mean=float(tt.mean()), tgt_tokens_max=int(tt.max()),
        src_chars_mean=float(sc.mean()), src_chars_max=int(sc.max()),
        tgt_chars_mean=float(tc.mean()), tgt_chars_max=int(tc.max()),
        empty_pairs=int((~both).sum()), duplicate_pairs=len(pairs) - len(set(pairs)),
        ratio_mean=float(ratio.mean()), ratio_p1=float(np.percentile(ratio, 1)),
        ratio_p99=float(np.percentile(ratio, 99)),
    )


def check_corpus(
    corpus: str | os.PathLike, src_lang: str | None = None, tgt_lang: str | None = None,
    splits: Sequence[str] | None = None,
) -> tuple[Path, str, str, list[SplitStats], dict[str, str]]:
    """Statistics of every split (or ``splits``) of a corpus.

    Returns:
        ``(folder, src_lang, tgt_lang, stats, errors)`` where ``errors`` maps a split that failed validation to the
        ``CorpusError`` message; the other splits are still checked.
    """
    folder = resolve_corpus(corpus)
    if src_lang is None or tgt_lang is None:
        src_lang, tgt_lang = language_pair(folder)
    layout = corpus_layout(folder)
    if splits is None:
        splits = [s for s, ls in layout.items() if src_lang in ls or tgt_lang in ls]
        if not splits:
            raise CorpusError(f"{folder}: no {src_lang}/{tgt_lang} files (files there: {describe_layout(folder)})")
        errors = {}
        if "train" not in splits:  # a corpus to train on needs one
            errors["train"] = (f"no train split: {folder} lacks train.{src_lang} and train.{tgt_lang} (files there: "
                               f"{describe_layout(folder)})")
    else:
        errors = {}
    stats = []
    for split in sorted(splits, key=_split_order):
        try:
            pairs = read_split(folder, split, src_lang, tgt_lang)
            stats.append(split_stats(split, pairs))
            require_nonempty_pairs(pairs, folder, split, src_lang, tgt_lang)
        except CorpusError as e:
            errors[split] = str(e)
    return folder, src_lang, tgt_lang, stats, errors


def format_stats(folder: Path, src_lang: str, tgt_lang: str, stats: Sequence[SplitStats],
                 errors: Mapping[str, str] | None = None) -> str:
    """A plain-text table, one row per split."""
    s, t = src_lang, tgt_lang
    header = ["split", "pairs", f"{s} tok mean/max", f"{t} tok mean/max", f"{s} chr mean/max", f"{t} chr mean/max",
              "empty", "dup", f"ratio {s}/{t} mean", "p1-p99"]
    rows = [[x.split, str(x.pairs), f"{x.src_tokens_mean:.1f}/{x.src_tokens_max}",
             f"{x.tgt_tokens_mean:.1f}/{x.tgt_tokens_max}", f"{x.src_chars_mean:.1f}/{x.src_chars_max}",
             f"{x.tgt_chars_mean:.1f}/{x.tgt_chars_max}", str(x.empty_pairs), str(x.duplicate_pairs),
             f"{x.ratio_mean:.2f}", f"{x.ratio_p1:.2f}-{x.ratio_p99:.2f}"] for x in stats]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    out = [f"corpus {folder.name} ({folder}): {s} -> {t}",
           "tok = whitespace-separated tokens, chr = characters; empty = pairs with an empty side; "
           "dup = repeats of an earlier pair; ratio = source/target characters", "",
           line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]
    for split, message in (errors or {}).items():
        out.append(f"{split}: ERROR {message}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------
def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer, max_length: int | None, *,
                 log: Callable[[str], object] = print) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of both sides, each ending with ``</s>``; drops pairs with an empty side or a side longer than
    ``max_length`` ids (``</s>`` included; ``None``: no limit), and logs how many it dropped.

    Returns:
        ``(src_ids, tgt_ids)``, aligned lists of the kept pairs.
    """
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an integer >= 2 or None, got {max_length!r}")
    eos = tokenizer.eos_id
    src_all = tokenizer.encode_batch([s for s, _ in pairs])
    tgt_all = tokenizer.encode_batch([t for _, t in pairs], target=True)
    src_ids, tgt_ids = [], []
    n_empty = n_long = 0
    for s, t in zip(src_all, tgt_all, strict=True):
        if not s or not t:
            n_empty += 1
        elif max_length is not None and (len(s) + 1 > max_length or len(t) + 1 > max_length):
            n_long += 1
        else:
            src_ids.append([*s, eos])
            tgt_ids.append([*t, eos])
    if n_empty or n_long:
        limit = f"longer than {max_length} tokens (</s> included)"
        log(f"encode_pairs: kept {len(src_ids)} of {len(pairs)} pairs; dropped {n_empty} with an empty side "
            f"and {n_long} {limit}")
    return src_ids, tgt_ids


# --------------------------------------------------------------------------------------------------------------
# Batching by tokens
# --------------------------------------------------------------------------------------------------------------
class TokenBatchSampler:
    """Batches of example indices whose padded size fits ``max_tokens`` on both sides.

    A batch's cost is ``rows x max(source length)`` and ``rows x max(target length)``, padding counted; both are
    <= ``max_tokens``. An example longer than ``max_tokens`` by itself is not dropped: it forms a batch of its own
    (the only batches that exceed the budget; ``encode_pairs(max_length=...)`` with ``max_length <= max_tokens``
    rules them out).

    With ``shuffle``, each epoch permutes the examples (from ``seed`` and the epoch), sorts each chunk of
    ``chunk_size`` examples by length, packs the chunk greedily and shuffles the order of all batches: same
    ``(seed, epoch)``, same batches; every example exactly once per epoch. Without ``shuffle``, all examples are
    sorted by length and packed once (for evaluation: little padding, same batches every epoch).

    Also usable as a ``batch_sampler`` of a ``torch.utils.data.DataLoader`` (``set_epoch``, ``__iter__``).
    """

    def __init__(self, src_lengths: Sequence[int], tgt_lengths: Sequence[int], max_tokens: int, *,
                 shuffle: bool = True, seed: int = 0, chunk_size: int | None = None):
        self.src_lengths = np.asarray(src_lengths, dtype=np.int64).reshape(-1)
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int64).reshape(-1)
        if len(self.src_lengths) != len(self.tgt_lengths):
            raise ValueError(f"{len(self.src_lengths)} source lengths but {len(self.tgt_lengths)} target lengths")
        if len(self.src_lengths) and min(self.src_lengths.min(), self.tgt_lengths.min()) < 1:
            raise ValueError("every length must be >= 1 (encode_pairs drops empty pairs)")
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        n = len(self.src_lengths)
        if chunk_size is None:  # about 100 batches' worth: long enough to sort well, short enough to mix
            mean_len = float(np.maximum(self.src_lengths, self.tgt_lengths).mean()) if n else 1.0
            chunk_size = max(1, int(100 * max_tokens / max(mean_len, 1.0)))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.max_tokens, self.shuffle, self.seed, self.chunk_size = int(max_tokens), shuffle, int(seed), chunk_size
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of indices) of ``epoch``; deterministic in ``(seed, epoch)``."""
        if self._cache is not None and self._cache[0] == epoch:
            return [list(b) for b in self._cache[1]]
        n = len(self.src_lengths)
        if self.shuffle:
            if epoch < 0:
                raise ValueError(f"epoch must be >= 0, got {epoch}")
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            chunks = [order[i:i + self.chunk_size] for i in range(0, n, self.chunk_size)]
        else:
            chunks = [np.arange(n)]
        batches: list[list[int]] = []
        for chunk in chunks:
            s, t = self.src_lengths[chunk], self.tgt_lengths[chunk]
            batches += self._pack(chunk[np.lexsort((t, s, np.maximum(s, t)))])  # stable: last key is primary
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return [list(b) for b in batches]

    def _pack(self, idx: np.ndarray) -> list[list[int]]:
        """Greedy packing of ``idx`` (sorted by length) under the padded-cost budget."""
        budget, src, tgt = self.max_tokens, self.src_lengths, self.tgt_lengths
        batches, rows, max_s, max_t = [], [], 0, 0
        for i, s, t in zip(idx.tolist(), src[idx].tolist(), tgt[idx].tolist(), strict=True):
            new_s, new_t = max(max_s, s), max(max_t, t)
            if rows and (len(rows) + 1) * max(new_s, new_t) > budget:
                batches.append(rows)
                rows, new_s, new_t = [], s, t
            rows.append(i)
            max_s, max_t = new_s, new_t
        if rows:
            batches.append(rows)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epoch_batches(self.epoch))

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))


# --------------------------------------------------------------------------------------------------------------
# Collation (Marian convention)
# --------------------------------------------------------------------------------------------------------------
def collate(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], pad_id: int,
            decoder_start_id: int) -> dict:
    """Pad a batch into tensors for ``MarianMTModel``.

    ``tgt_ids`` rows already end with ``</s>``. Teacher forcing shifts them right:
    ``decoder_input_ids = [decoder_start_id] + target[:-1]`` and ``labels = target``.

    Returns:
        ``input_ids`` [B, S] (``pad_id`` at padding), ``attention_mask`` [B, S] (1 = token, 0 = padding),
        ``decoder_input_ids`` [B, T] (``pad_id`` at padding), ``labels`` [B, T] (-100 at padding); all int64.
    """
    import torch

    if len(src_ids) != len(tgt_ids):
        raise ValueError(f"collate: {len(src_ids)} source rows but {len(tgt_ids)} target rows")
    if not src_ids:
        raise ValueError("collate: empty batch")
    for name, rows in (("source", src_ids), ("target", tgt_ids)):
        for b, row in enumerate(rows):
            if len(row) == 0:
                raise ValueError(f"collate: {name} row {b} is empty")
    B, S, T = len(src_ids), max(map(len, src_ids)), max(map(len, tgt_ids))
    input_ids = np.full((B, S), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, S), dtype=np.int64)
    decoder_input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    for b, (s, t) in enumerate(zip(src_ids, tgt_ids, strict=True)):
        input_ids[b, :len(s)] = s
        attention_mask[b, :len(s)] = 1
        labels[b, :len(t)] = t
        decoder_input_ids[b, 0] = decoder_start_id
        decoder_input_ids[b, 1:len(t)] = t[:-1]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "decoder_input_ids": torch.from_numpy(decoder_input_ids),
        "labels": torch.from_numpy(labels),
    }


# --------------------------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------------------------
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
MULTI30K_SPLITS = {"train": "train", "valid": "val", "test2016": "test_2016_flickr"}  # our split -> remote stem
MULTI30K_LANGS = ("de", "en", "fr", "cs")
# MD5 of the gzipped files of multi30k/dataset task 1, as published with torchtext's Multi30k loader.
MULTI30K_MD5 = {
    "train.de.gz": "81ff90b99829c0cd4b1b587d394afd39",
    "train.en.gz": "0065d13af80720a55ca8153d126e6627",
    "train.fr.gz": "6cb767741dcad3931f966fefbc05203f",
    "train.cs.gz": "d9a5fc268917725a2b0efce3a0cc8607",
    "val.de.gz": "6e0e229eb049e3fc99a1ef02fb2d5f91",
    "val.en.gz": "2b69aa9253948ac9f67e94917272dd40",
    "val.fr.gz": "93fc564584b7e5ba410c761ea5a1c682",
    "val.cs.gz": "83cdc082f646b769095615384cf5c0ca",
    "test_2016_flickr.de.gz": "efd67d314d98489b716b145475101932",
    "test_2016_flickr.en.gz": "ff2c0fcb4893a13bd73414306bc250ae",
    "test_2016_flickr.fr.gz": "08dc7cd4a662f31718412de95ca9bfe3",
    "test_2016_flickr.cs.gz": "3104872229daa1bef3b401d44dd2220b",
}


def download_corpus(
    name: str, dest: str | os.PathLike | None = None, *, base_url: str | None = None,
    checksums: Mapping[str, str] | None = None, corpus: str | None = None, split: str | None = None,
    force: bool = False, log: Callable[[str], object] = print,
) -> Path:
    """Download a public corpus into ``dest`` (default ``data_dir()``) as ``SPLIT.LANG`` files; returns its folder.

    Names:
        ``multi30k`` or ``multi30k-SRC-TGT`` (SRC, TGT in de, en, fr, cs; default de-en): Multi30k task 1 from the
        multi30k/dataset repository, as ``train``, ``valid`` and ``test2016``, into ``multi30k-SRC-TGT/``.
        ``TESTSET:SRC-TGT`` (e.g. ``wmt16:de-en``, ``iwslt17:de-en``): a dev/test set that sacrebleu knows, via its
        registry (URLs, MD5 sums, format parsers); source and first reference, as split ``split`` (default
        ``test``) of folder ``corpus`` (default ``TESTSET-SRC-TGT``). Add it to an existing corpus with ``corpus``
        and ``split`` (e.g. ``corpus="wmt-news-de-en", split="valid"``).

    Args:
        base_url: fetch every file from ``BASE_URL/FILE_NAME`` instead of its canonical URL (a mirror).
        checksums: ``{file name: md5 or sha256 hex}`` replacing the built-in table (32 hex digits: MD5, 64: SHA-256).
        force: replace ``SPLIT.LANG`` files that already exist (otherwise an error).

    Everything is fetched, verified and unpacked in a temporary folder inside ``dest``; only whole, checked files
    are moved into place (a new corpus folder by one rename), and the temporary folder is always removed.

    Raises:
        DownloadError: unknown name, network failure, checksum mismatch, bad archive, files already present.
        CorpusError: the downloaded files are not a valid corpus (line counts, UTF-8).
    """
    dest = Path(dest).expanduser() if dest is not None else data_dir()
    if name == "multi30k" or name.startswith("multi30k-"):
        langs = name.split("-")[1:] or ["de", "en"]
        if len(langs) != 2 or not set(langs) <= set(MULTI30K_LANGS) or langs[0] == langs[1]:
            raise DownloadError(f"unknown Multi30k pair {name!r}: use multi30k-SRC-TGT with SRC, TGT in "
                                f"{', '.join(MULTI30K_LANGS)}")
        if split is not None:
            raise DownloadError("split cannot be set for Multi30k: it has train, valid and test2016")
        return _download_multi30k(langs[0], langs[1], dest, corpus or f"multi30k-{langs[0]}-{langs[1]}",
                                  base_url=base_url, checksums=checksums, force=force, log=log)
    if ":" in name:
        test_set, pair = name.rsplit(":", 1)
        return _download_sacrebleu(test_set, pair, dest, corpus=corpus, split=split or "test", base_url=base_url,
                                   checksums=checksums, force=force, log=log)
    raise DownloadError(f"unknown corpus {name!r}: known are multi30k[-SRC-TGT] and TESTSET:SRC-TGT for the test sets "
                        f"sacrebleu knows (e.g. wmt16:de-en, wmt14:de-en, iwslt17:de-en; `sacrebleu --list`)")


def _download_multi30k(src: str, tgt: str, dest: Path, folder_name: str, *, base_url, checksums, force, log) -> Path:
    base = (base_url or MULTI30K_URL).rstrip("/")
    table = MULTI30K_MD5 if checksums is None else checksums
    with _staging(dest, folder_name) as (work, out):
        for split, stem in MULTI30K_SPLITS.items():
            for lang in (src, tgt):
                file_name = f"{stem}.{lang}.gz"
                archive = work / file_name
                _fetch(f"{base}/{file_name}", archive, table.get(file_name), log)
                _gunzip(archive, out / f"{split}.{lang}", f"{base}/{file_name}")
        for split in MULTI30K_SPLITS:
            read_split(out, split, src, tgt)
        return _install(out, dest / folder_name, force, log)


def _download_sacrebleu(test_set: str, pair: str, dest: Path, *, corpus, split, base_url, checksums, force,
                        log) -> Path:
    from sacrebleu.dataset import DATASETS

    if test_set not in DATASETS:
        near = [n for n in DATASETS if n.split("/")[0][:4] == test_set[:4]] or sorted(DATASETS)[:20]
        raise DownloadError(f"sacrebleu has no test set {test_set!r}; some it has: {', '.join(sorted(near))}")
    dataset = DATASETS[test_set]
    if pair not in dataset.langpairs:
        raise DownloadError(f"sacrebleu test set {test_set!r} has no pair {pair!r}; it has: "
                            f"{', '.join(sorted(dataset.langpairs))}")
    if pair.count("-") != 1:
        raise DownloadError(f"language pair must be SRC-TGT, got {pair!r}")
    src, tgt = pair.split("-")
    folder_name = corpus or f"{test_set.replace('/', '_')}-{pair}"
    md5s = list(dataset.md5 or [])[: len(dataset.data)]
    md5s += [None] * (len(dataset.data) - len(md5s))
    with _staging(dest, folder_name) as (work, out):
        # A private copy of sacrebleu's dataset that keeps its files in our temporary folder.
        local = copy.copy(dataset)
        local._outdir, local._rawdir = str(work / "sacrebleu"), str(work / "sacrebleu" / "raw")
        raw = Path(local._rawdir)
        raw.mkdir(parents=True)
        for url, md5 in zip(dataset.data, md5s, strict=True):
            file_name = _url_file_name(url)
            source = f"{base_url.rstrip('/')}/{file_name}" if base_url else url
            archive = raw / local._get_tarball_filename(url)
            _fetch(source, archive, md5 if checksums is None else checksums.get(file_name), log)
            _unpack(archive, raw, source)
        try:  # sacrebleu finds the archives in place, skips its own download and converts them to text
            src_file = local.get_source_file(pair)
            ref_file = local.get_reference_files(pair)[0]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise DownloadError(f"could not extract {test_set} {pair} from the downloaded files: {e}") from e
        shutil.copyfile(src_file, out / f"{split}.{src}")
        shutil.copyfile(ref_file, out / f"{split}.{tgt}")
        read_split(out, split, src, tgt)
        return _install(out, dest / folder_name, force, log)


@contextmanager
def _staging(dest: Path, folder_name: str) -> Iterator[tuple[Path, Path]]:
    """A temporary folder inside ``dest``: ``(work, out)``; removed on exit whatever happens."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{folder_name}.part-"))
    try:
        (tmp / "work").mkdir()
        (tmp / "out").mkdir()
        yield tmp / "work", tmp / "out"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(out: Path, folder: Path, force: bool, log) -> Path:
    """Move the verified files of ``out`` into ``folder``: one rename if it is new, else file by file."""
    if not folder.exists():
        os.rename(out, folder)
    else:
        targets = [(f, folder / f.name) for f in sorted(out.iterdir())]
        present = [str(t) for _, t in targets if t.exists()]
        if present and not force:
            raise DownloadError(f"{', '.join(present)} already exist; remove them or pass --force to replace them")
        for f, t in targets:
            os.replace(f, t)
    log(f"wrote {folder}: {describe_layout(folder)}")
    return folder


def _url_file_name(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path)


def _fetch(url: str, path: Path, expected: str | None, log) -> None:
    """Stream ``url`` to ``path`` and verify its checksum (MD5 if 32 hex digits, SHA-256 if 64)."""
    algo = {32: "md5", 64: "sha256"}.get(len(expected or ""), "sha256")
    if expected is not None and len(expected) not in (32, 64):
        raise DownloadError(f"checksum for {url} must be 32 (MD5) or 64 (SHA-256) hex digits, got {expected!r}")
    log(f"downloading {url}")
    digest = hashlib.new(algo)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DownloadError(f"could not download {url}: {e}") from e
    got = digest.hexdigest()
    if expected is None:
        log(f"warning: no checksum known for {url}; not verified ({algo} {got})")
    elif got != expected.lower():
        raise DownloadError(f"checksum mismatch for {url}: {algo} is {got}, expected {expected}; nothing was kept")


def _gunzip(archive: Path, target: Path, url: str) -> None:
    try:
        with gzip.open(archive, "rb") as f_in, open(target, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
    except (OSError, EOFError) as e:
        raise DownloadError(f"{url}: not a valid gzip file: {e}") from e


def _unpack(archive: Path, into: Path, url: str) -> None:
    """Unpack a .tar.gz/.tgz/.zip archive in place (other files are left as they are)."""
    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(into, filter="data")
                else:  # Python < 3.11.4: refuse members that would land outside ``into``
                    for m in tar.getmembers():
                        if not (into / m.name).resolve().is_relative_to(into.resolve()) or m.issym() or m.islnk():
                            raise DownloadError(f"{url}: unsafe archive member {m.name!r}")
                    tar.extractall(into)
        elif archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise DownloadError(f"{url}: cannot unpack: {e}") from e
