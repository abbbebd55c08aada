"""``data.max_length`` defaults to what the model reads (issue 26, point 3a): nothing is dropped by a fixed 128, and
what is still dropped or cut is printed at the end of setup and reported per split by ``ktransfer data check
--model`` (``ktransfer.training.lengths``)."""

from __future__ import annotations

import random
from pathlib import Path

from ktransfer.cli import main

WORDS = "a man and the dog is on in of with to at woman girl boy red blue big small runs walks".split()


def corpus(folder: Path, n: int = 40, long: int = 10) -> Path:
    """SPLIT.de / SPLIT.en pairs: ``long`` of the ``n`` training pairs have 150 words a side (over 128 tokens, under
    the tiny preset's 256 positions), the others 6."""
    rng = random.Random(0)
    folder.mkdir()
    for split, count, many in (("train", n, long), ("valid", 4, 0)):
        lines = [" ".join(rng.choice(WORDS) for _ in range(150 if i < many else 6)) for i in range(count)]
        for lang in ("de", "en"):
            (folder / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"data.corpus={data}", "data.vocab_size=300", "data.max_tokens=2000", "model.preset=tiny",
            "eval.max_length=8", "train.num_threads=1", "train.max_steps=1", f"train.out_dir={out}", *extra]


def test_default_keeps_what_the_model_reads_and_drops_are_printed_last(tmp_path, capsys):
    data = corpus(tmp_path / "long-de-en")
    assert main(tiny(data, tmp_path / "auto")) == 0
    err = capsys.readouterr().err
    assert "longest training example: 256 tokens (data.max_length=auto: the models' 256 positions)" in err
    assert "dropped" not in err.split("longest training example")[1].replace("dropped 0 with", "")  # all 40 kept
    assert "40 training pairs" in err
    assert main(tiny(data, tmp_path / "fixed", "data.max_length=128")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    setup_end = next(i for i, line in enumerate(err) if "training pairs in" in line)
    assert err[setup_end + 1].endswith("warning: dropped 10 of 40 training examples (25.0%: empty or longer than 128 "
                                       "tokens); the limit: data.max_length=128")


def test_data_check_counts_per_split_with_the_models_tokenizer(tmp_path, capsys):
    data = corpus(tmp_path / "long-de-en")
    run = tmp_path / "run"
    assert main(tiny(data, run)) == 0
    capsys.readouterr()
    assert main(["data", "check", str(data), "--model", str(run)]) == 0
    out = capsys.readouterr().out
    assert "examples longer than 256 tokens are dropped (data.max_length=auto: the models' 256 positions)" in out
    assert "  train: all 40 examples fit" in out and "  valid: all 4 examples fit" in out
    assert main(["data", "check", str(data), "--model", str(run), "data.max_length=128"]) == 0
    out = capsys.readouterr().out
    assert "  train: dropped 10 of 40 examples (25.0%: empty or longer than 128 tokens)" in out
    assert "  valid: all 4 examples fit" in out
