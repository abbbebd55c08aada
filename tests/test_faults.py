"""Fault injection: what a hostile but fair user can do to ktransfer, and that each ends in one clear message.

A killed kernel build does not wedge later processes; a model folder's own code never runs (even with ``y`` on
stdin); pickle weights are refused; a 200k-character word does not hang tokenizer training; a full disk is one line
naming the path with the previous checkpoint intact; two writers of one run folder are refused; kills at random
moments (inside saves too) then resume end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktransfer import hub

REPO_ROOT = Path(__file__).resolve().parents[1]
EVIL_CODE = """\
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def run_cli(*args: str, stdin: str = "", timeout: float = 120, env: dict | None = None):
    """``python -m ktransfer ARGS`` with ``stdin``; (returncode, stdout, stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "ktransfer", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO_ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def evil_folder(tmp_path: Path) -> tuple[Path, Path]:
    """An HF folder whose config asks to run ``configuration_evil.py``, which writes a marker file when imported."""
    folder, marker = tmp_path / "evil", tmp_path / "marker"
    folder.mkdir()
    (folder / "configuration_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    return folder, marker


def tiny_gpt2_folder(folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    model.save_pretrained(folder)
    return model


# --- model folders: no code, no pickles, no prompt ------------------------------------------------------------------
def test_evil_folder_is_live_with_plain_transformers(tmp_path):
    """The fixture really runs code: plain transformers, asked on stdin, answers 'y' and imports the folder's code."""
    folder, marker = evil_folder(tmp_path)
    code = "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(folder)], input="y\n", capture_output=True, text=True,
                   timeout=120)
    assert marker.exists()


def test_auto_map_folder_never_runs_its_code(tmp_path, shared_data):
    folder, marker = evil_folder(tmp_path)
    rc, _, err = run_cli("train", f"model.preset={folder}", f"data.corpus={shared_data / 'multi30k-de-en'}",
                         "data.train_limit=200", "data.vocab_size=300", f"train.out_dir={tmp_path / 'run'}",
                         stdin="y\ny\ny\n")
    assert rc == 2 and not marker.exists()
    assert "auto_map" in err and "trust_remote_code" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="auto_map"):
        hub.load_config(folder)
    with pytest.raises(ValueError, match="auto_map"):
        hub.load_auto_tokenizer(folder)
    assert not marker.exists()
    hub.load_config(folder, trust_remote_code=True)  # the explicit option does what it says
    assert marker.exists()


def test_pickle_only_folder_is_refused_unread(tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    model = tiny_gpt2_folder(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    from ktransfer.causal import build_causal_model

    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*safe_serialization=True"):
        build_causal_model(folder, None)
    assert calls == []


def test_safe_folder_loads_the_same_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2_folder(tmp_path / "safe")
    loaded = hub.load_pretrained(AutoModelForCausalLM, tmp_path / "safe")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_hub_id_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match=r"Helsinki-NLP/opus-mt-xx-yy: not a local folder, not in the local "
                                         r"Hugging Face cache, and HF_HUB_OFFLINE is set"):
        hub.load_pretrained(AutoModelForSeq2SeqLM, "Helsinki-NLP/opus-mt-xx-yy")
    with pytest.raises(ValueError, match="no such folder"):
        hub.load_pretrained(AutoModelForSeq2SeqLM, str(tmp_path / "missing" / "deeper"))
