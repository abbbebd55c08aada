"""``ktransfer data``: download, check and list parallel corpora."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  ktransfer data list
  ktransfer data check multi30k-de-en
  ktransfer data check chat.jsonl data.messages_key=conversation   # the data.* keys of train (--help-config)
  ktransfer data check chat.jsonl --model path/to/llama   # + the examples training would drop or cut, per split
  ktransfer data download multi30k                      # train/valid/test2016 into $KTRANSFER_DATA/multi30k-de-en
  ktransfer data download wmt16:de-en                   # newstest2016 as wmt16-de-en/test.{de,en}
  ktransfer data download wmt16:de-en --corpus wmt-news-de-en --split valid
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("download", help="fetch a public corpus, verify checksums, lay it out as SPLIT.LANG files")
    p.add_argument("name", help="multi30k[-SRC-TGT] (Multi30k task 1) or TESTSET:SRC-TGT (a sacrebleu test set, "
                                "e.g. wmt16:de-en)")
    p.add_argument("--dest", default=None, help="folder that receives the corpus folder (default: $KTRANSFER_DATA, "
                                                "else ~/.cache/ktransfer/data)")
    p.add_argument("--base-url", default=None, help="fetch each file from BASE_URL/FILE_NAME (a mirror)")
    p.add_argument("--corpus", default=None, help="name of the corpus folder (default: multi30k-SRC-TGT or "
                                                  "TESTSET-SRC-TGT); may be an existing corpus to add a split to")
    p.add_argument("--split", default=None, help="split name for a sacrebleu test set (default: test)")
    p.add_argument("--checksum", action="append", default=[], metavar="FILE=HEX",
                   help="expected MD5 (32 hex) or SHA-256 (64 hex) of a downloaded file; replaces the built-in "
                        "table (repeat for each file)")
    p.add_argument("--force", action="store_true", help="replace SPLIT.LANG files that already exist")

    p = sub.add_parser("check", help="line counts, lengths, empty and duplicated pairs, length ratios per split; "
                                     "for JSONL, text and datasets data: the format, examples and turns per split, "
                                     "and the first bad record (file and line)")
    p.add_argument("name", help="corpus name (under $KTRANSFER_DATA) or path (a folder, a .jsonl/.txt file, a "
                                "datasets folder)")
    p.add_argument("--src", default=None, help="source language (default: from the corpus name, e.g. de in "
                                               "multi30k-de-en)")
    p.add_argument("--tgt", default=None, help="target language")
    p.add_argument("--splits", nargs="+", default=None, help="splits to check (default: all)")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="also count, per split, the examples training would drop or cut with this model's tokenizer "
                        "and positions (data.max_length, data.truncate; a run, checkpoint or Hugging Face folder)")
    p.add_argument("keys", nargs="*", metavar="data.KEY=VALUE",
                   help="data settings as train takes them: data.format, data.prompt_key, data.completion_key, "
                        "data.messages_key, data.text_key")

    sub.add_parser("list", help="corpora under $KTRANSFER_DATA and their files")


def run(args: argparse.Namespace) -> int:
    from ktransfer.data import corpora, download

    try:
        if args.action == "download":
            checksums = _parse_checksums(args.checksum) if args.checksum else None
            download.download_corpus(args.name, args.dest, base_url=args.base_url, checksums=checksums,
                                     corpus=args.corpus, split=args.split, force=args.force, progress=True)
            return 0
        if args.action == "check":
            from ktransfer.data import formats

            data = _data_settings(args.keys)
            if data is None:
                return 2
            keys = formats.Keys(data.prompt_key, data.completion_key, data.messages_key, data.text_key)
            fmt, why = ((data.format, "data.format") if data.format != "auto" else
                        formats.infer_format(formats.locate(args.name), keys))
            if fmt != "parallel":
                print(formats.describe(args.name, fmt, why, args.splits, keys=keys))
                return _lengths(args, data, fmt)
            if (args.src is None) != (args.tgt is None):
                raise corpora.CorpusError("give both --src and --tgt, or neither")
            folder, src, tgt, stats, errors = corpora.check_corpus(args.name, args.src, args.tgt, args.splits)
            print(corpora.format_stats(folder, src, tgt, stats, errors))
            return 1 if errors else _lengths(args, data, fmt, src, tgt, stats)
        if args.action == "list":
            root = corpora.data_dir()
            names = corpora.list_corpora(root)
            print(f"corpora in {root}:" if names else f"no corpora in {root} (set ${corpora.DATA_ENV} or download one)")
            for name in names:
                print(f"  {name}: {corpora.describe_layout(root / name)}")
            return 0
    except (corpora.CorpusError, download.DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled action {args.action!r}")  # argparse only allows the actions above


def _lengths(args, data, fmt: str, src: str | None = None, tgt: str | None = None, stats=None) -> int:
    """With ``--model``: the examples of each split that training would drop or cut (``ktransfer.training.lengths``)."""
    if args.model is None:
        return 0
    import dataclasses

    from ktransfer.training.lengths import check_splits

    langs = {"src_lang": src, "tgt_lang": tgt} if src else {}
    data = dataclasses.replace(data, corpus=str(args.name), format=fmt, **langs)
    splits = args.splits or ([s.split for s in stats] if stats else None)
    print("\n".join(check_splits(data, args.model, splits)))
    return 0


def _data_settings(items: list[str]):
    """The ``data`` section of a run config from ``data.KEY=VALUE`` items (train's keys, checked as train checks
    them); None after printing the error."""
    from ktransfer.training.config import ConfigError, load_config

    try:
        bad = [i for i in items if not i.startswith("data.") or "=" not in i]
        if bad:
            raise ConfigError(f"{bad[0]}: data check takes data.KEY=VALUE settings (ktransfer train --help-config)")
        return load_config(None, items).data
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _parse_checksums(items: list[str]) -> dict[str, str]:
    from ktransfer.data.download import DownloadError

    table = {}
    for item in items:
        file_name, sep, digest = item.partition("=")
        if not sep or not file_name or not digest:
            raise DownloadError(f"--checksum must be FILE=HEX, got {item!r}")
        table[file_name] = digest
    return table
