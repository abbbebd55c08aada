"""ktransfer's compiled CPU kernel for the divergences (``csrc/divergence_cpu.cpp``), built on first use.

The kernel computes, per row of ``[N, V]`` logits, both log-normalisers, the value of every divergence term (full
vocabulary or a top-k support, which it selects itself) and the NLL, and writes the gradient, in four passes over a
row held in cache, with ATen's SIMD vectors. ``ktransfer.divergences`` calls it for CPU tensors in float32, bfloat16
or float16 (one dtype for both models); float64, mixed dtypes and CUDA tensors take the Python path, which is also the
reference the kernel is tested against (``tests/test_native.py``).

Building needs a C++ compiler (and ninja, which the ``ninja`` Python package provides); it takes a few tens of seconds
once, then the library is cached in torch's extension folder (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) and reloaded in well under a second. If the build fails, one warning is logged and the
Python path is used from then on. ``KTRANSFER_NATIVE=0`` in the environment, or ``use_native(False)``, switches the
kernel off.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

_log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "divergence_cpu.cpp"
# Compiler flags per ATen CPU capability: the same instruction sets ATen's own kernels are built for.
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
KIND_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3, "skew_reverse_kl": 4, "tvd": 5}
_STATE = {"enabled": os.environ.get("KTRANSFER_NATIVE", "1") != "0", "module": None, "failed": False}


def use_native(enabled: bool = True) -> None:
    """Switch the compiled CPU kernel on (the default unless ``KTRANSFER_NATIVE=0``) or off (Python path only)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"use_native(enabled) takes True or False, got {enabled!r}")
    _STATE["enabled"] = enabled


def native_enabled() -> bool:
    """Whether ``kernel()`` may be used (switched on, and no failed build in this process)."""
    return _STATE["enabled"] and not _STATE["failed"]


def capability() -> str:
    """ATen's CPU capability on this machine ("AVX512", "AVX2", "DEFAULT", ...): picks the kernel's instruction set."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older builds
        return "DEFAULT"


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; a venv that was not activated has the pip package's ninja off PATH."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:  # the build then fails with torch's own message ("Ninja is required ...")
            pass


def kernel():
    """The compiled module (with ``sweep``), building it on first call; None when switched off or unbuildable."""
    if not native_enabled():
        return None
    if _STATE["module"] is not None:
        return _STATE["module"]
    cap = capability()
    arch = _ARCH_FLAGS.get(cap, [])
    cap_name = cap if arch else "DEFAULT"
    defines = [f"-DCPU_CAPABILITY={cap_name}", f"-DCPU_CAPABILITY_{cap_name}"]
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        module = cpp_extension.load(
            name=f"ktransfer_divergence_cpu_{cap_name.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *arch, *defines],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, unsupported platform: the Python path still works
        _STATE["failed"] = True
        lines = str(exc).strip().splitlines() or [""]
        first_error = next((ln.strip() for ln in lines if "error:" in ln), lines[-1])
        _log.warning("ktransfer.native: the CPU kernel could not be built (%s: %s); using the Python path",
                     type(exc).__name__, first_error)
        return None
    seconds = time.perf_counter() - start
    if seconds > 2:
        _log.info("ktransfer.native: built the %s CPU kernel in %.0f s (cached for later runs)", cap_name, seconds)
    _STATE["module"] = module
    return module
