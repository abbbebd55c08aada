"""Every example of every ``ktransfer COMMAND --help`` runs (issue 26, point 9), in order, in one scratch folder that
holds what the examples name (``chat.jsonl``, ``llama-teacher/``, ``runs/teacher`` once the first train example made
it, ...), with tiny settings appended (later options and keys win) so that the whole file stays within minutes.

What is changed in an example line is listed in ``SWAPS`` with the reason; ``data download multi30k`` fetches from a
local mirror of the shared corpus (``file://``, with its checksums) into the scratch folder, and the only examples
not run are the ``data download wmt16:...`` lines, which need sacrebleu's archive from the network (``NOT_RUN``)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from test_formats import _chat_rows, _write_jsonl

from ktransfer.cli import COMMANDS, main

pytestmark = pytest.mark.usefixtures("one_thread")

# the order the examples run in: train makes the runs that the others read
ORDER = ["data", "train", "evaluate", "translate", "generate", "distill-data", "export", "reproduce", "report", "toy",
         "build-kernel"]
# tiny settings appended to each command's examples
TINY = {
    "train": ["data.max_train_samples=40", "data.max_eval_samples=4", "data.vocab_size=300", "data.max_tokens=400",
              "eval.max_length=8", "eval.beam=1", "train.max_steps=1", "train.num_threads=1"],
    "evaluate": ["--limit", "4", "--max-length", "8"],
    "translate": ["--max-length", "8"],
    "generate": ["--max-length", "8"],
    "distill-data": ["--limit", "4", "--max-length", "8"],
    "reproduce": ["stop_after=bpe", "data.max_train_samples=100", "data.vocab_size=300"],  # up to its first stage
    "toy": ["--epochs", "30"],
}
SWAPS = [  # (text in an example, its replacement, why)
    ("model.preset=cpu-teacher", "model.preset=tiny", "the CPU presets take minutes to train; tiny is the same kind"),
    ("model.preset=cpu-learner", "model.preset=tiny", "as above"),
    ("--device cuda", "--device cpu", "no GPU in the test (the torchrun lines run as one process)"),
    ("train.device=cuda", "train.device=cpu", "as above"),
    ("/tmp/", "tmp/", "the scratch folder, not the machine's /tmp"),
]
NOT_RUN = ("data download wmt16",)  # sacrebleu's test-set archive: the network


def examples(command: str, capsys) -> list[str]:
    """The example lines of ``ktransfer COMMAND --help`` (continuations joined, comments dropped)."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out.replace("\\\n", " ")
    lines = [line.strip().split("  #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith(("ktransfer ", "torchrun ", "echo ")) and "ktransfer " in line]


def as_call(line: str) -> tuple[list[str], str | None, str | None]:
    """``(argv after ktransfer, stdin text, stdout file)`` of an example line (``echo X |``, ``< FILE``, ``> FILE``;
    ``torchrun ... -m ktransfer`` runs as one process)."""
    for old, new, _ in SWAPS:
        line = line.replace(old, new)
    stdin = stdout = None
    if line.startswith("echo "):
        echoed, line = line.split(" | ", 1)
        stdin = shlex.split(echoed)[1] + "\n"
    words = shlex.split(line)
    if "<" in words:
        i = words.index("<")
        stdin, words = Path(words[i + 1]).read_text(encoding="utf-8"), words[:i] + words[i + 2:]
    if ">" in words:
        i = words.index(">")
        stdout, words = words[i + 1], words[:i] + words[i + 2:]
    return words[words.index("ktransfer") + 1:], stdin, stdout


def workspace(root: Path, shared_data: Path, lines, llama: Path) -> None:
    """The files and folders the examples name, besides the runs they make themselves."""
    import test_hf_models

    chat = _chat_rows(lines, 24)
    for row in chat:  # `data check chat.jsonl data.messages_key=conversation` reads the same file
        row["conversation"] = row["messages"]
    _write_jsonl(root / "chat.jsonl", chat)
    for folder in (root / "chat", root / "data" / "chat"):
        folder.mkdir(parents=True)
        _write_jsonl(folder / "train.jsonl", _chat_rows(lines, 12))
        _write_jsonl(folder / "valid.jsonl", _chat_rows(lines, 4, 100))
    (root / "prompts.txt").write_text("Translate: Ein Hund rennt.\nTranslate: Zwei Männer.\n", encoding="utf-8")
    test = shared_data / "multi30k-de-en"
    for lang in ("de", "en"):
        (root / f"test.{lang}").write_text("\n".join(
            (test / f"test2016.{lang}").read_text(encoding="utf-8").splitlines()[:4]) + "\n", encoding="utf-8")
    for name in ("llama-teacher", "small-llama", "path/to/llama", "runs/chat-teacher"):  # HF folders by name
        shutil.copytree(llama, root / name)
    # the hub id of the train example, as a local folder of that name (no network here; a folder wins over a hub id)
    test_hf_models.marian_teacher(root / "Helsinki-NLP" / "opus-mt-de-en", lines)
    (root / "tmp").mkdir()


def mirror(root: Path, shared_data: Path) -> list[str]:
    """``data download multi30k``'s options for a local mirror of its six gzipped files (and their SHA-256), written
    into the scratch folder instead of $KTRANSFER_DATA (the shared corpora are read-only)."""
    from ktransfer.data.download import MULTI30K_SPLITS

    folder, options = root / "mirror", ["--dest", "tmp/data"]
    folder.mkdir()
    for split, stem in MULTI30K_SPLITS.items():
        for lang in ("de", "en"):
            data = gzip.compress((shared_data / "multi30k-de-en" / f"{split}.{lang}").read_bytes(), mtime=0)
            (folder / f"{stem}.{lang}.gz").write_bytes(data)
            options += ["--checksum", f"{stem}.{lang}.gz={hashlib.sha256(data).hexdigest()}"]
    return [*options, "--base-url", folder.as_uri()]


def before(line: str, root: Path) -> None:
    """Runs an example reads that no earlier example made: made here from the ones that exist."""
    runs = root / "runs"
    if "runs/kd/" in line and not (runs / "kd").exists():
        shutil.copytree(runs / "ka", runs / "kd")  # a KD run is a KA run's layout
    if "runs/learner/" in line and not (runs / "learner").exists():
        shutil.copytree(runs / "teacher", runs / "learner")
    if "runs/lora-kd" in line and not (runs / "lora-kd").exists():  # the LoRA train example's folder (runs/ka-HASH)
        (lora,) = [p for p in runs.iterdir() if (p / "config.yaml").is_file()
                   and "lora_r: 16" in (p / "config.yaml").read_text(encoding="utf-8")]
        shutil.copytree(lora, runs / "lora-kd")
    if "runs/chat-ka" in line and not (runs / "chat-ka").exists():  # a chat learner for evaluate, generate, export
        assert main(["train", "data.corpus=chat", "model.teacher=llama-teacher", "model.preset=llama-tiny",
                     "objective.kind=ka", "train.out_dir=runs/chat-ka", *TINY["train"]]) == 0


def test_every_help_example_runs(shared_data, multi30k_lines, llama_folder, tmp_path, monkeypatch, capsys):
    assert sorted(ORDER) == sorted(COMMANDS)
    workspace(tmp_path, shared_data, multi30k_lines, llama_folder)
    monkeypatch.chdir(tmp_path)
    ran = []
    for command in ORDER:
        for line in examples(command, capsys):
            if any(f"ktransfer {x}" in line for x in NOT_RUN):
                continue
            argv, stdin, stdout = as_call(line)
            if argv != ["reproduce", "--list"] and argv[:1] != ["data"]:
                argv += TINY.get(argv[0], [])
            if argv[:2] == ["data", "download"]:
                argv += mirror(tmp_path, shared_data)
            before(line, tmp_path)
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
            capsys.readouterr()
            rc = main(argv)
            out, err = capsys.readouterr()
            assert rc == 0, f"`{line}` (run as ktransfer {' '.join(argv)}) exited {rc}: {err[-2000:]}"
            if stdout:
                Path(stdout).write_text(out, encoding="utf-8")
            ran.append((command, argv, out))
    by = {c: [a for k, a, _ in ran if k == c] for c in ORDER}
    assert len(by["train"]) >= 7 and len(by["evaluate"]) == 5 and len(by["translate"]) == 3
    assert by["generate"] and by["distill-data"] and by["export"] and len(by["reproduce"]) >= 6 and by["toy"]
    # what the examples claim to make is there
    assert len(Path("test.hyp.en").read_text(encoding="utf-8").splitlines()) == 4
    assert [json.loads(x)["prompt"] for x in Path("generations.jsonl").read_text().splitlines()] == [
        "Translate: Ein Hund rennt.", "Translate: Zwei Männer."]
    assert (tmp_path / "data/multi30k-seqkd/train.en").is_file() and (tmp_path / "data/chat-seqkd").is_dir()
    assert (tmp_path / "published/chat-ka/config.json").is_file() and (tmp_path / "tmp/merged/config.json").is_file()
    assert (tmp_path / "results/ka").is_dir() and (tmp_path / "runs/toy/toy.json").is_file()
    assert (tmp_path / "tmp/data/multi30k-de-en/train.de").read_bytes() == (
        shared_data / "multi30k-de-en/train.de").read_bytes()
