"""Training data as LLM and MT people keep it: four formats, read from files, folders or ``datasets`` folders.

==================  =================================================  ========================================
format              one example                                        scored (the loss covers)
==================  =================================================  ========================================
parallel            line i of ``SPLIT.SRC`` and of ``SPLIT.TGT``       the target sentence
prompt_completion   JSONL ``{"prompt": ..., "completion": ...}``       the completion
chat                JSONL ``{"messages": [{"role", "content"}, ...]}`` every assistant turn
text                a line of a ``.txt`` file, or JSONL ``{"text"}``   every token
==================  =================================================  ========================================

Where the data lives (``data.corpus``): a folder of ``SPLIT.LANG`` files (parallel); a ``.jsonl``/``.json``/``.txt``
file (the training split; validation is ``data.valid`` when that names a split or file, or one of Hugging Face's
names ``validation``/``valid``/``val``/``dev`` (``find_split``), else a held-out
``data.valid_fraction`` drawn with ``data.split_seed``); a folder of ``SPLIT.jsonl`` (or ``SPLIT.txt``) files; or a
folder written by ``datasets``' ``save_to_disk`` (a ``DatasetDict`` with named splits, or one ``Dataset`` split as a
file is). ``data.format=auto`` infers the format from the path and, for JSONL and datasets, from the columns of the
first record; the log says which it chose and why. Column names are ``data.prompt_key``, ``data.completion_key``,
``data.messages_key`` and ``data.text_key``.

Every example becomes one ``(prompt, completion)`` pair (``to_pairs``): for chat, one per conversation, the whole
conversation rendered once with the tokenizer's chat template; the prompt is the rendering up to the first assistant
turn and the completion a ``Scored`` rest, each assistant turn's character span scored (what the template adds for
that turn after the generation prompt: TRL's ``{% generation %}`` tokens), the user turns between them read but not
scored; so the loss is the loss of every assistant turn and the cost linear in the turns. ``turn_pairs`` keeps one
pair per turn (its history as the prompt) for sequence-level KD.
``text`` has an empty prompt. The model family turns a pair into ids (``ktransfer.models.causal``,
``ktransfer.models.seq2seq``). Text is kept exactly as read: multi-line values, any Unicode, every space.

Bad data raises ``CorpusError`` naming the file, the line (JSONL) and what is wrong, before anything is written
(and before any tokenizer sees it): a record over ``ktransfer.data.limits.max_record_bytes()`` or with a lone
surrogate escape, a broken ``datasets`` folder, a chat template that fails or runs out of time (``render``).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ktransfer.data import limits
from ktransfer.data.corpora import CorpusError, corpus_layout, read_split
from ktransfer.data.download import ensure_corpus
from ktransfer.runtime import timelimit

FORMATS = ("parallel", "prompt_completion", "chat", "text")
TEMPLATE_SECONDS = 10.0  # most seconds a chat template may take on one conversation (KTRANSFER_TEMPLATE_SECONDS)
ROLES = ("system", "user", "assistant", "tool")
DATA_SUFFIXES = (".jsonl", ".json", ".txt")


@dataclass(frozen=True)
class Keys:
    """Column names of the JSONL/datasets formats."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"


@dataclass
class Examples:
    """The examples of one split as read: ``records`` are ``(prompt, completion)`` pairs (parallel,
    prompt_completion), message lists (chat) or strings (text); ``where[i]`` names record i's file and line."""

    format: str
    records: list
    where: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int]) -> Examples:
        return Examples(self.format, [self.records[i] for i in indices],
                        [self.where[i] for i in indices] if self.where else [], self.source)

    def head(self, n: int | None) -> Examples:
        return self if n is None else self.subset(range(min(n, len(self))))


# --------------------------------------------------------------------------------------------------------------
# Where the data is, and which format
# --------------------------------------------------------------------------------------------------------------
def is_datasets_folder(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a DatasetDict or one Dataset)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def locate(corpus: str | os.PathLike) -> Path:
    """The path of ``data.corpus``: a file, a folder, or a corpus name under ``$KTRANSFER_DATA``; a name missing
    there that ``ktransfer data download`` knows (multi30k-SRC-TGT) is downloaded first (``download.ensure_corpus``).

    Raises:
        CorpusError: nothing there (the message says what was looked for), or the download failed.
    """
    path = Path(corpus).expanduser()
    if path.is_file() or path.is_dir():
        return path
    return ensure_corpus(corpus)


def infer_format(path: Path, keys: Keys = Keys()) -> tuple[str, str]:
    """``(format, why)`` for the data at ``path`` (``locate``'s result).

    Raises:
        CorpusError: a JSONL record or dataset whose columns fit no format.
    """
    if is_datasets_folder(path):
        return _format_of_columns(_dataset_columns(path), keys, f"{path} (datasets columns)")
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix in DATA_SUFFIXES and p.is_file() and not p.name.startswith("."))
        if not files:
            return "parallel", f"{path} is a folder of SPLIT.LANG files"
        path = files[0]
    if path.suffix == ".txt":
        return "text", f"{path.name} is a plain-text file (one example a line)"
    first = next(iter(_jsonl_rows(path)), None)
    if first is None:
        raise CorpusError(f"{path}: no record (the file is empty)")
    return _format_of_columns(list(first[1]), keys, f"{path}:{first[0]}")


def _format_of_columns(columns: Sequence[str], keys: Keys, where: str) -> tuple[str, str]:
    cols = set(columns)
    if keys.messages in cols:
        return "chat", f"{where} has {keys.messages!r}"
    if keys.prompt in cols and keys.completion in cols:
        return "prompt_completion", f"{where} has {keys.prompt!r} and {keys.completion!r}"
    if keys.text in cols:
        return "text", f"{where} has {keys.text!r}"
    raise CorpusError(f"{where}: columns {sorted(cols)} fit no format: chat needs {keys.messages!r}, "
                      f"prompt_completion {keys.prompt!r} and {keys.completion!r}, text {keys.text!r} "
                      "(data.messages_key, data.prompt_key, ... rename them)")


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------
def read_examples(corpus: str | os.PathLike, split: str, fmt: str, *, keys: Keys = Keys(), src_lang: str = "de",
                  tgt_lang: str = "en") -> Examples:
    """The examples of ``split`` of ``corpus`` in format ``fmt`` (not ``auto``), validated.

    ``split`` is a split name (``train``, ``valid``, ...) or, for data that is not parallel, a path to a file.

    Raises:
        CorpusError: missing split or file, invalid JSON, a missing key, an unknown role, an empty completion, a
            conversation without an assistant turn (each naming the file and the line).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "parallel":
        pairs = read_split(corpus, split, src_lang, tgt_lang)
        return Examples(fmt, pairs, [], str(corpus))
    path = locate(corpus)
    given = Path(split).expanduser()
    if given.suffix in DATA_SUFFIXES and given.is_file():
        return _read_file(given, fmt, keys)
    if is_datasets_folder(path):
        return _read_dataset(path, split, fmt, keys)
    if path.is_dir():
        for suffix in DATA_SUFFIXES:
            if (path / f"{split}{suffix}").is_file():
                return _read_file(path / f"{split}{suffix}", fmt, keys)
        found = sorted(p.name for p in path.iterdir() if p.suffix in DATA_SUFFIXES and not p.name.startswith("."))
        raise CorpusError(f"{path}: no {split}.jsonl, {split}.json or {split}.txt for split {split!r} (files: "
                          f"{', '.join(found) or 'none'})")
    return _read_file(path, fmt, keys)


def has_split(corpus: str | os.PathLike, split: str, fmt: str) -> bool:
    """Whether ``split`` exists as its own file or datasets split (else a single file is split by fraction)."""
    if fmt == "parallel":
        return split in corpus_layout(ensure_corpus(corpus))
    path = locate(corpus)
    if Path(split).expanduser().is_file():
        return True
    if is_datasets_folder(path):
        return (path / "dataset_dict.json").is_file() and split in _dataset_splits(path)
    return path.is_dir() and any((path / f"{split}{s}").is_file() for s in DATA_SUFFIXES)


VALID_NAMES = ("validation", "valid", "val", "dev")  # Hugging Face's name first, then the usual others
TEST_NAMES = ("test",)


def find_split(corpus: str | os.PathLike, requested: str, fmt: str, names: Sequence[str] = VALID_NAMES
               ) -> tuple[str | None, str]:
    """``(split, why)``: the split of ``corpus`` that holds ``requested``'s examples, and a phrase for the log.

    ``requested`` wins when it exists (``data.valid=heldout`` names its own split). When it is one of ``names``
    (the default ``valid`` is), the first of ``names`` that exists is taken instead: a ``DatasetDict`` saved with
    ``validation``, a folder with ``validation.jsonl`` or ``dev.jsonl``. ``None`` when there is none (then a single
    file gives up a held-out share)."""
    if has_split(corpus, requested, fmt):
        return requested, f"split {requested!r}"
    if requested in names:
        for name in names:
            if name != requested and has_split(corpus, name, fmt):
                return name, f"split {name!r} (no {requested!r}; {name!r} is a name for it)"
    return None, f"no split {requested!r}"


def hold_out(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """``(train, valid)``: a fixed random ``fraction`` of the examples (at least one) held out for validation."""
    n = len(examples)
    if n < 2:
        raise CorpusError(f"{examples.source}: {n} example(s): too few to hold out a validation split (give "
                          "data.valid as a file)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(n * fraction)))
    held = sorted(order[:k])
    kept = sorted(order[k:])
    return examples.subset(kept), examples.subset(held)


def _read_text(path: Path) -> str:
    """A UTF-8 file's text as it is (a byte-order mark dropped).

    Raises:
        CorpusError: unreadable or not UTF-8, naming the file.
    """
    try:
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 (byte offset {e.start}: {e.reason})") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read it ({e.strerror or e})") from None


def _jsonl_rows(path: Path):
    """``(line number, record)`` of a JSONL file (or a JSON list); blank lines skipped.

    Raises:
        CorpusError: unreadable, not UTF-8, invalid JSON or a record that is not an object (naming the line).
    """
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise CorpusError(f"{path}: item {i + 1} is a {type(row).__name__}, not an object")
            yield i + 1, row
        return
    limit = limits.max_record_bytes()
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if len(line) > 6 * limit + 1024:  # more than its text can be (an escape: 6 characters per byte): not parsed
            raise CorpusError(f"{path}:{number}: a line of {len(line):,} characters, over the limit of {limit:,} "
                              "bytes of text per record (KTRANSFER_MAX_RECORD_BYTES); shorten or split it")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise CorpusError(f"{path}:{number}: a JSON {type(row).__name__}, not an object with the example's "
                              "keys")
        yield number, row


def _read_file(path: Path, fmt: str, keys: Keys) -> Examples:
    if path.suffix == ".txt":
        if fmt != "text":
            raise CorpusError(f"{path}: a plain-text file holds text data, but data.format is {fmt!r}")
        lines = _read_text(path).split("\n")
        kept = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
        for i, line in kept:
            limits.check_record(line, f"{path}:{i}")
        return _checked(fmt, [line for _, line in kept], [f"{path}:{i}" for i, _ in kept], str(path))
    records, where = [], []
    for number, row in _jsonl_rows(path):
        records.append(_record(row, fmt, keys, f"{path}:{number}"))
        where.append(f"{path}:{number}")
    return _checked(fmt, records, where, str(path))


def _read_dataset(path: Path, split: str, fmt: str, keys: Keys) -> Examples:
    from datasets import load_from_disk  # arrow files and JSON state: nothing is unpickled

    try:
        data = load_from_disk(str(path))
        if hasattr(data, "keys"):  # a DatasetDict
            if split not in data:
                raise CorpusError(f"{path}: the datasets folder has no split {split!r} (splits: {', '.join(data)})")
            data = data[split]
        records = [_record(row, fmt, keys, f"{path} [{split}] row {i + 1}") for i, row in enumerate(data)]
    except CorpusError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # a missing or cut arrow file, a broken state.json
        raise CorpusError(f"{path}: a broken datasets folder ({type(e).__name__}: {' '.join(str(e).split())})") \
            from None
    return _checked(fmt, records, [f"{path} [{split}] row {i + 1}" for i in range(len(records))], str(path))


def _dataset_splits(path: Path) -> list[str]:
    body = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))
    return list(body.get("splits", []))


def _dataset_columns(path: Path) -> list[str]:
    folder = path / _dataset_splits(path)[0] if (path / "dataset_dict.json").is_file() else path
    info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    return list(info.get("features", {}))


def _text_value(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise CorpusError(f"{where}: missing key {key!r} (keys: {', '.join(map(repr, row)) or 'none'})")
    value = row[key]
    if not isinstance(value, str):
        raise CorpusError(f"{where}: {key!r} is a {type(value).__name__}, not a string")
    return value


def _record(row: dict, fmt: str, keys: Keys, where: str):
    """One example of ``fmt`` from a JSON object or datasets row, checked (its size and Unicode too)."""
    record = _record_fields(row, fmt, keys, where)
    limits.check_record(record, where)
    return record


def _record_fields(row: dict, fmt: str, keys: Keys, where: str):
    if fmt == "prompt_completion":
        prompt, completion = _text_value(row, keys.prompt, where), _text_value(row, keys.completion, where)
        if not completion.strip():
            raise CorpusError(f"{where}: empty completion (nothing to learn from this example)")
        return prompt, completion
    if fmt == "text":
        text = _text_value(row, keys.text, where)
        if not text.strip():
            raise CorpusError(f"{where}: empty {keys.text!r}")
        return text
    if keys.messages not in row:
        raise CorpusError(f"{where}: missing key {keys.messages!r} (keys: {', '.join(map(repr, row)) or 'none'})")
    messages = row[keys.messages]
    if not isinstance(messages, list) or not messages:
        raise CorpusError(f"{where}: {keys.messages!r} must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CorpusError(f"{where}: message {i + 1} must be an object with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise CorpusError(f"{where}: message {i + 1} has unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise CorpusError(f"{where}: message {i + 1}: content is a {type(m['content']).__name__}, not a string")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise CorpusError(f"{where}: the conversation has no assistant turn (nothing to learn from it)")
    for i in turns:
        if not messages[i]["content"].strip():
            raise CorpusError(f"{where}: message {i + 1} is an empty assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _checked(fmt: str, records: list, where: list[str], source: str) -> Examples:
    if not records:
        raise CorpusError(f"{source}: no example (the file or split is empty)")
    return Examples(fmt, records, where, source)


def split_names(corpus: str | os.PathLike) -> list[str]:
    """The splits of data that is not parallel: a file is one split (``train``), a folder has ``SPLIT.jsonl`` (or
    ``.json``, ``.txt``) files, a datasets folder its DatasetDict splits."""
    path = locate(corpus)
    if is_datasets_folder(path):
        return _dataset_splits(path) if (path / "dataset_dict.json").is_file() else ["train"]
    if path.is_file():
        return ["train"]
    return sorted({p.stem for p in path.iterdir() if p.suffix in DATA_SUFFIXES and not p.name.startswith(".")})


def describe(corpus: str | os.PathLike, fmt: str, why: str, splits: Sequence[str] | None = None,
             keys: Keys = Keys()) -> str:
    """A few lines on the data: its format and why, then per split the examples, (for chat) the assistant turns,
    and the characters of prompts and completions.

    Raises:
        CorpusError: the first bad record of a split (file and line).
    """
    lines = [f"{locate(corpus)}: {fmt} ({why})"]
    for split in splits or split_names(corpus):
        ex = read_examples(corpus, split, fmt, keys=keys)
        turns = ""
        if fmt == "chat":
            turns = f", {sum(m['role'] == 'assistant' for r in ex.records for m in r)} assistant turns"
            sizes = [(sum(len(m["content"]) for m in r if m["role"] != "assistant"),
                      sum(len(m["content"]) for m in r if m["role"] == "assistant")) for r in ex.records]
        elif fmt == "text":
            sizes = [(0, len(t)) for t in ex.records]
        else:
            sizes = [(len(p), len(c)) for p, c in ex.records]
        mean = [sum(x[i] for x in sizes) / len(sizes) for i in (0, 1)]
        lines.append(f"  {split}: {len(ex)} examples{turns}; mean characters: prompt {mean[0]:.0f}, completion "
                     f"{mean[1]:.0f} ({ex.source})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Examples -> (prompt, completion) strings
# --------------------------------------------------------------------------------------------------------------
def check_chat_template(tokenizer, label: str = "the tokenizer") -> None:
    """Raise CorpusError unless ``tokenizer`` (a ``ktransfer.models.tokenizer.Tokenizer``) has a chat template."""
    if not getattr(tokenizer.hf, "chat_template", None):
        raise CorpusError(f"chat data needs a tokenizer with a chat template, but {label} "
                          f"({type(tokenizer.hf).__name__}) has none: use a tokenizer that has one (data.tokenizer, "
                          "or the teacher's), or set its chat_template in tokenizer_config.json")


def render(tokenizer, messages: list[dict], *, generation_prompt: bool, where: str = "") -> str:
    """The conversation as the tokenizer's chat template writes it (text, special tokens as text), in at most
    ``TEMPLATE_SECONDS`` (``KTRANSFER_TEMPLATE_SECONDS``).

    Raises:
        CorpusError: the template raises (``raise_exception``), has a syntax error, breaks the sandbox or runs out
            of time; the message names the record ``where`` and the tokenizer.
    """
    import jinja2

    label = f"the chat template of {getattr(tokenizer.hf, 'name_or_path', '') or type(tokenizer.hf).__name__}"
    seconds = float(os.environ.get("KTRANSFER_TEMPLATE_SECONDS") or TEMPLATE_SECONDS)
    try:
        with timelimit.within(seconds, f"{label} ran for more than {seconds:g} s on one conversation (a loop that "
                                       "does not end?); fix the template, or raise KTRANSFER_TEMPLATE_SECONDS"):
            return tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TimeoutError as e:
        raise CorpusError(f"{where or 'chat data'}: {e}") from None
    except jinja2.TemplateError as e:  # raise_exception(...), a syntax error, the sandbox's SecurityError
        raise CorpusError(f"{where or 'chat data'}: {label} failed ({type(e).__name__}: "
                          f"{' '.join(str(e).split())})") from None


@dataclass(frozen=True)
class Scored:
    """A completion of which only parts are scored: ``text`` and the ``[start, end)`` character spans of it that
    the loss covers (a conversation after its first assistant turn begins: every assistant turn is scored, the
    user, system and tool turns between them are read but not scored)."""

    text: str
    spans: tuple[tuple[int, int], ...]


def chat_spans(tokenizer, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the whole conversation rendered once by the chat template, and the character span of each
    assistant turn k in it: what the rendering of ``messages[:k + 1]`` adds to that of ``messages[:k]`` with the
    generation prompt (the turn's content and the template's own end of turn, as TRL's ``{% generation %}`` blocks
    mark them).

    Raises:
        CorpusError: the template renders a shorter conversation as no prefix of the longer one (then a turn's
            tokens cannot be told apart from the rest).
    """
    text = render(tokenizer, messages, generation_prompt=False, where=where)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:k], generation_prompt=True, where=where)
        upto = render(tokenizer, messages[:k + 1], generation_prompt=False, where=where)
        if not (upto.startswith(prompt) and text.startswith(upto)) or (spans and len(prompt) < spans[-1][1]):
            raise CorpusError(f"{where}: the chat template does not render the conversation before assistant turn "
                              f"{k + 1} as a prefix of the conversation with it, so the turn cannot be scored alone")
        spans.append((len(prompt), len(upto)))
    return text, spans


def chat_turns(tokenizer, messages: list[dict], where: str = "") -> list[tuple[str, str]]:
    """``(prompt, completion)`` for each assistant turn k: the conversation before k rendered with the generation
    prompt, and what the rendering of messages[:k + 1] adds to it (what a teacher generates turn by turn).

    Raises:
        CorpusError: as ``chat_spans``.
    """
    text, spans = chat_spans(tokenizer, messages, where)
    prompts = [render(tokenizer, messages[:k], generation_prompt=True, where=where)
               for k, m in enumerate(messages) if m["role"] == "assistant"]
    return [(prompt, text[a:b]) for prompt, (a, b) in zip(prompts, spans, strict=True)]


def chat_pair(tokenizer, messages: list[dict], where: str = "") -> tuple[str, Scored]:
    """One conversation as one ``(prompt, Scored completion)``: the prompt is the rendering up to the first assistant
    turn, the completion the rest of the conversation with every assistant turn's span scored."""
    text, spans = chat_spans(tokenizer, messages, where)
    first = spans[0][0]
    return text[:first], Scored(text[first:], tuple((a - first, b - first) for a, b in spans))


def end_of_turn_tokens(tokenizer) -> list[str]:
    """The special tokens the chat template writes after an assistant's content (``<|im_end|>``, ``<|eot_id|>``,
    ``</s>``): the tokens a chat model stops at. Empty for a template that ends turns with plain text."""
    check_chat_template(tokenizer)
    probe = "ktransfer probe"
    text, spans = chat_spans(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    a, b = spans[0]
    tail = text[a:b].split(probe, 1)[-1]
    specials = sorted(set(getattr(tokenizer.hf, "all_special_tokens", [])) | set(_added_specials(tokenizer)),
                      key=len, reverse=True)
    return [t for t in specials if t and t in tail]


def _added_specials(tokenizer) -> list[str]:
    decoder = getattr(tokenizer.hf, "added_tokens_decoder", {}) or {}
    return [str(t) for t in decoder.values() if getattr(t, "special", False)]


def to_pairs(examples: Examples, tokenizer=None) -> list[tuple[str, str | Scored]]:
    """One ``(prompt, completion)`` pair per example: for chat one per conversation (``chat_pair``: the whole
    conversation, one sequence, every assistant turn scored); prompt ``""`` for text.

    Raises:
        CorpusError: chat data and a tokenizer without a chat template.
    """
    if examples.format in ("parallel", "prompt_completion"):
        return list(examples.records)
    if examples.format == "text":
        return [("", text) for text in examples.records]
    check_chat_template(tokenizer)
    where = examples.where or [examples.source] * len(examples)
    return [chat_pair(tokenizer, messages, w) for messages, w in zip(examples.records, where, strict=True)]


def turn_pairs(examples: Examples, tokenizer=None) -> list[tuple[str, str]]:
    """``to_pairs`` with one pair per assistant turn for chat (``chat_turns``): what sequence-level KD generates."""
    if examples.format != "chat":
        return to_pairs(examples, tokenizer)
    check_chat_template(tokenizer)
    where = examples.where or [examples.source] * len(examples)
    return [pair for messages, w in zip(examples.records, where, strict=True)
            for pair in chat_turns(tokenizer, messages, w)]


def texts(examples: Examples) -> list[str]:
    """Every string of the examples (what a tokenizer is trained on)."""
    if examples.format == "text":
        return list(examples.records)
    if examples.format == "chat":
        return [m["content"] for messages in examples.records for m in messages]
    return [s for pair in examples.records for s in pair]


# --------------------------------------------------------------------------------------------------------------
# Writing (sequence-level KD data)
# --------------------------------------------------------------------------------------------------------------
def replace_completions(examples: Examples, completions: Sequence[str], keys: Keys = Keys()) -> list[dict]:
    """JSON records of ``examples`` (prompt_completion or chat) with each completion (each assistant turn, in order)
    replaced by ``completions``: ``turn_pairs`` order, one string per pair."""
    it = iter(completions)
    rows = []
    for record in examples.records:
        if examples.format == "prompt_completion":
            rows.append({keys.prompt: record[0], keys.completion: next(it)})
        elif examples.format == "chat":
            rows.append({keys.messages: [{**m, "content": next(it)} if m["role"] == "assistant" else m
                                         for m in record]})
        else:
            raise ValueError(f"no completions to replace in {examples.format} data")
    return rows
