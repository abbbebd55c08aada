"""A trained learner as a plain Hugging Face model folder, for publishing (``ktransfer export``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ktransfer.models import adapters
from ktransfer.models.family import load_model
from ktransfer.runtime import tempdirs


def export_model(source: str | os.PathLike, out: Path) -> Path:
    """Write ``source``'s model and tokenizer to ``out`` with ``save_pretrained`` (LoRA adapters merged), atomically:
    under ``.OUT.tmp-PID-*`` renamed into place (``ktransfer.runtime.tempdirs``: a killed export's leftover is removed
    by the next export into ``out``).

    Raises:
        FileExistsError: ``out`` exists. RunFolderBusy: another process exports into ``out``. ValueError: a model
        without tokenizer files. CheckpointError, FileNotFoundError: as ``models.load_model``.
    """
    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another folder")
    model, tokenizer = load_model(source)
    if tokenizer is None:
        raise ValueError(f"{source} has no tokenizer files")
    if adapters.is_lora(model):
        model = adapters.merged(model)
    busy = lambda who: f"{out} is being exported by {who}; wait for it to finish, or choose another folder"  # noqa: E731
    with tempdirs.building(out, busy):  # also removes the .OUT.tmp-PID-* folders of killed exports
        if out.exists():
            raise FileExistsError(f"{out} exists; choose another folder")
        tmp = tempdirs.temp_folder(out)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save(tmp)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
