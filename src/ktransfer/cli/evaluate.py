"""``ktransfer evaluate``: beam-search a corpus split (or a source file) with a checkpoint and score it."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  ktransfer evaluate runs/teacher --corpus multi30k-de-en --split test2016
  ktransfer evaluate runs/kd/checkpoints/last --split valid --beam 4 --length-penalty 0.6
  ktransfer evaluate runs/ka --src test.de --ref test.en --out results/ka

  torchrun --nproc_per_node 8 -m ktransfer evaluate runs/ka --split test2016 --device cuda
  ktransfer evaluate runs/chat-ka --corpus chat/ --split valid    # JSONL data: NLL, perplexity, generations

CHECKPOINT is a checkpoint folder or a run folder (its checkpoints/best is used). Hypotheses go to
OUT/hyp.SPLIT.TGT and the scores to OUT/scores.SPLIT.json (OUT defaults to RUN/eval/CHECKPOINT_NAME for a run's
checkpoint, else ./eval-MODEL_NAME in the current directory: nothing is written beside your model).
Under torchrun each process beam-searches a contiguous share of the sentences (--device cuda: GPU LOCAL_RANK);
rank 0 alone scores, prints and writes, with the same hypotheses and scores as one process.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ktransfer.models.generation import DEFAULT_BEAM
    from ktransfer.runtime.device import DEFAULT_DEVICE

    parser.epilog = EPILOG
    parser.add_argument("checkpoint", metavar="MODEL", help="a ktransfer checkpoint or run folder (uses "
                                                                 "RUN/checkpoints/best)")
    data = parser.add_argument_group("data (a corpus split, or a source file with its reference file)")
    data.add_argument("--corpus", default=None, help="corpus name under $KTRANSFER_DATA or path (default: the "
                                                     "checkpoint's training corpus)")
    data.add_argument("--split", default=None, help="split to evaluate (default: the run's data.test for its own "
                                                    "corpus, else test; with --src: the source file's name without "
                                                    "its language suffix)")
    data.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N examples "
                      "(sentences; conversations for chat)")
    data.add_argument("--format", default=None, dest="data_format",
                      choices=["parallel", "prompt_completion", "chat", "text"],
                      help="format of --corpus (default: the run's data.format for its own data, else inferred); "
                           "not parallel: NLL/perplexity of the completions and generations.SPLIT.jsonl")
    data.add_argument("--src", default=None, metavar="FILE", help="source sentences, one per line")
    data.add_argument("--ref", default=None, metavar="FILE", help="reference translations, line-aligned with --src")
    data.add_argument("--src-lang", default=None, help="source language (default: from the checkpoint's config, "
                                                       "else the corpus name)")
    data.add_argument("--tgt-lang", default=None, help="target language (default: as --src-lang; with --ref: its "
                                                       "suffix)")
    dec = parser.add_argument_group("decoding")
    dec.add_argument("--beam", type=int, default=DEFAULT_BEAM, help=f"beam width; 1 = greedy (default: {DEFAULT_BEAM})")
    dec.add_argument("--length-penalty", type=float, default=1.0,
                     help="length normalisation exponent: hypotheses ranked by log p / length**LP (default: 1.0)")
    dec.add_argument("--max-length", type=int, default=256,
                     help="most target tokens per sentence, </s> included; capped by the model's positions "
                          "(default: 256)")
    dec.add_argument("--batch-size", type=int, default=64, help="sentences per generate() call (default: 64)")
    dec.add_argument("--device", default=DEFAULT_DEVICE, help="cpu, cuda, cuda:1, mps, or auto = cuda when available; "
                     f"under torchrun cuda means GPU LOCAL_RANK (default: {DEFAULT_DEVICE})")
    parser.add_argument("--out", default=None, metavar="DIR", help="folder for hyp.SPLIT.LANG and scores.SPLIT.json")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    parser.add_argument("--progress", action="store_true", help="progress bar with sentences/s on stderr")


def run(args: argparse.Namespace) -> int:
    from ktransfer.data.corpora import CorpusError
    from ktransfer.evaluation.evaluate import evaluate, format_result
    from ktransfer.runtime import distributed

    try:
        from ktransfer.models.checkpoint import CheckpointError
    except ImportError:  # pragma: no cover - checkpoint module always present in a full install
        CheckpointError = RuntimeError  # noqa: N806

    try:
        result = evaluate(
            args.checkpoint, corpus=args.corpus, split=args.split, src_file=args.src, ref_file=args.ref,
            src_lang=args.src_lang, tgt_lang=args.tgt_lang, beam=args.beam, length_penalty=args.length_penalty,
            max_length=args.max_length, batch_size=args.batch_size, out_dir=args.out, limit=args.limit,
            device=args.device, progress=args.progress, data_format=args.data_format,
        )
    except (FileNotFoundError, CorpusError, CheckpointError, ValueError) as e:
        print(f"{distributed.rank_prefix()}error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output folder that is read-only or full: one line naming the path
        print(f"{distributed.rank_prefix()}error: {e.filename or 'output'}: {e.strerror or e}", file=sys.stderr)
        return 1
    if distributed.launch_rank() == 0:  # torchrun: rank 0 alone prints (evaluate() has left the group by now)
        print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_result(result))
    return 0
