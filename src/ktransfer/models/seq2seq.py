"""The encoder-decoder family: Marian presets, and any ``AutoModelForSeq2SeqLM`` (an opus-mt Marian model, ...).

A pair (source, reference) is ``src = encode(source) + [</s>]``, ``tgt = encode_target(reference) + [</s>]``; a batch
feeds ``src`` to the encoder and ``[decoder start] + tgt[:-1]`` to the decoder, and ``labels = tgt`` line up with the
logits position by position (``ktransfer.data.batching.collate``). The decoder starts with the model's
``decoder_start_token_id`` (Marian: ``<pad>``).

Presets (encoder/decoder layers x d_model x attention heads; FFN = 4 x d_model; parameters for a 10K vocabulary), every
one a Marian model with post-norm layers, sinusoidal positions, embeddings scaled by sqrt(d_model), and one embedding
matrix shared by the encoder, the decoder and the output layer; the vocabulary size and the special ids come from the
tokenizer:

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

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ktransfer.data import batching
from ktransfer.data.corpora import IGNORE_INDEX
from ktransfer.models import generation, sampling
from ktransfer.models.generation import DecodeSettings

FORMATS = ("parallel", "prompt_completion")  # data formats an encoder-decoder reads (ktransfer.data.formats)

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
    return {**_COMMON, "encoder_layers": enc, "decoder_layers": dec, "d_model": dim, "encoder_attention_heads": heads,
            "decoder_attention_heads": heads, "encoder_ffn_dim": ffn, "decoder_ffn_dim": ffn, **extra}


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

# Short names accepted as overrides that set both the encoder and the decoder value.
ALIASES: dict[str, tuple[str, ...]] = {
    "layers": ("encoder_layers", "decoder_layers"),
    "heads": ("encoder_attention_heads", "decoder_attention_heads"),
    "ffn_dim": ("encoder_ffn_dim", "decoder_ffn_dim"),
}
# Overrides that change no tensor shape, so they also apply to a loaded model.
SHAPE_FREE = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop")


def _resolve_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    valid = set(base) | {"encoder_layerdrop", "decoder_layerdrop"}
    out = dict(base)
    for key, value in overrides.items():
        targets = ALIASES.get(key, (key,))
        if any(t not in valid for t in targets):
            raise ValueError(f"unknown model override {key!r}; valid: {', '.join(sorted(valid | set(ALIASES)))} "
                             "(vocabulary size and special ids come from the tokenizer)")
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
        check_dropout(kw[key], key)


def check_dropout(value, key: str = "dropout") -> float:
    """``value`` as a float in [0, 1); ValueError naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"model {key} must be in [0, 1), got {value!r}")
    return float(value)


def _with_instruction(model, pairs):
    """The pairs with the model's stored instruction (``prepare``) before each source text, when it has one."""
    head = getattr(generation.unwrap(model).config, generation.INSTRUCTION_KEY, "") if model is not None else ""
    return [(f"{head} {s}" if head and s else s, t) for s, t in pairs]


def decoder_start(model) -> int:
    """The id the decoder starts with (``decoder_start_token_id`` of the config or generation config; else pad)."""
    model = generation.unwrap(model)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        value = getattr(cfg, "decoder_start_token_id", None)
        if value is not None:
            return int(value)
    return int(model.config.pad_token_id)


class Seq2SeqFamily:
    """Encoder-decoder models (``AutoModelForSeq2SeqLM``): see the module docstring."""

    name = "seq2seq"
    presets = PRESETS

    @staticmethod
    def auto_class():
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    # --- building and loading ----------------------------------------------------------------------------------
    def build(self, preset: str, tokenizer, **overrides):
        """A fresh Marian model of ``preset`` for ``tokenizer`` (vocabulary and special ids), in train mode.

        ``overrides``: ``MarianConfig`` arguments or the aliases ``layers``, ``heads``, ``ffn_dim``; a new
        ``d_model`` scales the FFN with it unless an FFN size is given."""
        from transformers import MarianConfig, MarianMTModel

        kw = _resolve_overrides(PRESETS[preset], overrides)
        _check_architecture(kw)
        try:
            config = MarianConfig(**kw, vocab_size=tokenizer.vocab_size, decoder_vocab_size=tokenizer.vocab_size,
                                  pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                                  decoder_start_token_id=tokenizer.pad_id, bos_token_id=None,
                                  forced_eos_token_id=None)  # generation settings live in model.generation_config
        except Exception as e:  # huggingface_hub's strict-dataclass errors are not ValueErrors
            raise ValueError(f"invalid settings for model preset {preset!r}: {e}") from e
        model = MarianMTModel(config)
        self.set_generation_config(model, tokenizer)
        return model.train()

    def load_overrides(self, model_type: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """Config fields for ``from_pretrained`` from ktransfer's overrides: only shape-free ones (dropout)."""
        bad = sorted(set(overrides) - set(SHAPE_FREE))
        if bad:
            raise ValueError(f"a loaded model takes only dropout overrides ({', '.join(SHAPE_FREE)}), got {bad}")
        return {k: check_dropout(v, k) if "dropout" in k else v for k, v in overrides.items()}

    def after_load(self, model) -> None:
        """Freeze sinusoidal position tables again: ``from_pretrained`` returns them with ``requires_grad=True``
        (a fresh Marian model has them frozen), and training them would break exact resume."""
        for module in model.modules():
            if "Sinusoidal" in type(module).__name__:
                module.requires_grad_(False)

    def set_generation_config(self, model, tokenizer, settings: DecodeSettings | None = None) -> None:
        """The search ``translate`` runs with ``settings`` (default: its defaults, beam 6, length penalty 1, early
        stopping, at most 256 tokens within the positions; start with the decoder start id, stop at eos, forced at
        the limit, never generate pad): a plain ``model.generate(**inputs)`` of the saved model gives what
        ``ktransfer translate`` gives."""
        model.generation_config = self._beam_config(model, tokenizer, settings or DecodeSettings())

    def prepare(self, model, tokenizer, *, src_lang: str, tgt_lang: str, fmt: str = "parallel",
                instruction: str | None = None) -> None:
        """Store ``instruction`` (when given) in the model's config: ``encode`` and ``translate`` put it before
        every source text. Otherwise nothing: the encoder reads the source as it is.

        Raises:
            ValueError: a data format an encoder-decoder cannot read (chat, text).
        """
        if fmt not in FORMATS:
            raise ValueError(f"encoder-decoder models take {' or '.join(FORMATS)} data, not {fmt!r}: chat and text "
                             "data need a causal language model")
        if instruction is not None:
            setattr(generation.unwrap(model).config, generation.INSTRUCTION_KEY, instruction)

    def positions(self, model) -> int:
        """Longest sequence either side holds (sinusoidal tables have a fixed length)."""
        return int(getattr(generation.unwrap(model).config, "max_position_embeddings", None) or 1024)

    # --- data ----------------------------------------------------------------------------------------------------
    def encode(self, pairs: Sequence[tuple[str, str]], tokenizer, max_length: int | None, *, model=None,
               fmt: str = "parallel", truncate: bool = False,
               log: Callable[[str], object] = print) -> tuple[list[list[int]], list[list[int]]]:
        """``(source ids, target ids)`` of the pairs (translation or prompt/completion), each ending with ``</s>``
        (``batching.encode_pairs``); the model's stored instruction (``prepare``), if any, heads each source text. A
        pair over ``max_length`` is dropped (``truncate`` does not apply to an encoder-decoder)."""
        if fmt not in FORMATS:
            raise ValueError(f"encoder-decoder models take {' or '.join(FORMATS)} data, not {fmt!r}")
        return batching.encode_pairs(_with_instruction(model, pairs), tokenizer, max_length, log=log)

    def lengths(self, ids) -> tuple[list[int], list[int]]:
        """Per-example (source, target) lengths for ``TokenBatchSampler``."""
        return [len(x) for x in ids[0]], [len(x) for x in ids[1]]

    def collate(self, src, tgt, model, tokenizer) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``decoder_input_ids`` and ``labels`` (``batching.collate``)."""
        return batching.collate(src, tgt, tokenizer.pad_id, decoder_start(model))

    def model_inputs(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """``(inputs, labels)``: ``model(**inputs).logits[:, t]`` is scored against ``labels[:, t]``."""
        return {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}, batch["labels"]

    # --- generation ----------------------------------------------------------------------------------------------
    def translate(self, model, tokenizer, sources: Sequence[str], settings: DecodeSettings, *, batch_size: int = 64,
                  progress: bool = False) -> list[str]:
        """Beam search of each source (see ``ktransfer.evaluation.evaluate.translate``); a source longer than the
        positional
        table is cut to fit; empty sources give ""."""
        positions = self.positions(model)
        encoded = tokenizer.encode_batch([s for s, _ in _with_instruction(model, [(s, "") for s in sources])])
        prompts = [[*e[:positions - 1], tokenizer.eos_id] if e and src else [] for e, src in zip(encoded, sources,
                                                                                                  strict=True)]
        return self.complete(model, tokenizer, prompts, settings, batch_size=batch_size, progress=progress)

    def complete(self, model, tokenizer, prompts: Sequence[Sequence[int]], settings: DecodeSettings, *,
                 batch_size: int = 64, progress: bool = False) -> list[str]:
        """The decoded beam-search output for each encoder input (source ids as ``encode`` gives them; ``[]``
        gives "")."""
        from tqdm import tqdm

        hypotheses = [""] * len(prompts)
        ids = {i: list(p) for i, p in enumerate(prompts) if len(p)}
        device = next(model.parameters()).device
        with tqdm(total=len(prompts), unit="sent", desc="translate", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            bar.update(len(prompts) - len(ids))  # empty sources are done already
            for chunk in generation.sorted_batches(ids, batch_size):
                input_ids, mask = generation.pad_rows([ids[i] for i in chunk], tokenizer.pad_id)
                out = generation.generate(model, self._beam_config(model, tokenizer, settings),
                                          input_ids=input_ids.to(device), attention_mask=mask.to(device))
                for i, row in zip(chunk, out[:, 1:].tolist(), strict=True):  # drop the decoder start symbol
                    hypotheses[i] = tokenizer.decode(generation.cut_at_eos(row, tokenizer.eos_id, keep_eos=False))
                bar.update(len(chunk))
        return hypotheses

    def max_new_tokens(self, model, max_length: int) -> int:
        """Tokens generated at most: the decoder input is [start] + generated tokens, all within the positions."""
        return min(max_length, self.positions(model) - 1)

    def _beam_config(self, model, tokenizer, settings: DecodeSettings):
        from transformers import GenerationConfig

        return GenerationConfig(
            num_beams=settings.beam, length_penalty=float(settings.length_penalty),
            max_length=self.max_new_tokens(model, settings.max_length) + 1,  # the start symbol + generated tokens
            early_stopping=settings.beam > 1, do_sample=False, num_return_sequences=1, pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id, decoder_start_token_id=decoder_start(model),
            forced_eos_token_id=tokenizer.eos_id,  # a hypothesis cut at max_length still ends with </s>
            suppress_tokens=generation.suppressed_ids(model, tokenizer))

    def on_policy_batch(self, model, tokenizer, batch: dict, settings) -> dict:
        """The batch's sources with ``decoder_input_ids`` = start + the learner's samples and ``labels`` = the
        sampled tokens (-100 after each sample's first ``</s>``, which is kept, and after its length limit).

        Ancestral sampling (``ktransfer.models.sampling``) without gradient, in eval mode (restored after): the
        encoder runs once, the decoder one token a step on its KV cache. ``settings``: temperature, top_k, top_p,
        the length rule (``max_new_tokens`` capped by the positions, ``length_scale``, ``length_margin``) and the
        seed of the uniforms."""
        model = generation.unwrap(model)
        cap = self.max_new_tokens(model, settings.max_new_tokens)
        limits = sampling.row_limits(batch["labels"], cap, settings.length_scale, settings.length_margin)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        start = torch.full((ids.shape[0], 1), decoder_start(model), dtype=torch.long, device=ids.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=mask)
                cache = {"past": None}

                def next_logits(last):
                    out = model(encoder_outputs=encoder_outputs, attention_mask=mask,
                                decoder_input_ids=start if last is None else last.unsqueeze(1),
                                cache=cache["past"], use_cache=True)
                    cache["past"] = out.cache
                    return out.logits[:, -1]

                tokens, lengths = sampling.ancestral(
                    next_logits, limits, eos_id=tokenizer.eos_id, fill_id=tokenizer.pad_id, seed=settings.seed,
                    temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                    suppressed=generation.suppressed_ids(model, tokenizer))
        finally:
            model.train(was_training)
        after = torch.arange(tokens.shape[1], device=tokens.device) >= lengths.unsqueeze(1)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.cat([start, tokens[:, :-1]], 1),
                "labels": tokens.masked_fill(after, IGNORE_INDEX)}
