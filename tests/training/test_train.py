"""The training loop: NLL learns, distillation runs with a frozen teacher, updates are exact under gradient
accumulation, a killed or terminated run resumes to the weights of an uninterrupted one, non-finite steps are skipped.

Everything uses the ``tiny`` preset on a few hundred Multi30k pairs with a 500-token BPE, one thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ktransfer.training.config import ConfigError, load_config
from ktransfer.training.train import NonFiniteLossError, collate_batch, lr_factor, setup, train, train_step

REPO_ROOT = Path(__file__).resolve().parents[2]


def overrides(shared_data: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=300", "data.max_eval_samples=40",
        "data.vocab_size=500", "data.max_tokens=300", "model.preset=tiny", "eval.max_length=24",
        "optim.lr=1e-3", "train.num_threads=1", "train.log_every=5", "train.seed=3", "train.epochs=1",
        f"train.out_dir={out_dir}", *extra,
    ]


def config(shared_data: Path, out_dir: Path, *extra: str):
    return load_config(None, overrides(shared_data, out_dir, *extra))


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def teacher(shared_data, tmp_path_factory) -> Path:
    """A tiny teacher trained with NLL for 3 epochs (the NLL test reads its metrics)."""
    out = tmp_path_factory.mktemp("teacher")
    train(config(shared_data, out, "train.epochs=3", "model.dropout=0.1"))
    return out


def test_nll_training_reduces_loss(teacher):
    valid = records(teacher, "valid")
    assert [r["epoch"] for r in valid] == [1, 2, 3]
    assert valid[-1]["loss"] < valid[0]["loss"] - 0.3
    steps = records(teacher, "train")
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(0 <= r["bleu"] <= 100 and r["divergence"] == 0.0 for r in valid)
    for name in ("config.yaml", "tokenizer/tokenizer.json", "train.log", "checkpoints/last/training_state.json",
                 "checkpoints/best/model.safetensors"):
        assert (teacher / name).exists(), name
    assert load_config(teacher / "config.yaml", []).train.out_dir == str(teacher)


@pytest.mark.parametrize("objective", ["kd", "ka", "half"])
def test_one_distillation_epoch(objective, teacher, shared_data, tmp_path):
    before = (teacher / "checkpoints/best/model.safetensors").read_bytes()
    out = tmp_path / objective
    result = train(config(shared_data, out, f"objective.kind={objective}", "objective.divergence_weight=0.5",
                          f"model.teacher={teacher / 'checkpoints/best'}", "train.log_every=10"))
    assert result["stopped"] == "epochs" and result["epoch"] == 1
    valid = result["valid"]
    assert valid["divergence"] > 0 and valid["nll"] > 0
    assert valid["loss"] == pytest.approx(0.5 * valid["nll"] + 0.5 * valid["divergence"], rel=1e-5)
    assert all(r["divergence"] > 0 for r in records(out, "train"))
    assert (teacher / "checkpoints/best/model.safetensors").read_bytes() == before
    # the learner reuses the teacher's tokenizer
    assert (out / "tokenizer/tokenizer.json").read_text() == (teacher / "tokenizer/tokenizer.json").read_text()


def test_teacher_is_frozen(teacher, shared_data, tmp_path):
    best = teacher / "checkpoints/best"
    run = setup(config(shared_data, tmp_path / "kd", "objective.kind=kd", f"model.teacher={best}",
                       "objective.top_k=8"))
    assert not run.teacher.training
    learner_before = {k: v.clone() for k, v in run.model.state_dict().items()}
    batches = run.data.sampler.epoch_batches(0)[:2]
    result = train_step(run, [collate_batch(run, run.data.train_ids, idx) for idx in batches])
    assert result["finite"] and result["divergence"] > 0
    assert all(not p.requires_grad and p.grad is None for p in run.teacher.parameters())
    saved = weights(best)
    for name, value in run.teacher.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name
    assert any(not torch.equal(v, learner_before[k]) for k, v in run.model.state_dict().items())


def test_accumulated_half_batches_equal_one_batch(teacher, shared_data, tmp_path):
    """Two half batches accumulated give the update of the whole batch (the loss divides by all their tokens)."""
    best = teacher / "checkpoints/best"
    extra = ("objective.kind=half", f"model.teacher={best}", "model.dropout=0", "optim.clip_norm=1.0")
    runs = [setup(config(shared_data, tmp_path / name, *extra)) for name in ("one", "two")]
    idx = max(runs[0].data.sampler.epoch_batches(0), key=len)
    whole = collate_batch(runs[0], runs[0].data.train_ids, idx)
    rows = len(idx) // 3  # unequal halves: different numbers of tokens
    halves = [{k: v[:rows] for k, v in whole.items()}, {k: v[rows:] for k, v in whole.items()}]
    assert int((halves[0]["labels"] != -100).sum()) != int((halves[1]["labels"] != -100).sum())
    one = train_step(runs[0], [whole])
    two = train_step(runs[1], halves)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    a, b = runs[0].model.state_dict(), runs[1].model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lr_schedule():
    assert [lr_factor(s, "constant", 0) for s in range(3)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, "constant", 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(3, "inverse_sqrt", 4) == 1.0 and lr_factor(15, "inverse_sqrt", 4) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------------------
# Resume: kill -9 and SIGTERM in a subprocess
# --------------------------------------------------------------------------------------------------------------
def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "ktransfer", "train", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "checkpoints/last/training_state.json").read_text())["train_state"]
    except (OSError, ValueError, KeyError):
        return None  # not written yet, or being swapped into place


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, after_step: int, timeout: float = 120) -> dict:
    """Poll until ``last`` holds a mid-epoch checkpoint past ``after_step``."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        state = _train_state(run_dir)
        if state and state["step"] > after_step and state["batch"] > 0:
            return state
        if proc.poll() is not None:
            pytest.fail(f"training ended before a mid-epoch checkpoint (rc {proc.returncode}):\n{proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no mid-epoch checkpoint in time")


def test_kill_and_sigterm_resume_exactly(shared_data, tmp_path):
    """kill -9 mid-epoch, resume, SIGTERM, resume: the final weights equal those of an uninterrupted run, bitwise."""
    args = overrides(shared_data, tmp_path / "resumed", "train.epochs=2", "data.max_train_samples=600",
                     "model.dropout=0.3",
                     "train.save_every=3")

    killed = _start(args)
    state = _wait_for_checkpoint(killed, tmp_path / "resumed", after_step=3)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(60) == -signal.SIGKILL

    terminated = _start([*args, "--resume"])
    _wait_for_checkpoint(terminated, tmp_path / "resumed", after_step=state["step"])
    terminated.send_signal(signal.SIGTERM)
    _, err = terminated.communicate(timeout=120)
    assert terminated.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    state = _train_state(tmp_path / "resumed")
    assert state["stopped"] == "signal:SIGTERM" and state["step"] > 0
    assert "stopped by SIGTERM" in (tmp_path / "resumed/train.log").read_text()

    resumed = _start([*args, "--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err

    reference = load_config(None, args)  # the same run without interruptions, in this process
    reference.train.out_dir = str(tmp_path / "reference")
    train(reference)
    for name in ("last", "best"):
        a, b = weights(tmp_path / "resumed/checkpoints" / name), weights(tmp_path / "reference/checkpoints" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    steps = [r["step"] for r in records(tmp_path / "resumed", "train")]
    assert steps == [r["step"] for r in records(tmp_path / "reference", "train")]  # no line lost or repeated
    assert len(steps) == len(set(steps))


# --------------------------------------------------------------------------------------------------------------
# Non-finite steps, errors
# --------------------------------------------------------------------------------------------------------------
def _nan_on(calls: set[int] | None, monkeypatch):
    """Make the training loss (``spec_loss`` as ``ktransfer.training.signals`` calls it) return NaN on the given call
    numbers (every call from the first one when None)."""
    import ktransfer.training.signals as signals_module

    real, count = signals_module.spec_loss, [0]

    def fake(*args, **kwargs):
        out = real(*args, **kwargs)
        count[0] += 1
        if calls is None or count[0] in calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(signals_module, "spec_loss", fake)


def test_nonfinite_step_is_skipped(shared_data, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    _nan_on({2, 5}, monkeypatch)
    result = train(config(shared_data, out, "train.log_every=1", "data.max_eval_samples=5"))
    skipped = records(out, "nonfinite")
    assert [r["batch"] for r in skipped] == [2, 5]
    n_batches = records(out, "train")[-1]["batch"]
    assert result["step"] == n_batches - 2
    assert "update skipped" in (out / "train.log").read_text()
    assert all(torch.isfinite(v).all() for v in weights(out / "checkpoints/last").values())


def test_consecutive_nonfinite_steps_stop_with_a_checkpoint(shared_data, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    cfg = config(shared_data, out, "train.log_every=1", "train.max_nonfinite=3")
    _nan_on(None, monkeypatch)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps"):
        train(cfg)
    state = _train_state(out)
    assert state["stopped"] == "nonfinite" and state["step"] == 0 and state["batch"] == 3
    assert all(torch.isfinite(v).all() for v in weights(out / "checkpoints/last").values())


def test_changed_config_is_not_resumed(teacher, shared_data):
    with pytest.raises(ConfigError, match="train.seed: 3 -> 4") as e:
        setup(config(shared_data, teacher, "train.seed=4"))
    assert e.value.key == "train.out_dir"


def test_cli_config_error_exits_2_without_traceback(capsys, tmp_path):
    from ktransfer.cli import main

    assert main(["train", "optim.lrr=1e-3", f"train.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "Traceback" not in err
    assert main(["train", "model.teacher=/nonexistent", "objective.kind=kd", f"train.out_dir={tmp_path}"]) == 2
    assert "model.teacher" in capsys.readouterr().err
    assert main(["train", "data.corpus=/nonexistent", f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert "data.corpus" in capsys.readouterr().err and not (tmp_path / "run").exists()
