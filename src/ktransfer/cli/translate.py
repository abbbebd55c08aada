"""``ktransfer translate``: translate stdin to stdout (one line in, one line out), batched beam search."""

from __future__ import annotations

import argparse
import io
import sys
from itertools import islice

EPILOG = """\
examples:
  ktransfer translate runs/teacher < test.de > test.hyp.en
  echo "Ein Mann fährt Fahrrad." | ktransfer translate runs/teacher/checkpoints/best --beam 4

  torchrun --nproc_per_node 8 -m ktransfer translate runs/teacher --device cuda -i test.de -o test.hyp.en

CHECKPOINT is a checkpoint folder or a run folder (its checkpoints/best is used). Lines are read in chunks,
sorted by length into batches and written back in input order; an empty line gives an empty line.

Under torchrun, rank 0 alone reads the input (stdin or -i FILE), chunk by chunk, and broadcasts each chunk; every
process translates a contiguous share of it (--device cuda: GPU LOCAL_RANK) and rank 0 writes all of it, in input
order, to stdout or -o FILE. The other processes neither read nor write (the workers share torchrun's stdin, so
reading it from several would split the lines among them). The output is that of one process.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ktransfer.models.generation import DEFAULT_BEAM
    from ktransfer.runtime.device import DEFAULT_DEVICE

    parser.epilog = EPILOG
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder, or run folder (uses "
                                                                 "RUN/checkpoints/best)")
    parser.add_argument("-i", "--input", default="-", metavar="FILE", help="source text, one sentence per line "
                                                                           "(default: - = stdin)")
    parser.add_argument("-o", "--output", default="-", metavar="FILE", help="translations (default: - = stdout)")
    parser.add_argument("--beam", type=int, default=DEFAULT_BEAM,
                        help=f"beam width; 1 = greedy (default: {DEFAULT_BEAM})")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="length normalisation exponent (default: 1.0)")
    parser.add_argument("--max-length", type=int, default=256, help="most target tokens per sentence (default: 256)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per generate() call (default: 64)")
    parser.add_argument("--chunk", type=int, default=None, metavar="N",
                        help="lines read before translating and writing (default: 16 x batch size); output is "
                             "flushed after each chunk")
    parser.add_argument("--device", default=DEFAULT_DEVICE, help="cpu, cuda, cuda:1, mps, or auto = cuda when "
                        f"available; under torchrun cuda means GPU LOCAL_RANK (default: {DEFAULT_DEVICE})")
    parser.add_argument("--progress", action="store_true", help="progress bar with sentences/s on stderr")


def run(args: argparse.Namespace) -> int:
    from ktransfer.models.family import resolve_source
    from ktransfer.models.generation import DecodeSettings
    from ktransfer.runtime import distributed

    try:
        DecodeSettings(beam=args.beam, length_penalty=args.length_penalty, max_length=args.max_length)
        chunk = args.chunk if args.chunk is not None else 16 * args.batch_size
        if args.batch_size < 1 or chunk < 1:
            raise ValueError(f"--batch-size and --chunk must be >= 1, got {args.batch_size} and {chunk}")
        checkpoint = resolve_source(args.checkpoint)
        if str(args.device).startswith("cuda"):  # refused before the process group or the model touch CUDA
            from ktransfer.runtime.device import choose_device

            choose_device(args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"{distributed.rank_prefix()}error: {e}", file=sys.stderr)
        return 2
    with distributed.session(args.device):  # torchrun: joins the group (a no-op for one process)
        return _translate(args, checkpoint, chunk)


def _translate(args: argparse.Namespace, checkpoint, chunk: int) -> int:
    from ktransfer.evaluation.evaluate import rank_device, translate_sharded
    from ktransfer.models.checkpoint import CheckpointError
    from ktransfer.models.family import load_model
    from ktransfer.runtime import distributed

    try:
        model, tokenizer = load_model(checkpoint, device=rank_device(args.device))
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"{distributed.rank_prefix()}error: {e}", file=sys.stderr)
        return 2

    from ktransfer.models.causal import trained_on_chat

    if trained_on_chat(model):
        print(f"error: {checkpoint} was trained on chat data: its prompts need its chat template; use `ktransfer "
              "generate MODEL` (one user message a line, the template applied)", file=sys.stderr)
        return 2
    from ktransfer.models.family import family_of
    from ktransfer.models.generation import INSTRUCTION_KEY, unwrap

    if family_of(model).name == "causal" and not isinstance(getattr(unwrap(model).config, INSTRUCTION_KEY, None), str):
        print(f"error: {checkpoint} is a causal model that ktransfer did not train (its config.json has no "
              f"{INSTRUCTION_KEY}, the prompt a ktransfer training stores): use `ktransfer generate MODEL` for a chat "
              "model, or train or distil it with ktransfer first", file=sys.stderr)
        return 2
    # Rank 0 alone opens the input and the output; the other ranks get each chunk from it (broadcast).
    main, src, dst, status = distributed.is_main(), None, None, 0
    if main:
        try:
            # UTF-8 whatever the locale; lines end at "\n" only (a stray "\r" inside a line keeps the alignment).
            src = _stdio(sys.stdin, "r") if args.input == "-" else open(args.input, encoding="utf-8",
                                                                      errors="replace", newline="\n")
            dst = _stdio(sys.stdout, "w") if args.output == "-" else open(args.output, "w", encoding="utf-8")
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1  # the empty chunk broadcast below stops the other ranks too
    try:
        lines = (line.rstrip("\r\n") for line in src) if status == 0 and src is not None else iter(())
        while batch := distributed.broadcast(list(islice(lines, chunk)) if main else None):
            hypotheses = translate_sharded(model, tokenizer, batch, beam=args.beam,
                                           length_penalty=args.length_penalty, max_length=args.max_length,
                                           batch_size=args.batch_size, progress=args.progress)
            if main:
                dst.writelines(hyp + "\n" for hyp in hypotheses)
                dst.flush()
    finally:
        for stream, name, std in ((src, args.input, sys.stdin), (dst, args.output, sys.stdout)):
            if stream is None:
                continue
            if name != "-":
                stream.close()
            elif stream is not std:
                stream.detach()  # flushes; our UTF-8 wrapper goes, sys.stdin / sys.stdout stay open
    return status



def _stdio(stream, mode: str):
    """``stream`` re-read as UTF-8 whatever the locale (a stream without a byte buffer, e.g. a test's StringIO, is
    used as it is); bad input bytes become U+FFFD, so one costs one character, not the stream."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        return stream
    if mode == "r":
        return io.TextIOWrapper(buffer, encoding="utf-8", errors="replace", newline="\n")
    stream.flush()
    return io.TextIOWrapper(buffer, encoding="utf-8", write_through=True)
