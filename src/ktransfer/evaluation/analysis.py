"""The paper's Sec. 5 analyses of a learner during fine-tuning, on a fixed sample of training pairs (teacher-forced).

- ``token_entropy``: mean entropy of the learner's next-token distribution over target positions (Fig. 5);
- ``novel_token_counts``: per epoch, how many tokens of the learner's top-16 at a position were in no earlier
  epoch's top-16 at that position (Fig. 4b); epoch 0 is the learner before fine-tuning;
- the top-10 tokens with their probabilities at every position of the first few sample sentences (Table 3).

``analyze_model`` computes all three for one model; ``EpochAnalyzer`` is a ``train(..., on_epoch_end=...)`` hook that
writes ``ANALYSIS_DIR/epochN.safetensors`` (top-16 ids per position) and ``ANALYSIS_DIR/epochN.json`` (entropy,
Table 3 rows); ``collect`` reads a folder of them back, with the novel-token counts. Everything is deterministic
(eval mode, no sampling), so an epoch redone after a kill writes the same files.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

NOVEL_TOP_K = 16  # Fig. 4b: the learner's top-16
TABLE_TOP_K = 10  # Table 3: top-10 tokens


def sample_pairs(pairs: list[tuple[str, str]], n: int, seed: int = 0) -> list[tuple[str, str]]:
    """A fixed sample of ``n`` pairs (all when fewer), in a seeded random order: the same for every stage."""
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    return [pairs[i] for i in sorted(idx[:n])]


def token_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Sum of the entropies ``H(p_t) = -sum_v p_t(v) log p_t(v)`` (nats) over the labelled positions, and their count.

    Args:
        logits: (B, T, V) learner logits.
        labels: (B, T) target ids, -100 at padding.
    """
    mask = labels != -100  # (B, T)
    logp = torch.log_softmax(logits[mask].float(), dim=-1)  # (N, V)
    entropy = -(logp.exp() * logp).sum(-1)  # (N,)
    return float(entropy.sum()), int(mask.sum())


def novel_token_counts(topk_by_epoch: list[torch.Tensor], vocab_size: int) -> list[int]:
    """For each epoch e >= 1, the number of (position, token) pairs in the top-k at e that were in the top-k at no
    earlier epoch (0..e-1) at that position; entry 0 (the reference epoch) is 0.

    Args:
        topk_by_epoch: one (N, k) integer tensor per epoch: the top-k token ids at N positions (the same positions,
            in the same order, for every epoch).
        vocab_size: ids are < vocab_size (a (position, token) pair is keyed as ``position * vocab_size + token``).
    """
    counts, seen = [0], None
    for top in topk_by_epoch:
        rows = torch.arange(top.shape[0], dtype=torch.long)[:, None]  # (N, 1)
        keys = (rows * vocab_size + top.long()).reshape(-1)  # (N * k,)
        if seen is not None:
            counts.append(int((~torch.isin(keys, seen)).sum()))
            seen = torch.unique(torch.cat([seen, keys]))
        else:
            seen = torch.unique(keys)
    return counts


@torch.no_grad()
def analyze_model(model, tokenizer, pairs: list[tuple[str, str]], *, table_sentences: int = 3,
                  batch_size: int = 32, max_length: int | None = 128) -> tuple[dict, torch.Tensor]:
    """Teacher-forced pass of ``model`` over ``pairs`` (in order; the model's family encodes them, dropping any
    longer than ``max_length`` tokens; None: the model's positions, as ``data.max_length=null``).

    Returns:
        ``({"entropy": mean token entropy, "positions": N, "table": [{"sentence", "position", "reference",
        "top": [[token, prob], ...]}, ...]}, top16)`` with ``top16`` the (N, 16) int32 top-16 ids at every target
        position, sentence by sentence.
    """
    from ktransfer.models.family import family_of

    family = family_of(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    limit = family.positions(model) if max_length is None else min(max_length, family.positions(model))
    src, tgt = family.encode(pairs, tokenizer, limit, model=model, log=lambda _: None)
    total, count, tops, table = 0.0, 0, [], []
    k = min(NOVEL_TOP_K, tokenizer.vocab_size)
    try:
        for start in range(0, len(src), batch_size):
            batch = family.collate(src[start:start + batch_size], tgt[start:start + batch_size], model, tokenizer)
            inputs, labels = family.model_inputs({key: v.to(device) for key, v in batch.items()})
            logits = model(**inputs, use_cache=False).logits[..., :tokenizer.vocab_size]  # (B, T, V)
            s, n = token_entropy(logits, labels)
            total, count = total + s, count + n
            mask = labels != -100  # (B, T)
            tops.append(logits[mask].topk(k, dim=-1).indices.to(torch.int32).cpu())  # (n, k), row-major over (b, t)
            for b in range(min(logits.shape[0], table_sentences - start)):
                table += _table_rows(tokenizer, start + b, logits[b][mask[b]], labels[b][mask[b]])
    finally:
        model.train(was_training)
    top16 = torch.cat(tops) if tops else torch.zeros((0, k), dtype=torch.int32)
    return {"entropy": total / max(count, 1), "positions": count, "table": table}, top16


def _table_rows(tokenizer, sentence: int, logits: torch.Tensor, references: torch.Tensor) -> list[dict]:
    """Table 3 rows of one sentence: at each target position (``logits`` [T, V]), the reference token and the
    top-10 tokens with their probabilities."""
    p, ids = torch.softmax(logits.float(), dim=-1).topk(min(TABLE_TOP_K, logits.shape[-1]), dim=-1)
    return [{"sentence": sentence, "position": t, "reference": _piece(tokenizer, int(references[t])),
             "top": [[_piece(tokenizer, int(i)), round(float(q), 4)] for i, q in zip(ids[t], p[t], strict=True)]}
            for t in range(len(references))]


def _piece(tokenizer, token_id: int) -> str:
    """A sub-word as the tokenizer writes it (``▁`` marks a word start; special tokens by name), for Table 3."""
    return tokenizer.id_to_token(token_id) or f"<{token_id}>"


def save_epoch(folder: str | os.PathLike, epoch: int, summary: dict, top16: torch.Tensor) -> None:
    """``folder/epochN.safetensors`` (top-16 ids) and ``folder/epochN.json`` (summary), each written atomically."""
    import safetensors.torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".epoch{epoch}.safetensors.tmp"
    safetensors.torch.save_file({"top16": top16.contiguous()}, str(tmp))
    os.replace(tmp, folder / f"epoch{epoch}.safetensors")
    tmp = folder / f".epoch{epoch}.json.tmp"
    tmp.write_text(json.dumps({"epoch": epoch, **summary}, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / f"epoch{epoch}.json")


class EpochAnalyzer:
    """A ``train(..., on_epoch_end=...)`` hook: analyses the learner after each epoch into ``folder``.

    Deterministic and RNG-free (eval mode), so train's exact resume is unaffected.
    """

    def __init__(self, folder: str | os.PathLike, pairs: list[tuple[str, str]], table_sentences: int = 3):
        self.folder, self.pairs, self.table_sentences = Path(folder), pairs, table_sentences

    def __call__(self, run) -> None:
        from ktransfer.runtime import distributed

        if not distributed.is_main():  # several processes (torchrun): rank 0 alone writes; all hold the same weights
            return
        summary, top16 = analyze_model(run.model, run.tokenizer, self.pairs, table_sentences=self.table_sentences,
                                       max_length=run.cfg.data.max_length)
        s = run.state  # epochs done; a partial one (train.max_steps mid-epoch) counts as the next
        save_epoch(self.folder, s.epoch + (1 if s.batch else 0), summary, top16)


def collect(folder: str | os.PathLike, vocab_size: int) -> dict:
    """The epochs analysed in ``folder`` (consecutive from 0): ``{"epochs", "entropy", "novel", "table"}``, with
    ``table[i]`` the Table 3 rows of ``epochs[i]``."""
    import safetensors.torch

    folder = Path(folder)
    epochs, entropy, tops, tables = [], [], [], []
    e = 0
    while (folder / f"epoch{e}.json").is_file() and (folder / f"epoch{e}.safetensors").is_file():
        summary = json.loads((folder / f"epoch{e}.json").read_text(encoding="utf-8"))
        epochs.append(e)
        entropy.append(summary["entropy"])
        tables.append(summary["table"])
        tops.append(safetensors.torch.load_file(str(folder / f"epoch{e}.safetensors"))["top16"])
        e += 1
    return {"epochs": epochs, "entropy": entropy, "novel": novel_token_counts(tops, vocab_size) if tops else [],
            "table": tables}
