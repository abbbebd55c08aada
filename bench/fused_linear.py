"""Fused head + divergence against materialised logits: peak memory and time of forward + backward.

Each configuration runs in a fresh subprocess; peak extra memory is the growth of the process's maximum resident set
size (``ru_maxrss``) from just after the inputs are allocated to the end of forward + backward, so it counts every
temporary the step allocates (logits, softmaxes, gradients), on a CPU. Time is the median of ``--repeats`` runs.

    python bench/fused_linear.py                      # N=4096 positions, H=512, V in {32000, 128000}
    python bench/fused_linear.py --sizes 2048x32000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def _one(path: str, N: int, H: int, V: int, repeats: int, threads: int) -> dict:
    import torch

    from ktransfer import transfer_loss
    from ktransfer.losses.fused_linear import fused_linear_divergence

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    W = (0.02 * torch.randn(V, H, generator=g)).requires_grad_(True)
    ht = torch.randn(N, H, generator=g)
    Wt = 0.02 * torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)

    def step():
        if path == "fused":
            r = fused_linear_divergence(h, W, ht, Wt, "ka", labels=labels, lam=0.5)
        else:  # materialise both logits, then the (already chunked) transfer_loss
            with torch.no_grad():
                u = ht @ Wt.T
            r = transfer_loss(h @ W.T, u, labels, objective="ka", lam=0.5)
        r.loss.backward()
        h.grad = W.grad = None
        return float(r.loss)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, value = [], None
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = sorted(times[1:])
    return {"path": path, "N": N, "H": H, "V": V, "ms": 1000 * times[len(times) // 2],
            "peak_extra_mib": (peak - base) / 1024, "loss": value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["4096x32000", "4096x128000"], help="NxV (positions x vocabulary)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        path, N, H, V, rep = args._child
        print(json.dumps(_one(path, int(N), int(H), int(V), int(rep), args.threads)))
        return
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    print(f"command: python bench/fused_linear.py {' '.join(sys.argv[1:])}\n")
    print("| N x V (H) | path | ms fwd+bwd | peak extra MiB | loss |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        N, V = map(int, size.split("x"))
        for path in ("materialised", "fused"):
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--_child", path, str(N),
                                  str(args.hidden), str(V), str(args.repeats)], capture_output=True, text=True)
            if out.returncode:
                print(f"| {N} x {V} | {path} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {N} x {V} ({args.hidden}) | {path} | {r['ms']:.0f} | {r['peak_extra_mib']:.0f} | "
                  f"{r['loss']:.5f} |", flush=True)


if __name__ == "__main__":
    main()
