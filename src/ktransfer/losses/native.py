"""ktransfer's compiled CPU kernel for the divergences (``csrc/divergence_cpu.cpp``), built on first use.

The kernel computes, per row of ``[N, V]`` logits, both log-normalisers, the value of every divergence term (full
vocabulary or a top-k support, which it selects itself) and the NLL, and writes the gradient, in four passes over a
row held in cache, with ATen's SIMD vectors. ``ktransfer.losses.divergences`` calls it for CPU tensors in float32,
bfloat16
or float16 (one dtype for both models); float64, mixed dtypes and CUDA tensors take the Python path, which is also the
reference the kernel is tested against (``tests/unit/test_native.py``).

Building needs a C++ compiler (and ninja, which the ``ninja`` Python package provides); it takes a few tens of seconds
once, then the library is cached in ``build_folder()``: ``ktransfer_divergence_cpu_<isa>-<tag>`` in torch's extension
folder (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), where ``<tag>`` hashes the Python
environment (``sys.prefix``, Python and torch versions): two virtualenvs build into two folders and never race. It is
reloaded in well under a second. ``ktransfer build-kernel`` builds it ahead of time. The library's sha256 is written
beside it (``NAME.so.sha256``) when it is built and checked before every load: a corrupt or truncated cached library
(or one without the file) is rebuilt with a warning instead of being mapped.

A build holds an ``fcntl.flock`` on ``build.flock`` in that folder, which the OS releases when its holder dies (even by
SIGKILL): a second process (another torchrun rank, another run) waits for it at most ``KTRANSFER_BUILD_WAIT`` seconds
(default 600) with a message, then loads the built library. Under that lock, torch's own ``lock`` file, left behind
by a builder killed mid-build, is removed (left alone it makes every later build wait forever). If the build fails or
the wait runs out, one warning is logged and the Python path is used from then on. ``KTRANSFER_NATIVE=0`` in the
environment, or ``use_native(False)``, switches the kernel off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ktransfer.runtime.digest import file_sha256

_log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "divergence_cpu.cpp"
# Compiler flags per ATen CPU capability: the same instruction sets ATen's own kernels are built for.
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
KIND_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3, "skew_reverse_kl": 4, "tvd": 5}
LOCK_FILE = "build.flock"
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


def build_folder(cap_name: str | None = None) -> Path:
    """Where the kernel for this Python environment is built and cached (see the module docstring)."""
    from torch.utils import cpp_extension

    if cap_name is None:
        cap_name = capability() if capability() in _ARCH_FLAGS else "DEFAULT"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    env = f"{sys.prefix}|{sys.version}|{torch.__version__}|{SOURCE}"
    tag = hashlib.sha256(env.encode()).hexdigest()[:10]
    return Path(root) / f"ktransfer_divergence_cpu_{cap_name.lower()}-{tag}"


def _wait_seconds() -> float:
    try:
        return float(os.environ.get("KTRANSFER_BUILD_WAIT", "600"))
    except ValueError:
        raise ValueError(f"KTRANSFER_BUILD_WAIT must be a number of seconds, got "
                         f"{os.environ['KTRANSFER_BUILD_WAIT']!r}") from None


@contextlib.contextmanager
def build_lock(folder: Path, wait_s: float | None = None):
    """Hold an exclusive ``flock`` on ``folder/build.flock`` (released by the OS if this process dies).

    Waits at most ``wait_s`` seconds (default ``KTRANSFER_BUILD_WAIT`` or 600) for another holder, saying so once;
    then removes torch's ``lock`` file, which only a dead builder can have left.

    Raises:
        TimeoutError: another process held the lock longer than ``wait_s``.
    """
    wait_s = _wait_seconds() if wait_s is None else wait_s
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (torch's own baton only)
        yield
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another process has been building the kernel in {folder} for more than "
                                       f"{wait_s:.0f} s (KTRANSFER_BUILD_WAIT)") from None
                if not told:
                    _log.warning("ktransfer.losses.native: waiting (at most %.0f s) for another process building "
                                 "ktransfer's CPU kernel in %s", wait_s, folder)
                    told = True
                time.sleep(0.2)
        (folder / "lock").unlink(missing_ok=True)  # torch's baton: its owner is dead, since we hold the flock
        yield
    finally:
        os.close(fd)  # releases the flock


def check_cached(folder: Path, name: str) -> None:
    """Under the build lock: a cached ``NAME.so`` whose sha256 differs from ``NAME.so.sha256`` (written by ``seal``
    when it was built), or that has none, is removed with its object files, with a warning, so that it is rebuilt
    rather than loaded (a truncated library kills the process that maps it with SIGBUS)."""
    lib, digest_file = folder / f"{name}.so", folder / f"{name}.so.sha256"
    if not lib.exists():
        return
    try:
        expected = digest_file.read_text(encoding="utf-8").strip()
    except OSError:
        expected = None
    if expected == file_sha256(lib):
        return
    why = ("does not match the sha256 written when it was built (corrupt or truncated)" if expected else
           f"has no {digest_file.name} beside it (built by an older ktransfer, or its write was cut)")
    _log.warning("ktransfer.losses.native: the cached kernel %s %s; rebuilding it", lib, why)
    for stale in (*folder.glob("*.so"), *folder.glob("*.o")):
        stale.unlink(missing_ok=True)
    digest_file.unlink(missing_ok=True)


def seal(folder: Path, name: str) -> None:
    """Write ``NAME.so.sha256`` beside a library just built (atomically; kept when it is there already)."""
    lib, digest_file = folder / f"{name}.so", folder / f"{name}.so.sha256"
    if lib.exists() and not digest_file.exists():
        tmp = digest_file.with_name(f".{digest_file.name}.tmp-{os.getpid()}")
        tmp.write_text(file_sha256(lib) + "\n", encoding="utf-8")
        os.replace(tmp, digest_file)


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
    name = f"ktransfer_divergence_cpu_{cap_name.lower()}"
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        folder = build_folder(cap_name)
        with build_lock(folder):
            check_cached(folder, name)  # a corrupt or truncated library is rebuilt, never loaded (SIGBUS)
            if not (folder / f"{name}.so").exists():
                _log.warning("ktransfer.losses.native: building ktransfer's CPU kernel in %s, ~45 s, once", folder)
            module = cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(folder),
                                        extra_cflags=["-O3", "-fopenmp", *arch, *defines],
                                        extra_ldflags=["-fopenmp"], verbose=False)
            seal(folder, name)
    except Exception as exc:  # no compiler, no ninja, unsupported platform, a wait that ran out: the Python path
        _STATE["failed"] = True
        lines = str(exc).strip().splitlines() or [""]
        first_error = next((ln.strip() for ln in lines if "error:" in ln), lines[-1])
        _log.warning("ktransfer.losses.native: the CPU kernel could not be built (%s: %s); using the Python path",
                     type(exc).__name__, first_error)
        return None
    seconds = time.perf_counter() - start
    if seconds > 2:
        _log.info("ktransfer.losses.native: built the %s CPU kernel in %.0f s (cached for later runs)", cap_name,
        seconds)
    _STATE["module"] = module
    return module
