"""What a Hugging Face / TRL user expects of ktransfer's data, tokens, chat sequences, generation and CLI (issue 26):
HF split names, ``tokenizer(prompt)``'s own ids, one sequence per conversation, ``generate()`` equal to ktransfer's
decoding, and the CLI's help examples, flags and output folders. Built on the tiny Llama-style teacher of
``test_hf_models`` and Multi30k sentences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_formats import _pc_rows, _write_jsonl

from ktransfer.cli import main
from ktransfer.data import formats

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_args(data: Path, teacher: Path, out: Path, *extra) -> list[str]:
    return ["train", f"data.corpus={data}", f"model.teacher={teacher}", "model.preset=llama-tiny",
            "objective.objective=kd", "data.max_tokens=800", "data.max_length=120", "eval.max_length=8",
            "train.max_steps=1", "train.epochs=1", "train.num_threads=1", f"train.out_dir={out}", *extra]


# --------------------------------------------------------------------------------------------------------------
# Point 2: Hugging Face split names
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["validation", "valid", "val", "dev"])
def test_validation_split_names_are_found_in_jsonl_and_datasets_folders(multi30k_lines, tmp_path, name):
    from datasets import Dataset, DatasetDict

    lines = multi30k_lines
    folder = tmp_path / "jsonl"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", _pc_rows(lines, 20))
    _write_jsonl(folder / f"{name}.jsonl", _pc_rows(lines, 4, 100))
    DatasetDict({"train": Dataset.from_list(_pc_rows(lines, 20)),
                 name: Dataset.from_list(_pc_rows(lines, 4, 100))}).save_to_disk(str(tmp_path / "ds"))
    for corpus in (folder, tmp_path / "ds"):
        split, why = formats.find_split(corpus, "valid", "prompt_completion")
        assert split == name and repr(name) in why
        assert formats.find_split(corpus, "test", "prompt_completion", formats.TEST_NAMES)[0] is None
    # an explicit data.valid that exists wins over the HF names
    _write_jsonl(folder / "heldout.jsonl", _pc_rows(lines, 2, 200))
    assert formats.find_split(folder, "heldout", "prompt_completion")[0] == "heldout"
    assert formats.find_split(folder, "missing", "prompt_completion")[0] is None  # not an HF name: held out


def test_training_validates_on_the_datasetdict_validation_split_and_says_so(multi30k_lines, llama_folder, tmp_path):
    from datasets import Dataset, DatasetDict

    lines = multi30k_lines
    DatasetDict({"train": Dataset.from_list(_pc_rows(lines, 30)),
                 "validation": Dataset.from_list(_pc_rows(lines, 7, 100)),
                 "test": Dataset.from_list(_pc_rows(lines, 3, 200))}).save_to_disk(str(tmp_path / "ds"))
    run = tmp_path / "run"
    assert main(_train_args(tmp_path / "ds", llama_folder, run)) == 0
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "validation: split 'validation' (no 'valid'" in log and "held out" not in log
    assert "30 training and 7 validation examples" in log
    # an explicit data.valid wins
    run2 = tmp_path / "run2"
    assert main(_train_args(tmp_path / "ds", llama_folder, run2, "data.valid=test")) == 0
    assert "30 training and 3 validation examples" in (run2 / "train.log").read_text(encoding="utf-8")
    # evaluate on the run finds the same split
    assert main(["evaluate", str(run), "--beam", "1", "--max-length", "4", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "scores.validation.json").read_text())["examples"] == 7
