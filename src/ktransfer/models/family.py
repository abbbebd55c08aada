"""One model interface, two families: where models come from, which family a model is, and whether two fit together.

A *family* (``ModelFamily``) owns everything that differs between an encoder-decoder and a decoder-only model:
building from a preset, how examples become ids and batches, which logits line up with which labels, beam search and
on-policy sampling. ``ktransfer.models.seq2seq.Seq2SeqFamily`` (Marian and any ``AutoModelForSeq2SeqLM``) and
``ktransfer.models.causal.CausalFamily`` (any ``AutoModelForCausalLM``) implement it; ``family_of`` is the one place
that
picks, from the model's config. Code above this module never asks which family it holds.

A model *source* (``model.preset``, ``model.init``, ``model.teacher``, the argument of ``evaluate``/``translate``/
``distill-data``) is any of:

- a preset name (``PRESETS``: seq2seq and causal), built fresh for a tokenizer;
- a ktransfer checkpoint folder (``RUN/checkpoints/best``: a Hugging Face folder plus ``training_state.json``),
  verified file by file first;
- a ktransfer run folder (its ``checkpoints/best``);
- a Hugging Face model folder (``config.json`` + ``*.safetensors``, with or without tokenizer files), or a folder
  of LoRA adapters (``adapter_config.json``, read with the base it names: ``ktransfer.models.adapters``);
- a hub id (``Helsinki-NLP/opus-mt-de-en``), read through the local cache (``ktransfer.models.hub``).

Remote code is never run unless ``trust_remote_code`` is set by the user; only safetensors weights are read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ktransfer.models import adapters, checkpoint, hub
from ktransfer.models.causal import CAUSAL_PRESETS, CausalFamily
from ktransfer.models.generation import INSTRUCTION_KEY, DecodeSettings, output_rows, unwrap
from ktransfer.models.seq2seq import PRESETS as SEQ2SEQ_PRESETS
from ktransfer.models.seq2seq import Seq2SeqFamily
from ktransfer.models.tokenizer import Tokenizer, compare_tokenizers, is_tokenizer_folder, load_tokenizer

PRESETS: dict[str, dict[str, Any]] = {**SEQ2SEQ_PRESETS, **CAUSAL_PRESETS}


class ModelFamily(Protocol):
    """What ``train``, ``evaluate``, ``prefixes``, ``seqkd`` and ``analysis`` ask of a model family."""

    name: str
    presets: dict[str, dict[str, Any]]

    def auto_class(self): ...
    def build(self, preset: str, tokenizer: Tokenizer, **overrides): ...
    def load_overrides(self, model_type: str, overrides: dict[str, Any]) -> dict[str, Any]: ...
    def after_load(self, model) -> None: ...
    def set_generation_config(self, model, tokenizer: Tokenizer) -> None: ...
    def prepare(self, model, tokenizer: Tokenizer, *, src_lang: str, tgt_lang: str, fmt: str = "parallel",
                instruction: str | None = None) -> None: ...
    def positions(self, model) -> int: ...
    def encode(self, pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, max_length: int | None, *, model=None,
               fmt: str = "parallel", truncate: bool = False,
               log: Callable[[str], object] = print) -> tuple[list[list[int]], list[list[int]]]: ...
    def lengths(self, ids) -> tuple[list[int], list[int]]: ...
    def collate(self, src, tgt, model, tokenizer: Tokenizer) -> dict[str, torch.Tensor]: ...
    def model_inputs(self, batch: dict) -> tuple[dict, torch.Tensor]: ...
    def translate(self, model, tokenizer: Tokenizer, sources: Sequence[str], settings: DecodeSettings, *,
                  batch_size: int = 64, progress: bool = False) -> list[str]: ...
    def complete(self, model, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], settings: DecodeSettings, *,
                 batch_size: int = 64, progress: bool = False) -> list[str]: ...
    def max_new_tokens(self, model, max_length: int) -> int: ...
    def on_policy_batch(self, model, tokenizer: Tokenizer, batch: dict, settings) -> dict: ...


SEQ2SEQ, CAUSAL = Seq2SeqFamily(), CausalFamily()


def family_of(model_or_config) -> ModelFamily:
    """The family of a model (DDP-wrapped or not), a ``transformers`` config or a config dict.

    Raises:
        ValueError: a model that is neither an encoder-decoder nor a causal LM that ``transformers`` knows.
    """
    config = getattr(unwrap(model_or_config), "config", model_or_config)
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("is_encoder_decoder", False):
        return SEQ2SEQ
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return CAUSAL
    raise ValueError(f"model type {get('model_type')!r} is neither an encoder-decoder nor a causal language model "
                     "known to transformers")


def prepare_for_data(model, tokenizer: Tokenizer, fmt: str) -> ModelFamily:
    """The model's family, the model made ready to read data of format ``fmt`` outside training (evaluation,
    seq-KD): an instruction it was trained with is kept; a model without one (a foreign folder) gets the format's
    default (none but for translation pairs)."""
    family = family_of(model)
    if getattr(unwrap(model).config, INSTRUCTION_KEY, None) is None:
        family.prepare(model, tokenizer, src_lang="", tgt_lang="", fmt=fmt)
    return family


def preset_family(name: str) -> ModelFamily | None:
    """The family of preset ``name``, None for a name that is no preset."""
    return SEQ2SEQ if name in SEQ2SEQ_PRESETS else CAUSAL if name in CAUSAL_PRESETS else None


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------
def resolve_source(source: str | os.PathLike) -> Path | str:
    """The folder a model source stands for (a run folder becomes its ``checkpoints/best``), or the hub id.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder with no model in it (naming what was looked
            for); checkpoint.CheckpointError: a checkpoint saved by an older ktransfer.
    """
    name = os.fspath(source)
    path = Path(name).expanduser()
    if not path.exists():
        if checkpoint.interrupted_swap(path):
            return path  # a save killed between its two renames: the whole copy beside it stands in
        if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
            return name  # a hub id (org/name): ktransfer.models.hub reads it from the cache or says why it cannot
        raise FileNotFoundError(f"no such model folder: {path} (nor a preset: {', '.join(PRESETS)})")
    if checkpoint.is_checkpoint(path) or (path / "config.json").is_file() or adapters.is_adapter_folder(path):
        return path
    checkpoint.refuse_old_format(path)
    best = path / "checkpoints" / "best"
    if checkpoint.is_checkpoint(best):
        return best
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        last = path / "checkpoints" / "last"
        more = f"; {last} exists, pass it to use the last checkpoint" if checkpoint.is_checkpoint(last) else ""
        raise FileNotFoundError(f"run folder {path} has no best checkpoint: {best} not found{more}")
    raise FileNotFoundError(f"{path} holds no model: neither a Hugging Face folder (config.json), a ktransfer "
                            f"checkpoint ({checkpoint.STATE_FILE}) nor a run folder (checkpoints/best)")


def load_model(source: str | os.PathLike, *, device="cpu", trust_remote_code: bool = False,
               **overrides) -> tuple[torch.nn.Module, Tokenizer | None]:
    """``(model, tokenizer)`` of a source that is not a preset (see the module docstring), the model in eval mode on
    ``device``; the tokenizer is None when the folder has none.

    ``overrides``: shape-free settings such as ``dropout=0.1`` (the family maps them to its config fields).

    Raises:
        FileNotFoundError: nothing at the path; checkpoint.CheckpointError: a checkpoint that fails verification
            (naming an intact sibling); ValueError: the folder asks for remote code, has only pickle weights, or
            a hub id without a network.
    """
    where = resolve_source(source)
    if isinstance(where, Path) and (checkpoint.is_checkpoint(where) or checkpoint.interrupted_swap(where)):
        where = checkpoint.verified_folder(where)  # the folder whose files all match their sha256
    if isinstance(where, Path) and adapters.is_adapter_folder(where):  # LoRA: the base, then its adapters
        adapters.check_adapter_weights(where)  # before the base loads: no pickle is ever opened
        base, tokenizer = load_model(adapters.base_of(where), device=device, trust_remote_code=trust_remote_code,
                                     **overrides)
        if is_tokenizer_folder(where):
            tokenizer = load_tokenizer(where, trust_remote_code=trust_remote_code)
        return adapters.load_adapters(base, where).to(device).eval(), tokenizer
    config = hub.load_config(where, trust_remote_code=trust_remote_code)
    family = family_of(config)
    kw = family.load_overrides(config.model_type, overrides)
    model = hub.load_pretrained(family.auto_class(), where, trust_remote_code=trust_remote_code, **kw)
    family.after_load(model)
    tokenizer = None
    if not isinstance(where, Path) or is_tokenizer_folder(where):
        tokenizer = load_tokenizer(where, trust_remote_code=trust_remote_code)
        check_model_tokenizer(model, tokenizer, str(source))
    return model.to(device).eval(), tokenizer


def build_model(source: str | os.PathLike, tokenizer: Tokenizer, *, trust_remote_code: bool = False, **overrides):
    """A model for ``tokenizer`` in train mode: a fresh one of a preset, or one loaded from any other source.

    Args:
        source: a preset name (``PRESETS``) or a model source (module docstring).
        tokenizer: gives the vocabulary size and special ids of a preset; a loaded model's tokenizer (when its
            folder has one) must be the same, and its output layer must fit it.
        **overrides: a preset's config fields (``d_model``, ``layers``, ``n_embd``, ``dropout``, ...); a loaded
            model takes only dropout.

    Raises:
        ValueError: unknown preset (lists the presets), invalid override, a loaded model or tokenizer that does not
            fit ``tokenizer``.
    """
    name = os.fspath(source)
    family = preset_family(name)
    if family is not None:
        return family.build(name, tokenizer, **overrides)
    try:
        model, own = load_model(name, trust_remote_code=trust_remote_code, **overrides)
    except FileNotFoundError as e:
        raise ValueError(f"unknown model preset {name!r} and {e}") from None
    if own is not None:
        compare_tokenizers(own, tokenizer, f"model {name}", "given")
    check_model_tokenizer(model, tokenizer, name)
    return model.train()


# --------------------------------------------------------------------------------------------------------------
# Fit between models and tokenizers
# --------------------------------------------------------------------------------------------------------------
def _config_ids(model, key: str) -> list[int]:
    """The ids the model's config gives for ``key`` (a list where it holds several), else its generation config's."""
    model = unwrap(model)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        value = getattr(cfg, key, None)
        if value is not None:
            return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []


def check_model_tokenizer(model, tokenizer: Tokenizer, name: str) -> None:
    """Raise unless ``model`` can use ``tokenizer``: at least ``vocab_size`` output rows, the tokenizer's eos among
    the model's, and the same pad where the model sets one.

    Raises:
        ValueError: naming the model and both values.
    """
    rows = output_rows(model)
    if rows < tokenizer.vocab_size:
        raise ValueError(f"{name} model has {rows} output rows but its tokenizer has {tokenizer.vocab_size} ids: "
                         "ids would have no logit")
    eos = _config_ids(model, "eos_token_id")
    if eos and tokenizer.eos_id not in eos:
        raise ValueError(f"{name} model has eos_token_id={eos[0]!r} but its tokenizer's is {tokenizer.eos_id!r}")
    pad = getattr(unwrap(model).config, "pad_token_id", None)
    if pad is not None and int(pad) != tokenizer.pad_id:
        raise ValueError(f"{name} model has pad_token_id={pad!r} but its tokenizer's is {tokenizer.pad_id!r}")


def check_compatible(teacher, learner, teacher_tokenizer: Tokenizer, learner_tokenizer: Tokenizer, *,
                     log: Callable[[str], object] | None = None) -> int:
    """Raise unless teacher and learner can be compared id by id; return the number of shared ids ``V``.

    Both must be of one family; the tokenizers the same (or the learner's vocabulary the first ids of the
    teacher's); each model's output layer must fit its tokenizer. Output rows beyond ``V`` (embedding padding, e.g.
    32064 vs 32000) are sliced away (``shared_logits``), said once through ``log``.

    Raises:
        ValueError: naming the first disagreement (the first token id that differs, with both tokens).
    """
    ft, fl = family_of(teacher), family_of(learner)
    if ft is not fl:
        raise ValueError(f"the teacher is {ft.name} ({type(unwrap(teacher)).__name__}) but the learner is {fl.name} "
                         f"({type(unwrap(learner)).__name__}): both must be encoder-decoders or both decoder-only")
    compare_tokenizers(teacher_tokenizer, learner_tokenizer, "teacher", "learner", allow_prefix=True)
    check_model_tokenizer(teacher, teacher_tokenizer, "teacher")
    check_model_tokenizer(learner, learner_tokenizer, "learner")
    start_t, start_l = _config_ids(teacher, "decoder_start_token_id"), _config_ids(learner, "decoder_start_token_id")
    if start_t and start_l and start_t[0] != start_l[0]:  # both models read the learner's decoder inputs
        raise ValueError(f"teacher and learner differ in decoder_start_token_id: teacher {start_t[0]} vs learner "
                         f"{start_l[0]}")
    V, rows_t, rows_l = learner_tokenizer.vocab_size, output_rows(teacher), output_rows(learner)
    if (rows_t != V or rows_l != V) and log is not None:
        log(f"vocabulary: the teacher has {rows_t} output rows, the learner {rows_l}, the shared tokenizer ids "
            f"0..{V - 1}: logits are sliced to them (the other rows are padding or ids the learner lacks)")
    return V


def shared_logits(logits: torch.Tensor, teacher_logits: torch.Tensor | None, vocab_size: int):
    """``logits[..., :vocab_size]`` and the same for ``teacher_logits`` (None stays None): [B, L, rows] -> [B, L, V].

    A view: gradients flow into the kept columns; the padding columns get none."""
    cut = lambda x: x if x is None or x.shape[-1] == vocab_size else x[..., :vocab_size]  # noqa: E731
    return cut(logits), cut(teacher_logits)


def count_parameters(model, *, trainable_only: bool = True) -> int:
    """Number of distinct parameters (tied matrices once); by default only those that train (not sinusoidal tables)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def describe_presets() -> str:
    """One line per preset: its family and sizes."""
    lines = []
    for name, kw in PRESETS.items():
        sizes = ", ".join(f"{k} {v}" for k, v in kw.items() if isinstance(v, int) and not isinstance(v, bool))
        lines.append(f"{name:20s} {preset_family(name).name}: {sizes}")
    return "\n".join(lines)
