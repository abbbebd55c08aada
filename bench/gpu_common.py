"""Shared pieces of ``bench/gpu.py``: options, rows, timing and peak memory, error measures, optional competitors.

A row is a dict: ``section``, ``case``, ``cells`` ({column: (ms, MiB or None) or a short text such as "not
installed"}), ``errors`` ({column: max relative error}), ``tol`` (the tolerance of the ktransfer columns), ``status``
("ok", "FAIL", "skipped", "timeout", "error") and ``note``. Only the ktransfer columns' errors decide ``FAIL``; the
errors of TRL and Liger against ktransfer are printed for the reader (their conventions and precision are theirs).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

# Table columns, in order; a row fills those it measured.
COLUMNS = ("ktransfer", "ktransfer compiled", "plain", "TRL", "Liger", "Liger chunked")
# Columns whose error against the reference decides a row's status.
OWN = ("ktransfer", "ktransfer compiled", "ktransfer fused")


@dataclass
class Options:
    """What every section needs: the device, tiny sizes or the real ones, repeats and the section's deadline."""

    device: str = "cuda"
    tiny: bool = False
    repeats: int = 3
    deadline: float = float("inf")  # time.time() after which no new case starts
    pytest_k: str = "cuda"

    def left(self) -> float:
        return self.deadline - time.time()

    def out_of_time(self, margin: float = 5.0) -> bool:
        return self.left() < margin


def row(section: str, case: str, *, cells=None, errors=None, tol=None, status=None, note: str = "") -> dict:
    """A table row; ``status`` None means: decided from the errors of the ktransfer columns against ``tol``."""
    cells, errors = dict(cells or {}), dict(errors or {})
    if status is None and not errors and not any(isinstance(c, (list, tuple)) for c in cells.values()):
        status = "skipped"  # nothing measured (budget, missing libraries)
    if status is None:
        own = [errors[k] for k in errors if k in OWN]
        status = "FAIL" if tol is not None and any(not (e <= tol) for e in own) else "ok"
    return {"section": section, "case": case, "cells": cells, "errors": errors, "tol": tol, "status": status,
            "note": note}


def rel_error(value, grad, ref_value, ref_grad) -> float:
    """max(|v - v_ref| / |v_ref|, max|g - g_ref| / max|g_ref|), computed in float64 on the CPU; NaN propagates.

    ``grad``/``ref_grad`` may be None (value only). A reference value of 0 divides by 1e-12 instead.
    """
    v, rv = float(value), float(ref_value)
    err = abs(v - rv) / max(abs(rv), 1e-12)
    if grad is not None and ref_grad is not None:
        g = grad.detach().to("cpu", torch.float64)
        rg = ref_grad.detach().to("cpu", torch.float64)
        if g.shape != rg.shape:
            return float("inf")
        scale = max(float(rg.abs().max()), 1e-30)
        err = max(err, float((g - rg).abs().max()) / scale)
    if any(map(_isnan, (v, err))):
        return float("nan")
    return err


def _isnan(x: float) -> bool:
    return x != x


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str, repeats: int):
    """Run ``fn`` (forward + backward, returns ``(value, grad)``) once to warm up, then ``repeats`` times.

    Returns ``(first_output, median ms, peak extra MiB or None)``: the peak is ``torch.cuda.max_memory_allocated``
    over the timed runs minus what was allocated before them (None on a CPU). The warm-up's output is returned for
    the error checks; the timed runs' outputs are dropped as they come.
    """
    first = fn()
    sync(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        del out
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return first, 1e3 * statistics.median(times), peak


def failure_text(exc: BaseException) -> str:
    """A short cell text for a competitor's exception: "OOM" or "error: Type: first line"."""
    if isinstance(exc, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return "OOM"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {first[:80]}"


def trl_jsd():
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd`` in TRL >= 1.0, else ``trl``), or the
    reason it is missing (a string)."""
    try:
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:
            from trl import GKDTrainer
        return GKDTrainer.generalized_jsd_loss
    except Exception as exc:  # not installed, or broken against this torch/transformers
        return f"not installed ({type(exc).__name__})"


def liger_module(name: str):
    """A Liger-Kernel loss class by name (``LigerJSD``, ``LigerKLDIVLoss``, ``LigerFusedLinearJSD``,
    ``LigerFusedLinearJSDLoss``), or the reason it is unavailable (a string)."""
    where = {
        "LigerJSD": "liger_kernel.transformers.jsd",
        "LigerKLDIVLoss": "liger_kernel.transformers.kl_div",
        "LigerFusedLinearJSD": "liger_kernel.transformers.fused_linear_jsd",
        "LigerFusedLinearJSDLoss": "liger_kernel.chunked_loss",
    }[name]
    try:
        import importlib

        return getattr(importlib.import_module(where), name)
    except Exception as exc:
        return f"not installed ({type(exc).__name__})"


def triton_runs_here(device: str) -> str | None:
    """None when Liger's Triton kernels can run on ``device``, else why not (a cell text)."""
    import os

    if device.startswith("cuda"):
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "needs CUDA (TRITON_INTERPRET=1 runs it on CPU)"


def versions() -> dict:
    """Versions of torch, CUDA, NCCL, Triton, TRL, Liger-Kernel and transformers ("-" where absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "CUDA": torch.version.cuda or "-"}
    try:
        out["NCCL"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-"
    except Exception:
        out["NCCL"] = "-"
    for pkg in ("triton", "trl", "liger-kernel", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out
