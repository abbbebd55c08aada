"""How long a training example may be (``data.max_length``), and how many examples that drops or cuts.

``data.max_length=null`` (the default) is what the models read: the fewest positions of the
learner and the teacher (``ModelFamily.positions``: ``max_position_embeddings``, e.g. 512 for a Marian model, or
``n_positions``), capped by the tokenizer's ``model_max_length`` when that is a real length (Hugging Face writes a
huge placeholder when a tokenizer has none). An explicit ``data.max_length`` is used as given, capped by the
positions. Training (``ktransfer.training.setup``) prints what was still dropped or cut at the end of its setup, and
``ktransfer data check DATA --model MODEL`` reports it per split before any training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NO_LIMIT = 1_000_000  # a tokenizer's model_max_length at or above this is a placeholder, not a length


@dataclass(frozen=True)
class Limit:
    """The longest example kept (tokens, ``</s>`` included) and where that number comes from."""

    tokens: int
    why: str


def limit(max_length: int | None, positions: int, tokenizer=None) -> Limit:
    """``data.max_length`` resolved against the models' ``positions`` and the tokenizer's ``model_max_length``."""
    if max_length is not None:
        if max_length <= positions:
            return Limit(max_length, f"data.max_length={max_length}")
        return Limit(positions, f"data.max_length={max_length}, capped by the models' {positions} positions")
    tok_max = getattr(getattr(tokenizer, "hf", tokenizer), "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < min(positions + 1, NO_LIMIT):
        return Limit(tok_max, f"data.max_length=auto: the tokenizer's model_max_length {tok_max}")
    return Limit(positions, f"data.max_length=auto: the models' {positions} positions")


class Counter:
    """A log callback for ``ModelFamily.encode`` that also keeps the number of examples it cut (``data.truncate``)."""

    def __init__(self, log=None):
        self.log, self.cut = log, 0

    def __call__(self, message: str) -> None:
        found = re.search(r"\bcut (\d+) to fit", message)
        self.cut += int(found.group(1)) if found else 0
        if self.log is not None:
            self.log(message)


def report(what: str, total: int, kept: int, cut: int, lim: Limit) -> str | None:
    """One line on the examples of ``what`` dropped or cut at ``lim`` (None when none were)."""
    dropped = total - kept
    if not dropped and not cut:
        return None
    share = lambda n: f"{100.0 * n / max(total, 1):.1f}%"  # noqa: E731
    parts = [f"dropped {dropped} of {total} {what} ({share(dropped)}: empty or longer than {lim.tokens} tokens)"]
    if cut:
        parts.append(f"cut {cut} ({share(cut)}) to fit (data.truncate)")
    return "; ".join(parts) + f"; the limit: {lim.why}"


def check_splits(data, model_source: str, splits, *, trust_remote_code: bool = False) -> list[str]:
    """``ktransfer data check --model``: per split of ``data`` (a ``DataConfig``), the examples that training with
    ``model_source``'s tokenizer and positions would drop or cut, one line each."""
    from ktransfer.data import formats
    from ktransfer.data.corpora import read_split
    from ktransfer.models.family import family_of, load_model, resolve_source

    model, tokenizer = load_model(resolve_source(model_source), trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError(f"{model_source} has no tokenizer files")
    family = family_of(model)
    keys = formats.Keys(data.prompt_key, data.completion_key, data.messages_key, data.text_key)
    fmt = data.format if data.format != "auto" else formats.infer_format(formats.locate(data.corpus), keys)[0]
    family.prepare(model, tokenizer, src_lang=data.src_lang, tgt_lang=data.tgt_lang, fmt=fmt,
                   instruction=data.instruction)
    lim = limit(data.max_length, family.positions(model), tokenizer)
    lines = [f"with {model_source}: examples longer than {lim.tokens} tokens are "
             f"{'cut' if data.truncate else 'dropped'} ({lim.why})"]
    names = splits or (formats.split_names(data.corpus) if fmt != "parallel" else [data.train, data.valid])
    for split in names:
        if fmt == "parallel":
            pairs = read_split(data.corpus, split, data.src_lang, data.tgt_lang)
        else:
            pairs = formats.to_pairs(formats.read_examples(data.corpus, split, fmt, keys=keys), tokenizer)
        counter = Counter()
        src, _ = family.encode(pairs, tokenizer, lim.tokens, model=model, fmt=fmt, truncate=data.truncate,
                               log=counter)
        line = report("examples", len(pairs), len(src), counter.cut, lim)
        lines.append(f"  {split}: " + (line.split("; the limit:")[0] if line else f"all {len(pairs)} examples fit"))
    return lines
