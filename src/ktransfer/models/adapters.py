"""LoRA learners through ``peft`` (an optional extra: ``pip install "ktransfer[lora]"``).

``model.lora_r=R`` wraps the learner in a ``peft`` LoRA model: every target linear layer ``W`` becomes
``W + (alpha / r) * B A`` with ``A`` (r x in) and ``B`` (out x r) the only weights that train; the base stays frozen
and bit for bit what it was loaded as. LoRA adapts *pretrained* weights, so the base is ``model.init`` or a model
folder in ``model.preset`` (a preset built from scratch is refused).

A LoRA checkpoint holds what ``PeftModel.save_pretrained`` writes (``adapter_config.json`` naming the base folder,
``adapter_model.safetensors``) beside ktransfer's training state, so it is small and resumes exactly (the optimiser
holds the adapter weights only); ``transformers`` with ``peft`` installed opens it with ``from_pretrained``, and
``ktransfer export CHECKPOINT --out FOLDER`` merges the adapters into a plain Hugging Face model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def require_peft():
    """The ``peft`` module, or an ImportError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA learners need the peft library: pip install 'ktransfer[lora]' (or pip install "
                          "peft)") from None
    return peft


def is_adapter_folder(path) -> bool:
    """A folder of LoRA adapters (``adapter_config.json``) without full model weights."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def base_of(folder) -> str:
    """The base model an adapter folder was trained on (its ``base_model_name_or_path``).

    Raises:
        ValueError: the adapter config is unreadable or names no base.
    """
    file = Path(folder) / ADAPTER_CONFIG
    try:
        base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read it ({e})") from None
    if not base:
        raise ValueError(f"{file}: names no base model (base_model_name_or_path)")
    return str(base)


def is_lora(model) -> bool:
    """Whether ``model`` is a ``peft`` model (without importing peft when it is absent)."""
    return any(cls.__module__.startswith("peft.") for cls in type(model).__mro__)


def add_lora(model, *, r: int, alpha: float, dropout: float, target_modules: tuple[str, ...] | None, causal: bool):
    """``model`` wrapped with fresh LoRA adapters (``B = 0``: the same outputs as the base until it trains).

    ``target_modules`` None: every linear layer but the output head (peft's ``all-linear``).

    Raises:
        ValueError: a base built from scratch (no pretrained weights to adapt), or target modules not in the model.
    """
    peft = require_peft()
    if not getattr(model, "name_or_path", ""):
        raise ValueError("model.lora_r: LoRA adapts pretrained weights, but the learner was built from a preset; "
                         "give the base as model.init (a run, checkpoint or Hugging Face folder) or "
                         "model.preset=FOLDER")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=list(target_modules) if target_modules else "all-linear",
                             task_type="CAUSAL_LM" if causal else "SEQ_2_SEQ_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"model.lora_target_modules: {e}") from None


def check_adapter_weights(folder) -> None:
    """Refuse an adapter folder without ``adapter_model.safetensors`` before anything reads it: peft would unpickle
    an ``adapter_model.bin`` (a pickle can run code when loaded).

    Raises:
        ValueError: naming the folder, the pickle files found and how to convert them.
    """
    folder = Path(folder)
    if (folder / ADAPTER_WEIGHTS).is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder / pickles[0]}: LoRA adapters as a pickle ({', '.join(pickles)}); ktransfer reads "
                         f"{ADAPTER_WEIGHTS} only (a pickle can run code when loaded); convert it in an environment "
                         "you trust: PeftModel.from_pretrained(base, FOLDER).save_pretrained(OUT, "
                         "safe_serialization=True)")
    raise ValueError(f"{folder}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")


def load_adapters(base_model, folder, *, trainable: bool = True):
    """``base_model`` with the adapters of ``folder`` (safetensors only) loaded, trainable or not.

    Raises:
        ValueError: the folder has no ``adapter_model.safetensors`` (``check_adapter_weights``).
    """
    check_adapter_weights(folder)
    peft = require_peft()
    return peft.PeftModel.from_pretrained(base_model, str(folder), is_trainable=trainable)


def merged(model):
    """A plain ``transformers`` model with the adapters folded into the weights (``W + (alpha / r) B A``); the
    model itself is left as it was."""
    import copy

    return copy.deepcopy(model).merge_and_unload()


def parameter_summary(model) -> str:
    """``"N trainable of M parameters (p%)"``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
