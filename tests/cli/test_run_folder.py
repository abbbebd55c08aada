"""The run folder through ``ktransfer train``: the same command resumes its run, a different config is refused
before anything loads (naming the keys and the ways on), ``train.resume=false`` moves the old run aside, and two
experiments without ``train.out_dir`` get two folders (``ktransfer.training.runfolder``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ktransfer.cli import main
from ktransfer.training import loading
from ktransfer.training.config import ConfigError, load_config
from ktransfer.training.runfolder import SAFE_KEYS, check_same_run


def tiny(shared_data: Path, *extra: str) -> list[str]:
    return ["train", f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=40",
            "data.max_eval_samples=4",
            "data.vocab_size=300", "data.max_tokens=200", "model.preset=tiny", "eval.max_length=8",
            "train.num_threads=1", "train.max_steps=1", "train.seed=3", *extra]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def step(folder: Path) -> int:
    return json.loads((folder / "checkpoints/last/training_state.json").read_text())["train_state"]["step"]


def test_same_command_resumes_and_other_configs_get_other_folders(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(tiny(shared_data)) == 0
    (first,) = (tmp_path / "runs").iterdir()
    assert first.name.startswith("nll-") and f"new run in runs/{first.name}" in capsys.readouterr().err
    before = files(first / "checkpoints")
    assert main(tiny(shared_data)) == 0  # the same command: the same folder, resumed, nothing more to do
    err = capsys.readouterr().err
    assert f"resuming from runs/{first.name}/checkpoints/last" in err and "nothing to do" in err
    assert files(first / "checkpoints") == before and step(first) == 1
    assert main(tiny(shared_data, "train.max_steps=2")) == 0  # a safe key: the same run goes on
    assert step(first) == 2 and "train.max_steps: 1 -> 2" in capsys.readouterr().err
    assert main(tiny(shared_data, "train.seed=4")) == 0  # another experiment: another folder
    (second,) = [p for p in (tmp_path / "runs").iterdir() if p != first]
    assert second.name.startswith("nll-") and step(second) == 1 and step(first) == 2
    assert load_config(second / "config.yaml", []).train.seed == 4


def test_changed_config_is_refused_then_resume_false_moves_the_old_run_aside(shared_data, tmp_path, monkeypatch,
                                                                             capsys):
    run = tmp_path / "run"
    assert main(tiny(shared_data, f"train.out_dir={run}")) == 0
    before = files(run)

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded for a refused run")

    with monkeypatch.context() as m:
        m.setattr(loading, "load_teacher", must_not_load)
        m.setattr(loading, "learner_and_tokenizer", must_not_load)
        capsys.readouterr()
        assert main(tiny(shared_data, f"train.out_dir={run}", "train.seed=2", "train.log_every=7")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "train.seed: 3 -> 2" in err and "train.out_dir" in err and "train.resume=false" in err
    assert "train.log_every" not in err  # a safe key is not named
    assert files(run) == before and list(tmp_path.iterdir()) == [run]

    assert main(tiny(shared_data, f"train.out_dir={run}", "train.seed=2", "train.resume=false")) == 0
    (aside,) = tmp_path.glob("run.old-*")
    assert files(aside) == before  # moved, intact
    assert load_config(run / "config.yaml", []).train.seed == 2 and step(run) == 1
    log = (run / "train.log").read_text()
    assert f"moved the old run aside to {aside}" in log and "new run in" in log and "resuming" not in log


def test_safe_keys_and_the_global_batch(shared_data, tmp_path):
    """Only SAFE_KEYS may change; optim.accumulate may change when accumulate x processes stays."""
    from ktransfer.training.config import save_config

    cfg = load_config(None, [f"train.out_dir={tmp_path}", "optim.accumulate=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert check_same_run(cfg, tmp_path, 1) == []
    safe = load_config(None, [f"train.out_dir={tmp_path}", "optim.accumulate=1", "train.epochs=20",
                              "train.num_threads=3", "train.resume=true", "eval.batch_size=5"])
    assert [c.split(":")[0] for c in check_same_run(safe, tmp_path, 2)] == [
        "eval.batch_size", "train.epochs", "train.num_threads"]  # 2 x 1 process = 1 x 2 processes: the same step
    with pytest.raises(ConfigError, match=r"optim.accumulate x processes: '2 x 1' -> '1 x 1'"):
        check_same_run(safe, tmp_path, 1)
    for key, value in (("objective.divergence_weight", "0.2"), ("data.max_train_samples", "5"), ("eval.max_length",
                                                                                                 "9"),
                       ("optim.lr", "1e-3")):
        assert key not in SAFE_KEYS
        with pytest.raises(ConfigError, match=key):
            check_same_run(load_config(None, [f"train.out_dir={tmp_path}", "optim.accumulate=2", f"{key}={value}"]),
                           tmp_path, 1)


def test_a_folder_written_with_the_old_key_names_resumes_as_the_same_run(shared_data, tmp_path, monkeypatch, capsys,
                                                                        caplog):
    """A run folder of the last release (config.yaml with objective.objective, data.train_limit, ...): the same
    command, spelled with the old names or the new ones, finds the same folder and resumes it; each old name logs one
    deprecation line naming the new key (issue 26, point 8)."""
    monkeypatch.chdir(tmp_path)
    assert main(tiny(shared_data, "objective.divergence_weight=0.3")) == 0
    (run,) = (tmp_path / "runs").iterdir()
    saved = (run / "config.yaml").read_text()
    assert "divergence_weight: 0.3" in saved and "max_train_samples: 40" in saved and "lam:" not in saved
    old = (saved.replace("  kind:", "  objective:").replace("divergence_weight:", "lam:")
           .replace("max_train_samples:", "train_limit:").replace("max_eval_samples:", "valid_subset:"))
    capsys.readouterr()
    old_command = [x.replace("data.max_train_samples", "data.train_limit").replace("data.max_eval_samples",
                                                                                     "data.valid_subset")
                   for x in tiny(shared_data, "objective.lam=0.3")]
    caplog.set_level("WARNING")
    for command in (tiny(shared_data, "objective.divergence_weight=0.3"), old_command):
        caplog.clear()
        (run / "config.yaml").write_text(old)  # as the last release wrote it (a resume writes the new names)
        assert main(command) == 0
        err = capsys.readouterr().err
        assert f"resuming from runs/{run.name}/checkpoints/last" in err and "nothing to do" in err, err
        lines = [r.getMessage() for r in caplog.records]  # logging's (stderr without a handler of the user's)
        assert any("config.yaml" in x and "objective.lam is deprecated" in x and "objective.divergence_weight" in x
                   for x in lines), lines
        assert any("data.train_limit is deprecated" in x and "use data.max_train_samples" in x for x in lines)
        assert "holds another run" not in err
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name] and step(run) == 1
