"""Checkpoints: exact round trips (weights, Adam, scheduler, RNG), atomic swaps, corruption detection, no pickle."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from ktransfer.models import checkpoint as ck
from ktransfer.models.checkpoint import (
    CheckpointError,
    capture_rng,
    find_good_checkpoint,
    load_checkpoint,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
    verify_checkpoint,
)
from ktransfer.models.family import build_model, load_model
from ktransfer.models.tokenizer import Tokenizer, train_tokenizer
from ktransfer.training.config import config_from_dict, config_to_dict, load_config


@pytest.fixture(scope="module")
def tok(shared_data):
    lines = []
    for lang in ("de", "en"):
        with open(shared_data / "multi30k-de-en" / f"train.{lang}", encoding="utf-8") as f:
            lines += f.read().splitlines()[:300]
    return train_tokenizer(lines, vocab_size=500)


def _schedule(step: int) -> float:
    return min(1.0, (step + 1) / 4)


def _setup(tok, seed=0):
    torch.manual_seed(seed)
    model = build_model("tiny", tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
    return model, opt, sched


def _train(model, opt, sched, steps=2):
    x = torch.randint(3, model.config.vocab_size, (2, 6))  # [B, T]
    for _ in range(steps):
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def trained(tok):
    model, opt, sched = _setup(tok)
    _train(model, opt, sched)
    return model, opt, sched


CFG = load_config(None, ["optim.lr=1e-3", "train.epochs=2"])


def _save(path, tok, trained, step=2, **kw):
    model, opt, sched = trained
    return save_checkpoint(path, model=model, tokenizer=tok, config=config_to_dict(CFG), optimizer=opt,
                           scheduler=sched,
                           train_state={"epoch": 1, "step": step, "batch_in_epoch": 7, "best": 3.25, **kw})


def _draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_round_trip(tok, trained, tmp_path):
    model, opt, sched = trained
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = _save(tmp_path / "checkpoints" / "last", tok, trained)
    expected = _draws()  # the numbers a resumed run would draw next
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors",
                                        "optimizer.safetensors", "tokenizer.json", "tokenizer_config.json",
                                        "training_state.json"]

    c = load_checkpoint(path)
    # a Hugging Face folder: transformers loads the weights bitwise equal, every state_dict name present (tied too)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    hf = AutoModelForSeq2SeqLM.from_pretrained(path)
    ref = model.state_dict()
    assert set(hf.state_dict()) == set(ref)
    for name, t in ref.items():
        assert torch.equal(hf.state_dict()[name], t) and hf.state_dict()[name].dtype == t.dtype, name
    text = "Ein Mann fährt Fahrrad."
    assert AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    # run config, train state
    assert config_from_dict(c.config) == CFG and c.config == config_to_dict(CFG)
    assert {k: c.train_state[k] for k in ("epoch", "step", "batch_in_epoch", "best")} == {
        "epoch": 1, "step": 2, "batch_in_epoch": 7, "best": 3.25}
    assert c.versions["torch"] == torch.__version__

    # RNG: restoring gives the same numbers again
    _draws()
    restore_rng(c.train_state)
    assert _draws() == expected

    # optimizer: Adam moments and steps equal, param groups equal (betas stay a tuple)
    m2, tok2 = load_model(path)
    assert isinstance(tok2, Tokenizer) and tok2.fingerprint() == tok.fingerprint()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=5.0)
    restore_optimizer(opt2, c)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            assert torch.equal(v, s2["state"][i][k]), (i, k)
    # scheduler
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, _schedule)
    sched2.load_state_dict(c.scheduler_state)
    assert sched2.state_dict() == sched.state_dict()

    # the loaded model: same outputs, tied embeddings still tied, eval mode
    assert not m2.training
    assert m2.lm_head.weight is m2.model.shared.weight is m2.model.decoder.embed_tokens.weight
    x = torch.randint(3, tok.vocab_size, (2, 5))
    model.eval()
    with torch.no_grad():
        a = model(input_ids=x, decoder_input_ids=x).logits
        b = m2(input_ids=x, decoder_input_ids=x).logits
    model.train()
    assert torch.equal(a, b)
    assert m2.generation_config.decoder_start_token_id == tok.pad_id
    assert m2.generate(input_ids=x, num_beams=6, max_length=8).shape[0] == 2


def test_resumed_training_matches(tok, tmp_path):
    """Train 4 steps straight, or 2 + save + load into fresh objects + 2: the weights agree exactly."""
    model, opt, sched = _setup(tok)
    _train(model, opt, sched, 2)
    path = save_checkpoint(tmp_path / "last", model=model, tokenizer=tok, config=config_to_dict(CFG), optimizer=opt,
                           scheduler=sched, train_state={"step": 2})
    model.train()
    _train(model, opt, sched, 2)

    c = load_checkpoint(path)
    m2, _ = load_model(path)
    m2.train()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3, betas=(0.9, 0.98))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, _schedule)  # before restoring: it resets the group lr
    restore_optimizer(opt2, c)
    sched2.load_state_dict(c.scheduler_state)
    restore_rng(c.train_state)
    _train(m2, opt2, sched2, 2)
    for (n, a), b in zip(model.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_rng_helpers():
    state = capture_rng()
    json.dumps(state)  # plain JSON
    a = _draws()
    restore_rng(state)
    assert _draws() == a
    restore_rng({"rng": state})
    assert _draws() == a
    with pytest.raises(CheckpointError, match="no RNG state"):
        restore_rng({"step": 1})


def test_replace_existing_and_build_from_checkpoint(tok, trained, tmp_path):
    path = tmp_path / "last"
    _save(path, tok, trained, step=2)
    _save(path, tok, trained, step=3)
    assert load_checkpoint(path).train_state["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["last"]  # no temporary or aside folders left
    m = build_model(path, tok, dropout=0.0)
    assert m.training and m.config.dropout == 0.0
    assert torch.equal(m.model.shared.weight, trained[0].model.shared.weight)


def test_crash_during_swap_keeps_previous(tok, trained, tmp_path, monkeypatch):
    path = tmp_path / "last"
    _save(path, tok, trained, step=2)
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder -> NAME rename
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        _save(path, tok, trained, step=3)
    monkeypatch.undo()
    assert load_checkpoint(path).train_state["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["last"]


def test_crash_while_writing_keeps_previous(tok, trained, tmp_path, monkeypatch):
    path = tmp_path / "last"
    _save(path, tok, trained, step=2)

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the optimizer file

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        _save(path, tok, trained, step=3)
    monkeypatch.undo()
    assert load_checkpoint(path).train_state["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["last"]


def test_kill_between_renames_is_recovered(tok, trained, tmp_path):
    """A kill after NAME was renamed aside, before the new folder took its place."""
    path = tmp_path / "last"
    _save(path, tok, trained, step=2)
    os.rename(path, tmp_path / ".last.old-abc123")
    c = load_checkpoint(path)  # reads the aside copy, moves nothing
    assert c.train_state["step"] == 2 and not path.exists()
    verify_checkpoint(path)
    _save(path, tok, trained, step=3)  # the next save puts it back, then replaces it
    assert load_checkpoint(path).train_state["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["last"]


WRITER = textwrap.dedent("""
    import sys, torch
    from ktransfer.models.checkpoint import save_checkpoint
    from ktransfer.models.family import build_model
    from ktransfer.models.tokenizer import load_tokenizer
    tok = load_tokenizer(sys.argv[2])
    model = build_model("tiny", tok, d_model=64)
    opt = torch.optim.Adam(model.parameters())
    for step in range(10**6):
        for p in model.parameters():
            p.data.fill_(step)
        save_checkpoint(sys.argv[1], model=model, tokenizer=tok, config={}, optimizer=opt,
                        train_state={"step": step})
        print(step, flush=True)
""")


def test_kill_during_saves(tok, tmp_path):
    """SIGKILL a process that saves in a loop: what is on disk is always one whole checkpoint."""
    tok.save(tmp_path / "tok.json")
    path = tmp_path / "ckpts" / "last"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(tmp_path / "tok.json")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "0", "writer failed to save"
        steps = [load_checkpoint(path).train_state["step"] for _ in range(3)]  # readers racing the writer
        assert steps == sorted(steps)
        time.sleep(random.uniform(0.05, 0.3))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    c = load_checkpoint(path)
    step = c.train_state["step"]
    m, _ = load_model(path)
    # every parameter was set to the step number before that save: one consistent state, not a mix of two (the
    # sinusoidal position tables are not trained, and transformers recomputes them on load)
    for name, p in m.named_parameters():
        assert not p.requires_grad or (p == step).all(), name


@pytest.fixture()
def two(tok, trained, tmp_path):
    run = tmp_path / "run"
    last, best = run / "checkpoints" / "last", run / "checkpoints" / "best"
    _save(best, tok, trained, step=1)
    _save(last, tok, trained, step=2)
    return run, last, best


def _corruption_error(last) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(last)
    with pytest.raises(CheckpointError):
        verify_checkpoint(last)
    return str(e.value)


def test_truncated_file(two):
    run, last, best = two
    f = last / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    msg = _corruption_error(last)
    assert f"{f} is truncated: 1000 bytes, expected" in msg
    assert f"the checkpoint at {best} is intact" in msg
    assert find_good_checkpoint(run) == best


def test_flipped_byte(two):
    run, last, best = two
    f = last / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    msg = _corruption_error(last)
    assert f"{f}: sha256 checksum mismatch" in msg and str(best) in msg
    # the model alone does not need the optimizer file
    load_model(last)


def test_missing_file(two):
    run, last, best = two
    (last / "model.safetensors").unlink()
    msg = _corruption_error(last)
    assert "model.safetensors is missing" in msg and str(best) in msg
    (last / "training_state.json").unlink()
    assert "training_state.json is missing" in _corruption_error(last)


def test_bad_json(two):
    run, last, best = two
    f = last / "training_state.json"
    text = f.read_text()
    f.write_text(text[: len(text) // 2])
    msg = _corruption_error(last)
    assert f"{f} is not valid JSON (line" in msg and "truncated or corrupt" in msg and str(best) in msg

    f.write_text(text.replace('"step": 2', '"step": 9'))  # valid JSON, edited
    assert f"{f}: checksum mismatch" in _corruption_error(last)


def test_no_fallback_named_when_none(tok, trained, tmp_path):
    last = tmp_path / "last"
    _save(last, tok, trained)
    (last / "model.safetensors").write_bytes(b"")
    assert "no other intact checkpoint" in _corruption_error(last)
    with pytest.raises(CheckpointError, match="no checkpoint folder at"):
        load_checkpoint(tmp_path / "nothing")
    assert find_good_checkpoint(tmp_path) is None


def test_find_good_checkpoint_prefers_most_steps(two):
    run, last, best = two
    assert find_good_checkpoint(run) == last
    assert find_good_checkpoint(run / "checkpoints", exclude=[last]) == best


def test_loading_never_unpickles(two, monkeypatch):
    run, last, best = two

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during checkpoint load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    c = load_checkpoint(last)
    model, _ = load_model(last)
    restore_optimizer(torch.optim.AdamW(model.parameters()), c)
    restore_rng(c.train_state)


def test_unsupported_state_value(tok, trained, tmp_path):
    with pytest.raises(TypeError, match="cannot store a set at 'train_state.bad'|cannot store a set at 'bad'"):
        _save(tmp_path / "x", tok, trained, bad={1, 2})
    assert not (tmp_path / "x").exists() and os.listdir(tmp_path) == []


def test_state_json_is_plain(two):
    run, last, best = two
    body = json.loads((last / "training_state.json").read_text())
    files = body["files"]
    assert files["model.safetensors"]["bytes"] == (last / "model.safetensors").stat().st_size
    assert len(files["optimizer.safetensors"]["sha256"]) == 64
    # optimiser tensors are flattened to state.<param index>.<name>
    keys = safetensors.torch.load_file(last / "optimizer.safetensors").keys()
    assert "state.0.exp_avg" in keys and "state.0.exp_avg_sq" in keys
    assert set(files) == {p.name for p in last.iterdir()} - {"training_state.json"}  # every file is checked
    assert ck.STATE_FILE == "training_state.json"


def test_old_format_is_refused_by_name(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"format": "ktransfer-checkpoint", "format_version": 1}))
    with pytest.raises(CheckpointError, match="older ktransfer .format 1"):
        load_checkpoint(old)
    with pytest.raises(CheckpointError, match="older ktransfer"):
        load_model(old)
