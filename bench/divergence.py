"""Benchmark ``ktransfer.divergence`` against a plain PyTorch composition: time, peak extra memory, agreement.

For every kind and every N x V (N positions, V vocabulary) this measures, on the same random logits:

* ``ktransfer``: ``ktransfer.divergence(z, u, kind)`` with default settings (full support, T=1, reduction="mean"),
  forward + backward;
* ``plain``: the textbook composition written out below in ``PLAIN`` (``log_softmax`` of both logits, elementwise
  terms, sum over V, mean over positions), forward + backward through autograd;
* ``log_softmax``: one ``torch.log_softmax`` forward pass over one ``[N, V]`` tensor, as a yardstick
  (column "x log_softmax" = ktransfer time / log_softmax time).

Times are the median of ``--repeats`` runs after one warm-up run; the three are interleaved run by run, so that load
from other processes hits them alike.

Peak extra memory
-----------------
On CPU each (kind, N x V) runs in a fresh subprocess. It allocates the inputs, then, for each
implementation, resets the kernel's resident-set high-water mark (writing ``5`` to ``/proc/self/clear_refs``, Linux
>= 4.0), reads ``VmRSS`` from ``/proc/self/status``, runs forward + backward once (this is also the warm-up), and
reads ``VmHWM``: extra = VmHWM - VmRSS-before. This is what the process really had resident at its peak, including
the ``[N, V]`` gradient that lands in ``z.grad`` (both implementations must produce it), allocator overheads and
temporaries, and it needs no third-party package. ktransfer is measured first in the fresh process: its chunk-sized
temporaries (a few MiB) are served from the glibc heap, which is empty then; the plain composition's temporaries are
``[N, V]`` tensors, far above glibc's mmap threshold, so they are fresh mappings and are counted in full even after
ktransfer ran. (If ``/proc/self/clear_refs`` is not writable, the column says "n/a".)
On CUDA (one subprocess per N x V, all kinds in it): ``torch.cuda.max_memory_allocated()`` after the same first run
minus ``torch.cuda.memory_allocated()`` before it, after ``torch.cuda.reset_peak_memory_stats()`` (live tensors only,
not the caching allocator's reserve).

Agreement: "value rel diff" = |D_ktransfer - D_plain| / |D_plain|; "grad rel diff" = max |g_k - g_p| / max |g_p|
over the first 512 positions (only that slice of each gradient is kept, so that it does not inflate the next
measurement's baseline).

Usage (from the repository root)::

    .venv/bin/python bench/divergence.py --markdown
    .venv/bin/python bench/divergence.py --kinds forward_kl reverse_kl --sizes 2048x8000 --repeats 5
    .venv/bin/python bench/divergence.py --device cuda --dtype bfloat16 --markdown

Default: all 7 kinds x N in {2048, 8192} x V in {8000, 32000}, float32, 2 threads; repeats 5, or 3 where N*V >= 10^8.
The largest size needs about 8 GB of free memory (inputs 2 GB + the plain composition's temporaries).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

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


def _worker(cfg):
    """Run ``cfg["kinds"]`` on one N x V in this process; print one ``RESULT {json}`` line per kind."""
    import torch

    torch.set_num_threads(cfg["threads"])
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

    rows = min(N, WARM_ROWS)
    for kind in cfg["kinds"]:
        zs = z[:rows].detach().clone().requires_grad_(True)
        for fn in (_ktransfer, _plain):
            fn(kind, zs, u[:rows]).backward()
        del zs
    sync()
    for kind in cfg["kinds"]:
        out = _measure(kind, z, zd, u, cfg["repeats"], sync, cuda)
        print("RESULT " + json.dumps(out), flush=True)


def _measure(kind, z, zd, u, repeats, sync, cuda):
    import torch

    N, V = z.shape
    impls = {"ktransfer": _ktransfer, "plain": _plain}
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
    del gk, gp, grads

    # Warm-up of the yardstick, then interleaved timed repeats.
    with torch.no_grad():
        torch.log_softmax(zd, dim=-1)
    times = {"ktransfer": [], "plain": [], "log_softmax": []}
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


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def _row(r):
    if "error" in r:
        return [r["kind"], f"{r['n']}x{r['v']}", "error: " + r["error"]] + [""] * 8
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
    ]


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


def _print_table(rows, markdown):
    cells = [HEADER] + [_row(r) for r in rows]
    if markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADER) - 2)) + "|")
        for c in cells[1:]:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(str(c[i])) for c in cells) for i in range(len(HEADER))]
        for c in cells:
            print("  ".join(str(x).rjust(w) for x, w in zip(c, widths, strict=True)))


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
    ap.add_argument("--markdown", action="store_true", help="print a markdown table with the machine and the command")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results to PATH")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per configuration (default: 900)")
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
        machine = f"{_cpu_model()}, {os.cpu_count()} logical CPUs visible"
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()
    rows = []
    for n, v in args.sizes:
        repeats = args.repeats or (3 if n * v >= BIG else 5)
        # CPU: a fresh process per kind (the RSS high-water mark needs it); CUDA: one per size (the allocator's
        # peak statistics can be reset in-process).
        groups = [args.kinds] if args.device == "cuda" else [[k] for k in args.kinds]
        for kinds in groups:
            cfg = dict(
                kinds=kinds, n=n, v=v, threads=args.threads, dtype=args.dtype, device=args.device, repeats=repeats
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
                summary = "  ".join(f"{h}={c}" for h, c in zip(HEADER[2:], _row(r)[2:], strict=True))
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
                    results=rows,
                ),
                f,
                indent=1,
            )

    if args.markdown:
        print(
            f"Machine: {machine}; torch {torch.__version__}; {args.threads} threads; {args.dtype} on {args.device}; "
            f"{datetime.date.today().isoformat()}; load average (1 min) {load_before[0]:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after.  "
        )
        print(f"Command: `{command}`  ")
        print(
            "Times: median of the repeats, forward + backward (log_softmax: forward only); memory: peak extra "
            "over the inputs, including the [N, V] gradient; speed-up = plain / ktransfer; "
            "mem ratio = ktransfer / plain.\n"
        )
    _print_table(rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
