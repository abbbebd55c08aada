"""Checkpoints are Hugging Face folders with ktransfer's training state beside them, written atomically and verified
on load; nothing is ever unpickled.

A checkpoint folder (``RUN/checkpoints/best``, ``last``) holds:

- what ``save_pretrained`` writes for the model (``config.json``, ``generation_config.json``, ``model.safetensors``)
  and for the tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ... or SentencePiece files), so that
  ``AutoModelForSeq2SeqLM/AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``
  load it as they load any model;
- ``optimizer.safetensors`` (when an optimizer is saved): every tensor of ``optimizer.state_dict()`` under its path,
  e.g. ``state.0.exp_avg``; the rest (param groups, non-tensor values) is in the state file;
- ``training_state.json``: the run config, the scheduler state, the train state (epoch, step, batch position, best
  metric, RNG states, ...), library versions, the size and sha256 of every other file of the folder, and a sha256 of
  its own content.

``save_checkpoint`` writes everything into a hidden sibling folder ``.NAME.tmp-XXXX``, fsyncs it, then swaps it into
place: the old folder is renamed aside (``.NAME.old-XXXX``), the new one renamed to NAME, the old one deleted. A kill at
any moment leaves either the old or the new checkpoint whole; if it lands between the two renames, the loaders read
the aside copy and the next ``save_checkpoint`` puts it back in place. ``ktransfer.models.family.load_model`` loads the
model and tokenizer of a checkpoint after ``verified_folder`` has checked every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from ktransfer.runtime import nofollow

FORMAT = "ktransfer-checkpoint"
FORMAT_VERSION = 2  # 1: state.json with the model config and tokenizer inside (before checkpoints were HF folders)
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"  # a LoRA learner's checkpoint (ktransfer.models.adapters)
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "training_state.json"
OLD_STATE_FILE = "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt; the message says what is wrong and names a good fallback."""


@dataclass
class Checkpoint:
    """The training state ``load_checkpoint`` read and verified from a checkpoint folder.

    Attributes:
        path: the folder read (the aside copy when a swap was interrupted); ``models.load_model(path)`` gives the
            model and tokenizer.
        config: the run config as a dict (``config_to_dict``).
        optimizer_state: ready for ``optimizer.load_state_dict`` (None if not saved or not loaded).
        scheduler_state: ``scheduler.state_dict()`` or None.
        train_state: the dict given to ``save_checkpoint`` plus ``"rng"`` (see ``capture_rng``).
        files: name -> {bytes, sha256} of every file of the folder but the state file.
        versions: library versions at save time.
    """

    path: Path
    config: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    train_state: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


# --- RNG ---------------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global generators, as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": cached},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(train_state: dict[str, Any]) -> None:
    """Set the global generators from ``capture_rng()`` output, or from a train state holding it under ``"rng"``.

    Raises:
        CheckpointError: no RNG state found, or one of the wrong shape.
    """
    rng = train_state.get("rng", train_state) if isinstance(train_state, dict) else None
    if not isinstance(rng, dict) or "torch" not in rng:
        raise CheckpointError("no RNG state to restore (expected capture_rng() output or a train state with 'rng')")
    try:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        n = rng["numpy"]
        np.random.set_state(("MT19937", np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"invalid RNG state in checkpoint: {e}") from e


# --- nested state <-> JSON + tensors -------------------------------------------------------------------------------
def _split(obj: Any, key: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    """JSON-ready copy of ``obj``; tensors go into ``tensors`` under their dotted path (inline when it is None)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if tensors is None:
            return {"__tensor_inline__": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                                          "data": t.flatten().tolist()}}
        tensors[key] = t.contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        sub = lambda k: f"{key}.{k}" if key else str(k)  # noqa: E731
        if all(isinstance(k, str) for k in obj):
            return {k: _split(v, sub(k), tensors) for k, v in obj.items()}
        return {"__items__": [[_split(k, "", None), _split(v, sub(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {key!r} in a checkpoint (use JSON types or tensors)")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``_split``."""
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tensor_inline__" in obj:
        d = obj["__tensor_inline__"]
        return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])
    if "__tuple__" in obj:
        return tuple(_join(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_join(k, tensors): _join(v, tensors) for k, v in obj["__items__"]}
    return {k: _join(v, tensors) for k, v in obj.items()}


# --- files -------------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _digest(path: Path) -> dict[str, Any]:
    """Fsync ``path`` and return its size and sha256."""
    h = hashlib.sha256()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _body_checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _versions() -> dict[str, str]:
    import transformers

    from ktransfer import __version__

    return {"ktransfer": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}


def _config_dict(config) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, dict):
        return json.loads(json.dumps(config))  # a plain-JSON copy (tuples become lists); fails early if not JSON
    raise TypeError(f"config must be a dict (ktransfer.training.config.config_to_dict), got {type(config).__name__}")


# --- save ----------------------------------------------------------------------------------------------------------
def save_checkpoint(path, *, model, tokenizer, config, optimizer=None, scheduler=None, train_state=None,
                    state_dict=None, optimizer_state=None) -> Path:
    """Write a checkpoint folder at ``path`` atomically (see the module docstring); returns ``path``.

    Args:
        path: the folder, e.g. ``RUN/checkpoints/last``; an existing checkpoint there is replaced.
        model: a Hugging Face model (``save_pretrained``).
        tokenizer: a ``ktransfer.models.tokenizer.Tokenizer`` (``save`` = ``save_pretrained``).
        config: the run config as a dict (``config_to_dict``).
        optimizer, scheduler: saved through their ``state_dict()`` when given.
        train_state: JSON-ready dict (epoch, step, batch position, best metric, ...; tensors allowed). When it has
            no ``"rng"`` entry, the current ``capture_rng()`` is added.
        state_dict, optimizer_state: the model's and the optimizer's full states when they are not the objects'
            own (a sharded model: ``ktransfer.runtime.fsdp``); written in place of ``model.state_dict()`` and
            ``optimizer.state_dict()``.

    Raises:
        TypeError: a value in the states that is neither JSON nor a tensor.
        OSError: the folder cannot be written (the previous checkpoint is left as it was).
    """
    path = Path(path)
    nofollow.refuse_link(path.parent)  # RUN/checkpoints or RUN/checkpoints/NAME linked elsewhere: refused, named
    nofollow.refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _finish_interrupted_swap(path)
    for stale in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # leftovers of a killed save; NAME itself is whole

    train_state = dict(train_state or {})
    train_state.setdefault("rng", capture_rng())
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, **({} if state_dict is None else
                                                                  {"state_dict": state_dict}))
        tokenizer.save(tmp)
        optimizer_json = None
        if optimizer is not None:
            tensors: dict[str, torch.Tensor] = {}
            state = optimizer.state_dict() if optimizer_state is None else optimizer_state
            optimizer_json = _split(state, "", tensors)
            safetensors.torch.save_file(tensors, tmp / OPTIMIZER_FILE, metadata={"format": "pt"})
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": _versions(),
            "model_class": type(model).__name__,
            "config": _config_dict(config),
            "optimizer": optimizer_json,
            "scheduler": _split(scheduler.state_dict(), "", None) if scheduler is not None else None,
            "train_state": _split(train_state, "", None),
            "files": {f.name: _digest(f) for f in sorted(tmp.iterdir()) if f.is_file()},
        }
        body["checksum"] = _body_checksum(body)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(body, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _swap_into_place(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError | safetensors.SafetensorError):  # disk full, read-only, permission: name the path
            raise write_error(path, e) from e
        raise
    return path


def write_error(path: Path, error: BaseException) -> OSError:
    """An ``OSError`` whose ``filename`` is the checkpoint ``path`` and whose text says why it could not be written
    (``safetensors`` reports a full disk as ``SafetensorError ... code: 28``)."""
    code = getattr(error, "errno", None)
    if code is None:
        found = re.search(r"code: (\d+)", str(error))
        code = int(found.group(1)) if found else None
    reason = os.strerror(code) if code else str(error)
    return OSError(code, f"cannot write the checkpoint ({reason}); the previous one there is unchanged", str(path))


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old)  # an empty directory target is replaced
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)  # put the previous checkpoint back
        raise
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _asides(path: Path) -> list[Path]:
    """Whole copies left by a save killed between its two renames, newest first."""
    found = []
    for d in [*path.parent.glob(f".{path.name}.old-*"), *path.parent.glob(f".{path.name}.tmp-*")]:
        problem, body = _inspect(d)
        if problem is None:
            found.append((_step(body), d.stat().st_mtime, d))
    return [d for *_, d in sorted(found, reverse=True)]


def interrupted_swap(path) -> bool:
    """Whether ``path`` is missing because a save was killed between its two renames (a whole copy lies beside it)."""
    path = Path(path)
    return not path.exists() and path.parent.is_dir() and bool(_asides(path))


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a ktransfer checkpoint folder (it has ``training_state.json``)."""
    return (Path(path) / STATE_FILE).is_file()


def refuse_old_format(path) -> None:
    """Raise ``CheckpointError`` for a checkpoint of ktransfer's first format (``state.json``, no ``config.json``)."""
    old = Path(path) / OLD_STATE_FILE
    if old.is_file() and not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"{path} is a checkpoint of an older ktransfer (format 1: {OLD_STATE_FILE}); checkpoints "
                              "are now Hugging Face folders: train it again with this version")


def _finish_interrupted_swap(path: Path) -> None:
    if not path.exists():
        asides = _asides(path)
        if asides:
            os.replace(asides[0], path)
            _fsync_dir(path.parent)


# --- verify --------------------------------------------------------------------------------------------------------
def _read_state(path: Path) -> dict[str, Any]:
    """``state.json`` of ``path``, checked; raises CheckpointError without a fallback hint."""
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    refuse_old_format(path)
    state_path = path / STATE_FILE
    try:
        text = state_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{state_path} is missing (incomplete checkpoint)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {state_path}: {e}") from e
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{state_path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): truncated or corrupt"
        ) from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{state_path} is not a ktransfer checkpoint state (no format {FORMAT!r})")
    if body.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path} has format version {body.get('format_version')!r}; this ktransfer reads {FORMAT_VERSION}"
        )
    checksum = body.pop("checksum", None)
    if checksum != _body_checksum(body):
        raise CheckpointError(f"{state_path}: checksum mismatch (the file was edited or is corrupt)")
    missing = [k for k in ("train_state", "files") if k not in body]
    model_files = ([MODEL_FILE, "config.json"] if "adapter_config.json" not in body["files"]
                   else [ADAPTER_FILE, "adapter_config.json"])  # LoRA: the adapters (the base is named there)
    if missing or any(name not in body["files"] for name in model_files):
        raise CheckpointError(f"{state_path} lacks {missing or model_files}")
    return body


def _read_file(path: Path, name: str, expect: dict[str, Any]) -> bytes:
    """The bytes of ``path/name`` after checking its size and sha256 against ``expect``."""
    file = path / name
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing (incomplete checkpoint)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e
    if len(data) != expect["bytes"]:
        what = "truncated" if len(data) < expect["bytes"] else "longer than written"
        raise CheckpointError(f"{file} is {what}: {len(data)} bytes, expected {expect['bytes']}")
    if hashlib.sha256(data).hexdigest() != expect["sha256"]:
        raise CheckpointError(f"{file}: sha256 checksum mismatch (corrupt: bytes changed after it was written)")
    return data


def _inspect(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(problem or None, state body) of a checkpoint folder, checking every file's checksum."""
    try:
        body = _read_state(path)
        for name, expect in body["files"].items():
            _read_file(path, name, expect)
    except CheckpointError as e:
        return str(e), None
    return None, body


def _step(body: dict[str, Any] | None) -> int:
    step = (body or {}).get("train_state", {}).get("step", -1)
    return step if isinstance(step, int) else -1


def find_good_checkpoint(run_dir, *, exclude=()) -> Path | None:
    """The intact checkpoint with the most training steps among the folders of ``run_dir`` (or ``run_dir/checkpoints``).

    ``exclude``: folders not to consider (e.g. the one that just failed). Returns None when there is none.
    """
    run_dir = Path(run_dir)
    skip = {Path(p).resolve() for p in ([exclude] if isinstance(exclude, str | os.PathLike) else exclude)}
    found = []
    for parent in (run_dir, run_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for d in parent.iterdir():
            if d.name.startswith(".") or not d.is_dir() or d.resolve() in skip or not (d / STATE_FILE).exists():
                continue
            problem, body = _inspect(d)
            if problem is None:
                found.append((_step(body), d.stat().st_mtime, d))
    return max(found)[2] if found else None


def _fail(path: Path, problem: str) -> CheckpointError:
    # only another checkpoint of the same run (RUN/checkpoints/*): a folder beside an arbitrary one is unrelated
    same_run = path.parent.name == "checkpoints"
    good = find_good_checkpoint(path.parent, exclude=[path]) if same_run else None
    hint = f"; the checkpoint at {good} is intact: use it instead" if good else "; no other intact checkpoint beside it"
    return CheckpointError(problem + hint)


def verify_checkpoint(path) -> None:
    """Check every file of a checkpoint (sizes, sha256, JSON); raise CheckpointError naming a fallback if bad."""
    path = Path(path)
    if not path.exists() and _asides(path):
        return
    problem, _ = _inspect(path)
    if problem is not None:
        raise _fail(path, problem)


# --- load ----------------------------------------------------------------------------------------------------------
def load_checkpoint(path, *, with_optimizer: bool = True) -> Checkpoint:
    """Read and verify a checkpoint folder (safetensors and JSON only; nothing is unpickled).

    Args:
        path: the checkpoint folder.
        with_optimizer: also read ``optimizer.safetensors`` (False leaves ``optimizer_state`` None).

    Raises:
        CheckpointError: missing folder or file, truncated or corrupt file, invalid JSON; names an intact sibling.
    """
    path = Path(path)
    attempts = 5  # a reader racing a writer that saves in a loop reads again after each swap
    for attempt in range(attempts):
        inode = _inode(path)
        target = path
        if inode is None:
            asides = _asides(path)
            if asides:  # a save was killed between its two renames: its whole copy stands in
                target = asides[0]
        try:
            return _read_checkpoint(target, with_optimizer)
        except CheckpointError as e:
            if attempt < attempts - 1 and _inode(path) != inode:
                continue  # a save swapped the folder while we read it: read the new one
            raise _fail(target, str(e)) from None
    raise AssertionError("unreachable")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _read_checkpoint(path: Path, with_optimizer: bool) -> Checkpoint:
    try:
        body = _read_state(path)
        for name, expect in body["files"].items():
            if name != OPTIMIZER_FILE:
                _read_file(path, name, expect)
        optimizer_state = None
        if with_optimizer and body.get("optimizer") is not None:
            tensors = safetensors.torch.load(_read_file(path, OPTIMIZER_FILE, body["files"][OPTIMIZER_FILE]))
            optimizer_state = _join(body["optimizer"], tensors)
        return Checkpoint(
            path=path,
            config=body.get("config", {}),
            optimizer_state=optimizer_state,
            scheduler_state=_join(body.get("scheduler"), {}),
            train_state=_join(body["train_state"], {}),
            files=body["files"],
            versions=body.get("versions", {}),
        )
    except (KeyError, TypeError, ValueError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"{path}: invalid checkpoint content ({type(e).__name__}: {e})") from e


def run_config_of(path) -> dict[str, Any]:
    """The run config saved in checkpoint ``path`` (``{}`` for a folder that is no ktransfer checkpoint, or a hub id).
    Read without verification: the model's loader verifies every file."""
    state = Path(path) / STATE_FILE if Path(path).is_dir() else None
    if state is None or not state.is_file():
        return {}
    try:
        config = json.loads(state.read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return {}
    return config if isinstance(config, dict) else {}


def verified_folder(path) -> Path:
    """The folder of checkpoint ``path`` (the aside copy of an interrupted swap) after checking every file's size and
    sha256 (the weights and tokenizer files included).

    Raises:
        CheckpointError: naming what is wrong and an intact sibling.
    """
    return load_checkpoint(path, with_optimizer=False).path


def restore_optimizer(optimizer, ckpt: Checkpoint) -> None:
    """Load the saved optimizer state into ``optimizer`` (built over the same parameters, in the same order).

    Create the scheduler *before* calling this, then ``scheduler.load_state_dict(ckpt.scheduler_state)``: building
    a ``LambdaLR`` rewrites the learning rate of every param group, which would undo the restored one.

    Raises:
        CheckpointError: the checkpoint has no optimizer state, or it does not match ``optimizer``'s parameters.
    """
    if ckpt.optimizer_state is None:
        raise CheckpointError(f"{ckpt.path} has no optimizer state (saved without one, or loaded without_optimizer)")
    try:
        optimizer.load_state_dict(ckpt.optimizer_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt.path}: optimizer state does not match this optimizer: {e}") from e
