"""End to end on a slice of real Multi30k: BPE, a tiny teacher (nll), a tiny learner pre-trained with nll, one epoch of
kd, ka and half distillation from the teacher, evaluation of every run, and resume after a kill.

Everything goes through the command line (``ktransfer.cli.main``, and one ``python -m ktransfer`` process that is
killed), as a user would run it. The models are tiny and barely trained: the test checks that the pipeline holds
together and that its outputs agree with each other, not translation quality.
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
import sacrebleu
import torch

from ktransfer.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
# 300 training pairs, 40 validation pairs, 24-token validation translations, one thread: ~1 s per epoch.
COMMON = ["data.corpus=multi30k-de-en", "data.max_train_samples=300", "data.max_eval_samples=40", "data.vocab_size=800",
          "eval.max_length=24", "model.preset=tiny", "optim.lr=1e-3", "train.num_threads=1", "train.device=cpu",
          "train.seed=3"]
EVAL = ["--corpus", "multi30k-de-en", "--split", "test2016", "--limit", "50", "--beam", "2", "--max-length", "24"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train(*items: str) -> None:
    assert main(["train", *COMMON, *items]) == 0


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _state(checkpoint: Path) -> dict:
    """The train state of a checkpoint (load_checkpoint also finds the whole copy a kill mid-swap leaves aside)."""
    from ktransfer.models.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, with_optimizer=False).train_state


def _saved_step(checkpoint: Path) -> int:
    """Step of the checkpoint being written by another process; -1 while there is none (or it is mid-swap)."""
    try:
        return json.loads((checkpoint / "training_state.json").read_text(encoding="utf-8"))["train_state"]["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _evaluate(run: Path, capsys, defaults: bool = False) -> dict:
    """``ktransfer evaluate RUN`` on the first 50 test2016 sentences; ``defaults``: corpus and split from the run."""
    capsys.readouterr()
    assert main(["evaluate", str(run), *(EVAL[4:] if defaults else EVAL)]) == 0
    assert "BLEU = " in capsys.readouterr().out
    out = run / "eval" / "best"
    scores = json.loads((out / "scores.test2016.json").read_text(encoding="utf-8"))
    hyps = (out / "hyp.test2016.en").read_text(encoding="utf-8").split("\n")[:-1]
    refs = (Path(os.environ["KTRANSFER_DATA"]) / "multi30k-de-en" / "test2016.en").read_text(
        encoding="utf-8").split("\n")[:50]
    assert len(hyps) == scores["sentences"] == 50
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)  # the file is what was scored
    assert scores["checkpoint"] == str(run / "checkpoints" / "best")
    assert scores["decode_signature"].startswith("beam:2|lp:1.0|maxlen:24|")
    return scores


def test_pipeline_teacher_learner_distillation_evaluation_resume(shared_data, tmp_path, capsys):
    teacher, learner = tmp_path / "teacher", tmp_path / "learner"

    # BPE (trained by the teacher's run on its training slice) and the teacher, pre-trained with nll.
    _train("objective.kind=nll", f"train.out_dir={teacher}", "train.epochs=3")
    for name in ("config.yaml", "tokenizer/tokenizer.json", "metrics.jsonl", "train.log",
                 "checkpoints/best/training_state.json", "checkpoints/last/training_state.json"):
        assert (teacher / name).is_file(), name
    valid = [m for m in _metrics(teacher) if m["kind"] == "valid"]
    assert len(valid) == 3 and valid[-1]["nll"] < valid[0]["nll"]  # it learns something

    # The learner, pre-trained with nll on the teacher's tokenizer.
    _train("objective.kind=nll", f"train.out_dir={learner}", "train.epochs=1",
           f"data.tokenizer={teacher / 'tokenizer'}")
    assert (learner / "tokenizer/tokenizer.json").read_text() == (teacher / "tokenizer/tokenizer.json").read_text()

    # One epoch of each distillation objective, from the pre-trained learner and the frozen teacher.
    scores = {}
    for objective in ("kd", "ka", "half"):
        run = tmp_path / objective
        _train(f"objective.kind={objective}", f"train.out_dir={run}", "train.epochs=1",
               f"model.init={learner / 'checkpoints' / 'best'}", f"model.teacher={teacher / 'checkpoints' / 'best'}")
        valid = [m for m in _metrics(run) if m["kind"] == "valid"]
        assert len(valid) == 1 and valid[0]["divergence"] > 0  # the teacher term was there
        scores[objective] = _evaluate(run, capsys)
    scores["teacher"] = _evaluate(teacher, capsys, defaults=True)  # the run's corpus and its test split
    scores["learner"] = _evaluate(learner, capsys)
    assert all(0.0 <= s["bleu"] <= 100.0 and 0.0 <= s["chrf"] <= 100.0 for s in scores.values())

    # Resume after a kill: a ka run killed (SIGKILL, no chance to save) after its first checkpoints, resumed with
    # --resume to the end; then --resume of the finished run has nothing left to do.
    run = tmp_path / "ka-killed"
    distil = ["objective.kind=ka", "train.epochs=4", f"model.init={learner / 'checkpoints' / 'best'}",
              f"model.teacher={teacher / 'checkpoints' / 'best'}"]
    items = [*COMMON, *distil, f"train.out_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "ktransfer", "train", *items, "--save-every", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _saved_step(run / "checkpoints" / "last") < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "the training process wrote no checkpoint in 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at = _state(run / "checkpoints" / "last")
    assert killed_at["epoch"] < 4, "the run finished before it could be killed; give it more epochs"

    assert main(["train", "--resume", str(run)]) == 0
    done = _state(run / "checkpoints" / "last")
    assert done["epoch"] == 4 and done["step"] > killed_at["step"]
    assert "resuming from" in (run / "train.log").read_text(encoding="utf-8")
    steps = [m["step"] for m in _metrics(run) if m["kind"] == "valid"]
    assert steps == sorted(steps) and len(steps) == 4  # one validation per epoch, none lost or repeated

    # The same run never interrupted ends with the same validations (the train tests pin exactness; this checks
    # that it survives a real SIGKILL through the command line).
    _train(*distil, f"train.out_dir={tmp_path / 'ka-whole'}")
    whole = [m for m in _metrics(tmp_path / "ka-whole") if m["kind"] == "valid"]
    resumed = [m for m in _metrics(run) if m["kind"] == "valid"]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in whole], rel=1e-6)

    assert main(["train", "--resume", str(run)]) == 0  # finished: nothing to do, still a success
    assert _state(run / "checkpoints" / "last")["step"] == done["step"]
    _evaluate(run, capsys)
