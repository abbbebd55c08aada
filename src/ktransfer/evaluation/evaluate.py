"""Evaluation: batched beam search with ``generate()``, sacreBLEU BLEU and chrF with their signatures, translate.

Three layers, each usable on its own:

- ``translate(model, tokenizer, sources)``: detokenized hypotheses, in the order of ``sources``;
- ``score(hypotheses, references)``: corpus BLEU and chrF (sacreBLEU defaults) with sacreBLEU's signatures;
- ``evaluate(checkpoint, corpus=..., split=...)`` or ``evaluate(checkpoint, src_file=..., ref_file=...)``: both of
  the above on a corpus split or a pair of files, hypotheses and scores written to disk. Data that is not
  translation pairs (``ktransfer.data.formats``: prompt_completion, chat, text) gets ``evaluate_examples`` instead:
  the token-level NLL and perplexity of the completions, and the model's generation for each prompt.

Every reported number carries signatures that record what changes it: sacreBLEU's own (tokenizer, smoothing, case,
version) and ours for decoding (``beam:6|lp:1.0|maxlen:256|early:yes|nopad:yes|ktransfer:0.1.0``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from sacrebleu.metrics import BLEU, CHRF

from ktransfer.models.checkpoint import run_config_of
from ktransfer.models.family import family_of, load_model, prepare_for_data, resolve_source
from ktransfer.models.generation import DecodeSettings
from ktransfer.runtime import nofollow

# --------------------------------------------------------------------------------------------------------------
# Translation
# --------------------------------------------------------------------------------------------------------------


def translate(model, tokenizer, sources: Sequence[str], *, beam: int = 6, length_penalty: float = 1.0,
              max_length: int = 256, batch_size: int = 64, progress: bool = False) -> list[str]:
    """Beam-search translations of ``sources``, detokenized, in the order of ``sources``.

    Sentences are sorted by length into batches of ``batch_size`` (little padding), translated with
    ``model.generate()`` under ``torch.inference_mode`` with the model in eval mode (its previous mode is restored
    afterwards), and put back in their original order. A batched sentence gets the same hypothesis as the sentence
    alone (padding is masked). An empty (or blank) source gives an empty hypothesis without running the model; a
    source longer than the model's positional table is cut to fit.

    Args:
        model: an encoder-decoder or a decoder-only LM (any device; inputs follow its parameters); its family
            (``ktransfer.models.family.family_of``) does the search: the decoder after the encoded source, or the
            continuation of the prompt (instruction + source).
        tokenizer: a ``ktransfer.models.tokenizer.Tokenizer``.
        sources: raw source sentences.
        beam, length_penalty, max_length: see ``DecodeSettings``.
        batch_size: sentences per ``generate()`` call (each one expands to ``beam`` rows).
        progress: show a progress bar with sentences/s on stderr.

    Raises:
        ValueError: a setting out of range.
    """
    settings = DecodeSettings(beam=beam, length_penalty=length_penalty, max_length=max_length)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    try:
        return family_of(model).translate(model, tokenizer, list(sources), settings, batch_size=batch_size,
                                          progress=progress)
    finally:
        model.train(was_training)


def rank_device(device: str) -> str:
    """The device this process decodes on, by training's rule (``ktransfer.runtime.device.choose_device``): ``auto``
    is ``cuda`` when a GPU is visible, else ``cpu``; under torchrun with several processes, ``cuda`` means GPU
    ``LOCAL_RANK``; anything else (``cpu``, ``cuda:1``, ``mps``) is used as given."""
    from ktransfer.runtime.device import choose_device

    return str(choose_device(device))


def translate_sharded(model, tokenizer, sources: Sequence[str], *, progress: bool = False, **kwargs) -> list[str]:
    """``translate`` spread over the processes of a running group (``distributed.map_sharded``): rank r translates
    the r-th contiguous share of ``sources`` (shares differ by at most one sentence), and every rank gets all
    hypotheses in the order of ``sources``. The progress bar (``progress``) is rank 0's, over its own share. One
    process: ``translate(model, tokenizer, sources, ...)`` itself. Every rank must call it with the same sources."""
    from ktransfer.runtime import distributed

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

def _run_data(config: dict) -> dict:
    """The ``data`` section of the run config saved in a checkpoint (corpus, src_lang, tgt_lang, test, ...)."""
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else {}


def _same_corpus(a, b) -> bool:
    from ktransfer.data.corpora import CorpusError, resolve_corpus

    if a is None or b is None:
        return False
    if str(a) == str(b):
        return True
    try:
        return resolve_corpus(a).resolve() == resolve_corpus(b).resolve()
    except CorpusError:
        return False


def _default_out_dir(checkpoint: Path) -> Path:
    """Where results go without ``out_dir``: RUN/checkpoints/best -> RUN/eval/best (beside the run's other
    outputs, not inside a checkpoint folder that the next save replaces); any other model folder -> a folder
    ``eval-NAME`` in the current directory, never beside the user's model."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "eval" / checkpoint.name
    return Path.cwd() / f"eval-{checkpoint.resolve().name}"


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def evaluate(model_path: str | os.PathLike, *, corpus: str | os.PathLike | None = None, split: str | None = None,
             src_file: str | os.PathLike | None = None, ref_file: str | os.PathLike | None = None,
             src_lang: str | None = None, tgt_lang: str | None = None, beam: int = 6, length_penalty: float = 1.0,
             max_length: int = 256, batch_size: int = 64, out_dir: str | os.PathLike | None = None,
             limit: int | None = None, device: str = "cpu", progress: bool = False,
             data_format: str | None = None) -> dict:
    """Translate a corpus split (or a source file) with a checkpoint and score it against the references.

    Two modes:

    - corpus: ``corpus`` (a name under ``$KTRANSFER_DATA`` or a path; default: the corpus the checkpoint was trained
      on) and ``split`` (default: the run's ``data.test`` for its own corpus, else ``"test"``); languages from the
      arguments, else the checkpoint's run config, else the corpus name (``multi30k-de-en``);
    - files: ``src_file`` and ``ref_file``, line-aligned; ``split`` defaults to the source file's name without its
      language suffix (``test2016.de`` -> ``test2016``).

    Writes ``<out_dir>/hyp.<split>.<tgt_lang>`` (one detokenized hypothesis per line) and
    ``<out_dir>/scores.<split>.json`` (the returned dict). ``out_dir`` defaults to ``RUN/eval/<checkpoint name>``
    for a checkpoint inside a run folder, else ``./eval-<model folder name>``.

    Under torchrun (``WORLD_SIZE`` > 1) it joins the process group (``distributed.session(device)``, as ``train``
    does): each rank beam-searches a contiguous share of the sentences (``translate_sharded``), the hypotheses are
    gathered in source order, rank 0 alone scores and writes the files, and every rank returns rank 0's result. The
    hypotheses and scores are those of one process (a sentence's hypothesis does not depend on its batch).

    Args:
        model_path: a checkpoint folder, or a run folder (its ``checkpoints/best`` is used).
        beam, length_penalty, max_length, batch_size: see ``translate``.
        limit: evaluate only the first ``limit`` sentences (None = all); recorded in the result.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"auto"``; see ``rank_device`` for torchrun).
        data_format: ``ktransfer.data.formats`` format of the corpus (default: the run's ``data.format`` for its own
            corpus, else inferred); anything but ``parallel`` goes to ``evaluate_examples``.

    Returns:
        ``score()``'s dict plus ``decode_signature``, ``time_s`` and ``sentences_per_s`` (translation only), the
        settings, the checkpoint, the data and the files written.

    Raises:
        FileNotFoundError: no checkpoint at ``model_path``.
        ValueError: both or neither of corpus mode and file mode, source and reference files of different line
            counts (``ktransfer.data.corpora.CorpusError`` for a corpus that is missing or malformed).
    """
    settings = DecodeSettings(beam=beam, length_penalty=length_penalty, max_length=max_length)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 or None, got {limit!r}")
    checkpoint = resolve_source(model_path)
    if src_file is None and ref_file is None:
        examples, corpus, split = _examples_data(checkpoint, corpus, split, data_format)
        if examples is not None:
            return evaluate_examples(checkpoint, examples, corpus, split, settings, batch_size=batch_size,
                                     out_dir=out_dir, limit=limit, device=device, progress=progress)
    if src_file is not None or ref_file is not None:
        if corpus is not None:
            raise ValueError("give either a corpus (with a split) or --src/--ref files, not both")
        sources, references, split, tgt_lang, data_info = _file_data(src_file, ref_file, split, src_lang, tgt_lang)
    else:
        sources, references, split, tgt_lang, data_info = _corpus_data(checkpoint, corpus, split, src_lang, tgt_lang)
    sources, references = sources[:limit], references[:limit]
    from ktransfer.runtime import distributed

    # torchrun: join the group (gloo on CPU, nccl on CUDA; a no-op for one process); every rank beam-searches a
    # contiguous share of the sentences, rank 0 alone scores and writes, and every rank returns rank 0's result.
    with distributed.session(device):
        main, world = distributed.is_main(), distributed.world_size()
        model, tokenizer = load_model(checkpoint, device=rank_device(device))
        if tokenizer is None:
            raise ValueError(f"{checkpoint} has no tokenizer files: save the tokenizer into the model folder")
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
                                          "effective_max_new_tokens":
                                              family_of(model).max_new_tokens(model, settings.max_length),
                                      }, limit)
        return distributed.broadcast(result)


def _examples_data(checkpoint, corpus, split, data_format):
    """``(examples or None for translation pairs, corpus, split)`` of corpus mode, with the run's data settings
    where the corpus is its own: its format and keys, and its held-out validation share when its data is one file
    (then ``split`` = its ``data.valid`` gives exactly the examples it validated on)."""
    from ktransfer.data import formats

    run = _run_data(run_config_of(checkpoint))
    own = corpus is None or _same_corpus(corpus, run.get("corpus"))
    corpus = corpus if corpus is not None else run.get("corpus")
    if corpus is None:
        raise ValueError(f"no corpus given and checkpoint {checkpoint} does not name one; pass a corpus or files")
    fmt = data_format or (run.get("format") if own else None) or "auto"
    keys = formats.Keys(**{k: run[f"{k}_key"] for k in ("prompt", "completion", "messages", "text")
                           if own and isinstance(run.get(f"{k}_key"), str)})
    if fmt == "auto":
        fmt, _ = formats.infer_format(formats.locate(corpus), keys)
    if fmt == "parallel":
        return None, corpus, split
    requested = split or (run.get("valid") if own else None) or "valid"
    found, _ = formats.find_split(corpus, requested, fmt)  # as training finds it: validation, val, dev too
    if found is None and own and requested == run.get("valid"):
        every = formats.read_examples(corpus, run.get("train", "train"), fmt, keys=keys)
        held = formats.hold_out(every, run.get("valid_fraction", 0.05), run.get("split_seed", 0))[1]
        return held, corpus, requested
    split = found or requested
    return formats.read_examples(corpus, split, fmt, keys=keys), corpus, split


def evaluate_examples(model_path, examples, corpus, split: str, settings: DecodeSettings, *, batch_size: int = 64,
                      out_dir=None, limit: int | None = None, device: str = "cpu", progress: bool = False) -> dict:
    """Token-level NLL and perplexity of the model on the completions of ``examples`` (``ktransfer.data.formats``; every
    token for text data), and its generation (``settings``) for each prompt (none for text data: it has no prompt).

    One example is one conversation for chat: the NLL covers every assistant turn, the generation is the last
    assistant turn's after the conversation before it. Writes ``OUT/generations.SPLIT.jsonl`` (``{"prompt",
    "reference", "generation"}`` a line; a causal prompt decoded with its special tokens and role markers) and
    ``OUT/scores.SPLIT.json`` (the returned dict).

    Raises:
        CorpusError: bad data (naming the file and line); ValueError: a model without tokenizer files.
    """
    from ktransfer.data import formats

    model, tokenizer = load_model(model_path, device=rank_device(device))
    if tokenizer is None:
        raise ValueError(f"{model_path} has no tokenizer files: save the tokenizer into the model folder")
    examples, fmt = examples.head(limit), examples.format
    family = prepare_for_data(model, tokenizer, fmt)
    src, tgt = family.encode(formats.to_pairs(examples, tokenizer), tokenizer, family.positions(model), model=model,
                             fmt=fmt, log=lambda _: None)
    if not src:  # not "0 examples, NLL 0.0000, perplexity 1.00"
        raise ValueError(f"{corpus} {split}: no usable example among {len(examples)}: each is empty or longer than "
                         f"the model's {family.positions(model)} positions")
    start = time.perf_counter()
    nll_sum, tokens = completion_nll(model, tokenizer, src, tgt, batch_size=batch_size)
    turns = _generation_turns(family, src, tgt)
    generations = [] if fmt == "text" else family.complete(model, tokenizer, [p for p, _ in turns], settings,
                                                           batch_size=batch_size, progress=progress)
    nll = nll_sum / max(tokens, 1)
    result = {"format": fmt, "corpus": str(corpus), "split": split, "examples": len(src), "tokens": tokens,
              "nll": nll, "ppl": math.exp(min(nll, 50.0)), "generations": len(generations),
              "decode_signature": settings.signature() if generations else None, "checkpoint": str(model_path),
              "limit": limit, "time_s": round(time.perf_counter() - start, 3)}
    out = Path(out_dir) if out_dir is not None else _default_out_dir(Path(model_path))
    out.mkdir(parents=True, exist_ok=True)
    keep = family.name == "causal"  # a causal prompt as the model read it: role markers and specials kept
    rows = [{"prompt": tokenizer.hf.decode(p, skip_special_tokens=False) if keep else tokenizer.decode(p),
             "reference": tokenizer.decode(r), "generation": g} for (p, r), g in zip(turns, generations, strict=False)]
    result["generations_file"] = str(out / f"generations.{split}.jsonl")
    result["scores_file"] = str(out / f"scores.{split}.json")
    _write_text(Path(result["generations_file"]), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _write_text(Path(result["scores_file"]), json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def _generation_turns(family, src, tgt) -> list[tuple[list[int], list[int]]]:
    """``(prompt, reference)`` ids of what is generated per example: for a causal model the last scored run
    (a conversation's last assistant turn after everything before it; ``causal.last_turn``), else the pair."""
    if family.name != "causal":
        return list(zip(src, tgt, strict=True))
    from ktransfer.models.causal import last_turn

    return [last_turn(p, r) for p, r in zip(src, tgt, strict=True)]


@torch.no_grad()
def completion_nll(model, tokenizer, src, tgt, *, batch_size: int = 64, batches=None) -> tuple[float, int]:
    """``(sum of -log p over the scored tokens, their number)`` of ``model`` teacher-forced on the family's ids, in
    ``batches`` (lists of example indices, e.g. ``TokenBatchSampler``'s) or else ``batch_size`` examples at a time."""
    from ktransfer.losses.objectives import transfer_loss

    family, total, count = family_of(model), 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    if batches is None:
        batches = [range(i, min(i + batch_size, len(src))) for i in range(0, len(src), batch_size)]
    for idx in batches:
        batch = family.collate([src[i] for i in idx], [tgt[i] for i in idx], model, tokenizer)
        inputs, labels = family.model_inputs({k: v.to(device) for k, v in batch.items()})
        logits = model(**inputs, use_cache=False).logits[..., :tokenizer.vocab_size]
        out = transfer_loss(logits, None, labels, objective="nll")
        total += float(out.nll) * int(out.num_tokens)
        count += int(out.num_tokens)
    return total, count


def _file_data(src_file, ref_file, split, src_lang, tgt_lang):
    """``(sources, references, split, tgt_lang, data info)`` of a source file and its line-aligned reference file;
    ``split`` defaults to the source file's name without its language suffix."""
    from ktransfer.data.corpora import read_lines

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
    info = {"src_file": str(src_path), "ref_file": str(ref_path), "src_lang": src_lang, "tgt_lang": tgt_lang}
    return sources, references, split, tgt_lang, info


def _corpus_data(checkpoint, corpus, split, src_lang, tgt_lang):
    """``(sources, references, split, tgt_lang, data info)`` of a corpus split; corpus, split and languages default
    to the checkpoint run's (its ``data.test`` for its own corpus), else ``test`` and the corpus name's pair."""
    from ktransfer.data.corpora import language_pair, read_split, resolve_corpus, split_files

    run = _run_data(run_config_of(checkpoint))
    corpus = corpus if corpus is not None else run.get("corpus")
    if corpus is None:
        raise ValueError(f"no corpus given and checkpoint {checkpoint} does not name one; pass a corpus or files")
    split = split or (run.get("test") if _same_corpus(corpus, run.get("corpus")) else None) or "test"
    src_lang, tgt_lang = src_lang or run.get("src_lang"), tgt_lang or run.get("tgt_lang")
    if src_lang is None or tgt_lang is None:
        pair = language_pair(corpus)
        src_lang, tgt_lang = src_lang or pair[0], tgt_lang or pair[1]
    pairs = read_split(corpus, split, src_lang, tgt_lang)
    src_path, ref_path = split_files(corpus, split, src_lang, tgt_lang)
    info = {"corpus": str(corpus), "corpus_path": str(resolve_corpus(corpus)), "src_file": str(src_path),
            "ref_file": str(ref_path), "src_lang": src_lang, "tgt_lang": tgt_lang}
    return [s for s, _ in pairs], [t for _, t in pairs], split, tgt_lang, info


def _score_and_write(hypotheses: list[str], references: list[str], settings: DecodeSettings, elapsed: float,
                     out_dir, checkpoint: Path, split: str, tgt_lang: str, data_info: dict, run_settings: dict,
                     limit: int | None) -> dict:
    """``evaluate``'s result (scores, speed, settings, data, files) and its two files (rank 0's job)."""
    result = score(hypotheses, references, decoding=settings)
    out = Path(out_dir) if out_dir is not None else _default_out_dir(Path(checkpoint))
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
    """``text`` into ``path`` through a fresh temporary file (never a link's target), then renamed into place."""
    nofollow.refuse_link(path.parent)
    nofollow.refuse_link(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        nofollow.write_new(tmp, text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, e.filename or str(path)) from e


def format_result(result: dict) -> str:
    """A few readable lines: the scores with their signatures, the speed, the files written."""
    if "nll" in result and "bleu" not in result:  # evaluate_examples
        return "\n".join([
            f"{result['corpus']} {result['split']} ({result['format']}), {result['examples']} examples, checkpoint "
            f"{result['checkpoint']}",
            f"NLL = {result['nll']:.4f} per token, perplexity = {result['ppl']:.2f} ({result['tokens']} tokens)",
            f"generations: {result['generations']} ({result['decode_signature'] or 'none for text data'}) in "
            f"{result['generations_file']}",
            f"scores:      {result['scores_file']}"])
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
