"""Every Hugging Face load in ktransfer goes through here: no code from a model folder, no pickles, no prompt.

- A folder (or hub repository) whose ``config.json`` or ``tokenizer_config.json`` has ``auto_map`` asks to run
  Python code it ships; it is refused unless the caller passes ``trust_remote_code=True`` (the user's explicit option,
  ``model.trust_remote_code=true``). ``trust_remote_code`` is always passed to transformers, so it never asks
  ``[y/N]`` on stdin.
- Weights are read from safetensors only (``use_safetensors=True``), headers checked first and every weight of the
  model required (``ktransfer.models.weights``); a folder with only pickle weights
  (``pytorch_model.bin``, ``*.pt``, ...) is refused with how to convert it.
- A local folder loads with ``local_files_only=True``. Any other string is a hub id: the local cache is tried first,
  then the network (unless ``HF_HUB_OFFLINE`` is set, or the hub's host refuses a connection: ``hub_reachable``);
  without either, one error names the id, at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ktransfer.models.sizes import check_config
from ktransfer.models.weights import check_folder_weights, check_loading_info

CODE_FILES = ("config.json", "tokenizer_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = ("convert it in an environment you trust: model = AutoModel...from_pretrained(FOLDER); "
                "model.save_pretrained(OUT, safe_serialization=True)")
TRUST_HINT = ("ktransfer does not run code from a model folder unless you allow it "
              "(model.trust_remote_code=true, or trust_remote_code=True in Python), after reading that code")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set in the environment."""
    values = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v.strip().upper() in ("1", "ON", "YES", "TRUE") for v in values)


def read_json(file: Path):
    """The JSON value in ``file``.

    Raises:
        ValueError: ``FILE: cannot read it as JSON (...)`` for an unreadable, malformed or truncated file, one nested
            deeper than Python's recursion limit, or a number of more digits than Python converts.
    """
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise ValueError(f"{file}: cannot read it as JSON ({why})") from None


def check_config_file(folder) -> None:
    """A local folder's ``config.json`` read as JSON and its sizes checked (``ktransfer.models.sizes``) before
    transformers parses it or anything is allocated.

    Raises:
        ValueError: naming the file (and the key).
    """
    file = Path(folder) / "config.json"
    if not file.is_file():
        return
    body = read_json(file)
    if not isinstance(body, dict):
        raise ValueError(f"{file}: not a JSON object")
    check_config(body, file)


def check_tokenizer_file(folder) -> None:
    """A local folder's ``tokenizer.json`` (if any) parsed by the tokenizers library, naming the file on failure.

    Raises:
        ValueError: ``FILE: not a valid tokenizer (...)``.
    """
    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        return
    body = read_json(file)
    missing = [k for k in ("model", "added_tokens") if not isinstance(body, dict) or k not in body]
    if missing:
        raise ValueError(f"{file}: not a valid tokenizer (no {' or '.join(repr(k) for k in missing)})")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed model
        raise ValueError(f"{file}: not a valid tokenizer ({str(e)[:200]})") from None


def _auto_map_file(folder: Path) -> Path | None:
    """The first of ``CODE_FILES`` in ``folder`` that has an ``auto_map`` (custom code), else None."""
    for name in CODE_FILES:
        file = folder / name
        if not file.is_file():
            continue
        body = read_json(file)
        if isinstance(body, dict) and body.get("auto_map"):
            return file
    return None


def check_code(folder, *, trust_remote_code: bool = False, label: str | None = None) -> None:
    """Refuse a folder that asks to run its own code (``auto_map``) unless ``trust_remote_code``.

    Raises:
        ValueError: names the file with ``auto_map`` and how to allow it.
    """
    if trust_remote_code:
        return
    file = _auto_map_file(Path(folder))
    if file is not None:
        raise ValueError(f"{label or file}: has 'auto_map', i.e. asks to run Python code shipped with the model; "
                         + TRUST_HINT)


def check_weights(folder) -> None:
    """Refuse a folder without safetensors weights, saying how to convert pickle ones.

    Raises:
        ValueError: no ``*.safetensors`` file (names the pickle files found, if any).
    """
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder}: only pickle weights ({', '.join(pickles)}); ktransfer reads safetensors only "
                         f"(a pickle can run code when loaded); {CONVERT_HINT}")
    raise ValueError(f"{folder}: no model weights (no *.safetensors file)")


def check_folder(path, *, trust_remote_code: bool = False, weights: bool = True) -> None:
    """``check_code`` and (with ``weights``) ``check_weights`` and every safetensors header for a local model
    folder."""
    check_code(path, trust_remote_code=trust_remote_code)
    check_config_file(path)
    if weights:
        check_weights(path)
        check_folder_weights(path)


def pretrained_kwargs(source, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments every ``from_pretrained`` call passes: ``trust_remote_code`` always explicit (never a
    prompt), ``local_files_only`` for a folder or when offline."""
    local = Path(os.fspath(source)).is_dir() or offline()
    return {"trust_remote_code": bool(trust_remote_code), "local_files_only": local}


def _hub_id(source: str) -> str:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except Exception:  # HFValidationError: paths with several slashes, ./, absolute paths ...
        raise ValueError(f"{source}: no such folder (and not a Hugging Face hub id)") from None
    return source


def _unreachable(repo_id: str) -> ValueError:
    why = "HF_HUB_OFFLINE is set" if offline() else "the hub cannot be reached (no network?)"
    return ValueError(f"{repo_id}: not a local folder, not in the local Hugging Face cache, and {why}; "
                      "download it where there is a network (huggingface-cli download ID) or give a local folder")


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection (once per process; True behind a proxy, which is not
    probed). Without it huggingface_hub retries a dead connection for ~30 s before it gives up."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    if host not in _REACHABLE:
        import socket

        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def _hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of hub repository ``repo_id`` from the cache, else downloaded; None if the repo lacks it."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache records that the repository has no such file
        return None
    if not offline() and hub_reachable():
        try:
            return Path(hf_hub_download(repo_id, filename))
        except LocalEntryNotFoundError:  # no connection, not cached
            pass
        except EntryNotFoundError:
            return None
        except RepositoryNotFoundError:
            raise ValueError(f"{repo_id}: no such Hugging Face hub repository (or it is private/gated)") from None
        except OSError:
            pass
    raise _unreachable(repo_id)


def _check_hub_code(repo_id: str, trust_remote_code: bool, names: tuple[str, ...]) -> None:
    if trust_remote_code:
        return
    for name in names:
        file = _hub_file(repo_id, name)
        if file is not None and _auto_map_file(file.parent) is not None:
            raise ValueError(f"{repo_id} ({file.parent}): has 'auto_map', i.e. asks to run Python code shipped "
                             "with the model; " + TRUST_HINT)


def _from_pretrained(loader, source: str, trust_remote_code: bool, kw: dict[str, Any], names=("config.json",)):
    """``loader(source, ...)`` for a folder, or a hub id from the cache first, then the network."""
    if Path(source).is_dir():
        return loader(source, trust_remote_code=trust_remote_code, local_files_only=True, **kw)
    repo_id = _hub_id(source)
    _check_hub_code(repo_id, trust_remote_code, names)
    error: OSError | None = None
    for local_only in (True,) if offline() or not hub_reachable() else (True, False):
        try:
            return loader(repo_id, trust_remote_code=trust_remote_code, local_files_only=local_only, **kw)
        except OSError as e:
            error = e
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "safetensors" in text:
        raise ValueError(f"{repo_id}: no safetensors weights ({text}); ktransfer reads safetensors only; "
                         + CONVERT_HINT) from None
    if "connect" in text or offline() or not hub_reachable():
        raise _unreachable(repo_id) from None
    raise ValueError(f"{repo_id}: {text}") from None


def load_pretrained(auto_cls, source, *, trust_remote_code: bool = False, **kw):
    """``auto_cls.from_pretrained(source, ...)`` (a model class or ``AutoModel...``), safely.

    Args:
        auto_cls: e.g. ``transformers.AutoModelForSeq2SeqLM``.
        source: a local folder or a hub id.
        trust_remote_code: allow the folder's own code (``auto_map``); only on the user's explicit option.
        **kw: passed on (config overrides such as dropout).

    Raises:
        ValueError: custom code not allowed, pickle-only weights, a broken safetensors header, weights that lack
            tensors of the model or hold tensors it has no place for (tied weights aside), unknown folder/id, no
            network and not cached.
    """
    source = os.fspath(source)
    if Path(source).is_dir():
        check_folder(source, trust_remote_code=trust_remote_code)
    kw = {"use_safetensors": True, **kw, "output_loading_info": True}
    model, info = _from_pretrained(auto_cls.from_pretrained, source, trust_remote_code, kw)
    check_loading_info(info, source)
    return model


def load_config(source, *, trust_remote_code: bool = False):
    """``AutoConfig.from_pretrained(source)`` with the same checks as ``load_pretrained`` (weights not needed)."""
    from transformers import AutoConfig

    source = os.fspath(source)
    if Path(source).is_dir():
        check_code(source, trust_remote_code=trust_remote_code)
        check_config_file(source)
    try:
        return _from_pretrained(AutoConfig.from_pretrained, source, trust_remote_code, {})
    except (TypeError, KeyError, AttributeError) as e:  # a config.json transformers cannot make sense of
        raise ValueError(f"{Path(source) / 'config.json'}: {type(e).__name__}: {str(e)[:200]}") from None


def load_auto_tokenizer(source, *, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(source)`` with the same checks (no custom code unless allowed)."""
    from transformers import AutoTokenizer

    source = os.fspath(source)
    if Path(source).is_dir():
        check_code(source, trust_remote_code=trust_remote_code)
        check_tokenizer_file(source)
    try:
        return _from_pretrained(AutoTokenizer.from_pretrained, source, trust_remote_code, {}, CODE_FILES)
    except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as e:  # a tokenizer file it cannot read
        raise ValueError(f"{source}: cannot read its tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
