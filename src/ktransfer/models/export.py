"""A trained learner as a plain Hugging Face model folder, for publishing (``ktransfer export``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ktransfer.models import adapters
from ktransfer.models.family import load_model


def export_model(source: str | os.PathLike, out: Path) -> Path:
    """Write ``source``'s model and tokenizer to ``out`` with ``save_pretrained`` (LoRA adapters merged), atomically.

    Raises:
        FileExistsError: ``out`` exists. ValueError: a model without tokenizer files. CheckpointError,
        FileNotFoundError: as ``models.load_model``.
    """
    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another folder")
    model, tokenizer = load_model(source)
    if tokenizer is None:
        raise ValueError(f"{source} has no tokenizer files")
    if adapters.is_lora(model):
        model = adapters.merged(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
