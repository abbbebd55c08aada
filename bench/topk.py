"""Top-k supports against the full vocabulary: does summing over k tokens cost more than summing over all V?

    .venv/bin/python bench/topk.py --markdown                        # 512 x 8000, 1 thread, k in {1, 8, 16, 64, 256}
    .venv/bin/python bench/topk.py --size 2048x32000 --threads 2 --dtype bfloat16

For each kind, in one process on the same random logits, it times forward + backward of
``ktransfer.divergence(z, u, kind)`` over the full vocabulary and with ``top_k=k`` (the kind's default support:
the teacher's top-k for forward-type kinds, the learner's for reverse-type ones, each its own for ``half``, the union
for jsd and tvd), interleaved run by run, median of ``--repeats``; and one ``torch.log_softmax`` forward pass over one
``[N, V]`` tensor as a yardstick. "x full" is the top-k time over the full-vocabulary time of the same kind. The
C++ CPU kernel selects the k largest entries itself (``ktransfer.losses.native``); ``KTRANSFER_NATIVE=0`` times the
Python
path instead. ``--tail`` adds, for each k, the same support with ``tail=True`` (the rest of the vocabulary as one
more outcome) and its time over the plain top-k time ("x top-k"), in the kernel as the plain top-k (or the Python path
with ``KTRANSFER_NATIVE=0``).

The script re-runs itself with glibc's mmap for large blocks off and no trimming (``MALLOC_MMAP_MAX_=0``, as
``bench/divergence.py --heap-only``), so that each fresh ``[N, V]`` gradient reuses freed memory: otherwise glibc's
adaptive mmap threshold makes the same call page-fault or not depending on what ran before (seen: the full-vocabulary
forward_kl at 512 x 8000 took 16 ms after the k = 256 runs and 5.9 ms alone). ``--default-allocation`` keeps the
process's allocator settings. Timings are only meaningful on an otherwise idle machine: the header prints the load
average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import cpu_model, load_average  # noqa: E402  (bench/pipeline.py)

KINDS = ("forward_kl", "reverse_kl", "half", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def _size(s: str) -> tuple[int, int]:
    try:
        n, v = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x8000, got {s!r}") from None
    if n < 1 or v < 2:
        raise argparse.ArgumentTypeError(f"size needs N >= 1 and V >= 2, got {s!r}")
    return n, v


def _median_ms(fns: dict, repeats: int) -> dict:
    """Median wall time (ms) of each callable, interleaved run by run after one untimed warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=_size, default=(512, 8000), help="positions x vocabulary (default: 512x8000)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 16, 64, 256],
                    help="top-k sizes (default: 1 8 16 64 256)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), metavar="KIND",
                    help="divergence kinds (default: all): " + ", ".join(KINDS))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="logits dtype")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per configuration (default: 15)")
    ap.add_argument("--tail", action="store_true", help="also time each k with tail=True (x top-k of the same k)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table with the machine and the command")
    ap.add_argument("--default-allocation", action="store_true",
                    help="keep glibc's default large-block mmap (page faults on fresh [N, V] gradients)")
    args = ap.parse_args(argv)
    if not args.default_allocation and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env)
    N, V = args.size
    bad = [k for k in args.ks if not 1 <= k <= V]
    if bad:
        ap.error(f"--ks must lie in [1, V={V}], got {bad}")

    import torch

    from ktransfer import divergence
    from ktransfer.losses import native

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    z = (2.5 * torch.randn(N, V, generator=g)).to(dtype).requires_grad_(True)
    u = (2.5 * torch.randn(N, V, generator=g)).to(dtype)
    load_before = load_average()

    def step(kind, k, tail=False):
        def run():
            z.grad = None
            divergence(z, u, kind, top_k=k, tail=tail).backward()
        return run

    rows = []
    for kind in args.kinds:
        fns = {"log_softmax": lambda: torch.log_softmax(z.detach(), -1), "full": step(kind, None)}
        fns.update({k: step(kind, k) for k in args.ks})
        if args.tail:
            fns.update({("tail", k): step(kind, k, tail=True) for k in args.ks})
        ms = _median_ms(fns, args.repeats)
        rows.append((kind, ms))
        line = "  ".join(f"k={k} {ms[k]:.2f} ({ms[k] / ms['full']:.2f}x)" for k in args.ks)
        if args.tail:
            line += "  " + "  ".join(f"k={k} tail {ms['tail', k]:.2f} ({ms['tail', k] / ms[k]:.2f}x top-k)"
                                     for k in args.ks)
        print(f"# {kind}: full {ms['full']:.2f} ms ({ms['full'] / ms['log_softmax']:.1f}x log_softmax)  {line}",
              flush=True)

    path = "C++ kernel (ktransfer.losses.native)" if native.kernel() is not None else "Python chunk path"
    header = ["kind", "log_softmax ms", "full ms", *(f"k={k} ms (x full)" for k in args.ks),
              *((f"k={k} tail ms (x top-k)" for k in args.ks) if args.tail else ())]
    print()
    if args.markdown:
        print(f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs visible; torch "
              f"{torch.__version__}; {args.threads} thread(s); {args.dtype}; {N} x {V}; ktransfer path: {path}; "
              f"{'default allocation' if args.default_allocation else 'glibc heap only (no page faults on reuse)'}; "
              f"{datetime.date.today()}; load average (1/5/15 min) {load_before} before, {load_average()} after.  ")
        print(f"Command: `python bench/topk.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ")
        print("Times: median of the repeats, forward + backward through `ktransfer.divergence` (log_softmax: one "
              "forward pass); x full = top-k time / full-vocabulary time of the same kind.\n")
        print("| " + " | ".join(header) + " |")
        print("|---|" + "---:|" * (len(header) - 1))
    for kind, ms in rows:
        cells = [kind, f"{ms['log_softmax']:.2f}", f"{ms['full']:.2f}",
                 *(f"{ms[k]:.2f} ({ms[k] / ms['full']:.2f})" for k in args.ks),
                 *((f"{ms['tail', k]:.2f} ({ms['tail', k] / ms[k]:.2f})" for k in args.ks) if args.tail else ())]
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
