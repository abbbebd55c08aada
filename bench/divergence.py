"""Benchmark ``ktransfer.divergence`` against a plain PyTorch composition: time, peak extra memory, agreement.

For every kind and every N x V (N positions, V vocabulary) this measures, on the same random logits:

* ``ktransfer``: ``ktransfer.divergence(z, u, kind)`` with default settings (full support, T=1, reduction="mean"),
  forward + backward; on CPU this is the C++ kernel (``ktransfer.losses.native``, built or loaded before any timing),
  ``--python-path`` measures the Python chunk path instead (eager, or compiled with ``--compile``);
* ``plain``: the textbook composition written out below in ``PLAIN`` (``log_softmax`` of both logits, elementwise
  terms, sum over V, mean over positions), forward + backward through autograd;
* ``log_softmax``: one ``torch.log_softmax`` forward pass over one ``[N, V]`` tensor, as a yardstick
  (column "x log_softmax" = ktransfer time / log_softmax time);
* where installed (``pip install -e .[bench]``; ``--compare`` picks them), the same kind from other libraries, called
  as their trainers call them, forward + backward, with labels that mark every position as a target (so each
  averages over all N positions, like ktransfer's mean):

  - TRL: ``GKDTrainer.generalized_jsd_loss(z, u, labels, beta)`` (``trl.experimental.gkd`` in TRL >= 1.0, else
    ``trl``), reduction "batchmean" (sum / number of labelled positions). Its ``beta`` is the teacher's weight in
    the mixture m = beta q + (1 - beta) p, ktransfer's convention, with two special cases: beta = 0 is forward
    KL(q || p) = ``forward_kl`` and beta = 1 is reverse KL(p || q) = ``reverse_kl`` (not the limits of the mixture
    formula, which vanish); beta = 0.5 is ``jsd``.
  - torchtune: ``ForwardKLLoss()(z, u, labels)`` = ``forward_kl`` + H(q): it is the cross-entropy
    -sum q log p, without the teacher's entropy (a constant: the gradient is the same); ``ReverseKLLoss`` =
    ``reverse_kl``; ``SymmetricKLLoss(sym_kd_ratio=0.5)`` = ``half`` + H(q) / 2.

  Their "value rel diff" is against ktransfer's value plus that entropy offset (H(q), mean over positions, computed
  in float64), their "grad rel diff" against ktransfer's gradient: both near float32 round-off prove the mapping.

Times are the median of ``--repeats`` runs after one warm-up run; the three are interleaved run by run, so that load
from other processes hits them alike.

Peak extra memory
-----------------
On CPU each (kind, N x V) runs in a fresh subprocess. It allocates the inputs, then, for each
implementation, returns the glibc heap's free pages to the kernel (``malloc_trim(0)``), resets the kernel's
resident-set high-water mark (writing ``5`` to ``/proc/self/clear_refs``, Linux
>= 4.0), reads ``VmRSS`` from ``/proc/self/status``, runs forward + backward once (this is also the warm-up), and
reads ``VmHWM``: extra = VmHWM - VmRSS-before. This is what the process really had resident at its peak, including
the ``[N, V]`` gradient that lands in ``z.grad`` (both implementations must produce it), allocator overheads and
temporaries, and it needs no third-party package. ktransfer is measured first in the fresh process: its chunk-sized
temporaries (a few MiB) are served from the glibc heap, which the trim has emptied (without it, temporaries freed by
the warm-up runs stayed resident at the window's start and their trimming inside the window hid up to ~100 MiB of
the peak once the third-party warm-ups had run); the plain composition's temporaries are
``[N, V]`` tensors, far above glibc's mmap threshold, so they are fresh mappings and are counted in full even after
ktransfer ran. (If ``/proc/self/clear_refs`` is not writable, the column says "n/a".)
On CUDA (one subprocess per N x V, all kinds in it): ``torch.cuda.max_memory_allocated()`` after the same first run
minus ``torch.cuda.memory_allocated()`` before it, after ``torch.cuda.reset_peak_memory_stats()`` (live tensors only,
not the caching allocator's reserve).

The third-party losses are measured after those two, in the same way (their temporaries are ``[N, V]`` tensors too).

Agreement: "value rel diff" = |D_ktransfer - D_plain| / |D_plain|; "grad rel diff" = max |g_k - g_p| / max |g_p|
over the first 512 positions (only that slice of each gradient is kept, so that it does not inflate the next
measurement's baseline).

Usage (from the repository root)::

    .venv/bin/python bench/divergence.py --markdown
    .venv/bin/python bench/divergence.py --kinds forward_kl reverse_kl --sizes 2048x8000 --repeats 5
    .venv/bin/python bench/divergence.py --device cuda --dtype bfloat16 --markdown
    .venv/bin/python bench/divergence.py --compare trl --kinds forward_kl reverse_kl jsd --sizes 512x8000

Default: all 7 kinds x N in {2048, 8192} x V in {8000, 32000}, float32, 2 threads; repeats 5, or 3 where N*V >= 10^8.
The largest size needs about 8 GB of free memory (inputs 2 GB + the plain composition's temporaries); with TRL's jsd
about 17 GB (its peak extra is ~15 [N, V] float32 tensors: 1,906 MiB at 1024 x 32000); torchtune's half peaks at ~9
(1,156 MiB), so ``--compare torchtune`` needs about 11 GB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline import cpu_model  # noqa: E402  (bench/pipeline.py)

ALL_KINDS = ("forward_kl", "reverse_kl", "half", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
DEFAULT_SIZES = ("2048x8000", "2048x32000", "8192x8000", "8192x32000")
BETA = 0.5  # ktransfer's default beta for jsd
ALPHA = 0.1  # ktransfer's default alpha for the skew KLs
BIG = 10**8  # N*V from which the default number of repeats drops to 3
GRAD_ROWS = 512  # gradient agreement is checked on the first GRAD_ROWS positions
WARM_ROWS = 128  # rows of the untimed, unmeasured first run of each implementation


# ----------------------------------------------------------------------------------------------------------------------
# The plain composition, written independently of ktransfer: what a practitioner would type.
# z: learner logits [N, V] (requires grad), u: teacher logits [N, V]; returns the mean over positions of the divergence.
# ----------------------------------------------------------------------------------------------------------------------


def _plain(kind, z, u):
    import torch
    import torch.nn.functional as F

    if z.dtype in (torch.bfloat16, torch.float16):  # upcast as torchtune/DistiLLM do (dtype=torch.float32)
        z, u = z.float(), u.float()
    logp = F.log_softmax(z, dim=-1)
    logq = F.log_softmax(u.detach(), dim=-1)
    if kind == "forward_kl":  # KL(q || p)
        per_pos = (logq.exp() * (logq - logp)).sum(-1)
    elif kind == "reverse_kl":  # KL(p || q)
        per_pos = (logp.exp() * (logp - logq)).sum(-1)
    elif kind == "half":  # 1/2 KL(q || p) + 1/2 KL(p || q)
        fwd = (logq.exp() * (logq - logp)).sum(-1)
        rev = (logp.exp() * (logp - logq)).sum(-1)
        per_pos = 0.5 * fwd + 0.5 * rev
    elif kind == "jsd":  # beta KL(q || m) + (1-beta) KL(p || m), m = beta q + (1-beta) p
        logm = torch.logaddexp(logq + math.log(BETA), logp + math.log(1 - BETA))
        per_pos = BETA * (logq.exp() * (logq - logm)).sum(-1) + (1 - BETA) * (logp.exp() * (logp - logm)).sum(-1)
    elif kind == "skew_forward_kl":  # KL(q || alpha q + (1-alpha) p)
        logm = torch.logaddexp(logq + math.log(ALPHA), logp + math.log(1 - ALPHA))
        per_pos = (logq.exp() * (logq - logm)).sum(-1)
    elif kind == "skew_reverse_kl":  # KL(p || alpha p + (1-alpha) q)
        logm = torch.logaddexp(logp + math.log(ALPHA), logq + math.log(1 - ALPHA))
        per_pos = (logp.exp() * (logp - logm)).sum(-1)
    elif kind == "tvd":  # 1/2 sum |p - q|
        per_pos = 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return per_pos.mean()


def _ktransfer(kind, z, u):
    import ktransfer

    return ktransfer.divergence(z, u, kind)


# ----------------------------------------------------------------------------------------------------------------------
# Third-party counterparts (optional: the "bench" extra). Imported only here, never from src/ktransfer.
# ----------------------------------------------------------------------------------------------------------------------

LIBS = ("trl", "torchtune")
# kind -> library -> (the call, c): the library's value = ktransfer's value + c * H(q), H(q) the teacher's entropy
# (mean over positions); c = 0 where the library computes the divergence itself.
COUNTERPARTS = {
    "forward_kl": {"trl": ("generalized_jsd_loss(beta=0)", 0.0), "torchtune": ("ForwardKLLoss()", 1.0)},
    "reverse_kl": {"trl": ("generalized_jsd_loss(beta=1)", 0.0), "torchtune": ("ReverseKLLoss()", 0.0)},
    "half": {"torchtune": ("SymmetricKLLoss(sym_kd_ratio=0.5)", 0.5)},
    "jsd": {"trl": (f"generalized_jsd_loss(beta={BETA})", 0.0)},
}
TRL_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": BETA}
TORCHTUNE_CLASS = {"forward_kl": "ForwardKLLoss", "reverse_kl": "ReverseKLLoss", "half": "SymmetricKLLoss"}


def _import_lib(lib):
    """Import ``lib``'s loss code; return ``(version, where, namespace)``. Raises whatever the import raises."""
    if lib == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import trl

        try:  # TRL >= 1.0 moved the GKD trainer to trl.experimental
            from trl.experimental.gkd import GKDTrainer

            where = "trl.experimental.gkd.GKDTrainer.generalized_jsd_loss"
        except ImportError:
            from trl import GKDTrainer

            where = "trl.GKDTrainer.generalized_jsd_loss"
        return trl.__version__, where, GKDTrainer
    if lib == "torchtune":
        import torchtune
        import torchtune.modules.loss as tt_loss

        have = [c for c in ("ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss") if hasattr(tt_loss, c)]
        return torchtune.__version__, "torchtune.modules.loss." + "/".join(have), tt_loss
    raise ValueError(f"unknown library {lib!r}")


def _available_libs(libs):
    """``({lib: "version (where)"}, {lib: "why not"})`` for the requested libraries."""
    ok, missing = {}, {}
    for lib in libs:
        try:
            version, where, _ = _import_lib(lib)
            ok[lib] = f"{version} ({where})"
        except Exception as e:  # an optional comparison: report why, go on without it
            missing[lib] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    return ok, missing


def _counterpart(lib, kind, labels):
    """``fn(z, u) -> scalar`` computing ``kind`` with ``lib``, or None if it has none.

    ``labels`` [N] (no ignore_index: every position is a target); ``z``, ``u``: [n, V] with n <= N (the first n).
    """
    if kind not in COUNTERPARTS or lib not in COUNTERPARTS[kind]:
        return None
    _, _, ns = _import_lib(lib)
    if lib == "trl":
        beta = TRL_BETA[kind]
        return lambda z, u: ns.generalized_jsd_loss(z, u, labels=labels[: z.shape[0]], beta=beta)
    cls = getattr(ns, TORCHTUNE_CLASS[kind], None)
    if cls is None:
        return None
    module = cls(sym_kd_ratio=0.5) if kind == "half" else cls()
    return lambda z, u: module(z, u, labels[: z.shape[0]])


def _mean_entropy(u, rows=256):
    """H(q) = -sum_v q log q, mean over the N positions of u [N, V]; float64, a few rows at a time."""
    import torch

    total = 0.0
    with torch.no_grad():
        for i in range(0, u.shape[0], rows):
            logq = torch.log_softmax(u[i : i + rows].double(), dim=-1)
            total += float(-(logq.exp() * logq).sum())
    return total / u.shape[0]


# ----------------------------------------------------------------------------------------------------------------------
# Worker: one (kind, N, V) configuration in a fresh process; prints one JSON line.
# ----------------------------------------------------------------------------------------------------------------------


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap():
    """Return the glibc heap's free pages to the kernel (``malloc_trim(0)``), so that a measurement window starts
    with none: freed temporaries of earlier runs (the warm-ups, the third-party imports) would otherwise be resident
    at the window's start, and their trimming inside it would hide as much of the peak. No-op without glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _worker(cfg):
    """Run ``cfg["kinds"]`` on one N x V in this process; print one ``RESULT {json}`` line per kind."""
    import torch

    torch.set_num_threads(cfg["threads"])
    from ktransfer.losses import native

    if cfg.get("python_path"):  # ktransfer's Python chunk path instead of its C++ kernel
        native.use_native(False)
    elif cfg["device"] == "cpu" and native.kernel() is None:  # built (or loaded) before any timing
        print("WARNING the C++ kernel could not be built; ktransfer runs its Python path", file=sys.stderr)
    if cfg.get("compile"):  # ktransfer's opt-in compiled chunks; compiled during the untimed warm-up
        from ktransfer.losses.divergences import use_compile

        use_compile(True)
    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    N, V = cfg["n"], cfg["v"]
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # Inputs, generated in place (no transient copies): teacher = learner + noise, so the divergences are moderate.
    gen = torch.Generator(device=device).manual_seed(1234)
    z = torch.randn(N, V, generator=gen, device=device).mul_(2.0)
    u = torch.randn(N, V, generator=gen, device=device).mul_(1.5).add_(z)
    if dtype != torch.float32:
        z, u = z.to(dtype), u.to(dtype)
    z.requires_grad_(True)
    zd = z.detach()
    # Imports and one-time lazy initialisations happen here, outside the measurements: a run of each implementation on
    # WARM_ROWS rows takes the same (parallel, vectorised) code paths, so the pages of code they fault in and the
    # thread pools they start are not counted as the big run's extra memory.
    import ktransfer  # noqa: F401

    # Third-party counterparts: labels mark every position as a target (no ignore_index), so that each averages over
    # the same N positions as ktransfer's mean.
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    extra, errors = {}, {}
    for kind in cfg["kinds"]:
        for lib in cfg.get("compare", []):
            try:
                fn = _counterpart(lib, kind, labels)
            except Exception as e:
                errors[(kind, lib)] = f"{type(e).__name__}: {e}"
                continue
            if fn is not None:
                extra[(kind, lib)] = lambda kind, z, u, fn=fn: fn(z, u)

    rows = min(N, WARM_ROWS)
    for kind in cfg["kinds"]:
        zs = z[:rows].detach().clone().requires_grad_(True)
        for fn in (_ktransfer, _plain):
            fn(kind, zs, u[:rows]).backward()
        for lib in cfg.get("compare", []):
            if (kind, lib) in extra:
                try:
                    extra[(kind, lib)](kind, zs, u[:rows]).backward()
                except Exception as e:  # report it in the table, go on without it
                    errors[(kind, lib)] = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
                    del extra[(kind, lib)]
        del zs
    sync()
    for kind in cfg["kinds"]:
        libs = {lib: extra[(kind, lib)] for lib in cfg.get("compare", []) if (kind, lib) in extra}
        offsets = [COUNTERPARTS[kind][lib][1] for lib in libs]
        entropy = _mean_entropy(u) if any(offsets) else 0.0
        out = _measure(kind, z, zd, u, cfg["repeats"], sync, cuda, libs, entropy)
        for lib in cfg.get("compare", []):
            if (kind, lib) in errors:
                out[f"error_{lib}"] = errors[(kind, lib)]
        print("RESULT " + json.dumps(out), flush=True)


def _measure(kind, z, zd, u, repeats, sync, cuda, libs=None, entropy=0.0):
    """Time, peak memory and agreement of ktransfer, the plain composition and ``libs`` ({lib: fn(kind, z, u)})."""
    import torch

    N, V = z.shape
    impls = {"ktransfer": _ktransfer, "plain": _plain, **(libs or {})}
    out = {"kind": kind, "n": N, "v": V}
    values, grads = {}, {}

    # First run of each implementation: peak extra memory (and warm-up).
    for name, fn in impls.items():
        z.grad = None
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _trim_heap()
            ok = _reset_hwm()
            before = _status_kib("VmRSS") * 1024
        loss = fn(kind, z, u)
        loss.backward()
        sync()
        if cuda:
            out[f"mem_{name}"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            out[f"mem_{name}"] = (_status_kib("VmHWM") * 1024 - before) / 2**20 if ok else None
        values[name] = float(loss.detach().double())
        grads[name] = z.grad[:GRAD_ROWS].clone()  # keep a slice only, so the next measurement has the memory free
        del loss
        z.grad = None

    vp = values["plain"]
    out["value_ktransfer"], out["value_plain"] = values["ktransfer"], vp
    out["value_rel_diff"] = abs(values["ktransfer"] - vp) / abs(vp) if vp != 0 else abs(values["ktransfer"])
    gk, gp = grads.pop("ktransfer").float(), grads.pop("plain").float()
    out["grad_rel_diff"] = float((gk - gp).abs().max() / gp.abs().max())
    # Third-party values against ktransfer's plus the entropy offset of the mapping (see COUNTERPARTS).
    for lib in libs or {}:
        ref = values["ktransfer"] + COUNTERPARTS[kind][lib][1] * entropy
        out[f"value_{lib}"] = values[lib]
        out[f"value_rel_diff_{lib}"] = abs(values[lib] - ref) / abs(ref) if ref != 0 else abs(values[lib])
        gl = grads.pop(lib).float()
        out[f"grad_rel_diff_{lib}"] = float((gl - gk).abs().max() / gk.abs().max())
        del gl
    if entropy:
        out["entropy_teacher"] = entropy
    del gk, gp, grads

    # Warm-up of the yardstick, then interleaved timed repeats.
    with torch.no_grad():
        torch.log_softmax(zd, dim=-1)
    times = {name: [] for name in impls} | {"log_softmax": []}
    for _ in range(repeats):
        for name, fn in impls.items():
            z.grad = None
            sync()
            t0 = time.perf_counter()
            loss = fn(kind, z, u)
            loss.backward()
            sync()
            times[name].append(time.perf_counter() - t0)
            del loss
        z.grad = None
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            y = torch.log_softmax(zd, dim=-1)
        sync()
        times["log_softmax"].append(time.perf_counter() - t0)
        del y
    for name, ts in times.items():
        out[f"t_{name}"] = statistics.median(ts)
    out["repeats"] = repeats
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------


def _parse_size(s):
    try:
        n, v = s.lower().split("x")
        return int(n), int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 2048x8000, got {s!r}") from None


def _fmt_ms(t):
    return "-" if t is None else f"{t * 1e3:,.0f}" if t >= 0.1 else f"{t * 1e3:.1f}"


def _fmt_mib(m):
    return "n/a" if m is None else f"{m:,.0f}"


def _lib_cells(r, lib):
    """``lib`` ms, MiB and "value / grad" rel diff for one result; "-" where it has no counterpart of the kind."""
    if f"error_{lib}" in r:
        return ["error", "", r[f"error_{lib}"]]
    if f"t_{lib}" not in r:
        return ["-", "-", "-"]
    return [
        _fmt_ms(r[f"t_{lib}"]),
        _fmt_mib(r[f"mem_{lib}"]),
        f"{r[f'value_rel_diff_{lib}']:.1e} / {r[f'grad_rel_diff_{lib}']:.1e}",
    ]


def _row(r, libs=()):
    if "error" in r:
        return [r["kind"], f"{r['n']}x{r['v']}", "error: " + r["error"]] + [""] * (8 + 3 * len(libs))
    tk, tp, tl = r["t_ktransfer"], r["t_plain"], r["t_log_softmax"]
    mk, mp = r["mem_ktransfer"], r["mem_plain"]
    ratio = "n/a" if (mk is None or mp is None or mp <= 0) else f"{mk / mp:.2f}"
    return [
        r["kind"],
        f"{r['n']}x{r['v']}",
        _fmt_ms(tk),
        _fmt_ms(tp),
        f"{tp / tk:.2f}",
        f"{tk / tl:.1f}",
        _fmt_mib(mk),
        _fmt_mib(mp),
        ratio,
        f"{r['value_rel_diff']:.1e}",
        f"{r['grad_rel_diff']:.1e}",
    ] + [c for lib in libs for c in _lib_cells(r, lib)]


HEADER = [
    "kind",
    "N x V",
    "ktransfer ms",
    "plain ms",
    "speed-up",
    "x log_softmax",
    "ktransfer MiB",
    "plain MiB",
    "mem ratio",
    "value rel diff",
    "grad rel diff",
]


def _header(libs=()):
    return HEADER + [h for lib in libs for h in (f"{lib} ms", f"{lib} MiB", f"{lib} rel diff value / grad")]


def _print_table(rows, markdown, libs=()):
    header = _header(libs)
    cells = [header] + [_row(r, libs) for r in rows]
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
        for c in cells[1:]:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(str(c[i])) for c in cells) for i in range(len(header))]
        for c in cells:
            print("  ".join(str(x).rjust(w) for x, w in zip(c, widths, strict=True)))


def _print_mapping(kinds, libs):
    """What each library call computes, in ktransfer's terms (the rel diff columns check it)."""
    print(
        "\nThird-party counterparts (same logits, labels marking every position; value rel diff against "
        "ktransfer's value + c H(q), grad rel diff against ktransfer's gradient):\n"
    )
    for kind in kinds:
        for lib in libs:
            call, c = COUNTERPARTS.get(kind, {}).get(lib, (None, 0.0))
            if call is not None:
                offset = "" if c == 0 else f" + {c:g} H(q)" if c != 1 else " + H(q)"
                print(f"- {lib} `{call}` = ktransfer `{kind}`{offset}")


def _path_name(args):
    if args.device == "cpu" and not args.python_path:
        return "C++ kernel (ktransfer.losses.native)"
    return f"Python chunks, {'compiled (use_compile)' if args.compile else 'eager'}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--kinds",
        nargs="+",
        default=list(ALL_KINDS),
        choices=ALL_KINDS,
        metavar="KIND",
        help="divergence kinds (default: all): " + ", ".join(ALL_KINDS),
    )
    ap.add_argument(
        "--sizes",
        nargs="+",
        type=_parse_size,
        default=[_parse_size(s) for s in DEFAULT_SIZES],
        metavar="NxV",
        help="positions x vocabulary (default: " + " ".join(DEFAULT_SIZES) + ")",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per implementation, after one warm-up (default: 5, or 3 where N*V >= 1e8)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="logits dtype")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (cuda is skipped if unavailable)")
    ap.add_argument("--compile", action="store_true",
                    help="switch on ktransfer's opt-in torch.compile of the chunk math (ktransfer.losses.divergences."
                         "use_compile); compile time falls in the untimed warm-up")
    ap.add_argument("--python-path", action="store_true",
                    help="run ktransfer's Python chunk path (eager, or compiled with --compile) instead of its C++ CPU "
                         "kernel (ktransfer.losses.native), e.g. to compare the two")
    ap.add_argument("--heap-only", action="store_true",
                    help="run the workers with glibc's mmap for large blocks off (MALLOC_MMAP_MAX_=0) and no trimming, "
                         "so that a fresh [N, V] output (log_softmax's, the gradient) reuses memory instead of "
                         "page-faulting: times then compare the computations alone (Linux/glibc only)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table with the machine and the command")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results to PATH")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per configuration (default: 900)")
    ap.add_argument(
        "--compare",
        nargs="*",
        default=list(LIBS),
        choices=LIBS,
        metavar="LIB",
        help="third-party losses to add as columns where installed (default: trl torchtune; none: --compare)",
    )
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        _worker(json.loads(args._worker))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: skipping the --device cuda benchmark.")
        return 0
    if args.device == "cuda":
        machine = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        machine = f"{cpu_model()}, {os.cpu_count()} logical CPUs visible"
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    # Third-party columns: only the requested libraries that import here and have a counterpart of a selected kind.
    wanted = [lib for lib in args.compare if any(lib in COUNTERPARTS.get(k, {}) for k in args.kinds)]
    lib_versions, lib_missing = _available_libs(wanted)
    libs = [lib for lib in wanted if lib in lib_versions]
    for lib, why in lib_missing.items():
        print(
            f"# {lib}: not available, no {lib} columns ({why}); `pip install -e .[bench]` installs it",
            file=sys.stderr,
            flush=True,
        )

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if args.heap_only:  # glibc: no mmap for large blocks, freed memory kept: an [N, V] allocation stops page-faulting
        env["MALLOC_MMAP_MAX_"] = "0"
        env["MALLOC_TRIM_THRESHOLD_"] = str(1 << 40)
    load_before = os.getloadavg()
    rows = []
    for n, v in args.sizes:
        repeats = args.repeats or (3 if n * v >= BIG else 5)
        # CPU: a fresh process per kind (the RSS high-water mark needs it); CUDA: one per size (the allocator's
        # peak statistics can be reset in-process).
        groups = [args.kinds] if args.device == "cuda" else [[k] for k in args.kinds]
        for kinds in groups:
            cfg = dict(
                kinds=kinds,
                n=n,
                v=v,
                threads=args.threads,
                dtype=args.dtype,
                device=args.device,
                repeats=repeats,
                compare=libs,
                compile=args.compile,
                python_path=args.python_path,
            )
            t0 = time.perf_counter()
            got = []
            try:
                proc = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(cfg)],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=args.timeout * len(kinds),
                )
                got = [json.loads(ln[len("RESULT ") :]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                error = None
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or [""])[-1]
                    error = f"{tail} (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                error = f"timed out after {args.timeout * len(kinds):.0f} s"
            done = {r["kind"] for r in got}
            got += [dict(kind=k, n=n, v=v, error=error or "no result") for k in kinds if k not in done]
            for r in got:
                rows.append(r)
                summary = "  ".join(f"{h}={c}" for h, c in zip(_header(libs)[2:], _row(r, libs)[2:], strict=True))
                print(f"# {r['kind']} {n}x{v}: {summary}", file=sys.stderr, flush=True)
            print(f"#   ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    machine=machine,
                    threads=args.threads,
                    torch=torch.__version__,
                    dtype=args.dtype,
                    device=args.device,
                    command=command,
                    libraries=lib_versions,
                    libraries_missing=lib_missing,
                    results=rows,
                ),
                f,
                indent=1,
            )

    if args.markdown:
        print(
            f"Machine: {machine}; torch {torch.__version__}; {args.threads} threads; {args.dtype} on {args.device}; "
            f"ktransfer path: {_path_name(args)}; {'glibc heap only (no page faults on reuse); ' * args.heap_only}"
            f"{datetime.date.today().isoformat()}; load average (1 min) {load_before[0]:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after.  "
        )
        print(f"Command: `{command}`  ")
        print(
            "Times: median of the repeats, forward + backward (log_softmax: forward only); memory: peak extra "
            "over the inputs, including the [N, V] gradient; speed-up = plain / ktransfer; "
            "mem ratio = ktransfer / plain.  "
        )
        for lib in wanted:
            print(f"{lib}: {lib_versions[lib] if lib in lib_versions else 'not available: ' + lib_missing[lib]}  ")
        print()
    _print_table(rows, args.markdown, libs)
    if libs:
        _print_mapping(args.kinds, libs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
