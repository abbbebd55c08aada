"""Tiny Hugging Face models and data built offline for the tests of ``ktransfer.hf_loss`` and
``ktransfer.integrations``: a byte-level BPE with a chat template trained on Multi30k sentences, GPT-2 and Marian
models of a few thousand parameters, and a chat dataset of Multi30k pairs."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def multi30k_pairs(shared_data: Path, n: int) -> list[tuple[str, str]]:
    """The first ``n`` (German, English) training pairs of Multi30k."""
    folder = shared_data / "multi30k-de-en"
    de = (folder / "train.de").read_text(encoding="utf-8").split("\n")[:n]
    en = (folder / "train.en").read_text(encoding="utf-8").split("\n")[:n]
    return list(zip(de, en, strict=True))


def tokenizer(shared_data: Path, vocab_size: int = 400):
    """A ``PreTrainedTokenizerFast``: byte-level BPE on 500 Multi30k pairs, pad/eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([s for pair in multi30k_pairs(shared_data, 500) for s in pair], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=128)


def gpt2(tok, seed: int, n_layer: int = 2, n_embd: int = 32):
    """A GPT-2 LM with ``tok``'s vocabulary, no dropout, deterministic weights from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(config)


def marian(tok, seed: int):
    """A 1+1-layer Marian seq2seq model with ``tok``'s vocabulary."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(seed)
    config = MarianConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          decoder_start_token_id=tok.pad_token_id)
    return MarianMTModel(config)


def chat_dataset(shared_data: Path, n: int):
    """``datasets.Dataset`` of ``{"messages": [user: German, assistant: English]}`` from Multi30k."""
    from datasets import Dataset

    return Dataset.from_list([{"messages": [{"role": "user", "content": de}, {"role": "assistant", "content": en}]}
                              for de, en in multi30k_pairs(shared_data, n)])


def causal_dataset(tok, shared_data: Path, n: int, max_length: int = 40):
    """A list of ``{"input_ids", "labels"}`` (labels = input_ids, as Hugging Face causal LMs take them)."""
    rows = []
    for de, en in multi30k_pairs(shared_data, n):
        ids = tok(f"{de} = {en}", truncation=True, max_length=max_length)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows
