"""Encoding parallel pairs, batching by tokens or by examples, and collation into model inputs (Marian convention)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ktransfer.data.corpora import IGNORE_INDEX


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


class ExampleBatchSampler:
    """Batches of ``batch_size`` example indices, as a ``DataLoader`` with ``shuffle=True, batch_size=N`` (Hugging
    Face's ``per_device_train_batch_size``): each epoch permutes the examples (from ``seed`` and the epoch) and cuts
    the permutation into consecutive runs of ``batch_size``; the last batch of an epoch holds the rest (no example
    dropped). Same ``(seed, epoch)``, same batches; every example exactly once per epoch. The same interface as
    ``TokenBatchSampler``.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.n, self.batch_size, self.shuffle, self.seed = int(n), int(batch_size), shuffle, int(seed)
        self.epoch = 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of indices) of ``epoch``; deterministic in ``(seed, epoch)``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        return [order[i:i + self.batch_size].tolist() for i in range(0, self.n, self.batch_size)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epoch_batches(self.epoch))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


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


