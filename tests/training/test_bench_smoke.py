"""The benchmarks behind #28's numbers run end to end at tiny sizes (a bench that no longer runs against today's
``ktransfer.training`` is caught here, not on the day someone needs its table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, args: list[str], shared_data: Path, tmp_path: Path) -> dict:
    out = tmp_path / "times.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "KTRANSFER_DATA": str(shared_data), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--threads", "1", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_on_policy_bench_against_trl(shared_data, tmp_path):
    pytest.importorskip("trl")
    result = _run("on_policy.py", ["--vocab-size", "400", "--hidden", "32", "--teacher-layers", "1",
                                   "--learner-layers", "1", "--batch", "2", "--max-new-tokens", "4", "--steps", "1",
                                   "--warmup", "0", "--fused-head", "--data", str(shared_data)], shared_data, tmp_path)
    rows = {r["step"]: r for r in result["rows"]}
    assert set(rows) == {"ktransfer on", "TRL GKD lmbda=1", "ktransfer off", "ktransfer off, fused head",
                         "TRL GKD lmbda=0"}
    assert all(len(r["times"]) == 1 and r["times"][0] > 0 for r in rows.values())
    for name in ("ktransfer on", "ktransfer off", "ktransfer off, fused head"):  # each against its TRL row
        trl = rows["TRL GKD lmbda=1" if name == "ktransfer on" else "TRL GKD lmbda=0"]
        assert rows[name]["ratio"][1] == pytest.approx(rows[name]["times"][0] / trl["times"][0])
