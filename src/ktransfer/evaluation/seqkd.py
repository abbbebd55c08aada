"""Sequence-level knowledge distillation (Kim & Rush 2016): the teacher's beam-search translations become the targets.

The third prefix source, beside the reference and the learner's own samples (``ktransfer.training.prefixes``): the
learner is
trained on ``(x, y^)`` with ``y^ = beam_search(q, x)`` the teacher's translation of the training source, so both NLL
and the divergence see the teacher's outputs as prefixes. The translation is done once, into a corpus folder in the
standard layout, and training uses it as any corpus::

    ktransfer distill-data runs/teacher --out data/multi30k-seqkd --beam 5
    ktransfer train data.corpus=data/multi30k-seqkd objective.kind=kd model.teacher=runs/teacher/checkpoints/best

The folder holds ``SPLIT.SRC`` (the source lines of the corpus, unchanged), ``SPLIT.TGT`` (the teacher's
translations, line-aligned), the corpus's other splits copied unchanged (validation and test keep their human
references) and ``.seqkd.json``, the manifest (teacher, corpus, decode settings and signature, counts). The name is
hidden so that ``ktransfer.data.corpora.corpus_layout`` does not read it as a ``SPLIT.LANG`` file.

Robustness: the work happens in ``.FOLDER.partial`` beside the destination, which is renamed into place only once it is
complete. Sources are translated in chunks of ``chunk_lines`` lines, each written (atomically) as it finishes; a
killed run started again with the same settings translates only the chunks it lacks. Settings that differ from those
of a partial or finished folder are an error that names them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ktransfer.data.corpora import corpus_layout, read_split, resolve_corpus
from ktransfer.evaluation.evaluate import translate
from ktransfer.models.checkpoint import STATE_FILE, run_config_of
from ktransfer.models.family import load_model, resolve_source
from ktransfer.models.generation import DecodeSettings
from ktransfer.models.tokenizer import load_tokenizer
from ktransfer.runtime import nofollow, tempdirs
from ktransfer.runtime.device import choose_device

MANIFEST = ".seqkd.json"
_WORK = ".chunks"  # inside the partial folder: job.json and the translated chunks


def _write_atomic(path: Path, text: str) -> None:
    nofollow.refuse_link(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = nofollow.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # never a planted link's target
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _one_writer(out: Path):
    """Hold ``.OUT.lock`` beside ``out`` while this process makes it: a second ``distill-data`` into the same folder
    stops at once naming the first one's PID (``ktransfer.runtime.tempdirs``)."""
    return tempdirs.building(out, lambda who: f"{out} is being made by {who} (another distill-data into this --out); "
                                              "wait for it to finish and run again (the finished folder is reused), "
                                              "or choose another --out")


def _one_line(text: str) -> str:
    """A hypothesis as one corpus line (``read_lines`` splits on newlines and strips each line)."""
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def _differences(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    return "; ".join(f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k))


def distill_corpus(teacher: str | os.PathLike, out: str | os.PathLike, *, corpus: str | os.PathLike | None = None,
                   split: str = "train", src_lang: str | None = None, tgt_lang: str | None = None, beam: int = 5,
                   length_penalty: float = 1.0, max_length: int | None = None, batch_size: int = 64,
                   limit: int | None = None, chunk_lines: int = 1000, device: str = "cpu", progress: bool = False,
                   log: Callable[[str], object] = print) -> dict:
    """Translate ``split`` of a corpus with ``teacher`` (beam search, ``ktransfer.evaluation.evaluate.translate``) into
    a new
    corpus folder ``out`` (see the module docstring); returns its manifest.

    Args:
        teacher: any model source of ``ktransfer.models.family`` (checkpoint, run folder, Hugging Face folder, hub id).
        corpus, src_lang, tgt_lang: the corpus to translate; default: the teacher's training corpus and languages
            (a ktransfer checkpoint's run config).
        split: the split translated (the others are copied).
        beam, length_penalty, max_length: decode settings (``max_length`` default: the teacher run's
            ``eval.max_length``, else 256).
        batch_size: sentences per ``generate()`` call (does not change the output).
        limit: translate only the first N lines of the split.
        chunk_lines: lines per resumable chunk.

    Raises:
        FileNotFoundError: no model at ``teacher``. FileExistsError: ``out`` exists and is not this job's finished
        corpus. ValueError: bad settings, or a partial folder made with other settings. CorpusError: the corpus is
        missing or malformed.
    """
    if not isinstance(chunk_lines, int) or chunk_lines < 1:
        raise ValueError(f"chunk_lines must be an integer >= 1, got {chunk_lines!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 or None, got {limit!r}")
    where = resolve_source(teacher)
    job, decode, sources = _job(where, corpus, split, src_lang, tgt_lang, beam, length_penalty, max_length, limit,
                                chunk_lines)
    out = Path(out).expanduser()
    with _one_writer(out):
        if out.exists():
            return _finished(out, job, log)
        work, chunks = _work_folder(out, job)
        t0 = time.time()
        hyps = _translate_chunks(where, chunks, sources, chunk_lines, decode, batch_size, device, progress, log)
        copied = _assemble(work, job, sources, hyps)
        manifest = {
            "kind": "seqkd", "job": job, "teacher": job["teacher"], "corpus": job["corpus"], "split": split,
            "src_lang": job["src_lang"], "tgt_lang": job["tgt_lang"], "decode": _decode_info(decode),
            "lines": len(sources), "empty_hypotheses": sum(not h for h in hyps), "copied_splits": copied,
            "seconds_last_session": round(time.time() - t0, 3),
        }
        _publish(work, out, manifest)
        log(f"wrote {out}: {len(sources)} {split} pairs ({job['src_lang']} source, {job['tgt_lang']} = teacher's "
            f"beam-{decode.beam} translations), copied {', '.join(copied) or 'no other splits'}; train on it with "
            f"data.corpus={out}")
        return manifest


def _job(where, corpus, split, src_lang, tgt_lang, beam, length_penalty, max_length, limit, chunk_lines):
    """``(job, decode settings, source lines)``: the settings that make a seq-KD corpus, defaults from the teacher's
    run config; the job is what a partial or finished folder must match."""
    run_cfg = run_config_of(where)
    data_cfg, eval_cfg = run_cfg.get("data") or {}, run_cfg.get("eval") or {}
    corpus = corpus if corpus is not None else data_cfg.get("corpus")
    if corpus is None:
        raise ValueError(f"{where}: the teacher names no training corpus; give one with --corpus (corpus= in Python)")
    src_lang, tgt_lang = src_lang or data_cfg.get("src_lang"), tgt_lang or data_cfg.get("tgt_lang")
    if not src_lang or not tgt_lang:
        raise ValueError(f"{where}: the teacher names no languages; give them with --src-lang and --tgt-lang "
                         "(src_lang=, tgt_lang= in Python)")
    decode = DecodeSettings(beam=beam, length_penalty=length_penalty,
                            max_length=int(max_length or eval_cfg.get("max_length") or 256))
    folder = resolve_corpus(corpus).resolve()
    sources = [s for s, _ in read_split(folder, split, src_lang, tgt_lang)][:limit]
    job = {
        **_teacher_key(where),
        "corpus": str(folder), "split": split, "src_lang": src_lang, "tgt_lang": tgt_lang,
        "beam": decode.beam, "length_penalty": float(decode.length_penalty), "max_length": decode.max_length,
        "limit": limit, "lines": len(sources), "chunk_lines": chunk_lines,
        "source_sha256": hashlib.sha256("\n".join(sources).encode("utf-8")).hexdigest(),
    }
    return job, decode, sources


def _teacher_key(where) -> dict:
    """The teacher as a job names it: its path (or hub id) and the sha256 of its training state, if it has one."""
    state = Path(where) / STATE_FILE if isinstance(where, Path) else None
    digest = hashlib.sha256(state.read_bytes()).hexdigest() if state and state.is_file() else None
    return {"teacher": str(where.resolve()) if isinstance(where, Path) else where, "teacher_state_sha256": digest}


def _work_folder(out: Path, job: dict) -> tuple[Path, Path]:
    """``(.OUT.partial, its chunk folder)`` for ``job`` (``_open_work``)."""
    work = out.parent / f".{out.name}.partial"
    return work, _open_work(work, job)


def _decode_info(decode: DecodeSettings) -> dict:
    """The decode settings and their signature, as the manifest records them."""
    return {"beam": decode.beam, "length_penalty": float(decode.length_penalty), "max_length": decode.max_length,
            "signature": decode.signature()}


def _publish(work: Path, out: Path, manifest: dict) -> None:
    """Write the manifest last, rename the complete ``work`` folder to ``out``, drop its chunks."""
    _write_atomic(work / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    os.replace(work, out)
    shutil.rmtree(out / _WORK, ignore_errors=True)


def _open_work(work: Path, job: dict) -> Path:
    """The chunk folder of the partial corpus ``work``, made for ``job`` or checked against it."""
    chunks = work / _WORK
    if (chunks / "job.json").is_file():
        saved = json.loads((chunks / "job.json").read_text(encoding="utf-8"))
        if saved != job:
            raise ValueError(f"{work} holds a partial seq-KD corpus made with other settings "
                             f"({_differences(saved, job)}); run with the same settings to resume it, or delete {work}")
        return chunks
    if work.exists():
        shutil.rmtree(work)  # a partial folder from before its job was written: nothing in it to keep
    chunks.mkdir(parents=True)
    _write_atomic(chunks / "job.json", json.dumps(job, indent=2, ensure_ascii=False))
    return chunks


def _translate_chunks(where, chunks: Path, sources: list, chunk_lines: int, decode: DecodeSettings,
                      batch_size: int, device: str, progress: bool, log, generate=None) -> list[str]:
    """The teacher's output for every source, chunk by chunk; chunks already on disk are not redone.

    ``generate(model, tokenizer, part)`` gives the outputs of a list of sources (default: ``translate`` of source
    lines with ``decode``); the model is loaded only when a chunk is missing."""
    starts = range(0, len(sources), chunk_lines)
    size = lambda k: min(chunk_lines, len(sources) - k)  # noqa: E731
    done = {k for k in starts if _read_chunk(chunks, k, size(k)) is not None}
    if done:
        log(f"resuming {chunks.parent}: {len(done)} of {len(starts)} chunks already translated")
    todo = [k for k in starts if k not in done]
    if todo:
        from tqdm import tqdm

        model, tokenizer = load_model(where, device=str(choose_device(device)))  # auto: the one device rule
        if tokenizer is None:
            raise ValueError(f"{where} has no tokenizer files")
        if generate is None:
            def generate(model, tokenizer, part):  # corpus lines: one line each
                return [_one_line(h) for h in translate(model, tokenizer, part, beam=decode.beam,
                                                        length_penalty=decode.length_penalty,
                                                        max_length=decode.max_length, batch_size=batch_size)]
        with tqdm(total=len(sources), initial=sum(size(k) for k in done), unit="sent", desc="distill-data",
                  file=sys.stderr, dynamic_ncols=True, disable=not progress) as bar:
            for k in todo:
                part = sources[k:k + chunk_lines]
                hyps = generate(model, tokenizer, part)
                _write_atomic(chunks / f"{k:010d}.json", json.dumps(list(hyps), ensure_ascii=False))
                bar.update(len(part))
    return [h for k in starts for h in _read_chunk(chunks, k, size(k))]


def _assemble(work: Path, job: dict, sources: list[str], hyps: list[str]) -> list[str]:
    """Write the translated split and copy the corpus's other splits into ``work``; returns the copied splits."""
    split, src_lang, tgt_lang, folder = job["split"], job["src_lang"], job["tgt_lang"], Path(job["corpus"])
    _write_atomic(work / f"{split}.{src_lang}", "".join(s + "\n" for s in sources))
    _write_atomic(work / f"{split}.{tgt_lang}", "".join(h + "\n" for h in hyps))
    copied = []
    for other, langs in sorted(corpus_layout(folder).items()):
        if other != split and src_lang in langs and tgt_lang in langs:
            for lang in (src_lang, tgt_lang):
                shutil.copyfile(folder / f"{other}.{lang}", work / f"{other}.{lang}")
            copied.append(other)
    return copied


def _read_chunk(chunks: Path, start: int, n: int) -> list[str] | None:
    """The translations of chunk ``start`` if it is complete (``n`` lines), else None."""
    path = chunks / f"{start:010d}.json"
    try:
        lines = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return lines if isinstance(lines, list) and len(lines) == n and all(isinstance(x, str) for x in lines) else None


def _finished(out: Path, job: dict, log) -> dict:
    """``out`` exists: its manifest when it is this job's finished corpus, else FileExistsError."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise FileExistsError(f"{out} exists and is not a seq-KD corpus (no {MANIFEST}); choose another folder") \
            from None
    if manifest.get("job") != job:
        raise FileExistsError(f"{out} holds a seq-KD corpus made with other settings "
                              f"({_differences(manifest.get('job') or {}, job)}); choose another folder")
    shutil.rmtree(out / _WORK, ignore_errors=True)  # killed between the rename and this clean-up
    log(f"{out} is complete already (nothing to do)")
    return manifest


# --------------------------------------------------------------------------------------------------------------
# Data that is not translation pairs (ktransfer.data.formats): JSONL in, JSONL out
# --------------------------------------------------------------------------------------------------------------
def distill_examples(teacher: str | os.PathLike, out: str | os.PathLike, *, data: str | os.PathLike,
                     fmt: str | None = None, split: str = "train", keys=None, beam: int = 5,
                     length_penalty: float = 1.0, max_length: int | None = None, batch_size: int = 64,
                     limit: int | None = None, chunk_lines: int = 1000, device: str = "cpu", progress: bool = False,
                     log: Callable[[str], object] = print) -> dict:
    """The teacher's completions of ``split`` of prompt_completion or chat ``data`` (every assistant turn, after the
    reference conversation before it) as a new data folder ``out``: ``SPLIT.jsonl`` with the completions replaced,
    the other ``*.jsonl`` splits of a data folder copied unchanged, and the manifest ``.seqkd.json``; returns it.

    As ``distill_corpus``: the work happens in ``.OUT.partial`` in chunks of ``chunk_lines`` completions, each written
    as it finishes; the same call after a kill generates only the chunks it lacks; ``out`` appears whole.

    Raises:
        FileExistsError: ``out`` exists and is not this job's. ValueError: text data (it has no prompt to complete),
        a teacher without tokenizer files, or a partial folder made with other settings. CorpusError: bad data.
    """
    from ktransfer.data import formats
    from ktransfer.models.family import prepare_for_data

    keys = keys or formats.Keys()
    where = resolve_source(teacher)
    path = formats.locate(data)
    fmt = fmt or formats.infer_format(path, keys)[0]
    if fmt not in ("prompt_completion", "chat"):
        raise ValueError(f"distill-data on {fmt} data: {'text data has no prompt to complete' if fmt == 'text' else ''}"
                         "; sequence-level KD data is made from prompt_completion or chat data (for text, train "
                         "with objective.prefix=learner to distil on the learner's own samples)")
    examples = formats.read_examples(data, split, fmt, keys=keys).head(limit)
    decode = DecodeSettings(beam=beam, length_penalty=length_penalty, max_length=int(max_length or 256))
    records = json.dumps(examples.records, ensure_ascii=False)
    job = {"format": fmt, **_teacher_key(where), "data": str(path.resolve()), "split": split, "beam": decode.beam,
           "length_penalty": float(decode.length_penalty), "max_length": decode.max_length, "limit": limit,
           "chunk_lines": chunk_lines, "records_sha256": hashlib.sha256(records.encode("utf-8")).hexdigest()}
    out = Path(out).expanduser()
    with _one_writer(out):
        if out.exists():
            return _finished(out, job, log)
        work, chunks = _work_folder(out, job)
        t0 = time.time()

        def generate(model, tokenizer, part):
            family = prepare_for_data(model, tokenizer, fmt)
            prompts, _ = family.encode(part, tokenizer, None, model=model, fmt=fmt, log=log)
            return family.complete(model, tokenizer, prompts, decode, batch_size=batch_size)

        pairs = formats.turn_pairs(examples, load_tokenizer(where))  # chat: the teacher's template renders the turns
        completions = _translate_chunks(where, chunks, pairs, chunk_lines, decode, batch_size, device, progress, log,
                                        generate=generate)
        if completions and not any(completions):  # not a corpus of empty completions, rc 0
            raise ValueError(f"{path} {split}: the teacher completed none of the {len(completions)} examples (every "
                             "completion is empty: prompts longer than its positions, or it ends at once)")
        rows = formats.replace_completions(examples, completions, keys)
        _write_atomic(work / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        copied = []
        if path.is_dir() and not formats.is_datasets_folder(path):
            for other in sorted(path.glob("*.jsonl")):
                if other.stem != split:
                    shutil.copyfile(other, work / other.name)
                    copied.append(other.stem)
        manifest = {"kind": "seqkd", "job": job, "format": fmt, "teacher": job["teacher"], "data": str(path),
                    "split": split, "examples": len(examples), "completions": len(completions),
                    "empty_completions": sum(not c for c in completions), "copied_splits": copied,
                    "decode": _decode_info(decode), "seconds_last_session": round(time.time() - t0, 3)}
        _publish(work, out, manifest)
        log(f"wrote {out}: {len(examples)} {fmt} examples of {split} with the teacher's completions "
            f"({len(completions)}), copied {', '.join(copied) or 'no other splits'}; train on it with "
            f"data.corpus={out}")
        return manifest

