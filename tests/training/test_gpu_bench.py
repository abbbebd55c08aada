"""The CPU side of ``bench/gpu.py`` (the one-GPU check): arguments, the table, the correctness comparisons on CPU
tensors, the no-CUDA exit, a tiny dry run of every section, and Liger's Triton kernels under Triton's interpreter."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu  # noqa: E402  (bench/gpu.py)
import gpu_common  # noqa: E402
import gpu_losses  # noqa: E402
import gpu_system  # noqa: E402


def tiny(budget: float = 600) -> gpu_common.Options:
    return gpu_common.Options(device="cpu", tiny=True, repeats=1, deadline=time.time() + budget)


def test_arguments():
    a = gpu.parse_args([])
    assert (a.device, a.tiny, a.repeats, a.total_s, a.sections) == ("cuda", False, 3, gpu.TOTAL_S, list(gpu.SECTIONS))
    assert gpu.TOTAL_S + 10 < 480 and sum(gpu.BUDGET_S.values()) <= gpu.TOTAL_S  # under 8 minutes
    d = gpu.parse_args(["--dry-run", "--sections", "fused", "dist", "--out", "t.md"])
    assert (d.device, d.tiny, d.repeats, d.sections, d.out) == ("cpu", True, 1, ["fused", "dist"], Path("t.md"))
    assert d.total_s == gpu.TOTAL_S * gpu.CPU_SLOWDOWN and d.budget_scale == gpu.CPU_SLOWDOWN and a.budget_scale == 1
    assert gpu.parse_args(["--device", "cpu"]).tiny
    for bad in (["--sections", "nope"], ["--repeats", "0"], ["--device", "tpu"], ["--total-s", "-1"],
                ["--budget-scale", "0"]):
        with pytest.raises(SystemExit) as e:
            gpu.parse_args(bad)
        assert e.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_rc_0(capsys):
    assert gpu.main(["--out", "never-written.md"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out and not Path("never-written.md").exists()


def test_rows_and_table():
    ok = gpu_common.row("divergence", "jsd [8x9]", cells={"ktransfer": (2.0, 10.0), "ktransfer compiled": [1.0, None],
                                                         "TRL": "not installed"},
                        errors={"ktransfer": 1e-6, "TRL": 0.5}, tol=1e-4)
    assert ok["status"] == "ok"  # TRL's own error never fails a row
    bad = gpu_common.row("correctness", "tvd", errors={"ktransfer": 2e-4}, tol=1e-4)
    nan = gpu_common.row("correctness", "tvd", errors={"ktransfer compiled": math.nan}, tol=1e-4)
    assert bad["status"] == nan["status"] == "FAIL"
    assert gpu_common.row("train", "x", cells={"ktransfer": "skipped: budget"})["status"] == "skipped"
    meta = {"device": "NVIDIA Test (80 GiB)", "versions": {"torch": "2.13", "CUDA": "12.8"}, "date": "d",
            "command": "python bench/gpu.py", "elapsed_s": 3}
    text = gpu.format_table(meta, [ok, bad])
    lines = text.splitlines()
    assert lines[0] == "# bench/gpu.py on NVIDIA Test (80 GiB)" and "torch 2.13, CUDA 12.8" in lines[2]
    header = next(ln for ln in lines if ln.startswith("| section"))
    assert "Liger ms" not in header and "TRL ms" in header  # only the columns some row filled
    assert "| divergence | jsd [8x9] | 2.0 | 10.0 | 1.0 | - | not installed |  |" in text
    assert "ktransfer 1.0e-06; TRL 5.0e-01 (tol 1e-04) | ok" in text and "| FAIL |" in text
    assert "| jsd [8x9] | 2.0 | 1.0 | 0.50 | 10.0 | - |" in text  # compiled / eager
    assert "Compiled faster in 1 of 1 cases" in text


def test_rel_error_catches_what_it_should():
    g = torch.Generator().manual_seed(0)
    z, u = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    err = gpu_losses.check_against_float64(z, u, "reverse_kl", top_k=8)  # float32 (C++ kernel) vs float64
    assert 0 < err < 1e-5
    v, grad = gpu_losses.value_and_grad(z, u, "jsd")
    assert gpu_common.rel_error(v, grad, v, grad) == 0
    off = grad.clone()
    off[2, 3] += 1e-3 * grad.abs().max()
    assert gpu_common.rel_error(v, off, v, grad) == pytest.approx(1e-3, rel=1e-3)
    assert gpu_common.rel_error(v * (1 + 1e-3), grad, v, grad) == pytest.approx(1e-3, rel=1e-3)
    assert math.isnan(gpu_common.rel_error(float("nan"), None, v, None))
    assert gpu_common.rel_error(v, grad[:3], v, grad) == math.inf


def test_bf16_inputs_have_no_ties():
    g = torch.Generator().manual_seed(0)
    z = gpu_losses.distinct_bf16_logits(5, 200, g)
    assert z.dtype == torch.bfloat16 and all(len(set(r.tolist())) == 200 for r in z)
    p = gpu_losses.peaked_bf16_logits(4, 500, g, "cpu")
    top9 = p.float().topk(9, dim=-1).values
    assert torch.equal(top9[:, :8], (10 + 0.25 * torch.arange(8.0)).flip(0).expand(4, 8)) and (top9[:, 8] <= 8).all()


def test_pytest_plumbing():
    assert gpu_system.cuda_test_files() and "tests/unit/test_divergences.py" in gpu_system.cuda_test_files()
    out = "....\nFAILED tests/x.py::t - boom\n2 failed, 11 passed, 3 skipped, 371 deselected in 4.20s\n"
    assert gpu_system.pytest_summary(out) == {"failed": 2, "passed": 11, "skipped": 3, "deselected": 371}
    assert gpu_system.pytest_summary("1 error in 0.1s") == {"error": 1}


@pytest.mark.parametrize("section", ["correctness", "divergence", "fused", "train", "dist"])
def test_dry_run_of_each_section(section, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = []
    gpu.run_section(section, tiny(), rows.append)
    assert rows and all(r["section"] == section for r in rows)
    bad = [r for r in rows if r["status"] not in ("ok", "skipped")]
    assert not bad, bad
    measured = [r for r in rows if r["status"] == "ok"]
    assert measured and all(r["errors"] for r in measured if section != "tests")
    if section in ("divergence", "fused"):
        cells = measured[0]["cells"]
        assert isinstance(cells["ktransfer"], tuple) and isinstance(cells["plain"], tuple)
        assert cells.get("Liger") in ("-", gpu_common.triton_runs_here("cpu")) or \
            str(cells.get("Liger")).startswith("not installed")


def test_section_killed_at_its_budget(tmp_path):
    args = gpu.parse_args(["--dry-run"])
    rows = gpu.spawn_section("dist", args, budget=0.5)
    assert rows[-1]["status"] == "timeout" and rows[-1]["case"] == "dist (section)"


@pytest.mark.skipif(not (importlib.util.find_spec("liger_kernel") and importlib.util.find_spec("triton")),
                    reason="liger-kernel and triton are not installed (pip install torch==2.13.0 -e '.[bench]')")
def test_liger_under_triton_interpreter_agrees_with_ktransfer(tmp_path):
    """The whole script end to end on the fused section, Liger's Triton kernel interpreted on CPU tensors (budgets
    raised: on a loaded 2-core machine two torch imports alone took minutes)."""
    out = tmp_path / "table.md"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"),
                                                                                  os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--sections", "fused", "--budget-scale", "30",
           "--total-s", "3000", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| fused | fused head")]
    assert len(rows) == 2 and out.read_text().startswith("# bench/gpu.py on CPU dry run")
    for line in rows:
        errors = dict(part.rsplit(" ", 1) for part in line.split(" | ")[-3].split(" (tol")[0].split("; "))
        assert float(errors["Liger"]) < 1e-5 and float(errors["ktransfer"]) < 1e-5, line
