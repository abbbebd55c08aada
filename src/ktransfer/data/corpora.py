"""Parallel corpora on disk: resolve, read and validate, check.

A corpus is a folder of line-aligned ``SPLIT.LANG`` files (``train.de``, ``train.en``, ``valid.de``, ...). A corpus
name resolves under ``$KTRANSFER_DATA`` (default ``~/.cache/ktransfer/data``); a path works wherever a name does.

Reading is strict: sides with different line counts, invalid UTF-8, a missing side or an empty split raise
``CorpusError`` naming the file, the line and the problem. Downloads are written into a temporary folder beside the
destination and renamed into place only once every checksum and every file has been verified.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_ENV = "KTRANSFER_DATA"
DEFAULT_DATA_DIR = "~/.cache/ktransfer/data"
IGNORE_INDEX = -100  # label value ignored by the loss (PyTorch's cross_entropy default)


class CorpusError(ValueError):
    """A corpus is missing or malformed; the message names the file, the line (1-based) and the problem."""


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


