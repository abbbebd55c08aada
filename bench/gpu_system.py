"""Sections of ``bench/gpu.py`` beyond the losses: the CUDA tests, a training step, nccl and FSDP.

- ``tests``: pytest on the test files whose tests skip without CUDA (``skipif(not torch.cuda.is_available()``),
  ``-k cuda`` by default, in a subprocess limited to the section's budget.
- ``train``: one optimiser step of a small Llama learner (float32 weights, bf16 autocast) distilled from a bf16
  teacher: ``hf_loss`` (materialised logits) and ``fused_model_loss`` (fused head), against a plain PyTorch KD loss and
  TRL's ``generalized_jsd_loss(beta=0)``; every loss value is checked against the float64 value of the same logits.
- ``dist``: ``torch.distributed`` with one process (nccl on CUDA, gloo on a CPU), an all-reduce, and one FSDP2 step
  (``ktransfer.runtime.fsdp.shard``) compared with the same step unsharded.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_common import Options, failure_text, measure, rel_error, row, trl_jsd

from ktransfer.losses.fused_linear import fused_model_loss
from ktransfer.losses.hf_loss import hf_loss, shift_labels

REPO = Path(__file__).resolve().parents[1]
CUDA_SKIP = re.compile(r"skipif\(\s*not torch\.cuda\.is_available\(\)")
NOT_SCANNED = {"test_gpu_bench.py"}  # runs bench/gpu.py itself


def cuda_test_files(tests_dir: Path = REPO / "tests") -> list[str]:
    """Test files (relative to the repository) with a test that skips without CUDA."""
    return sorted(str(p.relative_to(tests_dir.parent)) for p in tests_dir.rglob("test_*.py")
                  if p.name not in NOT_SCANNED and CUDA_SKIP.search(p.read_text(encoding="utf-8")))


def pytest_summary(output: str) -> dict[str, int]:
    """Counts of pytest's last summary line ("3 failed, 11 passed, 2 skipped in 4.2s"): {"passed": 11, ...}."""
    counts = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found:
            for num, what in found:
                counts["error" if what.startswith("error") else what] = int(num)
            break
    return counts


def cuda_tests(opts: Options, emit) -> None:
    files = cuda_test_files()
    case = f"pytest -k {opts.pytest_k!r} {' '.join(files)}"
    if not files:
        emit(row("tests", "pytest", status="skipped", note="no test file skips without CUDA"))
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-k", opts.pytest_k, *files]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, opts.left() - 2))
    except subprocess.TimeoutExpired:
        emit(row("tests", case, status="timeout", note=f"pytest still running after {opts.left():.0f} s left"))
        return
    ms = 1e3 * (time.perf_counter() - t0)
    counts = pytest_summary(proc.stdout)
    failed = counts.get("failed", 0) + counts.get("error", 0)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or proc.stdout.strip()[-200:]
    if proc.returncode == 5:
        emit(row("tests", case, cells={"ktransfer": (ms, None)}, status="skipped", note=f"no test selected: {summary}"))
        return
    names = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))][:5]
    status = "FAIL" if failed or proc.returncode not in (0, 5) else "ok"
    if status == "ok" and not counts.get("passed"):
        status = "skipped"  # all skipped: no CUDA here
    emit(row("tests", case, cells={"ktransfer": (ms, None)}, status=status,
             note=summary + (f"; failing: {', '.join(names)}" if names else "")))


def tiny_llama(vocab: int, hidden: int, layers: int, seed: int, dtype=torch.float32):
    """A Llama causal LM built offline from a config (no download), deterministic weights from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=1024, tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(dtype)


def _kd_plain(z, u, labels):
    """Forward KL KL(q || p) per counted position (labels already shifted), written out in PyTorch; bf16/fp16 logits
    in float32, float64 logits in float64."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    logp, logq = F.log_softmax(z.to(dtype), -1), F.log_softmax(u.to(dtype), -1)
    per = (logq.exp() * (logq - logp)).sum(-1)
    mask = labels != -100
    return per[mask].sum() / mask.sum().clamp_min(1)


def train_step(opts: Options, emit) -> None:
    vocab, hidden, layers, batch, seq = (128, 32, 1, 2, 8) if opts.tiny else (32000, 512, 4, 4, 256)
    dev = opts.device
    learner = tiny_llama(vocab, hidden, layers, seed=0).to(dev)
    teacher = tiny_llama(vocab, 2 * hidden, layers, seed=1, dtype=torch.bfloat16).to(dev).eval()
    teacher.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(dev)
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-4)
    autocast = torch.autocast(torch.device(dev).type, dtype=torch.bfloat16)
    shifted = shift_labels(ids)
    checks: dict[str, tuple] = {}

    def loss_of(path):
        if path == "ktransfer fused":
            return fused_model_loss(learner, teacher, {"input_ids": ids}, shifted, objective="kd", lam=1.0).loss
        out = learner(input_ids=ids)
        with torch.no_grad():
            u = teacher(input_ids=ids).logits
        if path == "ktransfer":
            loss = hf_loss(out, u, ids, objective="kd", lam=1.0, model=learner).loss
        elif path == "plain":
            loss = _kd_plain(out.logits, u, shifted)
        else:
            loss = trl_jsd()(out.logits, u, labels=shifted, beta=0.0)
        checks.setdefault(path, (out.logits.detach(), u))  # the warm-up step's logits, whose loss is checked
        return loss

    def stepper(path):
        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_of(path)
            loss.backward()
            opt.step()
            return loss.detach(), None
        return step

    trl_missing = trl_jsd() if isinstance(trl_jsd(), str) else None
    cells, errors = {}, {}
    for path in ("ktransfer", "ktransfer fused", "plain", "TRL"):
        if path == "TRL" and trl_missing:
            cells[path] = trl_missing
            continue
        if opts.out_of_time():
            cells[path] = "skipped: budget"
            continue
        try:
            if path == "ktransfer fused":  # no logits to check inside the step: check the value first
                errors[path] = _fused_against_float64(learner, teacher, ids, shifted, autocast)
            (value, _), ms, mib = measure(stepper(path), dev, opts.repeats)
            cells[path] = (ms, mib)
            if path in checks:
                errors[path] = _against_float64(value, *checks.pop(path), shifted)
        except Exception as exc:
            cells[path] = failure_text(exc)
    fused = cells.pop("ktransfer fused", None)
    fused_err = errors.pop("ktransfer fused", None)
    case = f"train step kd Llama H={hidden} L={layers} V={vocab} [{batch}x{seq}], bf16 teacher, bf16 autocast"
    emit(row("train", case + " (hf_loss)", cells=cells, errors=errors, tol=1e-3,
             note="errors: each step's loss vs forward KL in float64 of that step's logits"))
    emit(row("train", case + " (fused head)", cells={"ktransfer": fused} if fused else {},
             errors={} if fused_err is None else {"ktransfer": fused_err}, tol=1e-3,
             note="fused_model_loss; error: its loss vs forward KL in float64 of the materialised logits"))


def _against_float64(value, z, u, shifted) -> float:
    """Relative error of a loss against forward KL in float64 of the logits it was computed from."""
    ref = _kd_plain(z.to("cpu", torch.float64), u.to("cpu", torch.float64), shifted.cpu())
    return rel_error(value, None, ref, None)


def _fused_against_float64(learner, teacher, ids, shifted, autocast) -> float:
    """``fused_model_loss`` (no gradient) against float64 forward KL of the materialised logits, same weights."""
    with torch.no_grad(), autocast:
        value = fused_model_loss(learner, teacher, {"input_ids": ids}, shifted, objective="kd", lam=1.0).loss
        z, u = learner(input_ids=ids).logits, teacher(input_ids=ids).logits
    return _against_float64(value, z, u, shifted)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed(opts: Options, emit) -> None:
    import torch.distributed as dist

    from ktransfer.runtime import fsdp

    cuda = opts.device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if not cuda:
        emit(row("dist", "nccl init (1 process)", status="skipped", note="no CUDA: gloo runs the same checks"))
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        x = torch.arange(4, dtype=torch.float32, device=opts.device)
        dist.all_reduce(x)
        dist.barrier()
        sync_ms = 1e3 * (time.perf_counter() - t0)
        err = float((x.cpu() - torch.arange(4.0)).abs().max())
        emit(row("dist", f"{backend} init + all_reduce + barrier (world 1, MASTER_ADDR=127.0.0.1)",
                 cells={"ktransfer": (sync_ms, None)}, errors={"ktransfer": err}, tol=0.0))
        if opts.out_of_time():
            emit(row("dist", "FSDP2 step", status="skipped", note="section budget spent"))
            return
        emit(fsdp_step(opts, fsdp))
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fsdp_step(opts: Options, fsdp) -> dict:
    """One AdamW step of a small Llama sharded with ``fsdp.shard`` against the same step unsharded: the loss and the
    largest weight difference after the step."""
    vocab, hidden, layers = (128, 32, 1) if opts.tiny else (32000, 512, 4)
    dev = opts.device
    model = tiny_llama(vocab, hidden, layers, seed=0).to(dev)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0)).to(dev)

    def step(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.detach()

    ref_loss = step(ref)
    fsdp.shard(model)
    t0 = time.perf_counter()
    loss = step(model)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0)
    full = fsdp.full_model_state(model)
    ref_state = ref.state_dict()
    diff = max(float((full[k].float().cpu() - ref_state[k].float().cpu()).abs().max()) for k in full)
    err = max(rel_error(loss, None, ref_loss, None), diff)
    return row("dist", f"FSDP2 step, Llama H={hidden} L={layers} V={vocab} (fsdp.shard, world 1)",
               cells={"ktransfer": (ms, None)}, errors={"ktransfer": err}, tol=1e-4,
               note="error: max(loss rel diff, max |weight diff| after one AdamW step) vs unsharded; "
                    "time includes the first (lazy-init) step")
