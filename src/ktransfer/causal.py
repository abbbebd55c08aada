"""Decoder-only (causal) language models: presets, translation as instruction data, collation, decoding, checks.

A pair (source, reference) becomes one sequence ``prompt + response``:

    prompt   = encode("Translate German to English:") + encode(source) + [</s>]     (P ids; </s> ends the prompt)
    response = encode(reference) + [</s>]                                           (R ids)
    input_ids[t]  = (prompt + response)[t]                                          t < L = P + R
    labels[t]     = input_ids[t + 1]   for P - 1 <= t <= L - 2 (the response, shifted), else -100

so ``logits[:, t]`` (the prediction after reading ``input_ids[:, :t+1]``) is scored against ``labels[:, t]`` and
``ktransfer.transfer_loss(logits, teacher_logits, labels, ...)`` applies unchanged: the prompt conditions every
prediction but is never scored. Our tokenizer turns every whitespace run into one space, so ``</s>`` (not a
newline) separates prompt and response. The instruction is stored in the model's config (``ktransfer_instruction``)
and travels with its checkpoints; ``translate`` reads it from there.

Presets (parameters for a 10K vocabulary; the output layer is tied to the input embedding):

==================  ====================  ======  ===============================================
preset              layers x dim x heads  params  use
==================  ====================  ======  ===============================================
cpu-causal-teacher  GPT-2 6 x 256 x 4       7.4M  Multi30k causal teacher sized for 2 CPU cores
cpu-causal-learner  GPT-2 3 x 128 x 2       1.9M  Multi30k causal learner, ~4x smaller
gpt2-tiny           GPT-2 2 x 32 x 2        0.3M  tests
llama-tiny          Llama 2 x 32 x 4 (2kv)  0.3M  tests (RoPE, RMSNorm, SwiGLU, grouped-query attention)
==================  ====================  ======  ===============================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ktransfer.data import IGNORE_INDEX

if TYPE_CHECKING:  # torch is imported where it is used: the config check reads CAUSAL_PRESETS without it
    import torch

INSTRUCTION_KEY = "ktransfer_instruction"  # attribute of model.config holding the instruction text
LANGUAGE_NAMES = {"de": "German", "en": "English", "fr": "French", "cs": "Czech", "th": "Thai"}


def _gpt2(layers: int, dim: int, heads: int, dropout: float) -> dict[str, Any]:
    return {"model_type": "gpt2", "n_layer": layers, "n_embd": dim, "n_head": heads, "n_inner": 4 * dim,
            "n_positions": 256, "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": 0.0,
            "activation_function": "gelu_new", "initializer_range": 0.02, "tie_word_embeddings": True}


def _llama(layers: int, dim: int, heads: int, kv_heads: int, ffn: int, dropout: float) -> dict[str, Any]:
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": dim, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": ffn, "max_position_embeddings": 256,
            "attention_dropout": dropout, "initializer_range": 0.02, "tie_word_embeddings": True}


# transformers config keyword arguments by preset name (vocabulary size and special ids come from the tokenizer).
CAUSAL_PRESETS: dict[str, dict[str, Any]] = {
    "cpu-causal-teacher": _gpt2(6, 256, 4, 0.3),
    "cpu-causal-learner": _gpt2(3, 128, 2, 0.3),
    "gpt2-tiny": _gpt2(2, 32, 2, 0.1),
    "llama-tiny": _llama(2, 32, 4, 2, 64, 0.0),
}
# ``dropout`` (model.dropout) sets these config fields; Llama has no residual dropout, only attention dropout.
_DROPOUT_FIELDS = {"gpt2": ("resid_pdrop", "embd_pdrop"), "llama": ("attention_dropout",)}
_SIZE_FIELDS = {"gpt2": ("n_layer", "n_embd", "n_head", "n_inner", "n_positions"),
                "llama": ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                          "intermediate_size", "max_position_embeddings")}


# --------------------------------------------------------------------------------------------------------------
# Which models are causal
# --------------------------------------------------------------------------------------------------------------
def is_causal_config(config) -> bool:
    """Whether a transformers config (object or dict) describes a decoder-only model."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("is_encoder_decoder", False):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def is_causal_model(model) -> bool:
    """Whether ``model`` (a transformers model, possibly wrapped in DDP) is decoder-only."""
    return is_causal_config(getattr(model, "module", model).config)


def is_causal_source(preset_or_path: str | os.PathLike) -> bool:
    """Whether ``build_model(preset_or_path)`` means a causal model: a causal preset, a ktransfer checkpoint of a
    causal model (``state.json``), or a Hugging Face folder whose ``config.json`` is a causal LM."""
    name = os.fspath(preset_or_path)
    if name in CAUSAL_PRESETS:
        return True
    path = Path(name)
    for file, key in (("state.json", "model_config"), ("config.json", None)):
        if (path / file).is_file():
            try:
                body = json.loads((path / file).read_text(encoding="utf-8"))
                return is_causal_config(body[key] if key else body)
            except (OSError, ValueError, KeyError, TypeError):
                return False
    return False


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------
def build_causal_model(preset_or_path: str | os.PathLike, tokenizer, **overrides):
    """A fresh causal LM from a preset, or one loaded from a ktransfer checkpoint or a local Hugging Face folder.

    Args:
        preset_or_path: a name in ``CAUSAL_PRESETS``, a checkpoint folder (``state.json``) or a folder with
            ``config.json`` + weights (``AutoModelForCausalLM.from_pretrained``).
        tokenizer: ``vocab_size``, ``pad_id`` and ``eos_id`` (also the beginning-of-sequence id, as in GPT-2).
        **overrides: config fields of the preset (``n_layer``, ``n_embd``, ``hidden_size``, ...) or ``dropout``
            (GPT-2: residual and embedding dropout; Llama: attention dropout). A loaded model takes only ``dropout``.

    Returns:
        The model in train mode; its output layer has at least ``tokenizer.vocab_size`` rows (more = padding).

    Raises:
        ValueError: unknown preset or override, heads not dividing the width, or a loaded model that does not fit
            the tokenizer (see ``check_model_tokenizer``).
    """
    name = os.fspath(preset_or_path)
    if name in CAUSAL_PRESETS:
        model = _from_preset(name, tokenizer, overrides)
    elif Path(name).is_dir():
        model = _from_folder(Path(name), tokenizer, overrides)
    else:
        raise ValueError(f"unknown causal preset {name!r} (and no such folder); presets: {', '.join(CAUSAL_PRESETS)}")
    return model.train()


def checkpoint_overrides(model_config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` for ``checkpoint.model_from_checkpoint``: a causal model's ``dropout`` becomes its config
    fields (GPT-2 ``resid_pdrop`` + ``embd_pdrop``, Llama ``attention_dropout``); seq2seq ones pass unchanged."""
    if not overrides or not is_causal_config(model_config):
        return overrides
    bad = sorted(set(overrides) - {"dropout"})
    if bad:
        raise ValueError(f"a loaded causal model takes only the dropout override, got {bad}")
    return _dropout_kw(model_config.get("model_type", ""), overrides["dropout"])


def _dropout_kw(model_type: str, value) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"model dropout must be in [0, 1), got {value!r}")
    return dict.fromkeys(_DROPOUT_FIELDS.get(model_type, ("dropout",)), float(value))


def _from_preset(name: str, tokenizer, overrides: dict[str, Any]):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kw = dict(CAUSAL_PRESETS[name])
    model_type = kw.pop("model_type")
    for key, value in overrides.items():
        if key == "dropout":
            kw.update(_dropout_kw(model_type, value))
        elif key in kw:
            kw[key] = value
        else:
            raise ValueError(f"unknown override {key!r} for causal preset {name!r}; valid: dropout, "
                             f"{', '.join(sorted(kw))} (vocabulary size and special ids come from the tokenizer)")
    sizes = [kw[k] for k in _SIZE_FIELDS[model_type]]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
        raise ValueError(f"causal preset {name!r}: {', '.join(_SIZE_FIELDS[model_type])} must be positive "
                         f"integers, got {sizes}")
    width, heads = sizes[1], sizes[2]
    if width % heads or (model_type == "llama" and heads % kw["num_key_value_heads"]):
        raise ValueError(f"causal preset {name!r}: width {width} must be divisible by {heads} heads (and heads by "
                         "the key/value heads)")
    try:
        config = CONFIG_MAPPING[model_type](**kw, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                                            eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id)
    except Exception as e:  # huggingface_hub's strict-dataclass errors are not ValueErrors
        raise ValueError(f"invalid settings for causal preset {name!r}: {e}") from e
    model = AutoModelForCausalLM.from_config(config)
    set_generation_config(model, tokenizer)
    return model


def _from_folder(path: Path, tokenizer, overrides: dict[str, Any]):
    bad = sorted(set(overrides) - {"dropout"})
    if bad:
        raise ValueError(f"{path}: a loaded causal model takes only the dropout override, got {bad}")
    if (path / "state.json").is_file():  # a ktransfer checkpoint
        from ktransfer.checkpoint import load_checkpoint, model_from_checkpoint
        from ktransfer.models import _compare_tokenizers

        ckpt = load_checkpoint(path, with_optimizer=False)
        kw = _dropout_kw(ckpt.model_config.get("model_type", ""), overrides["dropout"]) if overrides else {}
        model = model_from_checkpoint(ckpt, **kw)
        if tokenizer is not None:
            _compare_tokenizers(ckpt.tokenizer, tokenizer, f"checkpoint {path}", "given")
    else:
        from transformers import AutoModelForCausalLM

        from ktransfer.hub import load_config, load_pretrained

        model_type = load_config(path).model_type
        kw = _dropout_kw(model_type, overrides["dropout"]) if overrides else {}
        model = load_pretrained(AutoModelForCausalLM, path, **kw)
        if tokenizer is not None:
            set_generation_config(model, tokenizer)
    if tokenizer is not None:
        check_model_tokenizer(model, tokenizer, str(path))
    return model


def set_generation_config(model, tokenizer) -> None:
    """Stop at ``</s>``, pad with ``<pad>``; at most the model's number of positions in all."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                                               bos_token_id=tokenizer.eos_id, max_length=positions(model))


def positions(model) -> int:
    """The longest sequence (prompt + response) the model's positional table holds (RoPE: its configured length)."""
    config = getattr(model, "module", model).config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


# --------------------------------------------------------------------------------------------------------------
# Vocabulary checks
# --------------------------------------------------------------------------------------------------------------
def output_rows(model) -> int:
    """Rows of the output layer (the logits' last dimension); may exceed the tokenizer's size (padding)."""
    model = getattr(model, "module", model)
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_model_tokenizer(model, tokenizer, name: str) -> None:
    """Raise unless ``model`` can use ``tokenizer``: at least ``vocab_size`` output rows, same ``</s>`` (and
    ``<pad>`` when the model sets one).

    Raises:
        ValueError: naming the model and both values.
    """
    rows = output_rows(model)
    if rows < tokenizer.vocab_size:
        raise ValueError(f"{name} model has {rows} output rows but its tokenizer has vocab_size "
                         f"{tokenizer.vocab_size}: ids would have no logit")
    config = getattr(model, "module", model).config
    for key, want in (("eos_token_id", tokenizer.eos_id), ("pad_token_id", tokenizer.pad_id)):
        got = getattr(config, key, None)
        got = got[0] if isinstance(got, list) and len(got) == 1 else got
        if got is not None and got != want:
            raise ValueError(f"{name} model has {key}={got!r} but its tokenizer's id is {want!r}")


def check_compatible(teacher, learner, teacher_tokenizer, learner_tokenizer, *, teacher_name: str = "teacher",
                     learner_name: str = "learner", log: Callable[[str], object] | None = None) -> int:
    """Raise unless a causal teacher and learner share one tokenizer; return the number of shared ids.

    Distillation compares the distributions id by id. When the tokenizers are the same and the models only differ
    in padding rows of their embedding/output matrices (e.g. 32000 vs 32064), the logits are sliced to the
    tokenizer's ``vocab_size`` (``shared_logits``) and this is said once through ``log``.

    Raises:
        ValueError: a seq2seq model on either side, tokenizers that differ (naming both tokenizers and the first
            difference), or a model whose output rows or special ids do not fit its tokenizer.
    """
    from ktransfer.models import _compare_tokenizers

    for model, name in ((teacher, teacher_name), (learner, learner_name)):
        if not is_causal_model(model):
            raise ValueError(f"{name} is a {type(getattr(model, 'module', model)).__name__} (encoder-decoder) but "
                             "the other model is decoder-only: teacher and learner must both be causal or both seq2seq")
    _compare_tokenizers(teacher_tokenizer, learner_tokenizer, teacher_name, learner_name)  # "... tokenizers differ"
    check_model_tokenizer(teacher, teacher_tokenizer, teacher_name)
    check_model_tokenizer(learner, learner_tokenizer, learner_name)
    V, rows_t, rows_l = learner_tokenizer.vocab_size, output_rows(teacher), output_rows(learner)
    if (rows_t != V or rows_l != V) and log is not None:
        log(f"vocabulary: {teacher_name} has {rows_t} output rows, {learner_name} {rows_l}, the shared tokenizer "
            f"{V} ids: logits are sliced to the shared ids 0..{V - 1} (the extra rows are embedding padding)")
    return V


def shared_logits(logits: torch.Tensor, teacher_logits: torch.Tensor | None, vocab_size: int):
    """``logits[..., :vocab_size]`` and the same for ``teacher_logits`` (None stays None): [B, L, rows] -> [B, L, V].

    A view: gradients flow into the kept columns; the padding columns get none."""
    cut = lambda x: x if x is None or x.shape[-1] == vocab_size else x[..., :vocab_size]  # noqa: E731
    return cut(logits), cut(teacher_logits)


# --------------------------------------------------------------------------------------------------------------
# Prompt / response data
# --------------------------------------------------------------------------------------------------------------
def make_instruction(src_lang: str, tgt_lang: str) -> str:
    """``"Translate German to English:"`` (language codes without a known name are used as they are)."""
    return f"Translate {LANGUAGE_NAMES.get(src_lang, src_lang)} to {LANGUAGE_NAMES.get(tgt_lang, tgt_lang)}:"


def instruction(model) -> str:
    """The instruction stored in ``model.config`` (see ``ensure_instruction``).

    Raises:
        ValueError: the model has none (a model from a foreign folder: call ``ensure_instruction`` first).
    """
    text = getattr(getattr(model, "module", model).config, INSTRUCTION_KEY, None)
    if not isinstance(text, str):
        raise ValueError(f"causal model has no {INSTRUCTION_KEY} in its config: call ktransfer.causal."
                         "ensure_instruction(model, src_lang, tgt_lang) before translating with it")
    return text


def ensure_instruction(model, src_lang: str, tgt_lang: str) -> str:
    """The model's instruction; a model without one gets ``make_instruction(src_lang, tgt_lang)``."""
    config = getattr(model, "module", model).config
    if not isinstance(getattr(config, INSTRUCTION_KEY, None), str):
        setattr(config, INSTRUCTION_KEY, make_instruction(src_lang, tgt_lang))
    return getattr(config, INSTRUCTION_KEY)


def prompt_ids(tokenizer, instruction_ids: Sequence[int], source_ids: Sequence[int],
               limit: int | None = None) -> list[int]:
    """``instruction_ids + source_ids + [</s>]``, the source cut from its end so that the whole is <= ``limit``."""
    room = None if limit is None else max(limit - len(instruction_ids) - 1, 0)
    return [*instruction_ids, *(source_ids if room is None else source_ids[:room]), tokenizer.eos_id]


def encode_examples(pairs: Sequence[tuple[str, str]], tokenizer, max_length: int | None, *, instruction: str,
                    log: Callable[[str], object] = print) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and response ids of each pair (module docstring), ``instruction`` heading each prompt; drops pairs
    with an empty side or a sequence (prompt + response) longer than ``max_length``, and logs how many.

    Returns:
        ``(prompts, responses)``: aligned lists; each prompt and each response ends with ``</s>``.
    """
    head = tokenizer.encode(instruction)
    src_all = tokenizer.encode_batch([s for s, _ in pairs])
    tgt_all = tokenizer.encode_batch([t for _, t in pairs])
    prompts, responses, n_empty, n_long = [], [], 0, 0
    for s, t in zip(src_all, tgt_all, strict=True):
        if not s or not t:
            n_empty += 1
        elif max_length is not None and len(head) + len(s) + len(t) + 2 > max_length:
            n_long += 1
        else:
            prompts.append(prompt_ids(tokenizer, head, s))
            responses.append([*t, tokenizer.eos_id])
    if n_empty or n_long:
        log(f"causal.encode_examples: kept {len(prompts)} of {len(pairs)} pairs; dropped {n_empty} with an empty "
            f"side and {n_long} whose prompt + response is longer than {max_length} tokens")
    return prompts, responses


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Right-padded tensors for a causal LM from prompt and response ids.

    Row b is ``x = prompts[b] + responses[b]`` (length ``L_b = P_b + R_b``).

    Returns:
        ``input_ids`` [B, L] (``x``, then ``pad_id``), ``attention_mask`` [B, L] (1 on ``x``), and ``labels``
        [B, L] with ``labels[b, t] = x[t + 1]`` for ``P_b - 1 <= t <= L_b - 2`` (every response token, scored at
        the position that predicts it) and -100 elsewhere (prompt, the last token, padding); all int64.
    """
    import torch

    if len(prompts) != len(responses):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("collate: empty batch")
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not p or not r:
            raise ValueError(f"collate: row {b} has an empty {'prompt' if not p else 'response'}")
    B, L = len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        P, R = len(p), len(r)
        input_ids[b, :P + R] = torch.tensor([*p, *r], dtype=torch.long)
        attention_mask[b, :P + R] = 1
        labels[b, P - 1:P + R - 1] = torch.tensor(r, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def scored_window(labels: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(k, labels[:, -k:])`` with ``k = L - (first column any row scores)``: pass ``logits_to_keep=k`` to the
    model and its [B, k, V] logits line up with the returned labels (no output layer on unscored prompt columns)."""
    scored = (labels != IGNORE_INDEX).any(0).nonzero()
    start = int(scored[0]) if len(scored) else 0
    return labels.shape[1] - start, labels[:, start:]


def prompts_of(batch: dict) -> list[list[int]]:
    """The prompt of each row of a ``collate`` batch: the ids up to and including the first scored position."""
    out = []
    for b, (row, lab) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True)):
        first = next((t for t, v in enumerate(lab) if v != IGNORE_INDEX), None)
        if first is None:
            raise ValueError(f"row {b} of the batch has no response position (all labels are {IGNORE_INDEX})")
        out.append(row[:first + 1])
    return out


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------
def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] ids padded on the left and their attention mask (generate continues every row at column S)."""
    import torch

    S = max(map(len, rows))
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, S - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[b, S - len(row):] = 1
    return ids, mask


def _suppressed(model, tokenizer) -> list[int]:
    """``<pad>`` and the padding rows beyond the tokenizer: never generated."""
    return [tokenizer.pad_id, *range(tokenizer.vocab_size, output_rows(model))]


def _cut_at_eos(row: list[int], eos_id: int, keep_eos: bool) -> list[int]:
    if eos_id in row:
        return row[:row.index(eos_id) + int(keep_eos)]
    return row


def translate(model, tokenizer, sources: Sequence[str], *, beam: int = 6, length_penalty: float = 1.0,
              max_length: int = 256, batch_size: int = 64, progress: bool = False) -> list[str]:
    """``ktransfer.evaluate.translate`` for a causal LM: beam search after each left-padded prompt.

    Prompts (instruction + source + ``</s>``) are sorted by length into batches, left-padded (positions follow the
    attention mask), continued with ``model.generate`` (beam ``beam``, ``length_penalty``, at most
    ``min(max_length, positions - S)`` new tokens for a batch whose longest prompt has ``S`` ids, ``</s>`` forced
    at the limit, ``<pad>`` and padding rows never generated); the prompt is stripped, the response cut at ``</s>``
    and decoded. A source that leaves fewer than 8 positions for the response is cut. Empty sources give "".

    Raises:
        ValueError: a setting out of range, or a model without a stored instruction.
    """
    from tqdm import tqdm
    from transformers import GenerationConfig

    from ktransfer.evaluate import DecodeSettings

    settings = DecodeSettings(beam=beam, length_penalty=length_penalty, max_length=max_length)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    sources = list(sources)
    hypotheses = [""] * len(sources)
    head, n_pos = tokenizer.encode(instruction(model)), positions(model)
    encoded = tokenizer.encode_batch(sources)
    ids = {i: prompt_ids(tokenizer, head, e, limit=n_pos - 8) for i, e in enumerate(encoded) if e}
    order = sorted(ids, key=lambda i: (-len(ids[i]), i))
    device = next(model.parameters()).device
    suppress = _suppressed(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(sources), unit="sent", desc="translate", disable=not progress, dynamic_ncols=True) as bar:
            bar.update(len(sources) - len(ids))
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                input_ids, mask = _left_pad([ids[i] for i in chunk], tokenizer.pad_id)
                S = input_ids.shape[1]
                gen = GenerationConfig(
                    num_beams=settings.beam, length_penalty=float(settings.length_penalty),
                    max_new_tokens=max(1, min(settings.max_length, n_pos - S)), early_stopping=settings.beam > 1,
                    do_sample=False, num_return_sequences=1, pad_token_id=tokenizer.pad_id,
                    eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.eos_id,
                    forced_eos_token_id=tokenizer.eos_id, suppress_tokens=suppress)
                out = _generate(model, input_ids.to(device), mask.to(device), gen)
                for i, row in zip(chunk, out[:, S:].tolist(), strict=True):
                    hypotheses[i] = tokenizer.decode(_cut_at_eos(row, tokenizer.eos_id, keep_eos=False))
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return hypotheses


def _generate(model, input_ids, attention_mask, gen):
    import torch

    # generate() fills unset settings from model.generation_config: ours stands in for the call (see evaluate.py)
    saved, model.generation_config = model.generation_config, gen
    try:
        with torch.inference_mode():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen)
    finally:
        model.generation_config = saved


def _setting(settings, key: str, default=None):
    return settings.get(key, default) if isinstance(settings, dict) else getattr(settings, key, default)


def on_policy_batch(run, batch: dict, settings) -> dict:
    """The batch's prompts continued by samples of the learner (``run.model``), collated like ``collate``.

    Each prompt (``prompts_of(batch)``) is continued by ancestral sampling without gradient, in eval mode (no
    dropout), with temperature ``settings.temperature``, nucleus ``settings.top_p`` and at most
    ``settings.max_new_tokens`` tokens (and the model's positions); the sample ends at its first ``</s>``
    (kept) or at the limit. The random draws come from ``settings.generator`` (a ``torch.Generator``): a seed
    drawn from it seeds a forked global RNG, so the global RNG (dropout, exact resume) is left untouched and the
    same generator state gives the same samples.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` on ``run.device``: labels = the sampled tokens, shifted as in
        ``collate``, -100 on the prompt and padding.
    """
    import torch
    from transformers import GenerationConfig

    model, tokenizer = run.model, run.tokenizer
    prompts = prompts_of(batch)
    input_ids, mask = _left_pad(prompts, tokenizer.pad_id)
    S = input_ids.shape[1]
    max_new = int(_setting(settings, "max_new_tokens", 128))
    max_new = max(1, min(max_new, positions(model) - S))
    gen = GenerationConfig(do_sample=True, temperature=float(_setting(settings, "temperature", 1.0)),
                           top_p=float(_setting(settings, "top_p", 1.0)), top_k=0, num_beams=1,
                           max_new_tokens=max_new, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                           bos_token_id=tokenizer.eos_id, suppress_tokens=_suppressed(model, tokenizer))
    generator = _setting(settings, "generator")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = _generate(model, input_ids.to(device), mask.to(device), gen)
    finally:
        model.train(was_training)
    responses = [_cut_at_eos(row, tokenizer.eos_id, keep_eos=True) or [tokenizer.eos_id]
                 for row in out[:, S:].tolist()]
    new = collate(prompts, responses, tokenizer.pad_id)
    return {k: v.to(run.device) for k, v in new.items()}
