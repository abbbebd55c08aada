"""Hostile inputs, second battery (issue 30): files a user may be handed (model folders, adapters, weights, configs,
tokenizers, corpora) built in ``tmp_path`` to attack or confuse ktransfer; each ends in one line naming the file,
never in code running, a pickle opened, random weights used, or a memory bomb going off.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 180, env: dict | None = None, stdin: str = ""):
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "ktransfer", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO_ROOT)
    return proc.returncode, proc.stdout, proc.stderr


class Payload:
    """Unpickling this object writes ``marker`` (what a malicious pickle does with any code it likes)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def evil_pickle(file: Path, marker: Path) -> None:
    file.write_bytes(pickle.dumps(Payload(marker)))


def tiny_gpt2(folder: Path, *, vocab: int = 50, tok=None):
    """A 1-layer GPT-2 of 32 positions saved to ``folder`` (with ``tok``'s vocabulary, special ids and files)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ids = {"bos_token_id": 0, "eos_token_id": 0} if tok is None else {
        "bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32,
                                       vocab_size=vocab if tok is None else tok.vocab_size, **ids))
    model.save_pretrained(folder)
    if tok is not None:
        tok.save(folder)
    return model


# --- no pickle on any path ----------------------------------------------------------------------------------------
def test_the_payload_is_live(tmp_path):
    """The fixture really runs code when unpickled (so the tests below that it never does mean something)."""
    evil_pickle(tmp_path / "x.bin", tmp_path / "marker")
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))",
                    str(tmp_path / "x.bin")], capture_output=True, timeout=60)
    assert (tmp_path / "marker").exists()


def lora_folder_with_pickle(tmp_path: Path) -> tuple[Path, Path]:
    tiny_gpt2(tmp_path / "base")
    folder, marker = tmp_path / "adapters", tmp_path / "marker"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"],
        "base_model_name_or_path": str(tmp_path / "base")}))
    evil_pickle(folder / "adapter_model.bin", marker)
    return folder, marker


def test_adapter_pickle_is_refused_before_any_unpickler(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from ktransfer.models.family import load_model

    folder, marker = lora_folder_with_pickle(tmp_path)
    opened = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: opened.append(a))
    with pytest.raises(ValueError, match=r"adapter_model.bin: LoRA adapters as a pickle .*adapter_model.safetensors "
                                         r"only.*safe_serialization=True"):
        load_model(folder)
    assert opened == [] and not marker.exists()


def test_adapter_pickle_through_the_cli_is_one_line(tmp_path):
    pytest.importorskip("peft")
    folder, marker = lora_folder_with_pickle(tmp_path)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"prompt": "a b", "completion": "c d"}) + "\n")
    rc, _, err = run_cli("evaluate", str(folder), "--corpus", str(corpus))
    assert rc == 2 and "adapter_model.bin" in err and "Traceback" not in err and not marker.exists(), err
    assert len(err.strip().splitlines()) == 1, err


# --- weights: strict, headers checked ------------------------------------------------------------------------------
def test_a_file_missing_tensors_is_an_error_naming_them(tmp_path):
    import safetensors.torch

    from ktransfer.models.family import load_model

    tiny_gpt2(tmp_path / "m")
    file = tmp_path / "m/model.safetensors"
    tensors = safetensors.torch.load_file(file)
    kept = {k: v for k, v in tensors.items() if ".h.0.mlp." not in k}
    safetensors.torch.save_file(kept, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack 4 tensor\(s\) the model needs \(transformer.h.0.mlp.c_fc.bias, "
                                         r"transformer.h.0.mlp.c_fc.weight"):
        load_model(tmp_path / "m")
    safetensors.torch.save_file({**tensors, "extra.weight": torch.zeros(2)}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"hold 1 tensor\(s\) the model has no place for \(extra.weight\)"):
        load_model(tmp_path / "m")
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    model, _ = load_model(tmp_path / "m")  # whole again: loads, the tied head included
    assert torch.equal(model.lm_head.weight, tensors["transformer.wte.weight"])


def header_file(file: Path, header: bytes, data: bytes = b"", length: int | None = None) -> None:
    file.write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize("case, message", [
    ("empty", r"holds no tensors \(empty safetensors header\)"),
    ("huge", r"broken safetensors header \(says 18,446,744,073,709,551,615 bytes"),
    ("truncated", r"truncated safetensors file \(header of 4,096 bytes"),
    ("short", r"not a safetensors file \(truncated: 3 bytes\)"),
    ("not json", r"broken safetensors header \(not JSON"),
    ("bad offsets", r"tensor 'transformer.wte.weight': byte offsets \[0, 99999999\] outside the file"),
    ("wrong size", r"tensor 'transformer.wte.weight': byte offsets \[0, 8\] do not fit shape \[50, 16\] of F32"),
])
def test_broken_safetensors_headers_name_the_file(tmp_path, case, message):
    """Each, through the CLI: rc 2, one line naming the weights file (safetensors alone names no path)."""
    tiny_gpt2(tmp_path / "m")
    file = tmp_path / "m/model.safetensors"
    entry = lambda end: json.dumps({"transformer.wte.weight": {"dtype": "F32", "shape": [50, 16],  # noqa: E731
                                                               "data_offsets": [0, end]}}).encode()
    if case == "empty":
        header_file(file, b"{}")
    elif case == "huge":
        header_file(file, b"{}", length=2**64 - 1)
    elif case == "truncated":
        header_file(file, b"{", length=4096)
    elif case == "short":
        file.write_bytes(b"abc")
    elif case == "not json":
        header_file(file, b"\xff{not json")
    elif case == "bad offsets":
        header_file(file, entry(99999999), b"\0" * 3200)
    else:
        header_file(file, entry(8), b"\0" * 8)
    from ktransfer.models.family import load_model

    with pytest.raises(ValueError, match=rf"{file}: {message}"):
        load_model(tmp_path / "m")
    if case == "empty":  # the whole command: one line, rc 2
        rc, _, err = run_cli("translate", str(tmp_path / "m"), stdin="a b\n")
        assert rc == 2 and f"{file}: holds no tensors" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


# --- model configs: checked before allocation ---------------------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("n_layer", 10**6, r"n_layer = 1,000,000: beyond any real model \(at most 4,096 accepted\)"),
    ("vocab_size", 10**9, r"vocab_size = 1,000,000,000: beyond any real model"),
    ("n_embd", 10**6, r"n_embd = 1,000,000: beyond any real model"),
    ("n_embd", 65536, r"vocab_size = 50, n_embd = 65536, n_layer = 1 imply at least 192.0 GiB of weights, more than"),
    ("n_layer", -1, r"n_layer = -1: a size must be a positive integer"),
    ("n_embd", 16.5, r"n_embd = 16.5: a size must be a positive integer"),
    ("n_head", "2", r"n_head = '2': a size must be a positive integer"),
])
def test_absurd_config_sizes_are_refused_before_allocation(tmp_path, monkeypatch, key, value, message):
    from ktransfer.models.family import load_model

    tiny_gpt2(tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps({**config, key: value}))
    monkeypatch.setenv("KTRANSFER_MAX_MODEL_BYTES", str(32 * 2**30))
    allocated = []
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a, **k: allocated.append(a))  # nothing built
    with pytest.raises(ValueError, match=rf"{tmp_path / 'm' / 'config.json'}: {message}"):
        load_model(tmp_path / "m")
    assert allocated == []


def test_the_memory_limit_is_the_available_memory_or_the_variable(tmp_path, monkeypatch):
    from ktransfer.models import sizes

    monkeypatch.delenv("KTRANSFER_MAX_MODEL_BYTES", raising=False)
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < sizes.available_bytes() <= total
    config = {"vocab_size": 1000, "n_embd": 64, "n_layer": 2}  # 1000*64 + 2*(4*64^2 + 2*64*256) weights
    assert sizes.estimate_parameters(config) == 162_304
    monkeypatch.setenv("KTRANSFER_MAX_MODEL_BYTES", str(4 * 162_304))
    sizes.check_config(config, "c.json")
    monkeypatch.setenv("KTRANSFER_MAX_MODEL_BYTES", str(4 * 162_304 - 1))
    with pytest.raises(ValueError, match="c.json: vocab_size = 1000, n_embd = 64, n_layer = 2 imply"):
        sizes.check_config(config, "c.json")


# --- JSON files inside a model folder -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, body, message", [
    ("tokenizer.json", '{"version": "1.0", "truncation": null', r"tokenizer.json: cannot read it as JSON \(Expecting"),
    ("tokenizer.json", '{"version": "1.0", "model": {"type": "BPE"}}', r"tokenizer.json: not a valid tokenizer \(no "
                                                                       r"'added_tokens'\)"),
    ("tokenizer.json", '{"added_tokens": [], "model": {"type": "Nope"}}', r"tokenizer.json: not a valid tokenizer"),
    ("config.json", "[" * 100_000 + "]" * 100_000, r"config.json: cannot read it as JSON \(nested too deeply\)"),
    ("config.json", '{"n_layer": ' + "9" * 100_000 + "}", r"config.json: cannot read it as JSON \(Exceeds the limit"),
])
def test_malformed_json_in_a_model_folder_names_the_file(tmp_path, small_tokenizer, name, body, message):
    from ktransfer.models.family import load_model

    tiny_gpt2(tmp_path / "m", tok=small_tokenizer)
    (tmp_path / "m" / name).write_text(body)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'm'}/{message}"):
        load_model(tmp_path / "m")


# --- no silent result from nothing ----------------------------------------------------------------------------------
def test_evaluate_with_no_usable_example_is_an_error(tmp_path, small_tokenizer, capsys):
    """Every example longer than the model's 32 positions: the old code printed "0 examples, NLL 0.0000, perplexity
    1.00" with rc 0."""
    from ktransfer.cli import main

    tiny_gpt2(tmp_path / "m", tok=small_tokenizer)
    data = tmp_path / "long.jsonl"
    long = " ".join(["a man rides a horse"] * 20)
    data.write_text("".join(json.dumps({"prompt": long, "completion": long}) + "\n" for _ in range(3)))
    rc = main(["evaluate", str(tmp_path / "m"), "--corpus", str(data), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable example among 3: each is empty or longer than the model's 32 positions" in err
    assert not (tmp_path / "eval").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["evaluate", "translate", "distill-data"])
def test_cuda_without_cuda_is_one_line(tmp_path, small_tokenizer, capsys, command):
    from ktransfer.cli import main

    tiny_gpt2(tmp_path / "m", tok=small_tokenizer)
    (tmp_path / "src.txt").write_text("a b\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a b", "completion": "c d"}) + "\n")
    extra = {"evaluate": ["--src", str(tmp_path / "src.txt"), "--ref", str(tmp_path / "src.txt")], "translate": [],
             "distill-data": ["--out", str(tmp_path / "out"), "--corpus", str(tmp_path / "d.jsonl")]}[command]
    capsys.readouterr()
    rc = main([command, str(tmp_path / "m"), "--device", "cuda", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "'cuda' requested but CUDA is not available on this machine" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# --- clean failures: nothing left behind, one line for the loser of a race ------------------------------------------
def train_args(tmp_path: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    corpus = tmp_path / "short.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"a man {i}", "completion": "rides a horse"}) + "\n"
                              for i in range(20)))
    return ["train", f"data.corpus={corpus}", "data.max_length=24",
            "objective.kind=kd", "objective.top_k=4", f"model.teacher={teacher}", "model.preset=gpt2-tiny",
            "eval.max_length=4", "train.num_threads=1", "train.epochs=1", "train.max_steps=1", f"train.out_dir={out}",
            *extra]


@pytest.mark.parametrize("case", ["weights are a folder", "bad tokenizer.json"])
def test_a_setup_failure_leaves_no_folder(tmp_path, small_tokenizer, capsys, case):
    """A teacher that fails to load after the run folder was made: the old code left ``new/deeper/run`` (config.yaml,
    train.log, metrics.jsonl, .lock) for an OSError, and the parent folders it made for any error."""
    from ktransfer.cli import main

    tiny_gpt2(tmp_path / "teacher", tok=small_tokenizer)
    if case == "weights are a folder":
        (tmp_path / "teacher/model.safetensors").unlink()
        (tmp_path / "teacher/model.safetensors").mkdir()
    else:
        (tmp_path / "teacher/tokenizer.json").write_text('{"added_tokens": [], "model": {"type": "Nope"}}')
    capsys.readouterr()
    rc = main(train_args(tmp_path, tmp_path / "teacher", tmp_path / "new/deeper/run"))
    err = capsys.readouterr().err
    assert rc in (1, 2) and str(tmp_path / "teacher") in err and "Traceback" not in err, err
    assert not (tmp_path / "new").exists(), sorted(tmp_path.rglob("new/**/*"))


@contextlib.contextmanager
def lock_held_elsewhere(lock: Path):
    """Another live process holding ``lock`` as ktransfer's builders do (``fcntl.flock`` and its PID inside)."""
    code = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, f'{os.getpid()}\\n'.encode())\nprint('held', flush=True)\n"
            "time.sleep(600)\n")
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def dead_pid() -> int:
    """The PID of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_exports_leftover_goes_and_a_second_export_is_refused(tmp_path, small_tokenizer, capsys):
    from ktransfer.cli import main

    tiny_gpt2(tmp_path / "m", tok=small_tokenizer)
    out = tmp_path / "published"
    dead, live = tmp_path / f".published.tmp-{dead_pid()}-x1", tmp_path / f".published.tmp-{os.getppid()}-x2"
    for leftover in (dead, live):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half")
    with lock_held_elsewhere(tmp_path / ".published.lock") as pid:  # an export into `out` still running
        capsys.readouterr()
        assert main(["export", str(tmp_path / "m"), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"{out} is being exported by PID {pid}" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and dead.exists()
    assert main(["export", str(tmp_path / "m"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not dead.exists() and live.exists()  # a live PID's is kept
    assert not (tmp_path / ".published.lock").exists()


def test_a_second_distill_data_into_one_out_is_one_line(tmp_path, small_tokenizer, capsys):
    """The old loser said "[Errno 2] No such file ... .tmp" (both wrote the same temporary names)."""
    from ktransfer.cli import main

    tiny_gpt2(tmp_path / "m", tok=small_tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a man", "completion": "rides"}) + "\n" for _ in range(3)))
    out = tmp_path / "seqkd"
    args = ["distill-data", str(tmp_path / "m"), "--corpus", str(data), "--out", str(out), "--beam", "1",
            "--max-length", "4", "--no-progress"]
    with lock_held_elsewhere(tmp_path / ".seqkd.lock") as pid:
        capsys.readouterr()
        assert main(args) == 1
        err = capsys.readouterr().err
        assert f"{out} is being made by PID {pid} (another distill-data into this --out)" in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists() and not (tmp_path / ".seqkd.partial").exists()
    assert main(args) == 0 and (out / "train.jsonl").is_file() and not (tmp_path / ".seqkd.lock").exists()


def test_two_trainings_building_one_teacher_cache(tmp_path, small_tokenizer, capsys):
    """The loser names the builder and leaves neither its run folder nor a temporary cache folder (the old code said
    "Directory not empty" after its own teacher pass and left both); a killed build's ``.CACHE.tmp-PID`` is removed
    by the next build."""
    from ktransfer.cli import main

    tiny_gpt2(tmp_path / "teacher", tok=small_tokenizer)
    cache = tmp_path / "cache"
    with lock_held_elsewhere(tmp_path / ".cache.lock") as pid:
        capsys.readouterr()
        rc = main(train_args(tmp_path, tmp_path / "teacher", tmp_path / "run1", f"train.teacher_cache={cache}"))
        err = capsys.readouterr().err
        assert rc == 1 and f"{cache} is being built by PID {pid} (another training with this teacher cache)" in err, err
        assert "Traceback" not in err and not (tmp_path / "run1").exists(), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "short.jsonl", "teacher"]  # the holder's
    killed = tmp_path / f".cache.tmp-{dead_pid()}"
    killed.mkdir()
    (killed / "shard-00000.safetensors").write_bytes(b"half")
    rc = main(train_args(tmp_path, tmp_path / "teacher", tmp_path / "run2", f"train.teacher_cache={cache}"))
    assert rc == 0 and (cache / "manifest.json").is_file() and not killed.exists(), capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run2", "short.jsonl", "teacher"]
    assert f"removed {killed.name} (left by killed builds)" in (tmp_path / "run2/train.log").read_text()


# --- records: size limit and lone surrogates, the same answer from `data check` and `train` -------------------------
@pytest.mark.parametrize("case", ["huge line", "huge chat turn", "lone surrogate"])
def test_bad_records_are_refused_at_file_line_by_check_and_train(tmp_path, monkeypatch, capsys, case):
    """The old code: a 50 MB line went to the tokenizer (8 GB); ``"\\ud800"`` passed ``data check`` and crashed
    ``train``. Now both refuse the record at FILE:LINE before any tokenizer runs (a 2 kB limit stands in for 1 MB)."""
    from ktransfer.cli import main
    from ktransfer.data import formats, limits

    assert limits.max_record_bytes() == limits.MAX_RECORD_BYTES == 1_000_000
    monkeypatch.setenv("KTRANSFER_MAX_RECORD_BYTES", "2000")
    data = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "a man", "completion": "rides a horse"})
    if case == "huge line":
        bad, message = json.dumps({"prompt": "a " * 7000, "completion": "b"}), "a line of 14,0"
    elif case == "huge chat turn":  # escapes keep the line short: the record's text is measured
        bad = json.dumps({"messages": [{"role": "user", "content": "\u00e9" * 700},
                                       {"role": "assistant", "content": "\u00e9" * 700}]}, ensure_ascii=True)
        good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        message = "a record of 2,800 bytes of text, over the limit of 2,000 bytes per record"
    else:
        bad, message = '{"prompt": "a \\ud800 b", "completion": "c"}', "the prompt holds a lone surrogate escape"
    data.write_text(good + "\n" + good + "\n" + bad + "\n")
    tokenized = []
    monkeypatch.setattr(formats, "to_pairs", lambda *a, **k: tokenized.append(a))
    for args in (["data", "check", str(data)], ["train", f"data.corpus={data}", "model.preset=gpt2-tiny",
                                                   f"train.out_dir={tmp_path / 'run'}"]):
        capsys.readouterr()
        rc = main(args)
        out, err = capsys.readouterr()
        assert rc in (1, 2) and f"{data}:3: {message}" in out + err and "Traceback" not in err, (args, out, err)
    assert tokenized == [] and not (tmp_path / "run").exists()


# --- chat templates: errors and endless loops are one line naming the record ---------------------------------------
@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('no system turns here') }}", r"failed \(TemplateError: no system turns here\)"),
    ("{% for m in messages %}{{ m['content'] }", r"failed \(TemplateSyntaxError: "),
    ("{{ messages.append(1) }}", r"failed \(SecurityError: access to attribute 'append' of 'list' object is unsafe"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
     r"ran for more than 2 s on one conversation \(a loop that does not end\?\)"),
])
def test_a_bad_chat_template_is_one_line(tmp_path, small_tokenizer, monkeypatch, capsys, template, message):
    """The old code: a traceback for the first three, and training hung on the fourth."""
    import re

    from ktransfer.cli import main

    monkeypatch.setenv("KTRANSFER_TEMPLATE_SECONDS", "2")
    folder = tmp_path / "tok"
    small_tokenizer.save(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "a man"},
                                                     {"role": "assistant", "content": "rides"}]}) + "\n"
                            for _ in range(4)))
    capsys.readouterr()
    rc = main(["train", f"data.corpus={data}", f"data.tokenizer={folder}", "model.preset=gpt2-tiny",
               f"train.out_dir={tmp_path / 'run'}", "train.num_threads=1"])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(rf"the chat template of {folder} {message}", err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 4 and not (tmp_path / "run").exists(), err


# --- one line for the rest of issue 30's inputs ---------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("missing arrow", r"FileNotFoundError: .*No such file or directory: .*data-00000-of-00001.arrow"),
    ("truncated arrow", r"ArrowInvalid: Expected to read \d+ metadata bytes"),
    ("bad state.json", r"JSONDecodeError: Expecting property name"),
])
def test_a_broken_datasets_folder_is_one_line(tmp_path, capsys, case, message):
    """The old code: "Expecting property name ..." or "Expected to read 344 metadata bytes" with no path, rc 1 for the
    missing file; ``data check`` and ``train`` now both name the folder."""
    import re

    from datasets import Dataset

    from ktransfer.cli import main

    folder = tmp_path / "ds"
    Dataset.from_list([{"prompt": "a man", "completion": "rides"}] * 5).save_to_disk(str(folder))
    (arrow,) = folder.glob("*.arrow")
    if case == "missing arrow":
        arrow.unlink()
    elif case == "truncated arrow":
        arrow.write_bytes(arrow.read_bytes()[:100])
    else:
        (folder / "state.json").write_text("{bad")
    for args in (["data", "check", str(folder)], ["train", f"data.corpus={folder}", "model.preset=gpt2-tiny",
                                                     f"train.out_dir={tmp_path / 'run'}"]):
        capsys.readouterr()
        rc = main(args)
        out, err = capsys.readouterr()
        found = re.search(rf"{folder}: a broken datasets folder \(.*{message}", out + err)
        assert rc == (1 if args[0] == "data" else 2) and found, (out, err)  # data check: rc 1 for bad data
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, message", [
    ("objective.top_k=100000", "objective.top_k: 100000 is larger than the vocabulary (2,000 ids"),
    ("objective.temperature=1e-30", "objective.temperature: 1e-30 divides the logits into overflow"),
])
def test_loss_settings_the_vocabulary_or_float32_rule_out(tmp_path, small_tokenizer, capsys, setting, message):
    """The old code: "top_k must be ... in [1, V=2000]" and "every logit is -inf" from the first training step, with
    no key named and the run folder left."""
    from ktransfer.cli import main

    tiny_gpt2(tmp_path / "teacher", tok=small_tokenizer)
    capsys.readouterr()
    rc = main(train_args(tmp_path, tmp_path / "teacher", tmp_path / "run", setting))
    err = capsys.readouterr().err
    assert rc == 2 and f"config error: {message}" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_translate_on_a_plain_causal_folder_says_what_it_is(tmp_path, small_tokenizer, monkeypatch, capsys):
    import io

    from ktransfer.cli import main

    tiny_gpt2(tmp_path / "m", tok=small_tokenizer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a man\n"))
    capsys.readouterr()
    assert main(["translate", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'm'} is a causal model that ktransfer did not train (its config.json has no " \
           "ktransfer_instruction" in err and "ktransfer generate" in err and len(err.strip().splitlines()) == 1, err


def test_export_onto_a_full_disk_names_the_path_and_leaves_nothing(tmp_path, small_tokenizer, monkeypatch, capsys):
    import errno

    import transformers.modeling_utils

    from ktransfer.cli import main

    tiny_gpt2(tmp_path / "m", tok=small_tokenizer)
    out = tmp_path / "published"

    def full(tensors, filename, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)  # what save_pretrained writes with
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/.published.tmp-" in err and "model.safetensors: No space left on device" in err, err
    assert len(err.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_evaluate_into_a_read_only_folder_names_the_path(tmp_path, small_tokenizer, monkeypatch, capsys):
    import errno

    from ktransfer.cli import main

    tiny_gpt2(tmp_path / "m", tok=small_tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a man", "completion": "rides"}) + "\n" for _ in range(2)))
    out = tmp_path / "eval"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *a, **k):  # what a read-only mount answers (root ignores chmod, so it is simulated)
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    capsys.readouterr()
    rc = main(["evaluate", str(tmp_path / "m"), "--corpus", str(data), "--out", str(out), "--max-length", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{out}/" in err and "Read-only file system" in err and "Traceback" not in err, err
    assert list(out.iterdir()) == []
