"""What both model families share when they generate: decoding settings and their signature, the output layer's
size, the ids never generated, and a ``generate`` call that ignores the checkpoint's own generation settings
(on-policy sampling: ``ktransfer.models.sampling``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ktransfer import __version__

INSTRUCTION_KEY = "ktransfer_instruction"  # model.config attribute: the instruction heading every prompt
FORMAT_KEY = "ktransfer_data_format"  # model.config attribute: the data format a causal model was trained on


# the one beam default of `evaluate`, `translate`, `distill-data` and eval.beam (the paper's beam size); `generate`
# decodes greedily by default, as transformers' generate() does
DEFAULT_BEAM = 6


@dataclass(frozen=True)
class DecodeSettings:
    """Beam-search settings that change a hypothesis (and so a score).

    Attributes:
        beam: beam width (1 = greedy).
        length_penalty: exponent ``alpha`` of the length normalisation; a finished hypothesis is ranked by
            ``sum log p / len ** alpha`` (``generate()``'s convention; 0 = no normalisation).
        max_length: most target tokens generated per sentence, ``</s>`` included.
    """

    beam: int = DEFAULT_BEAM
    length_penalty: float = 1.0
    max_length: int = 256

    def __post_init__(self):
        if not isinstance(self.beam, int) or self.beam < 1:
            raise ValueError(f"beam must be an integer >= 1, got {self.beam!r}")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, got {self.max_length!r}")
        if not isinstance(self.length_penalty, (int, float)) or self.length_penalty != self.length_penalty:
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")

    def signature(self) -> str:
        """``beam:6|lp:1.0|maxlen:256|early:yes|nopad:yes|ktransfer:0.1.0``: early stopping of the beam when
        ``beam`` hypotheses are finished, ``<pad>`` never generated, and the version of this code."""
        return (f"beam:{self.beam}|lp:{float(self.length_penalty)}|maxlen:{self.max_length}|early:yes|nopad:yes"
                f"|ktransfer:{__version__}")


def unwrap(model):
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def output_rows(model) -> int:
    """Rows of the output layer (the logits' last dimension); may exceed the tokenizer's size (padding)."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def suppressed_ids(model, tokenizer) -> list[int]:
    """Ids never generated: the padding token (when it is not also end-of-sequence) and the output rows beyond the
    tokenizer's vocabulary (embedding padding)."""
    pad = [tokenizer.pad_id] if tokenizer.pad_id != tokenizer.eos_id else []
    return [*pad, *range(tokenizer.vocab_size, output_rows(model))]


def stop_ids(model, tokenizer) -> list[int]:
    """The ids generation ends at: the tokenizer's ``</s>`` and those of the model's ``generation_config``
    (``eos_token_id``, an id or a list: a chat model's end-of-turn token, e.g. ``<|im_end|>``)."""
    config = getattr(unwrap(model), "generation_config", None)
    more = getattr(config, "eos_token_id", None)
    more = [more] if isinstance(more, int) else list(more or [])
    return list(dict.fromkeys([tokenizer.eos_id, *more]))


def cut_at_eos(row: list[int], eos_id, keep_eos: bool) -> list[int]:
    """``row`` up to its first ``eos_id`` (an id or a collection of stop ids; kept or not); the whole row when it
    has none."""
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    for i, t in enumerate(row):
        if t in stops:
            return row[:i + int(keep_eos)]
    return row


def generate(model, gen, **inputs) -> torch.Tensor:
    """``model.generate(**inputs, generation_config=gen)`` under ``torch.inference_mode``.

    ``generate()`` fills every setting left unset in ``gen`` from ``model.generation_config``; swapping ``gen`` in for
    the call keeps a checkpoint's own settings (no_repeat_ngram_size, min_length, bad words, ...) out of the search,
    so the decode signature tells the whole story."""
    saved, model.generation_config = model.generation_config, gen
    try:
        with torch.inference_mode():
            return model.generate(**inputs, generation_config=gen)
    finally:
        model.generation_config = saved


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, S]`` int64 ids padded with ``pad_id`` (on the right, or the ``left``) and their attention mask."""
    S = max(map(len, rows))
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(S - len(row), S) if left else slice(0, len(row))
        ids[b, cols] = torch.tensor(list(row), dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask


def sorted_batches(ids: dict[int, list[int]], batch_size: int) -> list[list[int]]:
    """Keys of ``ids`` in batches of ``batch_size``, longest first (a too-big batch fails at once; little padding)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    order = sorted(ids, key=lambda i: (-len(ids[i]), i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
