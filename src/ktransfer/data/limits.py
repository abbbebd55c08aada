"""Limits on one record of training data, checked as it is read (``ktransfer.data.formats``), before any tokenizer
sees it: at most ``max_record_bytes()`` bytes of UTF-8 text (``MAX_RECORD_BYTES``, 1 MB, unless
``KTRANSFER_MAX_RECORD_BYTES`` says otherwise: one 50 MB line drove a tokenizer to 8 GB), and Unicode text only (a
lone surrogate escape such as ``"\\ud800"`` in JSON decodes to a string no tokenizer can encode).
"""

from __future__ import annotations

import os

from ktransfer.data.corpora import CorpusError

MAX_RECORD_BYTES = 1_000_000


def max_record_bytes() -> int:
    """The most bytes of UTF-8 text a record may hold: ``KTRANSFER_MAX_RECORD_BYTES``, else ``MAX_RECORD_BYTES``."""
    value = os.environ.get("KTRANSFER_MAX_RECORD_BYTES", "")
    if not value:
        return MAX_RECORD_BYTES
    if not value.isdigit() or int(value) < 1:
        raise CorpusError(f"KTRANSFER_MAX_RECORD_BYTES must be a positive integer, got {value!r}")
    return int(value)


def utf8_bytes(text: str, where: str, what: str) -> int:
    """The UTF-8 length of ``text``; a lone surrogate (``"\\ud800"`` in JSON) is a CorpusError naming ``where``."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise CorpusError(f"{where}: {what} holds a lone surrogate escape ({text[e.start:e.end]!r} at character "
                          f"{e.start + 1}): not Unicode text; fix the file's \\uD800-\\uDFFF escapes") from None


def check_record(record, where: str) -> None:
    """Refuse a record (as ``ktransfer.data.formats`` reads it: a text, a (prompt, completion) pair or messages)
    with a lone surrogate or more than ``max_record_bytes()`` bytes of text."""
    if isinstance(record, str):
        parts = [("the text", record)]
    elif isinstance(record, tuple):
        parts = [("the prompt", record[0]), ("the completion", record[1])]
    else:
        parts = [(f"message {i + 1}", m["content"]) for i, m in enumerate(record)]
    size, limit = sum(utf8_bytes(text, where, what) for what, text in parts), max_record_bytes()
    if size > limit:
        raise CorpusError(f"{where}: a record of {size:,} bytes of text, over the limit of {limit:,} bytes per "
                          "record (KTRANSFER_MAX_RECORD_BYTES); shorten or split it")
