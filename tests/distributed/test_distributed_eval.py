"""``evaluate`` and ``translate`` on several processes (torchrun, ``gloo`` on CPU) give what one process gives.

Each rank beam-searches a contiguous share of the sentences; the hypotheses are gathered in source order and rank 0
alone scores, prints and writes. The references are single-process runs in this test process. The model is a
``tiny`` one with large random weights (as in ``tests/cli/test_evaluate.py``), so that different sources get different
translations and a hypothesis out of place would show. The sentence counts are odd: the two shares differ in size.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktransfer.evaluation.evaluate import evaluate, translate

REPO_ROOT = Path(__file__).resolve().parents[2]
DECODE = {"beam": 2, "max_length": 8, "batch_size": 2}  # several batches per share
DECODE_ARGS = ["--beam", "2", "--max-length", "8", "--batch-size", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in extra:
            env.pop(key, None)
    return env


def torchrun(*args: str, stdin: str | None = None, nproc: int = 2, timeout: float = 300):
    """``torchrun --nproc_per_node NPROC --standalone -m ktransfer ARGS`` (stdin shared by the workers, as usual)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "ktransfer", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), input=stdin, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def checkpoint(small_tokenizer, tmp_path_factory) -> Path:
    from ktransfer.models.checkpoint import save_checkpoint
    from ktransfer.models.family import build_model

    torch.manual_seed(0)
    model = build_model("tiny", small_tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0)  # large: sources get different translations
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "best"
    save_checkpoint(path, model=model, tokenizer=small_tokenizer,
                    config={"data": {"corpus": "multi30k-de-en", "src_lang": "de", "tgt_lang": "en"}})
    return path


@pytest.fixture(scope="module")
def test_files(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """9 aligned sentences of Multi30k test2016 (shares of 5 and 4 on two processes)."""
    folder, out = shared_data / "multi30k-de-en", tmp_path_factory.mktemp("data")
    for lang in ("de", "en"):
        lines = (folder / f"test2016.{lang}").read_text(encoding="utf-8").split("\n")[:9]
        (out / f"t.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "t.de", out / "t.en"


@pytest.fixture(scope="module")
def one_process(checkpoint, test_files, tmp_path_factory) -> tuple[dict, str]:
    """The single-process evaluation (in this process): its result and its hypotheses file."""
    src, ref = test_files
    result = evaluate(checkpoint, src_file=src, ref_file=ref, out_dir=tmp_path_factory.mktemp("one"), **DECODE)
    hyps = Path(result["hyp_file"]).read_text(encoding="utf-8")
    assert len(set(hyps.splitlines())) >= 6, "the random model should translate different sources differently"
    return result, hyps


_EVALUATE_WORKER = """
import json, sys
from pathlib import Path
import ktransfer.evaluation.evaluate
from ktransfer.cli import main

ckpt, src, ref, out, rank = sys.argv[1:6]
library = ktransfer.evaluation.evaluate.evaluate
def spy(*args, **kwargs):  # keeps what evaluate() returns on this rank
    result = library(*args, **kwargs)
    Path(f"{out}-returned{rank}.json").write_text(json.dumps(result))
    return result
ktransfer.evaluation.evaluate.evaluate = spy
sys.exit(main(["evaluate", ckpt, "--src", src, "--ref", ref, "--beam", "2", "--max-length", "8", "--batch-size", "2",
               "--out", f"{out}{rank}", "--json"]))
"""


def test_evaluate_on_two_processes_equals_one(checkpoint, test_files, one_process, tmp_path):
    """``ktransfer evaluate`` on 2 ranks (torchrun's variables, gloo): same hypotheses (in order) and scores as 1
    process; rank 0 alone prints and writes (each rank is given its own output folder: rank 1's is never created,
    and rank 1 prints nothing), and every rank's ``evaluate()`` returns rank 0's result."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src, ref = test_files
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", _EVALUATE_WORKER, str(checkpoint), str(src), str(ref), str(out),
                               str(r)],
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    printed = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout + stderr
        printed.append(stdout)

    assert printed[1] == ""  # rank 1 prints nothing
    result = json.loads(printed[0])
    reference, reference_hyps = one_process
    assert (tmp_path / "out0" / "hyp.t.en").read_text(encoding="utf-8") == reference_hyps
    assert not (tmp_path / "out1").exists()  # rank 1 wrote nothing
    assert sorted(p.name for p in (tmp_path / "out0").iterdir()) == ["hyp.t.en", "scores.t.json"]
    assert json.loads((tmp_path / "out0" / "scores.t.json").read_text(encoding="utf-8")) == result
    returned = [json.loads((tmp_path / f"out-returned{r}.json").read_text()) for r in range(2)]
    assert returned[0] == returned[1] == result
    for key in ("bleu", "chrf", "hyp_len", "ref_len", "precisions", "sentences", "bleu_signature",
                "decode_signature"):
        assert result[key] == reference[key], key
    assert result["sentences"] == 9
    assert (result["settings"]["processes"], reference["settings"]["processes"]) == (2, 1)


def test_rank_device_follows_training(monkeypatch):
    """Under torchrun, ``cuda`` is GPU ``LOCAL_RANK`` (as in ``train._device``); explicit devices stay as given."""
    from ktransfer.evaluation.evaluate import rank_device
    from ktransfer.runtime import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the rule, on any machine
    assert rank_device("cuda") == "cuda" and rank_device("cpu") == "cpu"  # one process
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cuda") == "cuda:1" and rank_device("cuda:0") == "cuda:0" and rank_device("cpu") == "cpu"
    assert rank_device("auto") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto") == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        rank_device("cuda")


def test_translate_cli_under_torchrun_stdin(checkpoint, small_tokenizer, shared_data):
    """``torchrun -m ktransfer translate`` reading stdin: rank 0 reads and broadcasts each chunk (3 lines, then 3,
    then 1: rank 1's share of the last is empty); stdout is exactly one process's translation, in input order."""
    from ktransfer.models.family import load_model

    de = (shared_data / "multi30k-de-en" / "test2016.de").read_text(encoding="utf-8").split("\n")[20:25]
    lines = [de[0], "", *de[1:4], "", de[4]]  # 7 lines, two of them empty
    proc = torchrun("translate", str(checkpoint), *DECODE_ARGS, "--chunk", "3", stdin="\n".join(lines) + "\n")
    model, tokenizer = load_model(checkpoint)
    expected = translate(model, tokenizer, lines, **DECODE)
    assert proc.stdout == "".join(h + "\n" for h in expected)  # fails if rank 1 read a line or printed one
    assert len(set(expected)) >= 5
