"""Joint BPE over source and target with Hugging Face ``tokenizers``: encode text to ids, decode ids to plain text.

One shared vocabulary for both languages (Marian ties the embeddings). The pipeline:

- normaliser: NFKC, then every run of whitespace becomes one space, then strip;
- pre-tokenizer: Metaspace (spaces become ``▁`` and start a new word), so scripts without spaces (Thai) work and
  decoding is exact: ``decode(encode(s)) == normalize(s)``;
- model: BPE with ``<unk>`` for characters never seen in training (no byte fallback);
- decoder: Metaspace, giving back detokenized plain text, the form sacreBLEU scores.

Special tokens: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2. They are never produced from input text: a literal
``</s>`` in a sentence is encoded as ordinary characters.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

_log = logging.getLogger(__name__)
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2 in this order
METASPACE = "\u2581"  # ▁


class Tokenizer:
    """A trained joint BPE tokenizer (wraps ``tokenizers.Tokenizer``).

    Attributes:
        pad_id, eos_id, unk_id: ids of ``<pad>`` (0), ``</s>`` (1) and ``<unk>`` (2).
        vocab_size: number of ids, special tokens included.
    """

    def __init__(self, tokenizer: _HFTokenizer):
        for want_id, token in enumerate(SPECIAL_TOKENS):
            got = tokenizer.token_to_id(token)
            if got != want_id:
                raise ValueError(f"tokenizer must map {token!r} to id {want_id}, but it maps it to {got}")
        # Special tokens typed in the input are plain text, never control ids.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    # --- text <-> ids -------------------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it (NFKC, whitespace collapsed): what ``decode(encode(text))`` gives."""
        return self._tok.normalizer.normalize_str(text)

    def encode(self, text: str) -> list[int]:
        """Sub-word ids of ``text``, without special tokens (callers append ``eos_id``)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Plain detokenized text of ``ids`` (list, 1-D tensor or array); special and negative ids are skipped."""
        return _tidy(self._tok.decode(_as_id_list(ids), skip_special_tokens=True))

    def decode_batch(self, batch) -> list[str]:
        """``decode`` for each row of ``batch`` (list of lists, or a 2-D tensor/array [B, T])."""
        texts = self._tok.decode_batch([_as_id_list(row) for row in batch], skip_special_tokens=True)
        return [_tidy(t) for t in texts]

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # --- serialisation -----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The whole tokenizer (normaliser, BPE merges, vocabulary, decoder) as a JSON string."""
        return self._tok.to_str()

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        try:
            tok = _HFTokenizer.from_str(s)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"not a valid tokenizer JSON: {e}") from e
        return cls(tok)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``to_json()`` to ``path`` atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file not found: {path}") from None
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # torch.Tensor, numpy array
        ids = ids.tolist()
    return [int(i) for i in ids if i >= 0]  # -100 (ignored label positions) and other negatives are not tokens


def _tidy(text: str) -> str:
    # A skipped <unk> or a lone "▁" piece can leave doubled or edge spaces; the encoder never makes them.
    return " ".join(text.split()) if "  " in text or text[:1] == " " or text[-1:] == " " else text


def _pipeline(tokenizer: _HFTokenizer) -> _HFTokenizer:
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

    Raises:
        ValueError: ``vocab_size`` too small for the special tokens, or ``min_frequency`` < 1.
    """
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an integer > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
    tok = _pipeline(_HFTokenizer(models.BPE(unk_token=UNK)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    limited = WordLimiter(texts)
    tok.train_from_iterator(limited, trainer=trainer)
    if limited.cut:
        _log.warning("tokenizer training: %d word(s) longer than %d characters cut into pieces (BPE time grows "
                     "with the square of a word's length)", limited.cut, limited.max_chars)
    return Tokenizer(tok)


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
