"""Where the numbers go (``train.report_to``), through ``ktransfer train``: metrics.jsonl always; TensorBoard event
files read back with tensorboard's own EventAccumulator; a Weights & Biases run in offline mode read back from its
``.wandb`` file with wandb's protobuf records; a missing package is a one-line error (rc 2) before anything loads;
``--help-config`` lists the new keys of issue 26 point 6."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ktransfer.cli import main


def tiny(shared_data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=60",
            "data.max_eval_samples=4", "data.vocab_size=300", "data.batch_size=8", "model.preset=tiny",
            "eval.max_length=8",
            "train.num_threads=1", "train.seed=3", "train.epochs=2", "train.log_every=2", "train.eval_every=3",
            f"train.out_dir={out}", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(records: list[dict]) -> dict[str, dict[int, float]]:
    """``{KIND/KEY: {step: value}}`` of the numbers of metrics.jsonl, as the reports name them."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in r.items():
            if type(value) in (int, float) and key not in ("batch", "step", "time"):
                out.setdefault(f"{r['kind']}/{key}", {})[r["step"]] = value
    return out


def test_default_reports_to_metrics_jsonl_alone(shared_data, tmp_path, one_thread):
    pytest.importorskip("tensorboard", reason="the default must not write TensorBoard even where it is installed")
    assert main(tiny(shared_data, tmp_path / "run")) == 0
    assert metrics(tmp_path / "run") and not (tmp_path / "run/tensorboard").exists()


def test_tensorboard_gets_the_numbers_of_metrics_jsonl(shared_data, tmp_path, one_thread):
    pytest.importorskip("tensorboard", reason="pip install 'ktransfer[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(tiny(shared_data, out, "train.report_to=tensorboard")) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    expected = scalars(metrics(out))
    assert {"train/loss", "train/lr", "valid/loss", "valid/ppl"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got.keys() == by_step.keys(), tag
        assert [got[s] for s in by_step] == pytest.approx(list(by_step.values()), rel=1e-6), tag  # float32 events


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run: its ``.wandb`` file is a LevelDB-style log (32 KiB blocks, 7-byte
    record headers: CRC, length, type) of wandb's protobuf ``Record`` messages, after a 7-byte ``:W&B`` header."""
    from wandb.proto import wandb_internal_pb2

    data, rows = run_file.read_bytes(), []
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6] if left >= 7 else 0
        if kind == 0:  # the zero-filled tail of a block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_logs_the_numbers_of_metrics_jsonl(shared_data, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("wandb", reason="pip install 'ktransfer[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_PROJECT", "ktransfer-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    out = tmp_path / "run"
    assert main(tiny(shared_data, out, "train.report_to=wandb")) == 0
    import wandb

    wandb.teardown()  # wait for wandb's background service to close the run's files before they are read
    (run_file,) = (tmp_path / "wandb-dir").rglob("run-*.wandb")
    logged: dict[str, dict[int, float]] = {}
    for row in wandb_history(run_file):
        for key, value in row.items():
            if not key.startswith("_"):
                logged.setdefault(key, {})[row["_step"]] = value
    expected = scalars(metrics(out))
    assert {"train/loss", "train/nll", "valid/loss"} <= set(expected)
    assert logged.keys() == expected.keys()
    for key, by_step in expected.items():
        assert sorted(logged[key]) == sorted(by_step), (key, sorted(set(by_step) - set(logged[key])))
        assert logged[key] == pytest.approx(by_step, rel=1e-12), key
    assert not (out / "tensorboard").exists()


@pytest.mark.parametrize("package", ["wandb", "tensorboard"])
def test_missing_report_package_is_a_one_line_error_before_anything_loads(package, shared_data, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as where it is not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main(tiny(shared_data, out, f"train.report_to={package}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"train.report_to={package}" in err and f"ktransfer[{package}]" in err
    assert not out.exists()  # nothing read, created or loaded


def test_help_config_lists_the_llm_keys(capsys):
    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    for key in ("data.batch_size=null", "optim.schedule=constant", "train.eval_every=null", "train.report_to=none",
                "train.patience=0"):
        assert key in text, key
    assert "linear / cosine" in text and "per_device_train_batch_size" in text
