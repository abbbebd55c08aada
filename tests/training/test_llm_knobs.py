"""The training knobs an LLM practitioner reaches for (issue 26, point 6): batches of N examples (``data.batch_size``),
linear and cosine decay with warm-up (against transformers' own schedulers), validation every N updates
(``train.eval_every``) with the best checkpoint and early stopping on it, resumed with the same cadence, and early
stopping off by default.

Tiny models on 300 Multi30k pairs (``tests/training/test_train.py``'s settings), one thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ktransfer.experiments.presets import PRESETS
from ktransfer.training import loop
from ktransfer.training.config import RunConfig, load_config
from ktransfer.training.train import setup, train

CORPUS_SETTINGS = ("data.max_train_samples=300", "data.max_eval_samples=20", "data.vocab_size=500", "model.preset=tiny",
                   "eval.max_length=16", "optim.lr=1e-3", "train.num_threads=1", "train.seed=3", "train.epochs=1")


def kill_at_step(monkeypatch, step: int):
    """Make training raise "killed" when it reaches update ``step`` (before it runs); returns the real step."""
    real_step = loop.train_step

    def killed(run, batches, **kw):
        if run.state.step == step:
            raise RuntimeError("killed")
        return real_step(run, batches, **kw)

    monkeypatch.setattr(loop, "train_step", killed)
    return real_step


def config(shared_data: Path, out_dir: Path, *extra: str) -> RunConfig:
    return load_config(None, [f"data.corpus={shared_data / 'multi30k-de-en'}", *CORPUS_SETTINGS,
                              f"train.out_dir={out_dir}", *extra])


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "training_state.json").read_text())["train_state"]


# --------------------------------------------------------------------------------------------------------------
# data.batch_size
# --------------------------------------------------------------------------------------------------------------
def test_batch_size_gives_batches_of_n_examples_with_accumulation(shared_data, tmp_path, one_thread):
    """data.batch_size=32: every batch holds 32 examples but the epoch's last (the rest), every example once per
    epoch, a new order each epoch (as a shuffling DataLoader); optim.accumulate=2 makes one update of two batches."""
    run = setup(config(shared_data, tmp_path / "bs", "data.batch_size=32", "data.max_tokens=64"))
    n = len(run.data.train_ids[0])
    assert n > 250  # a few of the 300 pairs may be too long
    epochs = [run.data.sampler.epoch_batches(e) for e in (0, 1)]
    for batches in epochs:
        assert len(batches) == math.ceil(n / 32)
        assert [len(b) for b in batches] == [32] * (n // 32) + ([n % 32] if n % 32 else [])
        assert sorted(i for b in batches for i in b) == list(range(n))
    assert epochs[0] != epochs[1]
    assert run.data.sampler.epoch_batches(0) == epochs[0]  # deterministic in (seed, epoch)
    rows = [len(b["labels"]) for b in (loop.training_batch(run, idx) for idx in epochs[0][:2])]
    assert rows == [32, 32]  # data.max_tokens=64 would allow a few rows only: batch_size wins for training
    run.metrics.close()

    out = tmp_path / "accumulated"
    result = train(config(shared_data, out, "data.batch_size=32", "optim.accumulate=2", "train.log_every=1"))
    assert result["step"] == math.ceil(math.ceil(n / 32) / 2)
    steps = records(out, "train")
    assert [r["step"] for r in steps] == list(range(1, result["step"] + 1))
    assert [r["batch"] for r in steps][-1] == math.ceil(n / 32)


# --------------------------------------------------------------------------------------------------------------
# optim.schedule linear / cosine
# --------------------------------------------------------------------------------------------------------------
def _transformers_lrs(schedule: str, lr: float, warmup: int, total: int) -> list[float]:
    """The learning rate of updates 1..total by transformers' own scheduler (the lr before each step)."""
    import transformers

    make = {"linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup}[schedule]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make(optimizer, warmup, total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _closed_form(schedule: str, lr: float, warmup: int, total: int, step: int) -> float:
    """float64 reference: update ``step + 1`` after ``step`` updates, warm-up, then decay to 0 at ``total``."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / (total - warmup)
    return lr * (max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_schedules_equal_transformers_and_survive_a_resume(schedule, shared_data, tmp_path, monkeypatch,
                                                                 one_thread):
    """Two epochs of ceil(n / 32) batches with optim.accumulate=2: the total is epochs x updates per epoch; the lr of
    every update equals transformers' scheduler for that total and warm-up, also across a kill (the resumed run
    restarts from `last` and keeps the schedule)."""
    out = tmp_path / schedule
    cfg = config(shared_data, out, "data.batch_size=32", "optim.accumulate=2", "train.epochs=2",
                 f"optim.schedule={schedule}", "optim.warmup_steps=3", "train.log_every=1", "train.save_every=4")
    real_step = kill_at_step(monkeypatch, 9)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg)
    assert state_of(out / "checkpoints/last")["step"] == 8  # mid-epoch 2; the kill loses step 9
    monkeypatch.setattr(loop, "train_step", real_step)
    result = train(load_config(out / "config.yaml", []))
    n = len(setup(config(shared_data, tmp_path / "count", "data.batch_size=32")).data.train_ids[0])
    total = 2 * math.ceil(math.ceil(n / 32) / 2)
    assert result["step"] == total and result["stopped"] == "epochs"
    lrs = [r["lr"] for r in records(out, "train")]
    assert len(lrs) == total
    reference = _transformers_lrs(schedule, 1e-3, 3, total)
    assert lrs == pytest.approx(reference, rel=1e-12, abs=1e-15)
    assert lrs == pytest.approx([_closed_form(schedule, 1e-3, 3, total, k) for k in range(total)], rel=1e-9)
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(1e-3) and lrs[-1] < lrs[4]
    assert f"decay to 0 at update {total}" in (out / "train.log").read_text()


# --------------------------------------------------------------------------------------------------------------
# train.eval_every
# --------------------------------------------------------------------------------------------------------------
def test_eval_every_validates_by_steps_and_resumes_with_the_cadence(shared_data, tmp_path, monkeypatch, one_thread):
    """train.eval_every=4 over 2 epochs of 10 updates: validations at updates 4, 8, ..., 20 (not at the epoch's end),
    the best checkpoint is the best of them, and a run killed mid-epoch resumes with the same validations as an
    uninterrupted one (same steps, same losses)."""
    extra = ("data.batch_size=30", "data.max_train_samples=300", "train.epochs=2", "train.eval_every=6",
             "train.log_every=1", "train.save_every=3")
    reference = train(config(shared_data, tmp_path / "reference", *extra))
    n = reference["step"]
    assert n == 20  # 300 pairs (none longer than data.max_length) in batches of 30, two epochs
    valid = records(tmp_path / "reference", "valid")
    expected = [*range(6, n + 1, 6), *([n] if n % 6 else [])]  # every 6 updates, and once at the end
    assert [r["step"] for r in valid] == expected
    best = min(valid, key=lambda r: r["loss"])
    assert reference["best_step"] == best["step"] and reference["best"] == best["loss"]
    assert state_of(tmp_path / "reference/checkpoints/best")["step"] == best["step"]

    out = tmp_path / "killed"
    real_step = kill_at_step(monkeypatch, 8)
    with pytest.raises(RuntimeError, match="killed"):
        train(config(shared_data, out, *extra))
    assert state_of(out / "checkpoints/last")["step"] == 6 and state_of(out / "checkpoints/last")["batch"] > 0
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train(config(shared_data, out, *extra))
    assert resumed["step"] == n and resumed["best_step"] == reference["best_step"]
    again = records(out, "valid")
    assert [r["step"] for r in again] == expected
    assert [r["loss"] for r in again] == [r["loss"] for r in valid]


def test_eval_every_early_stopping_counts_step_validations(shared_data, tmp_path, monkeypatch, one_thread):
    """train.patience=2 with train.eval_every=2: the run stops after the 2nd validation without improvement, mid-epoch,
    and `best` is the update of the best validation (validation losses scripted: 3, 2, 2.5, 2.6, ...)."""
    losses = iter([3.0, 2.0, 2.5, 2.6, 1.0, 1.0])

    def scripted(run):
        loss = next(losses)
        return {"loss": loss, "nll": loss, "divergence": 0.0, "ppl": math.exp(loss), "bleu": None, "chrf": None,
                "beam": None, "sentences": 1}

    monkeypatch.setattr(loop, "validate", scripted)
    out = tmp_path / "early"
    result = train(config(shared_data, out, "data.batch_size=16", "train.epochs=3", "train.eval_every=2",
                          "train.patience=2"))
    assert result["stopped"] == "early_stopping" and result["step"] == 8 and result["epoch"] == 0
    assert [r["step"] for r in records(out, "valid")] == [2, 4, 6, 8]
    assert result["best_step"] == 4 and state_of(out / "checkpoints/best")["step"] == 4


# --------------------------------------------------------------------------------------------------------------
# train.patience
# --------------------------------------------------------------------------------------------------------------
def test_patience_is_off_by_default_and_explicit_in_every_preset():
    """No early stopping unless asked (Hugging Face Trainer without EarlyStoppingCallback); each `ktransfer
    reproduce` preset says its own patience, so the paper presets keep theirs."""
    assert RunConfig().train.patience == 0
    for name, preset in PRESETS.items():
        assert any(o.startswith("train.patience=") for o in preset.base), name
    assert "train.patience=5" in PRESETS["paper-deen"].base and "train.patience=10" in PRESETS["paper-then"].base
