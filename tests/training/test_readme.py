"""The README's "Use the losses in your own training code" blocks, executed with tiny offline models (``hf_tiny``),
so that the examples cannot drift from the API. Each block follows a ``<!-- readme-test: NAME -->`` marker."""

from __future__ import annotations

import os
import re
from pathlib import Path

import hf_tiny
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")
REPO_ROOT = Path(__file__).resolve().parents[2]


def readme_block(name: str) -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- readme-test: {re.escape(name)} -->\n```python\n(.*?)\n```", text, re.S)
    if match is None:
        raise AssertionError(f"README.md has no python block after <!-- readme-test: {name} -->")
    return match.group(1)


@pytest.fixture
def namespace(shared_data, tmp_path, monkeypatch):
    """What the README blocks assume: tiny causal learner/teacher, a tokenizer, a labelled batch, two datasets."""
    monkeypatch.chdir(tmp_path)  # the blocks write under runs/
    tok = hf_tiny.tokenizer(shared_data)
    rows = hf_tiny.causal_dataset(tok, shared_data, 16)
    from transformers import DataCollatorForSeq2Seq

    batch = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)(rows[:4])
    return {"learner": hf_tiny.gpt2(tok, 0), "teacher": hf_tiny.gpt2(tok, 1, n_layer=3, n_embd=48),
            "tokenizer": tok, "batch": batch, "train_dataset": rows, "chat_dataset": None,
            "_shared": shared_data}


def test_readme_hf_loss_block(namespace):
    exec(readme_block("hf-loss"), namespace)
    assert namespace["result"].num_tokens > 0 and namespace["learner"].lm_head.weight.grad is not None
    assert torch.isfinite(namespace["result"].loss)


def test_readme_hf_trainer_block(namespace):
    pytest.importorskip("accelerate")
    exec(readme_block("hf-trainer"), namespace)
    state = namespace["trainer"].state
    assert state.global_step == 1 and all(torch.isfinite(torch.tensor(h["train_loss"]))
                                          for h in state.log_history if "train_loss" in h)


def test_readme_trl_block(namespace):
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    namespace["chat_dataset"] = hf_tiny.chat_dataset(namespace["_shared"], 16)
    exec(readme_block("trl-gkd"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2 and trainer.transfer_options == {"top_k": 8}
