"""The one check to run on a CUDA GPU: CUDA tests, correctness against float64, timings against plain PyTorch, TRL and
Liger-Kernel, a training step, nccl and FSDP. At most 8 minutes; one markdown table.

    python bench/gpu.py --out docs/gpu_table.md            # on a machine with one CUDA GPU
    python bench/gpu.py --dry-run                          # every section at tiny sizes on CPU tensors
    python bench/gpu.py --sections correctness divergence  # some sections only

Sections (each runs in its own subprocess, killed when its time budget is spent; rows finished before are kept):

- ``tests``: the tests that skip without CUDA (``pytest -k cuda`` on the files that have them);
- ``correctness``: every divergence kind, full / top-k / union / tail supports, float32 and bf16 logits, value and
  gradient on the device against the float64 CPU path; the compiled chunk on CUDA;
- ``divergence``: ``ktransfer.divergence`` reverse_kl top-8, forward_kl, jsd beta 0.5 at [8192, 32000] and
  [4096, 128256], bf16 logits, eager and compiled, against plain PyTorch, TRL and Liger (forward + backward);
- ``fused``: the fused head (``fused_linear_divergence``) at hidden 4096, V = 128256, BT = 8192 against
  materialised logits (plain, TRL) and Liger's ``LigerFusedLinearJSD`` and chunked ``LigerFusedLinearJSDLoss``;
- ``train``: one training step of a small Llama with a bf16 teacher (``hf_loss`` and the fused head);
- ``dist``: a one-process nccl group and a 1-GPU FSDP2 step (``ktransfer.runtime.fsdp``).

Times are medians of ``--repeats`` forward + backward runs after one warm-up (which compiles, where compiling is on);
MiB is ``torch.cuda.max_memory_allocated`` over those runs minus what was allocated before them ("-" on a CPU).
Errors: ktransfer's columns against an independent reference (float64, or plain PyTorch on the same logits), which
decides "FAIL"; TRL and Liger against ktransfer, printed only. Exit status 1 when any row FAILs or a section crashes,
else 0. Without CUDA (and without ``--dry-run``) it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SECTIONS = ("tests", "correctness", "divergence", "fused", "train", "dist")
# Seconds per section (a subprocess each, killed at its budget); together with start-up under TOTAL_S.
BUDGET_S = {"tests": 80, "correctness": 50, "divergence": 140, "fused": 100, "train": 35, "dist": 35}
TOTAL_S = 460  # the sections together; with start-up and the table the run stays under 8 minutes
CPU_SLOWDOWN = 3  # the dry run's budgets (tiny sizes, but a CPU imports and builds models slower than a GPU host)
COMPILE_NOTE = ("`use_compile` stays off by default on CUDA until this table shows the compiled chunk faster "
                "(ktransfer.losses.divergences.use_compile)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="also write the markdown table to this file")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (default); cpu = the dry run (tiny sizes on CPU tensors)")
    ap.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on CPU tensors")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                    help=f"which sections, in this order (default all: {' '.join(SECTIONS)})")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 3; 1 in the dry run)")
    ap.add_argument("--total-s", type=float, default=None,
                    help=f"time budget of the whole run (default {TOTAL_S}; x{CPU_SLOWDOWN} in the dry run)")
    ap.add_argument("--budget-scale", type=float, default=None,
                    help=f"multiply every section's budget (default 1; {CPU_SLOWDOWN} in the dry run)")
    ap.add_argument("--pytest-k", default="cuda", help="pytest -k expression of the tests section (default cuda)")
    ap.add_argument("--_section", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--_rows", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
    args.tiny = args.device == "cpu"
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 3
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.budget_scale is None:
        args.budget_scale = CPU_SLOWDOWN if args.tiny else 1
    if args.budget_scale <= 0:
        ap.error(f"--budget-scale must be > 0, got {args.budget_scale}")
    if args.total_s is None:
        args.total_s = TOTAL_S * args.budget_scale
    if args.total_s <= 0:
        ap.error(f"--total-s must be > 0, got {args.total_s}")
    return args


# --- the table ---

def _num(x: float) -> str:
    return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def _cell(value) -> tuple[str, str]:
    """(ms, MiB) texts of one column of a row."""
    if value is None:
        return "", ""
    if isinstance(value, str):
        return value, ""
    ms, mib = value
    return _num(ms), "-" if mib is None else _num(mib)


def _errors(row: dict) -> str:
    errs = row.get("errors") or {}
    if not errs:
        return ""
    text = "; ".join(f"{k} {v:.1e}" for k, v in errs.items())
    return text + (f" (tol {row['tol']:.0e})" if row.get("tol") is not None else "")


def format_table(meta: dict, rows: list[dict]) -> str:
    """The markdown report: a header naming the device and versions, the rows, and the compiled-vs-eager table."""
    from gpu_common import COLUMNS

    used = [c for c in COLUMNS if any(c in r.get("cells", {}) for r in rows)]
    lines = [f"# bench/gpu.py on {meta['device']}", "",
             ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f"; {meta['date']}; "
             f"command: `{meta['command']}`; total {meta['elapsed_s']:.0f} s", ""]
    head = ["section", "case"] + [f"{c} {u}" for c in used for u in ("ms", "MiB")] + ["max error", "status", "note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [x for c in used for x in _cell(r.get("cells", {}).get(c))]
        lines.append("| " + " | ".join([r["section"], r["case"], *cells, _errors(r), r["status"],
                                        r.get("note", "")]).replace("\n", " ") + " |")
    lines += ["", *compile_comparison(rows)]
    if meta["device"].startswith("CPU"):
        lines += ["", "CPU dry run: float32/bf16 logits take the C++ kernel in both ktransfer columns (compiling "
                  "applies to CUDA); times and MiB here only show that the code paths run."]
    return "\n".join(lines) + "\n"


def compile_comparison(rows: list[dict]) -> list[str]:
    """Eager against compiled ktransfer for every row that timed both: the measurement that decides whether
    ``use_compile`` becomes the CUDA default."""
    def timed(r, col):
        return isinstance(r.get("cells", {}).get(col), (list, tuple))  # (ms, MiB); a list once read from JSON

    pairs = [(r["case"], r["cells"]["ktransfer"], r["cells"]["ktransfer compiled"]) for r in rows
             if timed(r, "ktransfer") and timed(r, "ktransfer compiled")]
    if not pairs:
        return ["Compiled vs eager: no row timed both.", "", COMPILE_NOTE + "."]
    out = ["## Compiled chunk vs eager (decides the CUDA default of `use_compile`)", "",
           "| case | eager ms | compiled ms | compiled / eager | eager MiB | compiled MiB |",
           "|---|---:|---:|---:|---:|---:|"]
    faster = 0
    for case, (ems, emib), (cms, cmib) in pairs:
        faster += cms < ems
        out.append(f"| {case} | {_num(ems)} | {_num(cms)} | {cms / ems:.2f} | {_cell((0, emib))[1]} | "
                   f"{_cell((0, cmib))[1]} |")
    out += ["", f"Compiled faster in {faster} of {len(pairs)} cases. {COMPILE_NOTE}."]
    return out


# --- running the sections ---

def run_section(name: str, opts, emit) -> None:
    """Run one section in this process, calling ``emit(row)`` for each finished row."""
    if name in ("correctness", "divergence", "fused"):
        import gpu_losses

        {"correctness": gpu_losses.correctness, "divergence": gpu_losses.divergence_timings,
         "fused": gpu_losses.fused_head}[name](opts, emit)
    else:
        import gpu_system

        {"tests": gpu_system.cuda_tests, "train": gpu_system.train_step, "dist": gpu_system.distributed}[name](
            opts, emit)


def _child_main(args) -> int:
    """In a section's subprocess: run it, appending each row to ``--_rows`` as one JSON line as soon as it is done."""
    from gpu_common import Options

    opts = Options(device=args.device, tiny=args.tiny, repeats=args.repeats, deadline=args._deadline,
                   pytest_k=args.pytest_k)
    with open(args._rows, "a", encoding="utf-8") as f:
        def emit(r):
            f.write(json.dumps(r) + "\n")
            f.flush()
        run_section(args._section, opts, emit)
    return 0


def spawn_section(name: str, args, budget: float) -> list[dict]:
    """Run section ``name`` in a subprocess for at most ``budget`` seconds; its rows, plus one row for a timeout or
    a crash."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.jsonl"
        rows_path.touch()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--repeats", str(args.repeats),
               "--pytest-k", args.pytest_k, "--_section", name, "--_rows", str(rows_path),
               "--_deadline", str(time.time() + budget - 3)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=budget)
            extra = None
            if proc.returncode != 0:
                last = [ln for ln in output.strip().splitlines() if ln.strip()][-1:] or [f"rc {proc.returncode}"]
                extra = {"status": "error", "note": f"section crashed (rc {proc.returncode}): {last[0][:300]}"}
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            extra = {"status": "timeout", "note": f"killed after its budget of {budget:.0f} s"}
        rows = [json.loads(ln) for ln in rows_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if extra:
        rows.append({"section": name, "case": f"{name} (section)", "cells": {}, "errors": {}, "tol": None, **extra})
    return rows


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {os.cpu_count()} CPU cores"
    return f"CPU dry run ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._section:
        return _child_main(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench/gpu.py: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "nothing run (--dry-run runs every section at tiny sizes on CPU tensors)")
        return 0
    from gpu_common import versions

    start = time.time()
    rows: list[dict] = []
    for name in args.sections:
        left = args.total_s - (time.time() - start)
        if left < 10:
            rows.append({"section": name, "case": f"{name} (section)", "cells": {}, "errors": {}, "tol": None,
                         "status": "skipped", "note": "total budget spent"})
            continue
        budget = min(BUDGET_S[name] * args.budget_scale, left)
        print(f"bench/gpu.py: section {name} (up to {budget:.0f} s)", file=sys.stderr, flush=True)
        rows += spawn_section(name, args, budget)
    meta = {"device": device_name(args.device), "versions": versions(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "command": "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "elapsed_s": time.time() - start}
    table = format_table(meta, rows)
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    for r in bad:
        print(f"bench/gpu.py: {r['status']}: {r['section']}: {r['case']}: {_errors(r)} {r.get('note', '')}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
