"""``ktransfer export``: a checkpoint as a plain Hugging Face model folder (LoRA adapters merged into the weights)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  ktransfer export runs/chat-ka --out published/chat-ka          # RUN/checkpoints/best
  ktransfer export runs/lora-kd/checkpoints/last --out /tmp/merged

OUT gets config.json, generation_config.json, model.safetensors and the tokenizer's files: what
AutoModelForSeq2SeqLM / AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained read, without
ktransfer's training state. A LoRA learner's adapters are folded into its weights (W + (alpha / r) B A), so the
folder needs neither peft nor the base model.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("model", metavar="MODEL", help="a ktransfer checkpoint or run folder (RUN/checkpoints/best), "
                                                       "or any model folder ktransfer reads")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="the new model folder (must not exist)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ktransfer.models.checkpoint import CheckpointError
    from ktransfer.models.export import export_model
    from ktransfer.runtime.runlock import RunFolderBusy

    try:
        out = export_model(args.model, Path(args.out))
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFolderBusy as e:  # another export into the same folder
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk or read-only folder: one line naming the path
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
