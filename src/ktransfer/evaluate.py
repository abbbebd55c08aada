"""Evaluation: batched beam search with ``generate()``, sacreBLEU BLEU and chrF with their signatures, translate.

Three layers, each usable on its own:

- ``translate(model, tokenizer, sources)``: detokenized hypotheses, in the order of ``sources``;
- ``score(hypotheses, references)``: corpus BLEU and chrF (sacreBLEU defaults) with sacreBLEU's signatures;
- ``evaluate(checkpoint, corpus=..., split=...)`` or ``evaluate(checkpoint, src_file=..., ref_file=...)``: both of
  the above on a corpus split or a pair of files, hypotheses and scores written to disk.

Every reported number carries signatures that record what changes it: sacreBLEU's own (tokenizer, smoothing, case,
version) and ours for decoding (``beam:6|lp:1.0|maxlen:256|early:yes|nopad:yes|ktransfer:0.1.0``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from sacrebleu.metrics import BLEU, CHRF

from ktransfer import __version__

# --------------------------------------------------------------------------------------------------------------
# Decoding settings and their signature
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeSettings:
    """Beam-search settings that change a hypothesis (and so a score).

    Attributes:
        beam: beam width (1 = greedy).
        length_penalty: exponent ``alpha`` of the length normalisation; a finished hypothesis is ranked by
            ``sum log p / len ** alpha`` (``generate()``'s convention; 0 = no normalisation).
        max_length: most target tokens generated per sentence, ``</s>`` included.
    """

    beam: int = 6
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


# --------------------------------------------------------------------------------------------------------------
# Translation
# --------------------------------------------------------------------------------------------------------------


def _max_new_tokens(model, max_length: int) -> int:
    # The decoder input is [start] + generated tokens; its positions must exist in the positional table.
    positions = getattr(model.config, "max_position_embeddings", None)
    return min(max_length, positions - 1) if positions else max_length


@torch.inference_mode()
def _generate(model, batch: list[list[int]], pad_id: int, eos_id: int, settings: DecodeSettings):
    """Beam search on one batch of source ids (each ending with ``</s>``); returns [B, T] generated ids."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    S = max(map(len, batch))
    input_ids = torch.full((len(batch), S), pad_id, dtype=torch.long)  # (B, S), padded on the right
    for b, row in enumerate(batch):
        input_ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    attention_mask = (torch.arange(S)[None, :] < torch.tensor([len(r) for r in batch])[:, None]).long()
    start_id = getattr(model.config, "decoder_start_token_id", None)
    start_id = pad_id if start_id is None else start_id
    gen = GenerationConfig(
        num_beams=settings.beam,
        length_penalty=float(settings.length_penalty),
        max_length=_max_new_tokens(model, settings.max_length) + 1,  # the decoder start symbol + generated tokens
        early_stopping=settings.beam > 1,  # stop once `beam` hypotheses are finished (greedy: no beam)
        do_sample=False,
        num_return_sequences=1,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=start_id,
        forced_eos_token_id=eos_id,  # a hypothesis cut at max_length still ends with </s>
        suppress_tokens=[pad_id],  # <pad> is the decoder's start symbol and never a target
    )
    # generate() fills every setting left unset here from model.generation_config; swapping ours in for the call
    # keeps a checkpoint's own settings (no_repeat_ngram_size, min_length, bad words, ...) out of the search, so
    # the decode signature tells the whole story.
    saved, model.generation_config = model.generation_config, gen
    try:
        return model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                              generation_config=gen)
    finally:
        model.generation_config = saved


def translate(model, tokenizer, sources: Sequence[str], *, beam: int = 6, length_penalty: float = 1.0,
              max_length: int = 256, batch_size: int = 64, progress: bool = False) -> list[str]:
    """Beam-search translations of ``sources``, detokenized, in the order of ``sources``.

    Sentences are sorted by length into batches of ``batch_size`` (little padding), translated with
    ``model.generate()`` under ``torch.inference_mode`` with the model in eval mode (its previous mode is restored
    afterwards), and put back in their original order. A batched sentence gets the same hypothesis as the sentence
    alone (padding is masked). An empty (or blank) source gives an empty hypothesis without running the model; a
    source longer than the model's positional table is cut to fit.

    Args:
        model: a ``MarianMTModel`` (any device; inputs follow its parameters); a decoder-only LM is handed to
            ``ktransfer.causal.translate`` (same arguments and result).
        tokenizer: a ``ktransfer.tokenizer.Tokenizer`` (``encode_batch``, ``decode``, ``pad_id``, ``eos_id``).
        sources: raw source sentences.
        beam, length_penalty, max_length: see ``DecodeSettings``.
        batch_size: sentences per ``generate()`` call (each one expands to ``beam`` rows).
        progress: show a progress bar with sentences/s on stderr.

    Raises:
        ValueError: a setting out of range.
    """
    if not getattr(model.config, "is_encoder_decoder", True):  # decoder-only LM: prompt + continuation
        from ktransfer import causal

        return causal.translate(model, tokenizer, sources, beam=beam, length_penalty=length_penalty,
                                max_length=max_length, batch_size=batch_size, progress=progress)
    settings = DecodeSettings(beam=beam, length_penalty=length_penalty, max_length=max_length)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    sources = list(sources)
    hypotheses = [""] * len(sources)
    positions = getattr(model.config, "max_position_embeddings", None) or 10**9
    encoded = tokenizer.encode_batch(sources)
    ids = {i: [*e[:positions - 1], tokenizer.eos_id] for i, e in enumerate(encoded) if e}
    order = sorted(ids, key=lambda i: (-len(ids[i]), i))  # longest first: a too-big batch fails at once

    from tqdm import tqdm

    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(sources), unit="sent", desc="translate", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            bar.update(len(sources) - len(ids))  # empty sources are done already
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                out = _generate(model, [ids[i] for i in chunk], tokenizer.pad_id, tokenizer.eos_id, settings)
                for i, row in zip(chunk, out[:, 1:].tolist(), strict=True):  # drop the decoder start symbol
                    if tokenizer.eos_id in row:  # what follows </s> is padding
                        row = row[:row.index(tokenizer.eos_id)]
                    hypotheses[i] = tokenizer.decode(row)
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return hypotheses


def rank_device(device: str) -> str:
    """The device this process decodes on, with training's conventions (``train._device``): ``auto`` is ``cuda``
    when a GPU is visible, else ``cpu``; under torchrun with several processes, ``cuda`` means GPU ``LOCAL_RANK``
    (the GPU ``distributed.init`` made current); anything else (``cpu``, ``cuda:1``, ``mps``) is used as given."""
    from ktransfer import distributed

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and distributed.world_size() > 1:
        return f"cuda:{distributed.local_rank()}"
    return device


def translate_sharded(model, tokenizer, sources: Sequence[str], *, progress: bool = False, **kwargs) -> list[str]:
    """``translate`` spread over the processes of a running group (``distributed.map_sharded``): rank r translates
    the r-th contiguous share of ``sources`` (shares differ by at most one sentence), and every rank gets all
    hypotheses in the order of ``sources``. The progress bar (``progress``) is rank 0's, over its own share. One
    process: ``translate(model, tokenizer, sources, ...)`` itself. Every rank must call it with the same sources."""
    from ktransfer import distributed

    show = progress and distributed.is_main()
    return distributed.map_sharded(lambda part: translate(model, tokenizer, part, progress=show, **kwargs), sources)


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------


def score(hypotheses: Sequence[str], references: Sequence[str], *,
          decoding: DecodeSettings | None = None) -> dict:
    """Corpus BLEU and chrF of detokenized ``hypotheses`` against one reference each (sacreBLEU defaults:
    BLEU 13a tokenisation, exp smoothing, mixed case; chrF2 on characters).

    Args:
        hypotheses, references: aligned detokenized sentences.
        decoding: the settings that produced the hypotheses; adds ``decode_signature``.

    Returns:
        ``{"bleu", "chrf", "bleu_signature", "chrf_signature", "bleu_detail", "bp", "ratio", "hyp_len", "ref_len",
        "precisions", "sentences"}`` (+ ``"decode_signature"``); scores on a 0-100 scale.

    Raises:
        ValueError: different numbers of hypotheses and references, or none.
    """
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references: they must be aligned")
    if not hypotheses:
        raise ValueError("nothing to score: 0 hypotheses")
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    result = {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_detail": b.format(),  # "BLEU = 35.12 66.1/41.0/27.2/18.6 (BP = 1.000 ratio = ...)"
        "bp": b.bp,
        "ratio": b.ratio,
        "hyp_len": b.sys_len,
        "ref_len": b.ref_len,
        "precisions": list(b.precisions),
        "sentences": len(hypotheses),
    }
    if decoding is not None:
        result["decode_signature"] = decoding.signature()
    return result


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------

CHECKPOINT_FILES = ("state.json", "model.safetensors")


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in CHECKPOINT_FILES)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder of ``path``: a checkpoint itself, or a run folder (its ``checkpoints/best``).

    Raises:
        FileNotFoundError: nothing at ``path``, or no checkpoint there; the message says what to pass instead.
    """
    p = Path(path).expanduser()
    if not p.exists() and any(p.parent.glob(f".{p.name}.old-*")):
        return p  # a save killed between its two renames: load_checkpoint reads the whole copy beside it
    if not p.exists():
        hint = ""
        if p.name in ("best", "last") and p.parent.name == "checkpoints" and p.parent.is_dir():
            others = sorted(x.name for x in p.parent.iterdir() if _is_checkpoint(x))
            hint = f" (the run has {', '.join(others) if others else 'no checkpoint yet'})"
        raise FileNotFoundError(f"checkpoint not found: {p}{hint}")
    if _is_checkpoint(p):
        return p
    best, last = p / "checkpoints" / "best", p / "checkpoints" / "last"
    if _is_checkpoint(best):
        return best
    if (p / "checkpoints").is_dir() or (p / "config.yaml").is_file():
        more = f"; {last} exists, pass it to use the last checkpoint" if _is_checkpoint(last) else ""
        raise FileNotFoundError(f"run folder {p} has no best checkpoint: {best} not found{more}")
    raise FileNotFoundError(
        f"{p} is not a checkpoint (no {' or '.join(CHECKPOINT_FILES)} in it); pass a checkpoint folder, or a run "
        f"folder whose checkpoints/best will be used (e.g. {p / 'checkpoints' / 'best'})"
    )


def _run_data(config: dict) -> dict:
    """The ``data`` section of the run config saved in a checkpoint (corpus, src_lang, tgt_lang, test, ...)."""
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else {}


def _same_corpus(a, b) -> bool:
    from ktransfer.data import CorpusError, resolve_corpus

    if a is None or b is None:
        return False
    if str(a) == str(b):
        return True
    try:
        return resolve_corpus(a).resolve() == resolve_corpus(b).resolve()
    except CorpusError:
        return False


def _default_out_dir(checkpoint: Path) -> Path:
    # RUN/checkpoints/best -> RUN/eval/best: beside the run's other outputs, and not inside a checkpoint folder
    # that the next save replaces.
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / checkpoint.name
    return checkpoint.parent / f"{checkpoint.name}.eval"


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def evaluate(model_path: str | os.PathLike, *, corpus: str | os.PathLike | None = None, split: str | None = None,
             src_file: str | os.PathLike | None = None, ref_file: str | os.PathLike | None = None,
             src_lang: str | None = None, tgt_lang: str | None = None, beam: int = 6, length_penalty: float = 1.0,
             max_length: int = 256, batch_size: int = 64, out_dir: str | os.PathLike | None = None,
             limit: int | None = None, device: str = "cpu", progress: bool = False) -> dict:
    """Translate a corpus split (or a source file) with a checkpoint and score it against the references.

    Two modes:

    - corpus: ``corpus`` (a name under ``$KTRANSFER_DATA`` or a path; default: the corpus the checkpoint was trained
      on) and ``split`` (default: the run's ``data.test`` for its own corpus, else ``"test"``); languages from the
      arguments, else the checkpoint's run config, else the corpus name (``multi30k-de-en``);
    - files: ``src_file`` and ``ref_file``, line-aligned; ``split`` defaults to the source file's name without its
      language suffix (``test2016.de`` -> ``test2016``).

    Writes ``<out_dir>/hyp.<split>.<tgt_lang>`` (one detokenized hypothesis per line) and
    ``<out_dir>/scores.<split>.json`` (the returned dict). ``out_dir`` defaults to ``RUN/eval/<checkpoint name>``
    for a checkpoint inside a run folder.

    Under torchrun (``WORLD_SIZE`` > 1) it joins the process group (``distributed.session(device)``, as ``train``
    does): each rank beam-searches a contiguous share of the sentences (``translate_sharded``), the hypotheses are
    gathered in source order, rank 0 alone scores and writes the files, and every rank returns rank 0's result. The
    hypotheses and scores are those of one process (a sentence's hypothesis does not depend on its batch).

    Args:
        model_path: a checkpoint folder, or a run folder (its ``checkpoints/best`` is used).
        beam, length_penalty, max_length, batch_size: see ``translate``.
        limit: evaluate only the first ``limit`` sentences (None = all); recorded in the result.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"auto"``; see ``rank_device`` for torchrun).

    Returns:
        ``score()``'s dict plus ``decode_signature``, ``time_s`` and ``sentences_per_s`` (translation only), the
        settings, the checkpoint, the data and the files written.

    Raises:
        FileNotFoundError: no checkpoint at ``model_path``.
        ValueError: both or neither of corpus mode and file mode, source and reference files of different line
            counts (``ktransfer.data.CorpusError`` for a corpus that is missing or malformed).
    """
    from ktransfer.checkpoint import load_checkpoint, model_from_checkpoint
    from ktransfer.data import language_pair, read_lines, read_split, resolve_corpus, split_files

    settings = DecodeSettings(beam=beam, length_penalty=length_penalty, max_length=max_length)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 or None, got {limit!r}")
    checkpoint = resolve_checkpoint(model_path)
    ckpt = load_checkpoint(checkpoint, with_optimizer=False)
    files_mode = src_file is not None or ref_file is not None
    if files_mode and corpus is not None:
        raise ValueError("give either a corpus (with a split) or --src/--ref files, not both")
    if files_mode:
        if src_file is None or ref_file is None:
            raise ValueError(f"file mode needs both a source and a reference file; got src={src_file}, ref={ref_file}")
        src_path, ref_path = Path(src_file), Path(ref_file)
        sources, references = read_lines(src_path), read_lines(ref_path)
        if len(sources) != len(references):
            raise ValueError(f"source file {src_path} has {len(sources)} lines but reference file {ref_path} has "
                             f"{len(references)} lines: they must be line-aligned")
        if not sources:
            raise ValueError(f"source file {src_path} is empty")
        split = split or (src_path.stem if src_path.suffix else src_path.name)
        tgt_lang = tgt_lang or (ref_path.suffix[1:] if ref_path.suffix else "hyp")
        data_info = {"src_file": str(src_path), "ref_file": str(ref_path), "src_lang": src_lang, "tgt_lang": tgt_lang}
    else:
        run = _run_data(ckpt.config)
        corpus = corpus if corpus is not None else run.get("corpus")
        if corpus is None:
            raise ValueError(f"no corpus given and checkpoint {checkpoint} does not name one; pass a corpus or files")
        split = split or (run.get("test") if _same_corpus(corpus, run.get("corpus")) else None) or "test"
        src_lang, tgt_lang = src_lang or run.get("src_lang"), tgt_lang or run.get("tgt_lang")
        if src_lang is None or tgt_lang is None:
            pair = language_pair(corpus)
            src_lang, tgt_lang = src_lang or pair[0], tgt_lang or pair[1]
        pairs = read_split(corpus, split, src_lang, tgt_lang)
        sources, references = [s for s, _ in pairs], [t for _, t in pairs]
        src_path, ref_path = split_files(corpus, split, src_lang, tgt_lang)
        data_info = {"corpus": str(corpus), "corpus_path": str(resolve_corpus(corpus)), "src_file": str(src_path),
                     "ref_file": str(ref_path), "src_lang": src_lang, "tgt_lang": tgt_lang}

    sources, references = sources[:limit], references[:limit]
    from ktransfer import distributed

    # torchrun: join the group (gloo on CPU, nccl on CUDA; a no-op for one process); every rank beam-searches a
    # contiguous share of the sentences, rank 0 alone scores and writes, and every rank returns rank 0's result.
    with distributed.session(device):
        main, world = distributed.is_main(), distributed.world_size()
        model, tokenizer = model_from_checkpoint(ckpt, rank_device(device)), ckpt.tokenizer
        start = time.perf_counter()
        hypotheses = translate_sharded(model, tokenizer, sources, beam=settings.beam,
                                       length_penalty=settings.length_penalty, max_length=settings.max_length,
                                       batch_size=batch_size, progress=progress)
        elapsed = time.perf_counter() - start  # all shards gathered: the slowest rank's time
        result = None
        if main:
            result = _score_and_write(hypotheses, references, settings, elapsed, out_dir, checkpoint, split,
                                      tgt_lang, data_info, {
                                          "batch_size": batch_size, "device": str(device), "processes": world,
                                          "effective_max_new_tokens": _max_new_tokens(model, settings.max_length),
                                      }, limit)
        return distributed.broadcast(result)


def _score_and_write(hypotheses: list[str], references: list[str], settings: DecodeSettings, elapsed: float,
                     out_dir, checkpoint: Path, split: str, tgt_lang: str, data_info: dict, run_settings: dict,
                     limit: int | None) -> dict:
    """``evaluate``'s result (scores, speed, settings, data, files) and its two files (rank 0's job)."""
    result = score(hypotheses, references, decoding=settings)
    out = Path(out_dir) if out_dir is not None else _default_out_dir(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    hyp_file, scores_file = out / f"hyp.{split}.{tgt_lang}", out / f"scores.{split}.json"
    result.update({
        "time_s": round(elapsed, 3),
        "sentences_per_s": round(len(hypotheses) / elapsed, 2) if elapsed > 0 else None,
        "settings": {**asdict(settings), **run_settings},
        "checkpoint": str(checkpoint),
        "split": split,
        "limit": limit,
        **data_info,
        "hyp_file": str(hyp_file),
        "scores_file": str(scores_file),
    })
    _write_text(hyp_file, "".join(h + "\n" for h in hypotheses))
    _write_text(scores_file, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_result(result: dict) -> str:
    """A few readable lines: the scores with their signatures, the speed, the files written."""
    where = result.get("corpus") or result.get("src_file")
    lines = [
        f"{where} {result.get('split')} ({result.get('src_lang') or '?'}->{result.get('tgt_lang')}), "
        f"{result['sentences']} sentences, checkpoint {result.get('checkpoint')}",
        f"BLEU = {result['bleu']:.2f}   {result['bleu_signature']}",
        f"  {result['bleu_detail']}",
        f"chrF = {result['chrf']:.2f}   {result['chrf_signature']}",
        f"decoding: {result.get('decode_signature', '-')}",
    ]
    if "time_s" in result:
        lines.append(f"time: {result['time_s']:.1f} s, {result['sentences_per_s']} sentences/s")
    if "hyp_file" in result:
        lines.append(f"hypotheses: {result['hyp_file']}")
        lines.append(f"scores:     {result['scores_file']}")
    return "\n".join(lines)
