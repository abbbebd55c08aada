"""Weight files checked before anything reads them, and a load that must fill every weight.

- ``check_safetensors(path)`` reads a safetensors file's header only (8-byte length, then JSON) and refuses, naming
  the file, a header that is too large, truncated, not a JSON object, empty (``{}``: no tensors), or whose tensors
  have an unknown dtype, a bad shape, or byte offsets that leave the file or disagree with dtype x shape. The
  safetensors library reports these without the path (``HeaderTooLarge``, ``MetadataIncompleteBuffer``, ...).
- ``check_loading_info(info, source)`` turns ``from_pretrained(..., output_loading_info=True)``'s report into an
  error: a weight the model has and the file lacks (it would keep its random initialisation) or a tensor the model
  has no place for. Tied weights (an output head tied to the embedding) are not reported missing by transformers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
SHOWN = 5  # names listed in an error before "... and N more"


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file and the size of its data section."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (truncated: {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            raise ValueError(f"{path}: broken safetensors header (says {n:,} bytes; at most {MAX_HEADER:,})")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file (header of {n:,} bytes, file of {size:,})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: broken safetensors header (not JSON: {str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: broken safetensors header (not a JSON object)")
    return header, size - 8 - n


def check_safetensors(path) -> list[str]:
    """The tensor names of safetensors file ``path``, after checking its header against the file.

    Raises:
        ValueError: naming the file and what is wrong (see the module docstring).
    """
    path = Path(path)
    header, data = _header(path)
    names = [k for k in header if k != "__metadata__"]
    if not names:
        raise ValueError(f"{path}: holds no tensors (empty safetensors header)")
    for name in names:
        entry = header[name]
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
            raise ValueError(f"{path}: tensor {name!r}: unknown dtype in the safetensors header")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{path}: tensor {name!r}: bad shape {shape!r} in the safetensors header")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data):
            raise ValueError(f"{path}: tensor {name!r}: byte offsets {offsets!r} outside the file's {data:,} bytes "
                             "of data (truncated or corrupt)")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[entry["dtype"]]:
            raise ValueError(f"{path}: tensor {name!r}: byte offsets {offsets!r} do not fit shape {shape} of "
                             f"{entry['dtype']}")
    return names


def check_folder_weights(folder) -> None:
    """``check_safetensors`` on the model weight files of ``folder`` (``model.safetensors`` or its shards
    ``model-*.safetensors``; a checkpoint's ``optimizer.safetensors`` may well hold no tensors)."""
    for file in sorted(Path(folder).glob("model*.safetensors")):
        check_safetensors(file)


def check_loading_info(info: dict, source: str | os.PathLike) -> None:
    """Refuse a load that left weights at their random initialisation or found tensors the model has no place for.

    Raises:
        ValueError: naming the source and the tensors.
    """
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    if missing:
        raise ValueError(f"{os.fspath(source)}: the weights lack {len(missing)} tensor(s) the model needs "
                         f"({_names(missing)}): they would stay random; the file is incomplete or of another model")
    if unexpected:
        raise ValueError(f"{os.fspath(source)}: the weights hold {len(unexpected)} tensor(s) the model has no place "
                         f"for ({_names(unexpected)}): the file is of another model or architecture")
