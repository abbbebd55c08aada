"""Fault injection: what a hostile but fair user can do to ktransfer, and that each ends in one clear message.

A killed kernel build does not wedge later processes; a model folder's own code never runs (even with ``y`` on
stdin); pickle weights are refused; a 200k-character word does not hang tokenizer training; a full disk is one line
naming the path with the previous checkpoint intact; two writers of one run folder are refused; kills at random
moments (inside saves too) then resume end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ktransfer.models import hub

REPO_ROOT = Path(__file__).resolve().parents[2]
EVIL_CODE = """\
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def run_cli(*args: str, stdin: str = "", timeout: float = 120, env: dict | None = None):
    """``python -m ktransfer ARGS`` with ``stdin``; (returncode, stdout, stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "ktransfer", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO_ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def evil_folder(tmp_path: Path) -> tuple[Path, Path]:
    """An HF folder whose config asks to run ``configuration_evil.py``, which writes a marker file when imported."""
    folder, marker = tmp_path / "evil", tmp_path / "marker"
    folder.mkdir()
    (folder / "configuration_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    return folder, marker


def tiny_gpt2_folder(folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    model.save_pretrained(folder)
    return model


# --- model folders: no code, no pickles, no prompt ------------------------------------------------------------------
def test_evil_folder_is_live_with_plain_transformers(tmp_path):
    """The fixture really runs code: plain transformers, asked on stdin, answers 'y' and imports the folder's code."""
    folder, marker = evil_folder(tmp_path)
    code = "import sys; from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(folder)], input="y\n", capture_output=True, text=True,
                   timeout=120)
    assert marker.exists()


def test_auto_map_folder_never_runs_its_code(tmp_path, shared_data):
    folder, marker = evil_folder(tmp_path)
    rc, _, err = run_cli("train", f"model.preset={folder}", f"data.corpus={shared_data / 'multi30k-de-en'}",
                         "data.max_train_samples=200", "data.vocab_size=300", f"train.out_dir={tmp_path / 'run'}",
                         stdin="y\ny\ny\n")
    assert rc == 2 and not marker.exists()
    assert "auto_map" in err and "trust_remote_code" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="auto_map"):
        hub.load_config(folder)
    with pytest.raises(ValueError, match="auto_map"):
        hub.load_auto_tokenizer(folder)
    assert not marker.exists()
    hub.load_config(folder, trust_remote_code=True)  # the explicit option does what it says
    assert marker.exists()


def test_pickle_only_folder_is_refused_unread(tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    model = tiny_gpt2_folder(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    from ktransfer.models.family import load_model

    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*safe_serialization=True"):
        load_model(folder)
    assert calls == []


def test_safe_folder_loads_the_same_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2_folder(tmp_path / "safe")
    loaded = hub.load_pretrained(AutoModelForCausalLM, tmp_path / "safe")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_hub_id_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match=r"Helsinki-NLP/opus-mt-xx-yy: not a local folder, not in the local "
                                         r"Hugging Face cache, and HF_HUB_OFFLINE is set"):
        hub.load_pretrained(AutoModelForSeq2SeqLM, "Helsinki-NLP/opus-mt-xx-yy")
    with pytest.raises(ValueError, match="no such folder"):
        hub.load_pretrained(AutoModelForSeq2SeqLM, str(tmp_path / "missing" / "deeper"))


def test_hub_id_without_a_network_fails_at_once(tmp_path, monkeypatch, capsys):
    """No HF_HUB_OFFLINE, a host that refuses connections: one clear error, without huggingface_hub's ~30 s of
    retries (each printed)."""
    import socket
    import time

    from ktransfer.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub, "_REACHABLE", {})

    def refuse(address, timeout=None):
        raise ConnectionRefusedError(f"refused: {address}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    assert main(["translate", "Helsinki-NLP/opus-mt-de-en"]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 5 and "Retrying" not in err
    assert "Helsinki-NLP/opus-mt-de-en: not a local folder, not in the local Hugging Face cache, and the hub cannot " \
           "be reached" in err


# --- the kernel build -----------------------------------------------------------------------------------------------
# A stand-in for csrc/divergence_cpu.cpp built through the same path (native.kernel with native.SOURCE replaced): a
# Python module that takes seconds to compile (constexpr loops, ~1.5 s each), so a build can be killed midway.
SLOW_SOURCE = """\
#include <Python.h>
constexpr long spin(long n) {
    long s = 0;
    for (long i = 0; i < n; ++i) for (long j = 0; j < 100; ++j) s += (i ^ j) % 7;
    return s;
}
SPIN
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "NAME", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_NAME(void) { return PyModule_Create(&def); }
"""
BUILD_SCRIPT = """\
import sys, logging
from pathlib import Path
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from ktransfer.losses import native
native.SOURCE = Path(sys.argv[1])
print("built" if native.kernel() is not None else "python path", flush=True)
"""


def slow_source(tmp_path: Path, loops: int = 3) -> Path:
    from ktransfer.losses import native

    name = native.build_folder().name.rsplit("-", 1)[0]  # the module name kernel() builds
    src = tmp_path / "slow_kernel.cpp"
    asserts = "".join(f'static_assert(spin({5000 + i}) > 0, "spin");\n' for i in range(loops))
    src.write_text(SLOW_SOURCE.replace("SPIN", asserts).replace("NAME", name))
    return src


def start_build(src: Path, ext_dir: Path, **env) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "TORCH_EXTENSIONS_DIR": str(ext_dir), **env}
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(src)], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.skipif(not shutil.which("c++"), reason="needs a C++ compiler")
def test_a_build_killed_midway_does_not_wedge_the_next(tmp_path):
    """kill -9 (the whole process group, compiler included) while torch's ``lock`` file is there; the next process
    clears it under its flock and builds in bounded time (torch alone would wait on that file forever)."""
    src, ext = slow_source(tmp_path), tmp_path / "ext"
    first = start_build(src, ext)
    deadline = time.monotonic() + 90
    while not list(ext.glob("*/lock")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.005)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    assert list(ext.glob("*/lock")), "the kill must land inside the build (torch's lock file present)"
    second = start_build(src, ext)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0 and out.strip() == "built", err
    assert "building ktransfer's CPU kernel" in err and not list(ext.glob("*/lock"))


@pytest.mark.skipif(not shutil.which("c++"), reason="needs a C++ compiler")
def test_two_first_calls_at_once_both_get_the_kernel(tmp_path):
    """Two processes (torchrun ranks) build at once: one builds, the other waits (saying so) and loads it."""
    src, ext = slow_source(tmp_path, loops=1), tmp_path / "ext"
    procs = [start_build(src, ext) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [out.strip() for out, _ in results] == ["built", "built"], results
    assert sum("waiting" in err for _, err in results) <= 1


def test_a_wait_that_runs_out_takes_the_python_path(tmp_path, monkeypatch, caplog):
    import fcntl
    import logging

    from ktransfer.losses import native

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("KTRANSFER_BUILD_WAIT", "0.3")
    folder = native.build_folder()
    folder.mkdir(parents=True)
    holder = os.open(folder / native.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another builder, alive
    saved = dict(native._STATE)
    native._STATE.update(module=None, failed=False, enabled=True)
    try:
        with caplog.at_level(logging.WARNING, logger="ktransfer.losses.native"):
            assert native.kernel() is None
        assert "waiting (at most 0 s)" in caplog.text and "TimeoutError" in caplog.text
    finally:
        native._STATE.update(saved)
        os.close(holder)


@pytest.mark.skipif(not shutil.which("c++"), reason="needs a C++ compiler")
def test_a_truncated_cached_kernel_is_rebuilt_not_loaded(tmp_path):
    """A cached library cut in half with a newer mtime (ninja sees nothing to do): the old code mapped it and the
    next process died of SIGBUS, or fell back to the Python path for good. Now its sha256 (written beside it at
    build time) differs, and it is rebuilt with a warning. A small module stands in for the kernel (same path)."""
    import hashlib

    src, ext = slow_source(tmp_path, loops=0), tmp_path / "ext"
    out, err = start_build(src, ext).communicate(timeout=300)
    assert out.strip() == "built", err
    (lib,) = ext.glob("*/*.so")
    digest = lib.with_name(lib.name + ".sha256")
    assert digest.read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
    lib.write_bytes(lib.read_bytes()[:lib.stat().st_size // 2])
    os.utime(lib, (time.time() + 60, time.time() + 60))
    proc = start_build(src, ext)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.strip() == "built", (proc.returncode, err)
    assert f"the cached kernel {lib} does not match the sha256 written when it was built" in err, err
    assert digest.read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()


def test_two_virtualenvs_build_in_two_folders(monkeypatch):
    from ktransfer.losses import native

    a = native.build_folder("AVX2")
    monkeypatch.setattr(sys, "prefix", "/other/venv")
    b = native.build_folder("AVX2")
    assert a.parent == b.parent and a != b and a.name.startswith("ktransfer_divergence_cpu_avx2-")


# --- tokenizer training, argument order, corpora ----------------------------------------------------------------------
def test_a_200k_character_word_is_cut_before_bpe(shared_data, caplog):
    import logging
    import random

    from ktransfer.models.tokenizer import WordLimiter, train_tokenizer

    rng = random.Random(0)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(200_000))
    lines = (shared_data / "multi30k-de-en/train.en").read_text(encoding="utf-8").split("\n")[:2000]
    limited = WordLimiter([lines[0], f"x {word} y"], max_chars=1000)
    out = list(limited)
    assert out[0] == lines[0] and limited.cut == 1
    assert "".join(out[1].split()) == f"x{word}y" and max(map(len, out[1].split())) == 1000  # cut, nothing lost
    with caplog.at_level(logging.WARNING, logger="ktransfer.models.tokenizer"):
        tok = train_tokenizer([*lines, word], vocab_size=2000)  # quadratic in 200k without the cut: minutes
    assert "1 word(s) longer than 1000 characters cut" in caplog.text
    assert max(map(len, tok.vocab())) <= 1001  # "▁" + at most 1000 characters
    assert tok.decode(tok.encode(lines[5])) == lines[5]


def test_options_anywhere_among_the_items():
    from ktransfer.cli import build_parser

    args = build_parser("train").parse_args(["train", "a.b=1", "--save-every", "2", "c.d=3", "--resume"])
    assert args.items == ["a.b=1", "c.d=3"] and args.save_every == 2 and args.resume


def corpus(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "corpus-de-en"
    folder.mkdir()
    for name, text in files.items():
        (folder / name.replace("_", ".")).write_text(text, encoding="utf-8")
    return folder


def test_all_empty_targets_name_the_cause_and_leave_no_run_folder(tmp_path):
    folder = corpus(tmp_path, train_de="a b\nc d\n", train_en="\n\n", valid_de="a\n", valid_en="b\n")
    rc, _, err = run_cli("train", f"data.corpus={folder}", f"train.out_dir={tmp_path / 'run'}")
    assert rc == 2 and "every pair has an empty side" in err and "train.en: only empty lines" in err, err
    assert not (tmp_path / "run").exists()
    rc, out, err = run_cli("data", "check", str(folder))
    assert rc == 1 and "every pair has an empty side" in out + err


def test_data_check_fails_without_a_train_split_and_names_a_folder_as_one(tmp_path):
    folder = corpus(tmp_path, valid_de="a\n", valid_en="b\n")
    rc, out, err = run_cli("data", "check", str(folder))
    assert rc == 1 and "no train split" in out + err
    (folder / "train.de").write_text("a\n")
    (folder / "train.en").mkdir()
    from ktransfer.data.corpora import CorpusError, read_split

    with pytest.raises(CorpusError, match=r"train.en: is a folder, not a text file"):
        read_split(folder, "train", "de", "en")


def test_the_fallback_hint_names_only_a_checkpoint_of_the_same_run(tmp_path):
    from ktransfer.models.checkpoint import CheckpointError, load_checkpoint

    tiny_checkpoint(tmp_path / "unrelated")  # another model, beside the one given
    tiny_checkpoint(tmp_path / "run/checkpoints/best")
    for broken in (tmp_path / "broken", tmp_path / "run/checkpoints/last"):
        broken.mkdir(parents=True)
        (broken / "training_state.json").write_text("{")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "broken")
    assert "unrelated" not in str(info.value) and "no other intact checkpoint" in str(info.value)
    with pytest.raises(CheckpointError, match=r"checkpoints/best is intact: use it instead"):
        load_checkpoint(tmp_path / "run/checkpoints/last")  # a checkpoint of the same run is still named


def tiny_checkpoint(path: Path, n_embd: int = 16, step: int = 1):
    from transformers import GPT2Config, GPT2LMHeadModel

    from ktransfer.models.checkpoint import save_checkpoint
    from ktransfer.models.tokenizer import train_tokenizer

    tok = train_tokenizer(["ein haus", "a house"] * 5, vocab_size=40)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=n_embd, n_head=2, vocab_size=tok.vocab_size, n_positions=16))
    return save_checkpoint(path, model=model, tokenizer=tok, config={}, train_state={"step": step})


# --- writes: a full disk, two writers ---------------------------------------------------------------------------------
def small_filesystem(path: Path, size: str = "2m") -> bool:
    """Mount a tmpfs of ``size`` at ``path`` (needs root and mount permission); False where that is not allowed."""
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from ktransfer.models.checkpoint import load_checkpoint, save_checkpoint
    from ktransfer.models.tokenizer import train_tokenizer

    tok = train_tokenizer(["ein haus", "a house"] * 5, vocab_size=40)
    small = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=tok.vocab_size, n_positions=16))
    big = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=256, n_head=2, vocab_size=tok.vocab_size, n_positions=16))
    mounted = small_filesystem(tmp_path / "disk")
    try:
        path = tmp_path / "disk/run/checkpoints/last"
        save_checkpoint(path, model=small, tokenizer=tok, config={}, train_state={"step": 1})
        if not mounted:  # no small filesystem here: safetensors' writer reports a full disk as it would
            import safetensors

            def full(*a, **k):
                raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                                  'StorageFull, message: "No space left on device" })')

            monkeypatch.setattr("safetensors.torch.save_file", full)
        with pytest.raises(OSError) as info:  # ~6 MB of weights on a 2 MB disk
            save_checkpoint(path, model=big, tokenizer=tok, config={}, train_state={"step": 2})
        assert info.value.filename == str(path) and "No space left on device" in info.value.strerror
        assert load_checkpoint(path).train_state["step"] == 1  # the previous one, whole
        assert [p.name for p in path.parent.iterdir()] == ["last"]  # no half-written temporary left
    finally:
        if mounted:
            subprocess.run(["umount", str(tmp_path / "disk")], check=False)


def test_a_write_error_in_training_is_one_line_naming_the_path(tmp_path, shared_data, monkeypatch, capsys):
    """A read-only run folder (simulated: every append to its files fails with EROFS) ends with rc 1, one line."""
    import errno

    from ktransfer.cli import main

    real_open, real_os_open = open, os.open

    def read_only(file, mode="r", *args, **kwargs):
        if "a" in mode and str(file).startswith(str(tmp_path / "run")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(file, mode, *args, **kwargs)

    def read_only_fd(path, flags, *args, **kwargs):  # ktransfer's own appends go through os.open (O_NOFOLLOW)
        if flags & os.O_APPEND and str(path).startswith(str(tmp_path / "run")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    monkeypatch.setattr("os.open", read_only_fd)
    rc = main(["train", f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=50",
               "data.vocab_size=200",
               "model.preset=tiny", f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 1 and f"ktransfer train: error: {tmp_path / 'run' / 'train.log'}: Read-only file system" in err
    assert "Traceback" not in err


def test_a_second_writer_is_refused_naming_the_pid(tmp_path):
    from ktransfer.runtime import runlock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ktransfer.runtime import runlock; "
                               "runlock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "run")], env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunFolderBusy, match=rf"being written by PID {holder.pid} "):
            runlock.acquire(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    runlock.acquire(tmp_path / "run")  # the OS released the dead holder's lock
    runlock.release(tmp_path / "run")


@pytest.mark.parametrize("left", ["", "the PID of a finished process"])
def test_the_pid_is_named_when_the_holder_writes_it_just_after_locking(tmp_path, left):
    """The race CI hit: the loser reads the lock file between the winner's flock and its PID write, when the file is
    still empty or still holds the PID an earlier, finished holder left there."""
    import fcntl
    import threading

    from ktransfer.runtime import runlock

    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / runlock.LOCK_NAME
    if left:
        finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True, check=True)
        lock.write_text(finished.stdout)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # a second open file description: flock conflicts in-process
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    def write_pid():  # as a holder does, with a live PID
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    late = threading.Timer(0.3, write_pid)
    late.start()
    try:
        with pytest.raises(runlock.RunFolderBusy, match=rf"being written by PID {os.getpid()} "):
            runlock.acquire(tmp_path / "run")
        os.ftruncate(fd, 0)  # a holder that never writes its PID: named as another process once the wait ends
        with pytest.raises(runlock.RunFolderBusy, match=r"being written by another process "):
            runlock.acquire(tmp_path / "run")
    finally:
        late.join()
        os.close(fd)


def test_two_trainings_into_one_folder(tmp_path, shared_data):
    """Two identical commands at once: one trains, the other stops at once naming the first one's PID."""
    args = ["train", f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=100",
            "data.vocab_size=200",
            "data.max_eval_samples=10", "model.preset=tiny", "eval.max_length=8", "train.num_threads=1",
            f"train.out_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-m", "ktransfer", *args], env=env, cwd=REPO_ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]  # reads both pipes while waiting: none can fill and block
    results = [(p.pid, p.returncode, err) for p, (_, err) in zip(procs, outputs, strict=True)]
    codes = sorted(rc for _, rc, _ in results)
    assert codes == [0, 1], results
    (winner, *_), (_, _, err) = sorted(results, key=lambda r: r[1])
    assert f"being written by PID {winner}" in err and "Traceback" not in err


# --- ten kills at random moments, then resume ---------------------------------------------------------------------
@pytest.mark.slow
def test_ten_kills_at_random_moments_then_resume_bit_identical(shared_data, tmp_path):
    """SIGKILL a training ten times (every third kill inside a save: a temporary folder present), resume each time;
    the final model and optimizer equal an uninterrupted run's bit for bit (tests/training/test_train.py kills once)."""
    import random

    import safetensors.torch

    from ktransfer.training.config import load_config
    from ktransfer.training.train import train

    args = [f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=300", "data.max_eval_samples=10",
            "data.vocab_size=300", "data.max_tokens=200", "model.preset=tiny", "model.dropout=0.3",
            "eval.max_length=8", "train.num_threads=1", "train.seed=5", "train.epochs=2", "train.save_every=1",
            "train.log_every=1"]
    run, rng, kills, step = tmp_path / "killed", random.Random(18), 0, -1
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    while kills < 10:
        proc = subprocess.Popen([sys.executable, "-m", "ktransfer", "train", *args, f"train.out_dir={run}"],
                                env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # progress past the last kill's step
            state = _last_state(run)
            if state is not None and state["step"] > step:
                break
            time.sleep(0.005)
        if kills % 3 == 0:  # inside a save
            while proc.poll() is None and not list((run / "checkpoints").glob(".last.tmp-*")):
                pass
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        rc = proc.wait(30)
        assert rc == -signal.SIGKILL, f"the training ended before kill {kills + 1}: {proc.stderr.read()}"
        kills += 1
        step = (_last_state(run) or {"step": step})["step"]
    done = subprocess.run([sys.executable, "-m", "ktransfer", "train", *args, f"train.out_dir={run}"], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    train(load_config(None, [*args, f"train.out_dir={tmp_path / 'reference'}"]))
    for file in ("model.safetensors", "optimizer.safetensors"):
        a = safetensors.torch.load_file(run / "checkpoints/last" / file)
        b = safetensors.torch.load_file(tmp_path / "reference/checkpoints/last" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def _last_state(run: Path) -> dict | None:
    try:
        return json.loads((run / "checkpoints/last/training_state.json").read_text())["train_state"]
    except (OSError, ValueError, KeyError):
        return None


# --- writes never follow a link out of a run or output folder ---------------------------------------------------------
@pytest.mark.parametrize("entry", [".lock", "train.log", "metrics.jsonl", "tokenizer"])
def test_links_inside_a_run_folder_are_refused_and_nothing_outside_changes(tmp_path, shared_data, entry):
    """``RUN/ENTRY`` made a link to a file (or folder) elsewhere: ``ktransfer train RUN`` stops with one line naming
    the link, and the outside target keeps its content (the old code truncated .lock and metrics.jsonl there and
    overwrote an outside tokenizer.json)."""
    outside, run = tmp_path / "outside", tmp_path / "run"
    outside.mkdir()
    run.mkdir()
    if entry == "tokenizer":
        (outside / "tokenizer.json").write_text("precious\n")
        target = outside
    else:
        target = outside / "precious.txt"
        target.write_text("line one\nline two\n")
    (run / entry).symlink_to(target)
    before = {p: p.read_bytes() for p in outside.iterdir()}
    rc, _, err = run_cli("train", f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=40",
                         "data.vocab_size=200", "data.max_eval_samples=5", "model.preset=tiny", "eval.max_length=4",
                         "train.num_threads=1", "train.epochs=1", f"train.out_dir={run}", timeout=300)
    assert rc != 0 and f"{run / entry}: is a symbolic link" in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in outside.iterdir()} == before


def test_a_linked_checkpoints_folder_is_refused(tmp_path, small_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from ktransfer.models.checkpoint import save_checkpoint

    outside = tmp_path / "outside"
    (outside / "last").mkdir(parents=True)
    (outside / "last/config.json").write_text("precious\n")
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=small_tokenizer.vocab_size))
    for link, target in (("run/checkpoints", outside), ("run2/checkpoints/last", outside / "last")):
        (tmp_path / link).parent.mkdir(parents=True)
        (tmp_path / link).symlink_to(target)
        with pytest.raises(OSError, match="is a symbolic link") as info:
            save_checkpoint(tmp_path / link.replace("/last", "") / "last", model=model, tokenizer=small_tokenizer,
                            config={}, train_state={"step": 1})
        assert info.value.filename == str(tmp_path / link)
    assert sorted(p.name for p in outside.rglob("*")) == ["config.json", "last"]
    assert (outside / "last/config.json").read_text() == "precious\n"


def test_evaluate_and_distill_outputs_refuse_links(tmp_path):
    from ktransfer.evaluation import evaluate as evaluate_module
    from ktransfer.runtime import nofollow

    outside = tmp_path / "outside.txt"
    outside.write_text("keep\n")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "scores.test.json").symlink_to(outside)
    with pytest.raises(OSError, match="is a symbolic link") as info:
        evaluate_module._write_text(out / "scores.test.json", "{}")
    assert info.value.filename == str(out / "scores.test.json") and outside.read_text() == "keep\n"
    (out / ".hyp.tmp").symlink_to(outside)  # a planted temporary name: O_EXCL | O_NOFOLLOW refuses it
    with pytest.raises(OSError, match="is a symbolic link"):
        nofollow.write_new(out / ".hyp.tmp", "x")
    with pytest.raises(OSError, match="is a symbolic link"):
        nofollow.append_text(out / ".hyp.tmp", "x")
    assert outside.read_text() == "keep\n"


def test_a_corrupt_metrics_line_on_resume_names_file_and_line(tmp_path):
    from ktransfer.runtime.runlog import kept_records

    file = tmp_path / "metrics.jsonl"
    file.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st\n{"kind": "valid"}\n')
    assert [r for _, r in kept_records(file, 1)] == [{"kind": "train", "step": 1}]
    with pytest.raises(ValueError, match=rf"{file}:2: not a JSON object"):
        kept_records(file, 3)


# --- remote code: only from this command line ---------------------------------------------------------------------
def test_a_config_file_cannot_turn_on_remote_code(tmp_path, shared_data, monkeypatch):
    """The issue's case: ``model.trust_remote_code: true`` and an ``auto_map`` teacher written into
    ``RUN/config.yaml``; ``ktransfer train RUN`` ran the folder's code. Now refused (rc 2, naming FILE:LINE and how
    to allow it), for a run folder and for a YAML given as the config; the code never runs."""
    from ktransfer.training.config import ConfigError, load_config, save_config

    folder, marker = evil_folder(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    yaml_text = (f"data:\n  corpus: {shared_data / 'multi30k-de-en'}\n  max_train_samples: 40\n"
                 f"model:\n  teacher: {folder}\n"
                 "  trust_remote_code: true\nobjective:\n  kind: kd\n")
    (run / "config.yaml").write_text(yaml_text)
    (tmp_path / "shared.yaml").write_text(yaml_text)
    for items in ([str(run)], [str(tmp_path / "shared.yaml"), f"train.out_dir={tmp_path / 'run2'}"]):
        rc, _, err = run_cli("train", *items, stdin="y\ny\n", timeout=300)
        assert rc == 2 and not marker.exists(), err
        assert ".yaml:6: model.trust_remote_code: True is refused in a config file" in err, err
        assert "model.trust_remote_code=true" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="refused in a config file"):
        load_config(tmp_path / "shared.yaml", ["model.trust_remote_code=true"])  # the file's value is refused
    assert load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code  # the command line may
    monkeypatch.setenv("KTRANSFER_TRUST_REMOTE_CODE", "1")
    cfg = load_config(None, [])
    assert cfg.model.trust_remote_code  # and the environment
    save_config(cfg, tmp_path / "saved.yaml")  # never saved on: a resumed run asks again
    monkeypatch.delenv("KTRANSFER_TRUST_REMOTE_CODE")
    assert not load_config(tmp_path / "saved.yaml", []).model.trust_remote_code
    assert not marker.exists()
