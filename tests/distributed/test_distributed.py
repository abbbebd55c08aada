"""Training on several processes (``torchrun``, DDP with ``gloo`` on CPU) equals training on one.

Why the equivalence is exact by construction: a global step of N processes with ``optim.accumulate=1`` takes the N
consecutive batches ``batches[b:b + N]`` of the epoch, rank r the r-th; the loss of each divides by the token count of
all N (all-reduced) and is multiplied by N, and DDP averages (sums, then divides by N) the gradients. One process with
``optim.accumulate=N`` takes the same N batches, divides by the same count and sums the same gradients. With dropout
0 and the same seed (same initial weights), the updates are the same up to the order of a sum of N terms, which for
N=2 is exact (x2 and /2 are exact in binary floating point), so the weights agree to 1e-5 (in practice bitwise).

Everything uses the ``tiny`` preset, a 300-pair Multi30k slice, a 500-token BPE, one thread per process, and distils
from a "teacher" trained for two steps (the teacher is loaded, frozen, on every rank).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ktransfer.runtime import distributed
from ktransfer.training.config import load_config
from ktransfer.training.train import rank_batches, train

REPO_ROOT = Path(__file__).resolve().parents[2]


def overrides(shared_data: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=300", "data.max_eval_samples=12",
        "data.vocab_size=500", "data.max_tokens=300", "model.preset=tiny", "model.dropout=0", "eval.max_length=16",
        "optim.lr=1e-3", "train.num_threads=1", "train.log_every=1", "train.seed=3", "train.epochs=1",
        "train.save_every=0", f"train.out_dir={out_dir}", *extra,
    ]


def weights(run_dir: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(run_dir / "checkpoints" / name / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-5, msg=key)


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def step_of(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoints/last/training_state.json").read_text())["train_state"]["step"]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 600,
             command: str = "train") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "ktransfer", command, *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def setting(shared_data, tmp_path_factory) -> dict:
    """The teacher (two NLL steps) and two single-process runs with ``optim.accumulate=2``: the reference (the
    whole epoch) and ``one`` (its first 5 steps)."""
    root = tmp_path_factory.mktemp("ddp")
    train(load_config(None, overrides(shared_data, root / "teacher", "train.max_steps=2")))
    kd = ("objective.kind=kd", f"model.teacher={root / 'teacher/checkpoints/last'}")
    reference, one = root / "reference", root / "one"
    train(load_config(None, overrides(shared_data, reference, *kd, "optim.accumulate=2")))
    train(load_config(None, overrides(shared_data, one, *kd, "optim.accumulate=2", "train.max_steps=5")))
    return {"root": root, "kd": kd, "reference": reference, "one": one}


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def test_shard_covers_in_order_and_single_process_helpers():
    items = [f"s{i}" for i in range(11)]
    for world in (1, 2, 3, 4, 16):
        pieces = [distributed.shard(items, r, world) for r in range(world)]
        assert [x for p in pieces for x in p] == items
        assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.gather(items) == items and distributed.all_reduce_sum([2, 3.5]) == [2.0, 3.5]
    assert distributed.broadcast({"a": 1}) == {"a": 1} and distributed.all_reduce_max(7) == 7


def test_rank_batches_split_a_global_step():
    group = [[0], [1], [2], [3], [4]]  # e.g. accumulate=3 x 2 processes at the end of an epoch: 5 batches left
    (a, pad_a), (b, pad_b) = rank_batches(group, 0, 2), rank_batches(group, 1, 2)
    assert (a, pad_a) == ([[0], [2], [4]], 0)
    assert (b, pad_b) == ([[1], [3], [0]], 1)  # same number of passes; the stand-in counts nothing
    assert rank_batches(group[:1], 1, 2) == ([[0]], 1)
    assert rank_batches(group, 0, 1) == (group, 0)


_GATHER_WORKER = """
from ktransfer.runtime import distributed
assert distributed.init("cpu") and distributed.world_size() == 2  # from torchrun's variables: gloo
rank = distributed.rank()
items = [f"sentence {i}" for i in range(7)]
mine = distributed.shard(items)
assert mine == items[slice(*distributed.shard_bounds(7, rank, 2))]
assert distributed.gather([s.upper() for s in mine]) == [s.upper() for s in items]
assert distributed.all_reduce_sum([rank + 1, 0.5]) == [3.0, 1.0]
assert distributed.all_reduce_max(rank * 5) == 5
assert distributed.broadcast(f"from {rank}") == "from 0"
tagged = distributed.map_sharded(lambda part: [f"{s} on {rank}" for s in part], items)
assert tagged == [f"{s} on {0 if i < 4 else 1}" for i, s in enumerate(items)]
distributed.cleanup()
"""


def test_gather_keeps_order_across_two_processes():
    """Two processes joined from torchrun's environment variables: shard, gather (in order), sums, broadcast."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", _GATHER_WORKER], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out


# --------------------------------------------------------------------------------------------------------------
# Training: equivalence, files of rank 0 only, resume across process counts
# --------------------------------------------------------------------------------------------------------------
def test_two_processes_equal_one_with_accumulation_then_resume_on_one(setting, shared_data):
    """2 processes x 5 steps == 1 process with accumulate=2 x 5 steps; rank 0 alone wrote the run folder; the
    2-process checkpoint, resumed by 1 process with accumulate=2, ends with the uninterrupted reference's weights."""
    root, kd = setting["root"], setting["kd"]
    two = root / "two"
    proc = torchrun(overrides(shared_data, two, *kd, "train.max_steps=5"))
    assert proc.stdout.count("max_steps after 5 steps") == 1  # rank 0 alone reports

    one = setting["one"]  # the same 5 steps on one process
    assert_same_weights(two, one)
    assert step_of(two) == 5
    (valid_two,), (valid_one,) = records(two, "valid"), records(one, "valid")
    assert valid_two["loss"] == pytest.approx(valid_one["loss"], rel=1e-5)  # sharded validation, summed
    assert valid_two["bleu"] == valid_one["bleu"] and valid_two["sentences"] == 12  # hypotheses gathered

    # only rank 0 wrote: the files of one run, each line once
    files = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert [r["step"] for r in records(two, "train")] == [1, 2, 3, 4, 5]
    assert [r["kind"] for r in records(two)] == [r["kind"] for r in records(one)]
    log = (two / "train.log").read_text()
    assert log.count("new run") == 1 and log.count("x 2 processes (DDP)") == 1

    # 2 processes -> 1 process: same weights, optimiser and step; the data position is the global batch index
    result = train(load_config(None, overrides(shared_data, two, *kd, "optim.accumulate=2")))
    reference = setting["reference"]
    assert result["stopped"] == "epochs" and result["step"] == step_of(reference) > 5
    assert all(torch.isfinite(v).all() for v in weights(two).values())
    assert_same_weights(two, reference)
    steps = [r["step"] for r in records(two, "train")]
    assert steps == list(range(1, result["step"] + 1))  # continued, no step repeated


def test_causal_learner_on_two_processes_equals_one(shared_data, tmp_path):
    """Decoder-only (gpt2-tiny) KA distillation with DDP: 2 processes x 3 steps == 1 process with accumulate=2."""
    gpt2 = ("model.preset=gpt2-tiny", "data.max_tokens=400")
    teacher = tmp_path / "teacher"
    train(load_config(None, overrides(shared_data, teacher, *gpt2, "train.max_steps=2")))
    ka = (*gpt2, "objective.kind=ka", "objective.top_k=8", f"model.teacher={teacher / 'checkpoints/last'}",
          "train.max_steps=3")
    proc = torchrun(overrides(shared_data, tmp_path / "two", *ka))
    assert proc.stdout.count("max_steps after 3 steps") == 1
    train(load_config(None, overrides(shared_data, tmp_path / "one", *ka, "optim.accumulate=2")))
    assert_same_weights(tmp_path / "two", tmp_path / "one")
    (valid_two,), (valid_one,) = records(tmp_path / "two", "valid"), records(tmp_path / "one", "valid")
    assert valid_two["loss"] == pytest.approx(valid_one["loss"], rel=1e-5) and valid_two["divergence"] != 0


def test_on_policy_learner_on_two_processes_equals_one(shared_data, tmp_path):
    """On-policy kd (objective.prefix=learner) with DDP: each rank samples its batch from (seed, step, its sources),
    as one process with accumulate=2 samples the same two micro-batches, and the learner's two forward passes (the
    reference rows through the DDP wrapper, the sampled rows through the module inside) give one reduction:
    2 processes x 3 steps == 1 process with accumulate=2."""
    teacher = tmp_path / "teacher"
    train(load_config(None, overrides(shared_data, teacher, "train.max_steps=2")))
    on = ("objective.kind=kd", f"model.teacher={teacher / 'checkpoints/last'}", "objective.prefix=learner",
          "objective.sample_max_length=10", "train.max_steps=3")
    proc = torchrun(overrides(shared_data, tmp_path / "two", *on))
    assert proc.stdout.count("max_steps after 3 steps") == 1
    train(load_config(None, overrides(shared_data, tmp_path / "one", *on, "optim.accumulate=2")))
    assert_same_weights(tmp_path / "two", tmp_path / "one")
    assert all(r["divergence"] > 0 for r in records(tmp_path / "two", "train"))


def test_one_process_checkpoint_resumed_on_two(setting, shared_data):
    """A 1-process (accumulate=2) checkpoint after 5 steps, resumed by 2 processes to the end of the epoch (whose
    odd number of batches leaves rank 1 a stand-in batch at the last step), equals the uninterrupted reference."""
    root, kd, reference = setting["root"], setting["kd"], setting["reference"]
    assert records(reference, "train")[-1]["batch"] % 2 == 1, "the epoch should end with an odd batch"
    one = root / "one-to-two"
    shutil.copytree(setting["one"], one)
    assert step_of(one) == 5
    torchrun([*overrides(shared_data, one, *kd), "--resume"])
    assert step_of(one) == step_of(reference)
    assert_same_weights(one, reference)
    assert [r["step"] for r in records(one, "train")] == list(range(1, step_of(one) + 1))
    shutil.rmtree(one)


def test_reproduce_on_two_processes(shared_data, tmp_path, monkeypatch):
    """``torchrun ... ktransfer reproduce``: every stage runs once, rank 0 alone writes the run's files and logs."""
    monkeypatch.setenv("KTRANSFER_DATA", str(shared_data))
    run = tmp_path / "run"
    args = ["smoke", "--out", str(run), "data.max_train_samples=120", "data.max_eval_samples=8", "data.vocab_size=300",
            "max_predict_samples=8", "analysis_sample=8", "table_sentences=1", "seeds=1", "objectives=kd,ka",
            "control=false",
            "bootstrap=20", "teacher.train.epochs=1", "finetune.train.epochs=1"]
    proc = torchrun(args, command="reproduce", timeout=900)
    stages = json.loads((run / "stages.json").read_text())
    expected = ["bpe", "teacher", "learner", "analysis0", "finetune/kd/seed1", "finetune/ka/seed1", "eval/teacher",
                "eval/learner", "eval/finetune/kd/seed1", "eval/finetune/ka/seed1", "significance"]
    assert list(stages) == expected and all(stages[name]["done"] for name in expected)
    log = (run / "reproduce.log").read_text().splitlines()
    starts = [line.split("==== ", 1)[1].split(" ")[-2] for line in log if "==== " in line]
    assert starts == expected  # one line per stage: the second process logs nothing
    assert proc.stdout.count("report:") == 1  # the summary comes from rank 0 only
    assert (run / "report.md").is_file() and json.loads((run / "results.json").read_text())["table2"]
    for name in ("finetune/kd/seed1", "finetune/ka/seed1"):  # every model kept, with the per-epoch analyses
        assert (run / name / "checkpoints/best/model.safetensors").is_file()
        assert (run / name / "analysis/epoch1.json").is_file()


# --------------------------------------------------------------------------------------------------------------
# FSDP2 (train.distributed=fsdp): learner and teacher sharded per block
# --------------------------------------------------------------------------------------------------------------
def test_fsdp_seq2seq_two_processes_equal_one_then_resume_on_one(setting, shared_data):
    """Marian kd with learner and teacher sharded over 2 processes, 5 steps, then resumed on 1 process to the end
    of the epoch: equal to the 1-process reference (accumulate=2) throughout, weights and optimiser gathered into
    the checkpoint in the single-process layout."""
    root, kd, reference = setting["root"], setting["kd"], setting["reference"]
    two = root / "fsdp-two"
    proc = torchrun(overrides(shared_data, two, *kd, "train.distributed=fsdp", "train.max_steps=5"))
    assert "sharded over 2 processes (FSDP2)" in proc.stdout + proc.stderr
    assert_same_weights(two, setting["one"])
    saved = json.loads((two / "checkpoints/last/training_state.json").read_text())["optimizer"]
    assert saved["param_groups"][0]["params"][:3] == [0, 1, 2]  # by index, as one process writes it
    train(load_config(None, overrides(shared_data, two, *kd, "optim.accumulate=2")))  # resumed on one process
    assert step_of(two) == step_of(reference)
    assert_same_weights(two, reference)
    shutil.rmtree(two)


def test_fsdp_causal_one_process_checkpoint_resumed_on_two(shared_data, tmp_path):
    """gpt2-tiny ka: 3 steps on one process (accumulate=2), resumed on 2 FSDP processes to step 6, equals 6 steps
    on one process; the teacher is sharded too."""
    gpt2 = ("model.preset=gpt2-tiny", "data.max_tokens=400")
    teacher = tmp_path / "teacher"
    train(load_config(None, overrides(shared_data, teacher, *gpt2, "train.max_steps=2")))
    ka = (*gpt2, "objective.kind=ka", "objective.top_k=8", f"model.teacher={teacher / 'checkpoints/last'}",
          "optim.schedule=inverse_sqrt", "optim.warmup_steps=4")  # the restored schedule matters
    train(load_config(None, overrides(shared_data, tmp_path / "ref", *ka, "optim.accumulate=2", "train.max_steps=6")))
    mixed = tmp_path / "mixed"
    train(load_config(None, overrides(shared_data, mixed, *ka, "optim.accumulate=2", "train.max_steps=3")))
    torchrun(overrides(shared_data, mixed, *ka, "train.distributed=fsdp", "train.max_steps=6"))
    assert step_of(mixed) == 6
    assert_same_weights(mixed, tmp_path / "ref")
    (valid,) = records(mixed, "valid")[-1:]
    assert valid["divergence"] != 0


def test_fsdp_refuses_on_policy_prefixes_by_name(setting, shared_data, tmp_path):
    """Sampling runs a different number of forward passes on each rank, which sharded weights cannot do."""
    args = overrides(shared_data, tmp_path / "run", *setting["kd"], "train.distributed=fsdp", "train.max_steps=1",
                     "objective.prefix=learner")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "ktransfer", "train", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "objective.prefix: not with train.distributed=fsdp (use ddp)" in proc.stderr
