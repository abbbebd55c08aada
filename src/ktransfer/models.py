"""Marian transformer presets by name, building models for a tokenizer, and teacher/learner compatibility checks.

Every preset is a Marian encoder-decoder (Hugging Face ``MarianMTModel``) with post-norm layers, sinusoidal positions,
embeddings scaled by sqrt(d_model), and one embedding matrix shared by the encoder, the decoder and the output layer.
The vocabulary size and the special ids (pad, eos, decoder start = pad) always come from the tokenizer.

Sizes (encoder/decoder layers x d_model x attention heads; FFN = 4 x d_model; parameters for a 10K vocabulary):

==================  ================  ======  ==========================================================
preset              layers x dim x h  params  use
==================  ================  ======  ==========================================================
paper-deen-teacher  6/6 x 1024 x 16   186.6M  the paper's De-En teacher (Table 1)
paper-deen-learner  6/1 x 512 x 4      28.2M  the paper's De-En learner (Table 1)
paper-then-teacher  3/1 x 256 x 2       6.0M  the paper's Th-En teacher (Table 1)
paper-then-learner  1/1 x 128 x 1       1.7M  the paper's Th-En learner (Table 1)
cpu-teacher         3/3 x 256 x 4       8.1M  Multi30k teacher sized for 2 CPU cores
cpu-learner         2/1 x 128 x 2       1.9M  Multi30k learner, about 4x smaller than cpu-teacher
tiny                1/1 x 32 x 2        0.3M  tests (builds and runs in milliseconds)
==================  ================  ======  ==========================================================
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Settings every preset shares. Dropout 0.3 on the residual stream, as for small-data translation (IWSLT, Multi30k);
# relu FFN as in the base Transformer.
_COMMON: dict[str, Any] = {
    "max_position_embeddings": 256,
    "dropout": 0.3,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "scale_embedding": True,
    "share_encoder_decoder_embeddings": True,
    "tie_word_embeddings": True,
    "init_std": 0.02,
}


def _preset(enc: int, dec: int, dim: int, heads: int, ffn: int | None = None, **extra) -> dict[str, Any]:
    ffn = 4 * dim if ffn is None else ffn
    return {
        **_COMMON,
        "encoder_layers": enc,
        "decoder_layers": dec,
        "d_model": dim,
        "encoder_attention_heads": heads,
        "decoder_attention_heads": heads,
        "encoder_ffn_dim": ffn,
        "decoder_ffn_dim": ffn,
        **extra,
    }


# MarianConfig keyword arguments by preset name (vocabulary size and special ids are added from the tokenizer).
PRESETS: dict[str, dict[str, Any]] = {
    "paper-deen-teacher": _preset(6, 6, 1024, 16),
    "paper-deen-learner": _preset(6, 1, 512, 4),
    "paper-then-teacher": _preset(3, 1, 256, 2),
    "paper-then-learner": _preset(1, 1, 128, 1),
    "cpu-teacher": _preset(3, 3, 256, 4),
    "cpu-learner": _preset(2, 1, 128, 2),
    "tiny": _preset(1, 1, 32, 2),
}

# Short names accepted by ``build_model(..., **overrides)`` that set both the encoder and the decoder value.
_ALIASES: dict[str, tuple[str, ...]] = {
    "layers": ("encoder_layers", "decoder_layers"),
    "heads": ("encoder_attention_heads", "decoder_attention_heads"),
    "ffn_dim": ("encoder_ffn_dim", "decoder_ffn_dim"),
}
# Overrides that change no tensor shape, so they also apply to a model loaded from a folder.
_SHAPE_FREE = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop")


def build_model(preset_or_path: str | os.PathLike, tokenizer, **overrides):
    """A fresh Marian model from a preset, or a model loaded from a local folder, for ``tokenizer``.

    Args:
        preset_or_path: a name in ``PRESETS``; a ktransfer checkpoint folder (has ``state.json``); or a local
            Hugging Face seq2seq folder (``config.json`` + weights), loaded with ``AutoModelForSeq2SeqLM``. Causal
            presets (``ktransfer.causal.CAUSAL_PRESETS``) and causal folders go to ``causal.build_causal_model``.
        tokenizer: gives ``vocab_size``, ``pad_id`` and ``eos_id`` (the decoder starts with ``pad_id``).
        **overrides: ``MarianConfig`` arguments (``d_model``, ``dropout``, ``encoder_layers``, ...) or the aliases
            ``layers``, ``heads``, ``ffn_dim`` (both encoder and decoder). Changing ``d_model`` scales the FFN with it
            unless ``ffn_dim`` is given. A model loaded from a folder takes only dropout overrides.

    Returns:
        ``MarianMTModel`` (or the folder's model class) in train mode, with a generation config set up for beam search.

    Raises:
        ValueError: unknown preset (lists the presets), unknown or invalid override, heads not dividing d_model, or a
            loaded model whose vocabulary or special ids differ from the tokenizer's.
    """
    name = os.fspath(preset_or_path)
    from ktransfer import causal

    if causal.is_causal_source(name):  # decoder-only presets and folders: ktransfer.causal
        return causal.build_causal_model(name, tokenizer, **overrides)
    if name in PRESETS:
        model = _from_preset(name, tokenizer, overrides)
    elif Path(name).is_dir():
        model = _from_folder(Path(name), tokenizer, overrides)
    else:
        raise ValueError(
            f"unknown model preset {name!r} (and no such folder); presets: "
            f"{', '.join([*PRESETS, *causal.CAUSAL_PRESETS])}; "
            "or give a local checkpoint folder"
        )
    model.train()
    return model


def _resolve_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    valid = set(base) | {"encoder_layerdrop", "decoder_layerdrop"}
    out = dict(base)
    for key, value in overrides.items():
        targets = _ALIASES.get(key, (key,))
        if any(t not in valid for t in targets):
            raise ValueError(
                f"unknown model override {key!r}; valid: {', '.join(sorted(valid | set(_ALIASES)))} "
                "(vocabulary size and special ids come from the tokenizer)"
            )
        for t in targets:
            out[t] = value
    ffn_given = any(k in overrides for k in ("ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim"))
    if "d_model" in overrides and not ffn_given:  # FFN = 4 x d_model follows a new width
        for side in ("encoder", "decoder"):
            if base[f"{side}_ffn_dim"] == 4 * base["d_model"]:
                out[f"{side}_ffn_dim"] = 4 * overrides["d_model"]
    return out


def _check_architecture(kw: dict[str, Any]) -> None:
    for key in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings"):
        v = kw[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"model {key} must be a positive integer, got {v!r}")
    for side in ("encoder", "decoder"):
        heads = kw[f"{side}_attention_heads"]
        if kw["d_model"] % heads:
            raise ValueError(f"d_model={kw['d_model']} is not divisible by {side}_attention_heads={heads}")
    for key in ("dropout", "attention_dropout", "activation_dropout"):
        v = kw[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
            raise ValueError(f"model {key} must be in [0, 1), got {v!r}")


def _from_preset(name: str, tokenizer, overrides: dict[str, Any]):
    from transformers import MarianConfig, MarianMTModel

    kw = _resolve_overrides(PRESETS[name], overrides)
    _check_architecture(kw)
    try:
        config = MarianConfig(
            **kw,
            vocab_size=tokenizer.vocab_size,
            decoder_vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
            decoder_start_token_id=tokenizer.pad_id,
            bos_token_id=None,
            forced_eos_token_id=None,  # generation settings live in model.generation_config
        )
    except Exception as e:  # huggingface_hub's strict-dataclass errors are not ValueErrors
        raise ValueError(f"invalid settings for model preset {name!r}: {e}") from e
    model = MarianMTModel(config)
    set_generation_config(model, tokenizer)
    return model


def _from_folder(path: Path, tokenizer, overrides: dict[str, Any]):
    bad = sorted(set(overrides) - set(_SHAPE_FREE))
    if bad:
        raise ValueError(f"{path}: a loaded model takes only dropout overrides ({', '.join(_SHAPE_FREE)}), got {bad}")
    if (path / "state.json").is_file():  # a ktransfer checkpoint
        from ktransfer.checkpoint import load_model

        model, ckpt_tokenizer = load_model(path, **overrides)
        if tokenizer is not None:
            _compare_tokenizers(ckpt_tokenizer, tokenizer, "checkpoint", "given")
    elif (path / "config.json").is_file():
        from transformers import AutoModelForSeq2SeqLM

        from ktransfer.hub import load_pretrained

        model = load_pretrained(AutoModelForSeq2SeqLM, path, **overrides)
    else:
        raise ValueError(f"{path} is neither a ktransfer checkpoint (state.json) nor a Hugging Face model folder")
    if tokenizer is not None:
        _compare_model_tokenizer(model, tokenizer, str(path))
        if getattr(model.generation_config, "decoder_start_token_id", None) is None:
            set_generation_config(model, tokenizer)
    return model


def set_generation_config(model, tokenizer, max_length: int | None = None) -> None:
    """Give ``model`` a generation config for ``tokenizer``: start = pad, stop at eos, at most ``max_length`` tokens.

    ``max_length`` defaults to the model's number of positions (sinusoidal tables have a fixed length).
    """
    from transformers import GenerationConfig

    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 256))
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        forced_eos_token_id=tokenizer.eos_id,
        max_length=max_length,
    )


def count_parameters(model, *, trainable_only: bool = True) -> int:
    """Number of distinct parameters (tied matrices once); by default only those that train (not sinusoidal tables)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already yields a tied tensor once; the id check is for safety
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _special_ids(model) -> dict[str, Any]:
    gen = getattr(model, "generation_config", None)
    out = {}
    for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        value = getattr(model.config, key, None)
        if value is None and gen is not None:
            value = getattr(gen, key, None)
        out[key] = value
    return out


def _output_size(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _compare_model_tokenizer(model, tokenizer, name: str) -> None:
    want = {"pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id,
            "decoder_start_token_id": tokenizer.pad_id}
    if _output_size(model) != tokenizer.vocab_size:
        raise ValueError(
            f"{name} model has an output vocabulary of {_output_size(model)} but its tokenizer has "
            f"vocab_size {tokenizer.vocab_size}"
        )
    got = _special_ids(model)
    for key, value in want.items():
        if got[key] != value:
            raise ValueError(f"{name} model has {key}={got[key]!r} but the tokenizer implies {value!r}")


def _vocab_and_merges(tokenizer) -> tuple[dict | None, list | None]:
    try:
        model = json.loads(tokenizer.to_json())["model"]
        return model.get("vocab"), model.get("merges")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None, None


def _compare_tokenizers(a, b, name_a: str, name_b: str) -> None:
    for attr in ("vocab_size", "pad_id", "eos_id", "unk_id"):
        va, vb = getattr(a, attr, None), getattr(b, attr, None)
        if va != vb:
            raise ValueError(f"{name_a} and {name_b} tokenizers differ in {attr}: {name_a} {va!r} vs {name_b} {vb!r}")
    vocab_a, merges_a = _vocab_and_merges(a)
    vocab_b, merges_b = _vocab_and_merges(b)
    if vocab_a is not None and vocab_b is not None and vocab_a != vocab_b:
        inv_a = {i: t for t, i in vocab_a.items()}
        inv_b = {i: t for t, i in vocab_b.items()}
        i = min(i for i in set(inv_a) | set(inv_b) if inv_a.get(i) != inv_b.get(i))
        raise ValueError(
            f"{name_a} and {name_b} tokenizers have different vocabularies: id {i} is {inv_a.get(i)!r} in {name_a} "
            f"vs {inv_b.get(i)!r} in {name_b}"
        )
    if merges_a != merges_b or (vocab_a is None and a.to_json() != b.to_json()):
        raise ValueError(
            f"{name_a} and {name_b} tokenizers share vocab_size {a.vocab_size} but segment text differently "
            "(different BPE merges or settings)"
        )


def check_compatible(teacher, learner, teacher_tokenizer, learner_tokenizer) -> None:
    """Raise unless teacher and learner share one tokenizer and agree on vocabulary and special ids.

    Distillation compares the two models' distributions id by id, so id ``i`` must mean the same token in both.

    Raises:
        ValueError: naming the first disagreement with the teacher's and the learner's value.
    """
    a = _special_ids(teacher) | {"output vocabulary": _output_size(teacher)}
    b = _special_ids(learner) | {"output vocabulary": _output_size(learner)}
    for key in a:
        if a[key] != b[key]:
            raise ValueError(
                f"teacher and learner differ in {key}: teacher {a[key]!r} vs learner {b[key]!r}; "
                "a learner must be built with the teacher's tokenizer"
            )
    _compare_tokenizers(teacher_tokenizer, learner_tokenizer, "teacher", "learner")
    _compare_model_tokenizer(teacher, teacher_tokenizer, "teacher")
    _compare_model_tokenizer(learner, learner_tokenizer, "learner")


def describe_presets() -> str:
    """One line per preset: layers, width, heads and FFN size."""
    lines = []
    for name, kw in PRESETS.items():
        lines.append(
            f"{name:20s} enc {kw['encoder_layers']} / dec {kw['decoder_layers']} layers, d_model {kw['d_model']}, "
            f"{kw['encoder_attention_heads']} heads, ffn {kw['encoder_ffn_dim']}"
        )
    return "\n".join(lines)
