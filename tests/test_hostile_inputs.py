"""Hostile inputs, second battery (issue 30): files a user may be handed (model folders, adapters, weights, configs,
tokenizers, corpora) built in ``tmp_path`` to attack or confuse ktransfer; each ends in one line naming the file,
never in code running, a pickle opened, random weights used, or a memory bomb going off.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 180, env: dict | None = None, stdin: str = ""):
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "ktransfer", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO_ROOT)
    return proc.returncode, proc.stdout, proc.stderr


class Payload:
    """Unpickling this object writes ``marker`` (what a malicious pickle does with any code it likes)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def evil_pickle(file: Path, marker: Path) -> None:
    file.write_bytes(pickle.dumps(Payload(marker)))


def tiny_gpt2(folder: Path, *, vocab: int = 50):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=32))
    model.save_pretrained(folder)
    return model


# --- no pickle on any path ----------------------------------------------------------------------------------------
def test_the_payload_is_live(tmp_path):
    """The fixture really runs code when unpickled (so the tests below that it never does mean something)."""
    evil_pickle(tmp_path / "x.bin", tmp_path / "marker")
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))",
                    str(tmp_path / "x.bin")], capture_output=True, timeout=60)
    assert (tmp_path / "marker").exists()


def lora_folder_with_pickle(tmp_path: Path) -> tuple[Path, Path]:
    tiny_gpt2(tmp_path / "base")
    folder, marker = tmp_path / "adapters", tmp_path / "marker"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"],
        "base_model_name_or_path": str(tmp_path / "base")}))
    evil_pickle(folder / "adapter_model.bin", marker)
    return folder, marker


def test_adapter_pickle_is_refused_before_any_unpickler(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from ktransfer.models.family import load_model

    folder, marker = lora_folder_with_pickle(tmp_path)
    opened = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: opened.append(a))
    with pytest.raises(ValueError, match=r"adapter_model.bin: LoRA adapters as a pickle .*adapter_model.safetensors "
                                         r"only.*safe_serialization=True"):
        load_model(folder)
    assert opened == [] and not marker.exists()


def test_adapter_pickle_through_the_cli_is_one_line(tmp_path):
    pytest.importorskip("peft")
    folder, marker = lora_folder_with_pickle(tmp_path)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"prompt": "a b", "completion": "c d"}) + "\n")
    rc, _, err = run_cli("evaluate", str(folder), "--corpus", str(corpus))
    assert rc == 2 and "adapter_model.bin" in err and "Traceback" not in err and not marker.exists(), err
    assert len(err.strip().splitlines()) == 1, err
