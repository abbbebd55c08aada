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

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ktransfer.data.corpora import IGNORE_INDEX
from ktransfer.models import generation, sampling
from ktransfer.models.generation import FORMAT_KEY, INSTRUCTION_KEY, DecodeSettings, unwrap

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
    text = getattr(unwrap(model).config, INSTRUCTION_KEY, None)
    if not isinstance(text, str):
        raise ValueError(f"causal model has no {INSTRUCTION_KEY} in its config: call ktransfer.models.causal."
                         "ensure_instruction(model, src_lang, tgt_lang) before translating with it")
    return text


def ensure_instruction(model, src_lang: str, tgt_lang: str) -> str:
    """The model's instruction; a model without one gets ``make_instruction(src_lang, tgt_lang)``."""
    config = unwrap(model).config
    if not isinstance(getattr(config, INSTRUCTION_KEY, None), str):
        setattr(config, INSTRUCTION_KEY, make_instruction(src_lang, tgt_lang))
    return getattr(config, INSTRUCTION_KEY)


def prompt_ids(tokenizer, instruction_ids: Sequence[int], source_ids: Sequence[int],
               limit: int | None = None) -> list[int]:
    """``[<s>] + instruction_ids + source_ids + [</s>]`` (``<s>`` where the tokenizer has one of its own), the source
    cut from its end so that the whole is <= ``limit``."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id not in (None, tokenizer.eos_id) else []
    room = None if limit is None else max(limit - len(bos) - len(instruction_ids) - 1, 0)
    return [*bos, *instruction_ids, *(source_ids if room is None else source_ids[:room]), tokenizer.eos_id]


def encode_examples(pairs: Sequence[tuple[str, str]], tokenizer, max_length: int | None, *, instruction: str,
                    log: Callable[[str], object] = print) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and response ids of each pair (module docstring), ``instruction`` heading each prompt; drops pairs
    with an empty side or a sequence (prompt + response) longer than ``max_length``, and logs how many.

    Returns:
        ``(prompts, responses)``: aligned lists; each prompt and each response ends with ``</s>``.
    """
    head = tokenizer.encode(instruction)
    src_all = tokenizer.encode_batch([s for s, _ in pairs])
    tgt_all = tokenizer.encode_batch([t for _, t in pairs], target=True)
    prompts, responses, n_empty, n_long = [], [], 0, 0
    for s, t in zip(src_all, tgt_all, strict=True):
        if not s or not t:
            n_empty += 1
        elif max_length is not None and len(prompt_ids(tokenizer, head, s)) + len(t) + 1 > max_length:
            n_long += 1
        else:
            prompts.append(prompt_ids(tokenizer, head, s))
            responses.append([*t, tokenizer.eos_id])
    if n_empty or n_long:
        log(f"causal.encode_examples: kept {len(prompts)} of {len(pairs)} pairs; dropped {n_empty} with an empty "
            f"side and {n_long} whose prompt + response is longer than {max_length} tokens")
    return prompts, responses


def own_ids(tokenizer, text: str, head: Sequence[int] = ()) -> list[int]:
    """``tokenizer(text)``'s ids: the special tokens the tokenizer itself adds (a Llama tokenizer's ``<s>``, none
    for GPT-2's), nothing else; ``head`` (an instruction's ids) goes after the ones it puts first."""
    ids = list(tokenizer.hf(text)["input_ids"])
    if not head:
        return ids
    bare = tokenizer.encode(text)
    lead = len(ids) - len(bare) if ids[len(ids) - len(bare):] == bare else 0
    return [*ids[:lead], *head, *ids[lead:]]


def unscored(token: int) -> int:
    """How a response stores a token the model reads but is not scored on (a user turn inside a conversation):
    ``-token - 1``; ``collate`` feeds ``token`` and labels it -100, ``Tokenizer.decode`` skips it."""
    return -token - 1


def token_of(stored: int) -> int:
    """The token id of a stored response entry (``unscored``'s inverse for negative entries)."""
    return stored if stored >= 0 else -stored - 1


def chat_ids(tokenizer, prompt: str, completion) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` of a conversation (``formats.chat_pair``'s prompt and ``Scored`` completion,
    or a turn's prompt and text): ``prompt + completion.text`` tokenized once as the chat template wrote it (no
    special token added); the response starts at the first scored token, and each token in it that starts outside
    the scored spans is stored ``unscored``. Fast tokenizers place tokens by their offsets, others are tokenized
    piece by piece."""
    text, spans = (completion.text, completion.spans) if hasattr(completion, "spans") else \
        (completion, ((0, len(completion)),))
    whole, spans = prompt + text, [(a + len(prompt), b + len(prompt)) for a, b in spans]
    if getattr(tokenizer.hf, "is_fast", False):
        enc = tokenizer.hf(whole, add_special_tokens=False, return_offsets_mapping=True)
        marked = [t if any(a <= o[0] < b for a, b in spans) else unscored(t)
                  for t, o in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    else:
        marked = []
        for a, b in itertools.pairwise(sorted({0, *(c for span in spans for c in span), len(whole)})):
            ids = tokenizer.encode(whole[a:b]) if b > a else []
            marked += ids if any(x <= a < y for x, y in spans) else [unscored(t) for t in ids]
    first = next((i for i, t in enumerate(marked) if t >= 0), len(marked))
    return [token_of(t) for t in marked[:first]], marked[first:]


def _completion_ids(tokenizer, prompt: str, completion: str, prompt_ids: list[int]) -> list[int]:
    """What tokenizing prompt + completion adds to the prompt's ids (else the completion alone), then ``</s>``
    unless the last token is already one."""
    whole = list(tokenizer.hf(prompt + completion)["input_ids"])
    c = whole[len(prompt_ids):] if whole[:len(prompt_ids)] == prompt_ids else tokenizer.encode(completion,
                                                                                            target=True)
    return c if not c or c[-1] == tokenizer.eos_id else [*c, tokenizer.eos_id]


def encode_completions(pairs: Sequence[tuple[str, Any]], tokenizer, max_length: int | None, *, instruction: str = "",
                       truncate: bool = False, fmt: str = "prompt_completion",
                       log: Callable[[str], object] = print):
    """``(prompt ids, response ids)`` of ``(prompt, completion)`` pairs, the tokens exactly as the tokenizer makes
    them: the prompt is ``tokenizer(prompt)``'s ids (its own special tokens, nothing added) with the
    ``instruction`` (when not empty) after its leading specials; the response is what tokenizing prompt +
    completion adds (else the completion alone) and ``</s>`` unless it ends with one. Chat (``fmt="chat"``): the
    whole conversation tokenized once as the template renders it, no special token added; its user turns after the
    first assistant turn are stored ``unscored``. An empty prompt (text data) whose tokenizer adds nothing lends
    the first token of the text as the prompt (the first token has nothing to be predicted from).

    A pair longer than ``max_length`` is dropped, or with ``truncate`` its completion is cut to fit (dropped all
    the same when its prompt leaves no room); the log says how many.
    """
    head = tokenizer.encode(instruction) if instruction else []
    prompts, responses, n_empty, n_long, n_cut = [], [], 0, 0, 0
    for p_text, completion in pairs:
        if fmt == "chat":
            prompt, response = chat_ids(tokenizer, p_text, completion)
            prompt = [*head, *prompt] if head else prompt
        else:
            prompt = own_ids(tokenizer, p_text, head)
            response = _completion_ids(tokenizer, p_text, completion, prompt)
        if not prompt and len(response) > 1:
            prompt, response = response[:1], response[1:]
        if not prompt or not any(t >= 0 for t in response):
            n_empty += 1
            continue
        if max_length is not None and len(prompt) + len(response) > max_length:
            room = max_length - len(prompt)
            if not truncate or room < 1:
                n_long += 1
                continue
            response, n_cut = response[:room], n_cut + 1
        prompts.append(prompt)
        responses.append(response)
    if n_empty or n_long or n_cut:
        log(f"causal.encode_completions: kept {len(prompts)} of {len(pairs)} examples; dropped {n_empty} with an "
            f"empty completion and {n_long} longer than {max_length} tokens; cut {n_cut} to fit (data.truncate)")
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
        input_ids[b, :P + R] = torch.tensor([*p, *map(token_of, r)], dtype=torch.long)
        attention_mask[b, :P + R] = 1
        labels[b, P - 1:P + R - 1] = torch.tensor([t if t >= 0 else IGNORE_INDEX for t in r], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def scored_window(labels: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(k, labels[:, -k:])`` with ``k = L - (first column any row scores)``: pass ``logits_to_keep=k`` to the
    model and its [B, k, V] logits line up with the returned labels (no output layer on unscored prompt columns)."""
    scored = (labels != IGNORE_INDEX).any(0).nonzero()
    start = int(scored[0]) if len(scored) else 0
    return labels.shape[1] - start, labels[:, start:]


def prompts_of(batch: dict) -> list[list[int]]:
    """The prompt of each row of a ``collate`` batch: the ids up to and including the first position of the last
    scored run (the last assistant turn of a conversation; the whole response otherwise)."""
    out = []
    for b, (row, lab) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True)):
        scored = [t for t, v in enumerate(lab) if v != IGNORE_INDEX]
        if not scored:
            raise ValueError(f"row {b} of the batch has no response position (all labels are {IGNORE_INDEX})")
        first = next(t for i, t in reversed(list(enumerate(scored))) if i == 0 or scored[i - 1] != t - 1)
        out.append(row[:first + 1])
    return out


def last_turn(prompt: Sequence[int], response: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(context ids, response ids)`` of the last scored run of an encoded example (``encode_completions``): the
    prompt and the stored response before the run (its tokens as read), then the run itself. The prompt and
    response themselves for an example scored in one piece."""
    runs = [i for i in range(len(response)) if response[i] >= 0 and (i == 0 or response[i - 1] < 0)]
    start = runs[-1] if runs else 0
    return [*prompt, *map(token_of, response[:start])], list(response[start:])


def trained_on_chat(model) -> bool:
    """Whether the model was trained on chat data (its config's data format, stored by ``CausalFamily.prepare``)."""
    return getattr(unwrap(model).config, FORMAT_KEY, None) == "chat"


def generation_prompt_ids(model, tokenizer, text: str, *, chat: bool | None = None) -> list[int]:
    """The ids a prompt is continued from: for a chat model (``chat`` None: ``trained_on_chat``) ``text`` as a user
    message rendered by the chat template with its generation prompt; else ``tokenizer(text)``'s ids with the
    model's instruction, as training and evaluation encode prompts.

    Raises:
        CorpusError: chat asked for and the tokenizer has no chat template.
    """
    from ktransfer.data import formats

    if trained_on_chat(model) if chat is None else chat:
        formats.check_chat_template(tokenizer)
        rendered = formats.render(tokenizer, [{"role": "user", "content": text}], generation_prompt=True)
        return tokenizer.encode(rendered)
    head = tokenizer.encode(getattr(unwrap(model).config, INSTRUCTION_KEY, None) or "")
    return own_ids(tokenizer, text, head)


class CausalFamily:
    """Decoder-only language models (``AutoModelForCausalLM``): see the module docstring."""

    name = "causal"
    presets = CAUSAL_PRESETS

    @staticmethod
    def auto_class():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    # --- building and loading ----------------------------------------------------------------------------------
    def build(self, preset: str, tokenizer, **overrides):
        """A fresh causal LM of ``preset`` for ``tokenizer``, in train mode.

        ``overrides``: config fields of the preset (``n_layer``, ``n_embd``, ``hidden_size``, ...) or ``dropout``
        (GPT-2: residual and embedding dropout; Llama: attention dropout)."""
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        kw = dict(CAUSAL_PRESETS[preset])
        model_type = kw.pop("model_type")
        for key, value in overrides.items():
            if key == "dropout":
                kw.update(_dropout_kw(model_type, value))
            elif key in kw:
                kw[key] = value
            else:
                raise ValueError(f"unknown override {key!r} for causal preset {preset!r}; valid: dropout, "
                                 f"{', '.join(sorted(kw))} (vocabulary size and special ids come from the tokenizer)")
        _check_sizes(preset, model_type, kw)
        bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        try:
            config = CONFIG_MAPPING[model_type](**kw, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                                                eos_token_id=tokenizer.eos_id, bos_token_id=bos)
        except Exception as e:  # huggingface_hub's strict-dataclass errors are not ValueErrors
            raise ValueError(f"invalid settings for causal preset {preset!r}: {e}") from e
        model = AutoModelForCausalLM.from_config(config)
        self.set_generation_config(model, tokenizer)
        return model.train()

    def load_overrides(self, model_type: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """Config fields for ``from_pretrained``: ``dropout`` becomes the model type's dropout fields."""
        bad = sorted(set(overrides) - {"dropout"})
        if bad:
            raise ValueError(f"a loaded causal model takes only the dropout override, got {bad}")
        return _dropout_kw(model_type, overrides["dropout"]) if overrides else {}

    def after_load(self, model) -> None:
        """Nothing to fix after ``from_pretrained``."""

    def set_generation_config(self, model, tokenizer) -> None:
        """Stop at eos (forced at the limit), pad with pad, never generate pad or padding rows; at most the model's
        positions in all: a plain ``generate()`` of the saved model searches as ``translate`` does."""
        from transformers import GenerationConfig

        bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                                                   bos_token_id=bos, max_length=self.positions(model),
                                                   forced_eos_token_id=tokenizer.eos_id,
                                                   suppress_tokens=generation.suppressed_ids(model, tokenizer))

    def prepare(self, model, tokenizer, *, src_lang: str, tgt_lang: str, fmt: str = "parallel",
                instruction: str | None = None) -> None:
        """Store the instruction heading every prompt in the model's config: ``instruction`` when given; else, for
        translation pairs, the model's own or ``make_instruction``; for the other formats none (``""``)."""
        config = unwrap(model).config
        setattr(config, FORMAT_KEY, fmt)
        if fmt == "chat":
            self._stop_at_end_of_turn(model, tokenizer)
        if instruction is not None:
            setattr(config, INSTRUCTION_KEY, instruction)
        elif fmt == "parallel":
            ensure_instruction(model, src_lang, tgt_lang)
        else:
            setattr(config, INSTRUCTION_KEY, "")

    @staticmethod
    def _stop_at_end_of_turn(model, tokenizer) -> None:
        """A chat model's generation ends where its template ends an assistant turn (``<|im_end|>``, ``<|eot_id|>``)
        as well as at ``</s>``: ``generation_config.eos_token_id`` becomes that list, so that a plain ``generate()``
        of the saved model stops there too."""
        from ktransfer.data import formats

        ends = [tokenizer.token_to_id(t) for t in formats.end_of_turn_tokens(tokenizer)]
        stops = list(dict.fromkeys([tokenizer.eos_id, *(i for i in ends if i is not None)]))
        unwrap(model).generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]

    def positions(self, model) -> int:
        """The longest sequence (prompt + response) the positional table holds (RoPE: its configured length)."""
        config = unwrap(model).config
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 1024

    # --- data ----------------------------------------------------------------------------------------------------
    def encode(self, pairs, tokenizer, max_length: int | None, *, model=None, fmt: str = "parallel",
               truncate: bool = False, log: Callable[[str], object] = print) -> tuple[list[list[int]], list[list[int]]]:
        """``(prompt ids, response ids)`` of the ``(prompt, completion)`` pairs of data format ``fmt``: translation
        pairs get the model's instruction and ``</s>`` after the source (``encode_examples``); the other formats
        their text as it is (``encode_completions``), the instruction only where one was set."""
        if fmt == "parallel":
            return encode_examples(pairs, tokenizer, max_length, instruction=instruction(model), log=log)
        return encode_completions(pairs, tokenizer, max_length, instruction=instruction(model), truncate=truncate,
                                  fmt=fmt, log=log)

    def lengths(self, ids) -> tuple[list[int], list[int]]:
        """Prompt + response on both sides: one sequence a row."""
        total = [len(p) + len(r) for p, r in zip(*ids, strict=True)]
        return total, total

    def collate(self, src, tgt, model, tokenizer) -> dict:
        """``input_ids``, ``attention_mask`` and shifted ``labels`` (``collate``)."""
        return collate(src, tgt, tokenizer.pad_id)

    def model_inputs(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """``(inputs, labels)`` with ``logits_to_keep``: logits only from the first scored column on (the prompt
        before it is never scored), lined up with the returned labels (``scored_window``)."""
        keep, labels = scored_window(batch["labels"])
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "logits_to_keep": keep}, labels

    # --- generation ----------------------------------------------------------------------------------------------
    def translate(self, model, tokenizer, sources: Sequence[str], settings: DecodeSettings, *, batch_size: int = 64,
                  progress: bool = False) -> list[str]:
        """Beam search after each prompt (instruction + source + ``</s>``, see ``complete``). A source that leaves
        fewer than 8 positions for the response is cut. Empty sources give ""."""
        if trained_on_chat(model):
            raise ValueError("this causal model was trained on chat data: its prompts need its chat template; use "
                             "`ktransfer generate MODEL` (one user message a line, the template applied)")
        head, n_pos = tokenizer.encode(instruction(model)), self.positions(model)
        encoded = tokenizer.encode_batch(list(sources))
        prompts = [prompt_ids(tokenizer, head, e, limit=n_pos - 8) if e else [] for e in encoded]
        return self.complete(model, tokenizer, prompts, settings, batch_size=batch_size, progress=progress)

    def complete(self, model, tokenizer, prompts: Sequence[Sequence[int]], settings: DecodeSettings, *,
                 batch_size: int = 64, progress: bool = False) -> list[str]:
        """The decoded continuation of each prompt (ids as ``encode`` gives them; ``[]`` gives ""): beam search
        after the left-padded prompts, batches sorted by length, positions following the attention mask, at most
        ``min(max_length, positions - S)`` new tokens for a batch whose longest prompt has ``S`` ids, ``</s>``
        forced at the limit; each continuation cut at ``</s>``."""
        from tqdm import tqdm

        out_text = [""] * len(prompts)
        stops = generation.stop_ids(model, tokenizer)
        ids = {i: list(p) for i, p in enumerate(prompts) if len(p)}
        device = next(model.parameters()).device
        with tqdm(total=len(prompts), unit="seq", desc="generate", disable=not progress, dynamic_ncols=True) as bar:
            bar.update(len(prompts) - len(ids))
            for chunk in generation.sorted_batches(ids, batch_size):
                input_ids, mask = generation.pad_rows([ids[i] for i in chunk], tokenizer.pad_id, left=True)
                S = input_ids.shape[1]
                out = generation.generate(model, self._beam_config(model, tokenizer, settings, S),
                                          input_ids=input_ids.to(device), attention_mask=mask.to(device))
                for i, row in zip(chunk, out[:, S:].tolist(), strict=True):
                    out_text[i] = tokenizer.decode(generation.cut_at_eos(row, stops, keep_eos=False))
                bar.update(len(chunk))
        return out_text

    def max_new_tokens(self, model, max_length: int, prompt_length: int = 0) -> int:
        """Tokens generated at most after a prompt of ``prompt_length`` ids: within the positions, at least 1."""
        return max(1, min(max_length, self.positions(model) - prompt_length))

    def _beam_config(self, model, tokenizer, settings: DecodeSettings, prompt_length: int):
        from transformers import GenerationConfig

        return GenerationConfig(
            num_beams=settings.beam, length_penalty=float(settings.length_penalty),
            max_new_tokens=self.max_new_tokens(model, settings.max_length, prompt_length),
            early_stopping=settings.beam > 1, do_sample=False, num_return_sequences=1,
            pad_token_id=tokenizer.pad_id, eos_token_id=generation.stop_ids(model, tokenizer),
            forced_eos_token_id=tokenizer.eos_id,
            suppress_tokens=generation.suppressed_ids(model, tokenizer))

    def on_policy_batch(self, model, tokenizer, batch: dict, settings) -> dict:
        """The batch's prompts (``prompts_of``) continued by samples of the learner, collated like ``collate``.

        Ancestral sampling (``ktransfer.models.sampling``) without gradient, in eval mode (restored after): the
        left-padded prompts run once (positions from the attention mask), then one token a step on the KV cache.
        ``settings``: temperature, top_k, top_p, the length rule (``max_new_tokens`` capped by the positions,
        ``length_scale``, ``length_margin``) and the seed of the uniforms; each sample ends at its first ``</s>``
        (kept) or at its limit."""
        model = unwrap(model)
        device = batch["input_ids"].device
        prompts = prompts_of(batch)
        input_ids, mask = (t.to(device) for t in generation.pad_rows(prompts, tokenizer.pad_id, left=True))
        cap = self.max_new_tokens(model, settings.max_new_tokens, input_ids.shape[1])
        limits = sampling.row_limits(batch["labels"], cap, settings.length_scale, settings.length_margin)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        state = {"past": None, "mask": mask, "next": position[:, -1:] + 1}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                def next_logits(last):
                    if last is None:
                        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True,
                                    logits_to_keep=1)
                    else:
                        state["mask"] = torch.cat([state["mask"], mask.new_ones(mask.shape[0], 1)], 1)
                        out = model(input_ids=last.unsqueeze(1), attention_mask=state["mask"],
                                    position_ids=state["next"], cache=state["past"], use_cache=True)
                        state["next"] = state["next"] + 1
                    state["past"] = out.cache
                    return out.logits[:, -1]

                tokens, lengths = sampling.ancestral(
                    next_logits, limits, eos_id=generation.stop_ids(model, tokenizer), fill_id=tokenizer.pad_id,
                    seed=settings.seed,
                    temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                    suppressed=generation.suppressed_ids(model, tokenizer))
        finally:
            model.train(was_training)
        responses = [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True)]
        return {k: v.to(device) for k, v in collate(prompts, responses, tokenizer.pad_id).items()}


def _dropout_kw(model_type: str, value) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"model dropout must be in [0, 1), got {value!r}")
    return dict.fromkeys(_DROPOUT_FIELDS.get(model_type, ("dropout",)), float(value))


def _check_sizes(name: str, model_type: str, kw: dict[str, Any]) -> None:
    sizes = [kw[k] for k in _SIZE_FIELDS[model_type]]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
        raise ValueError(f"causal preset {name!r}: {', '.join(_SIZE_FIELDS[model_type])} must be positive "
                         f"integers, got {sizes}")
    width, heads = sizes[1], sizes[2]
    if width % heads or (model_type == "llama" and heads % kw["num_key_value_heads"]):
        raise ValueError(f"causal preset {name!r}: width {width} must be divisible by {heads} heads (and heads by "
                         "the key/value heads)")
