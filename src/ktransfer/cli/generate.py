"""``ktransfer generate``: a causal learner's continuations of prompts (chat-trained: its chat template applied)."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  ktransfer generate runs/chat-ka -i prompts.txt -o generations.jsonl
  echo "Translate: Ein Mann fährt Fahrrad." | ktransfer generate runs/chat-ka --beam 1 --max-length 32

MODEL is a run folder (its checkpoints/best), a checkpoint or any causal model folder. One prompt a line; a
model trained on chat data gets each line as a user message rendered by its chat template (with the
generation prompt), others get the line as it is, tokenized as tokenizer(line) tokenizes it. Output: JSONL
{"prompt", "generation"} a line, in input order. Decoding is ktransfer's (the same as evaluate's generations).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ktransfer.runtime.device import DEFAULT_DEVICE

    parser.epilog = EPILOG
    parser.add_argument("model", metavar="MODEL", help="run folder, checkpoint or causal model folder")
    parser.add_argument("-i", "--input", default="-", metavar="FILE", help="prompts, one a line (default: stdin)")
    parser.add_argument("-o", "--output", default="-", metavar="FILE", help="JSONL generations (default: stdout)")
    parser.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                        help="apply the chat template (default auto: when the model was trained on chat data)")
    parser.add_argument("--beam", type=int, default=1, help="beam width; 1 = greedy (default: 1, as transformers' "
                        "generate(); evaluate, translate and distill-data default to beam 6)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="length normalisation exponent")
    parser.add_argument("--max-length", type=int, default=256, help="most new tokens per prompt (default: 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call (default: 16)")
    parser.add_argument("--device", default=DEFAULT_DEVICE,
                        help=f"cpu, cuda, cuda:1, mps, or auto = cuda when available (default: {DEFAULT_DEVICE})")


def run(args: argparse.Namespace) -> int:
    from ktransfer.data.corpora import CorpusError
    from ktransfer.models.causal import generation_prompt_ids
    from ktransfer.models.checkpoint import CheckpointError
    from ktransfer.models.family import family_of, load_model, resolve_source
    from ktransfer.models.generation import DecodeSettings
    from ktransfer.runtime.device import choose_device

    try:
        settings = DecodeSettings(beam=args.beam, length_penalty=args.length_penalty, max_length=args.max_length)
        model, tokenizer = load_model(resolve_source(args.model), device=str(choose_device(args.device)))
        family = family_of(model)
        if family.name != "causal":
            raise ValueError(f"{args.model} is an encoder-decoder model: use `ktransfer translate`")
        source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
        with source:
            prompts = [line.rstrip("\r\n") for line in source]
        chat = {"yes": True, "no": False}.get(args.chat)
        ids = [generation_prompt_ids(model, tokenizer, p, chat=chat) for p in prompts]
        model.eval()
        outputs = family.complete(model, tokenizer, ids, settings, batch_size=args.batch_size)
    except (FileNotFoundError, CheckpointError, CorpusError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    rows = "".join(json.dumps({"prompt": p, "generation": g}, ensure_ascii=False) + "\n"
                   for p, g in zip(prompts, outputs, strict=True))
    if args.output == "-":
        sys.stdout.write(rows)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(rows)
    return 0
