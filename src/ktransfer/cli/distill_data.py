"""``ktransfer distill-data``: sequence-level KD data: the teacher's beam-search translations of the training source."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  ktransfer distill-data runs/teacher --out data/multi30k-seqkd --beam 5
  ktransfer train data.corpus=data/multi30k-seqkd model.init=runs/learner/checkpoints/best
  ktransfer distill-data runs/teacher/checkpoints/best --out /tmp/seqkd-small --limit 1000 --beam 1

TEACHER is a checkpoint folder or a run folder (its checkpoints/best is used). OUT becomes a complete corpus:
SPLIT.SRC (the source lines, unchanged), SPLIT.TGT (the teacher's translations, line-aligned), the other splits of
the corpus copied unchanged, and the manifest OUT/.seqkd.json. The work is done in .OUT.partial beside OUT in chunks
of --chunk-lines lines; the same command, run again after a kill, translates only what is missing. Training on OUT
(data.corpus=OUT) is sequence-level KD (Kim & Rush 2016), the `teacher` prefix source of docs/design.md.

JSONL data (--corpus FILE.jsonl or a folder of SPLIT.jsonl; prompt_completion or chat): OUT/SPLIT.jsonl holds the
same records with every completion (every assistant turn, generated after the reference conversation before it)
replaced by the teacher's, the other SPLIT.jsonl files copied; resumable in chunks as above:
  ktransfer distill-data runs/chat-teacher --corpus data/chat --out data/chat-seqkd --beam 1
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ktransfer.models.generation import DEFAULT_BEAM
    from ktransfer.runtime.device import DEFAULT_DEVICE

    parser.epilog = EPILOG
    parser.add_argument("teacher", metavar="TEACHER", help="teacher checkpoint folder, or run folder (uses "
                                                           "RUN/checkpoints/best)")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="the new corpus folder (must not exist, "
                                                                       "unless it is this command's finished output)")
    data = parser.add_argument_group("data")
    data.add_argument("--corpus", default=None, help="corpus name under $KTRANSFER_DATA or path (default: the "
                                                     "teacher's training corpus)")
    data.add_argument("--split", default="train", help="split to translate; the others are copied (default: train)")
    data.add_argument("--src-lang", default=None, help="source language (default: the teacher run's data.src_lang)")
    data.add_argument("--tgt-lang", default=None, help="target language (default: the teacher run's data.tgt_lang)")
    data.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N lines of the split")
    data.add_argument("--format", default=None, dest="data_format", choices=["parallel", "prompt_completion", "chat"],
                      help="format of --corpus (default: inferred from the path and the first record); "
                           "prompt_completion and chat give OUT/SPLIT.jsonl with the teacher's completions")
    dec = parser.add_argument_group("decoding")
    dec.add_argument("--beam", type=int, default=DEFAULT_BEAM, help=f"beam width; 1 = greedy (default: {DEFAULT_BEAM})")
    dec.add_argument("--length-penalty", type=float, default=1.0, help="length normalisation exponent (default: 1.0)")
    dec.add_argument("--max-length", type=int, default=None, metavar="N",
                     help="most target tokens per sentence (default: the teacher run's eval.max_length)")
    dec.add_argument("--batch-size", type=int, default=64, help="sentences per generate() call (default: 64)")
    dec.add_argument("--chunk-lines", type=int, default=1000, metavar="N",
                     help="lines per resumable chunk, written as it finishes (default: 1000)")
    dec.add_argument("--device", default=DEFAULT_DEVICE,
                     help=f"cpu, cuda, cuda:1, mps, or auto = cuda when available (default: {DEFAULT_DEVICE})")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    from ktransfer.data.corpora import CorpusError
    from ktransfer.evaluation.seqkd import distill_corpus, distill_examples
    from ktransfer.models.checkpoint import CheckpointError
    from ktransfer.runtime.runlock import RunFolderBusy

    log = (lambda message: print(message, file=sys.stderr)) if args.json else print
    try:
        if str(args.device).startswith("cuda"):  # refused before any model is loaded
            from ktransfer.runtime.device import choose_device

            choose_device(args.device)
        fmt = _data_format(args)
        if fmt != "parallel":
            manifest = distill_examples(
                args.teacher, args.out, data=args.corpus, fmt=fmt, split=args.split, beam=args.beam,
                length_penalty=args.length_penalty, max_length=args.max_length, batch_size=args.batch_size,
                limit=args.limit, chunk_lines=args.chunk_lines, device=args.device, progress=not args.no_progress,
                log=log)
        else:
            manifest = distill_corpus(
                args.teacher, args.out, corpus=args.corpus, split=args.split, src_lang=args.src_lang,
                tgt_lang=args.tgt_lang, beam=args.beam, length_penalty=args.length_penalty,
                max_length=args.max_length, batch_size=args.batch_size, limit=args.limit,
                chunk_lines=args.chunk_lines, device=args.device,
                progress=not args.no_progress, log=log)
    except (FileNotFoundError, FileExistsError, CorpusError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFolderBusy as e:  # another distill-data into the same --out
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output folder that is read-only or full: one line naming the path
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))
    return 0


def _data_format(args: argparse.Namespace) -> str:
    """--format, else the format of --corpus as ``ktransfer.data.formats`` infers it (parallel without --corpus)."""
    if args.data_format is not None or args.corpus is None:
        return args.data_format or "parallel"
    from ktransfer.data import formats

    return formats.infer_format(formats.locate(args.corpus))[0]
