"""Tokenizers are Hugging Face tokenizers: ``Tokenizer`` wraps any ``transformers`` tokenizer with the ids ktransfer
needs, ``load_tokenizer`` reads one from a folder, a ``tokenizer.json`` file or a hub id, and ``train_tokenizer``
trains ktransfer's own joint BPE as a ``PreTrainedTokenizerFast``.

Special ids come from the tokenizer, never assumed: ``eos_id`` is its end-of-sequence token, ``pad_id`` its padding
token or, where it has none (Llama, GPT-2), ``eos_id``; ``bos_id`` is optional. The tokenizer's special tokens stay
special (a chat template's ``<|user|>`` is one id), and decoding is the tokenizer's own (``skip_special_tokens``), so
code and whitespace come back as the tokenizer gives them.

ktransfer's joint BPE (``train_tokenizer``), one vocabulary for both languages (Marian ties the embeddings):

- normaliser: NFKC, then every run of whitespace becomes one space, then strip (translation data is one line a
  sentence);
- pre-tokenizer: Metaspace (spaces become ``▁`` and start a new word), so scripts without spaces (Thai) work and
  decoding is exact: ``decode(encode(s)) == normalize(s)``;
- model: BPE with ``<unk>`` for characters never seen in training (no byte fallback);
- special tokens ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2.

Saved with ``save_pretrained`` (a folder ``AutoTokenizer`` loads) or, for the BPE alone, as one ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from ktransfer.runtime import nofollow

_log = logging.getLogger(__name__)
PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2 in a tokenizer of train_tokenizer
METASPACE = "\u2581"  # ▁
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "source.spm", "tokenizer.model")


class Tokenizer:
    """A Hugging Face tokenizer (``self.hf``) with the special ids and the few calls ktransfer uses.

    Attributes:
        hf: the ``transformers`` tokenizer (``PreTrainedTokenizerFast``, ``MarianTokenizer``, ...).
        eos_id: end of sequence; pad_id: padding (``eos_id`` when the tokenizer has none); bos_id: start of
            sequence or None; unk_id: unknown token or None.
        vocab_size: ``len(hf)``, added tokens included.

    Raises:
        ValueError: the tokenizer has no end-of-sequence token.
    """

    def __init__(self, hf):
        if hf.eos_token_id is None:
            raise ValueError(f"tokenizer {type(hf).__name__} has no end-of-sequence token (eos_token): ktransfer "
                             "ends every target with it")
        self.hf = hf
        self.eos_id: int = int(hf.eos_token_id)
        self.pad_id: int = int(hf.pad_token_id) if hf.pad_token_id is not None else self.eos_id
        self.bos_id: int | None = None if hf.bos_token_id is None else int(hf.bos_token_id)
        self.unk_id: int | None = None if hf.unk_token_id is None else int(hf.unk_token_id)
        self.vocab_size: int = len(hf)
        self._vocab: dict[str, int] | None = None
        # A normaliser that collapses whitespace (ktransfer's BPE) makes decoded text collapse it too, so that a
        # skipped <unk> leaves no double space: decode(encode(s)) == normalize(s).
        self._collapse = self.normalize(" a \t b ") == "a b"

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size}, eos={self.eos_id}, "
                f"pad={self.pad_id})")

    # --- text <-> ids -------------------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """The text as the tokenizer's normaliser sees it (ktransfer's BPE: NFKC, whitespace collapsed)."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        normalizer = getattr(backend, "normalizer", None)
        return normalizer.normalize_str(text) if normalizer is not None else text

    def encode(self, text: str, *, target: bool = False) -> list[int]:
        """Sub-word ids of ``text`` without added special tokens (callers append ``eos_id``). ``target``: encode as
        the target side (Marian's separate target SentencePiece model; the same for one-vocabulary tokenizers)."""
        return self.encode_batch([text], target=target)[0]

    def encode_batch(self, texts: Sequence[str], *, target: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once."""
        texts = list(texts)
        if not texts:
            return []
        key = "text_target" if target else "text"
        return [list(ids) for ids in self.hf(**{key: texts}, add_special_tokens=False)["input_ids"]]

    def decode(self, ids) -> str:
        """Text of ``ids`` (list, 1-D tensor or array) as the tokenizer decodes it; special and negative ids skipped."""
        text = self.hf.decode(_as_id_list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return " ".join(text.split()) if self._collapse else text

    def decode_batch(self, batch) -> list[str]:
        """``decode`` for each row of ``batch`` (list of lists, or a 2-D tensor/array [B, T])."""
        return [self.decode(row) for row in batch]

    def vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        if self._vocab is None:
            self._vocab = dict(self.hf.get_vocab())
        return self._vocab

    def id_to_token(self, i: int) -> str | None:
        return self.hf.convert_ids_to_tokens(int(i)) if 0 <= int(i) < self.vocab_size else None

    def token_to_id(self, token: str) -> int | None:
        return self.vocab().get(token)

    # --- identity and files ------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of what decides the ids: the vocabulary, the special ids and the segmentation (the BPE / the
        SentencePiece models). Equal fingerprints mean the same text gives the same ids."""
        h = hashlib.sha256()
        h.update(json.dumps(sorted(self.vocab().items()), ensure_ascii=False).encode())
        h.update(f"{self.eos_id}:{self.pad_id}:{self.bos_id}:{self.unk_id}".encode())
        h.update(segmentation(self.hf))
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """``save_pretrained`` into the folder ``path``; a path ending in ``.json`` gets the ``tokenizers`` file alone
        (fast tokenizers only), written atomically."""
        path = Path(path)
        if path.suffix != ".json":
            nofollow.refuse_links_in(path)  # RUN/tokenizer or a file in it linked elsewhere: refused, named
            path.mkdir(parents=True, exist_ok=True)
            self.hf.save_pretrained(path)
            return
        nofollow.refuse_link(path)
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{path}: a {type(self.hf).__name__} has no tokenizer.json form; save it to a folder")
        _write_atomic(path, backend.to_str())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Same as ``load_tokenizer(path)``."""
        return load_tokenizer(path)


def segmentation(hf) -> bytes:
    """The bytes that decide how ``hf`` splits text: a fast tokenizer's JSON (vocabulary, merges, normaliser,
    pre-tokenizer), else the files its ``save_vocabulary`` writes (SentencePiece models, vocab.json)."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        body = json.loads(backend.to_str())
        body.pop("truncation", None)
        body.pop("padding", None)
        return json.dumps(body, sort_keys=True, ensure_ascii=False).encode()
    with tempfile.TemporaryDirectory() as tmp:
        files = hf.save_vocabulary(tmp)
        return b"".join(Path(f).read_bytes() for f in sorted(files))


def compare_tokenizers(a: Tokenizer, b: Tokenizer, name_a: str, name_b: str, *, allow_prefix: bool = False) -> None:
    """Raise unless ``a`` and ``b`` give the same ids for the same text.

    ``allow_prefix``: ``a`` may have more ids than ``b`` where they are all added tokens of ``a`` (a vocabulary
    padded with added tokens); ids ``0 .. len(b) - 1`` must be the same tokens.

    Raises:
        ValueError: naming the first token id that differs (both tokens), or the special id, or the segmentation.
    """
    va, vb = a.vocab(), b.vocab()
    if va != vb:
        inv_a, inv_b = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
        added = {int(i) for i in getattr(a.hf, "added_tokens_decoder", {})}
        extra_added = allow_prefix and all(i in added for i in inv_a if i not in inv_b)  # padded with added tokens
        diff = [i for i in set(inv_a) | set(inv_b) if inv_a.get(i) != inv_b.get(i) and not (extra_added and i in added
                                                                                             and i not in inv_b)]
        if diff:
            i = min(diff)
            raise ValueError(f"{name_a} and {name_b} tokenizers have different vocabularies: id {i} is "
                             f"{inv_a.get(i)!r} in {name_a} vs {inv_b.get(i)!r} in {name_b} "
                             f"({len(va)} vs {len(vb)} ids)")
    for attr in ("eos_id", "pad_id"):
        if getattr(a, attr) != getattr(b, attr):
            raise ValueError(f"{name_a} and {name_b} tokenizers differ in {attr}: {name_a} {getattr(a, attr)!r} vs "
                             f"{name_b} {getattr(b, attr)!r}")
    if va == vb and segmentation(a.hf) != segmentation(b.hf):
        raise ValueError(f"{name_a} and {name_b} tokenizers share their vocabulary of {len(va)} ids but segment "
                         "text differently (different merges, normaliser or SentencePiece model)")


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # torch.Tensor, numpy array
        ids = ids.tolist()
    return [int(i) for i in ids if i >= 0]  # -100 (ignored label positions) and other negatives are not tokens


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def is_tokenizer_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...)."""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


def from_rust(tok: RustTokenizer) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast``; its special tokens are found by name among the
    added special tokens (``<pad>``, ``</s>``, ``<unk>``, ``<s>``)."""
    from transformers import PreTrainedTokenizerFast

    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    named = {key: tok_ for key, tok_ in (("pad_token", PAD), ("eos_token", EOS), ("unk_token", UNK),
                                          ("bos_token", BOS)) if tok_ in specials}
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1_000_000, **named))


def load_tokenizer(source: str | os.PathLike, *, trust_remote_code: bool = False) -> Tokenizer:
    """The tokenizer at ``source``: a ``tokenizer.json`` file (ktransfer's BPE), a folder ``AutoTokenizer`` reads
    (``save_pretrained`` output, a model or checkpoint folder), or a hub id.

    Raises:
        ValueError: the file or folder holds no valid tokenizer (the message names it), or a hub id cannot be
            reached.
    """
    from ktransfer.models import hub

    path = Path(source).expanduser()
    if path.is_file():
        try:
            return from_rust(RustTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer file: {e}") from None
    if path.is_dir() and not is_tokenizer_folder(path):
        raise ValueError(f"{path}: no tokenizer files in this folder (looked for {', '.join(TOKENIZER_FILES)})")
    return Tokenizer(hub.load_auto_tokenizer(source, trust_remote_code=trust_remote_code))


# --------------------------------------------------------------------------------------------------------------
# Training ktransfer's joint BPE
# --------------------------------------------------------------------------------------------------------------
def _pipeline(tokenizer: RustTokenizer) -> RustTokenizer:
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 10000, min_frequency: int = 2) -> Tokenizer:
    """Train a joint BPE tokenizer on ``texts`` (pass the training split of both languages).

    Args:
        texts: raw sentences, any number of languages mixed.
        vocab_size: size of the shared vocabulary, special tokens and the character alphabet included. The result
            may be smaller when the data has fewer distinct merges.
        min_frequency: a pair is merged only if it occurs at least this often.

    Returns:
        A ``Tokenizer`` around a ``PreTrainedTokenizerFast`` (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).

    Raises:
        ValueError: ``vocab_size`` too small for the special tokens, or ``min_frequency`` < 1.
    """
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an integer > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
    tok = _pipeline(RustTokenizer(models.BPE(unk_token=UNK)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    limited = WordLimiter(texts)
    tok.train_from_iterator(limited, trainer=trainer)
    if limited.cut:
        _log.warning("tokenizer training: %d word(s) longer than %d characters cut into pieces (BPE time grows "
                     "with the square of a word's length)", limited.cut, limited.max_chars)
    return from_rust(tok)


class WordLimiter:
    """Iterate over ``texts`` with every whitespace-free run longer than ``max_chars`` cut into pieces of at most
    ``max_chars`` (spaces between them), so that BPE training stays linear in the input; ``cut`` counts such runs.

    1000 characters keeps whole sentences of scripts without spaces (Thai); a 1 MB line without a space would
    otherwise not finish training in minutes.
    """

    def __init__(self, texts: Iterable[str], max_chars: int = 1000):
        if not isinstance(max_chars, int) or max_chars < 1:
            raise ValueError(f"max_chars must be a positive integer, got {max_chars!r}")
        self.texts, self.max_chars, self.cut = texts, max_chars, 0
        self._long = re.compile(rf"\S{{{max_chars + 1},}}")

    def _split(self, match: re.Match) -> str:
        self.cut += 1
        word, n = match.group(0), self.max_chars
        return " ".join(word[i:i + n] for i in range(0, len(word), n))

    def __iter__(self):
        for text in self.texts:
            yield self._long.sub(self._split, text) if len(text) > self.max_chars else text
