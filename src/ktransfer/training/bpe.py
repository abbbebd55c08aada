"""ktransfer's joint BPE on a run's training examples, the one way both ``train`` and ``reproduce`` make it."""

from __future__ import annotations

import time

from ktransfer.data import formats
from ktransfer.models.tokenizer import Tokenizer, from_rust, train_tokenizer
from ktransfer.runtime import distributed


def train_joint_bpe(examples: formats.Examples, vocab_size: int, log) -> Tokenizer:
    """A joint BPE (``train_tokenizer``) on every string of ``examples``; with several processes every rank takes
    rank 0's (a tie could differ). One line to ``log`` (a callable taking a message)."""
    t0 = time.time()
    tokenizer = train_tokenizer(formats.texts(examples), vocab_size=vocab_size)
    if distributed.world_size() > 1:
        from tokenizers import Tokenizer as RustTokenizer

        body = distributed.broadcast(tokenizer.hf.backend_tokenizer.to_str())
        tokenizer = from_rust(RustTokenizer.from_str(body))
    log(f"trained a joint BPE tokenizer on {len(examples)} examples: {tokenizer.vocab_size} tokens "
        f"({time.time() - t0:.1f}s)" + ("" if examples.format == "parallel" else
                                        "; it folds whitespace runs into one space: give a Hugging Face tokenizer "
                                        "(data.tokenizer, or the teacher's) to keep whitespace exactly"))
    return tokenizer
