"""ktransfer's fused head + jsd against Liger-Kernel's ``LigerFusedLinearJSDLoss`` on a CPU: time and agreement.

Both take hidden states and the two output layers and never hold the ``[N, V]`` logits of either model at once:

* ktransfer: ``fused_linear_divergence(h, W, g, Wt, "jsd", labels=y, lam=1.0, beta=b)`` (per-token mean);
* Liger: ``LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, beta=b, compiled=...)(h, W, g, Wt, y)``
  (its chunked-loss module is plain PyTorch + ``torch.func``, so it runs on a CPU; Liger's Triton kernels, e.g.
  ``LigerJSD`` on log-probabilities, need a GPU and fail here with "0 active drivers").

Forward + backward, median of ``--repeats`` after one warm-up (which also compiles Liger's chunk with
``--compiled``); "value rel diff" and "grad rel diff" (max-norm, gradient of h) compare Liger with ktransfer.

Usage::

    .venv/bin/python bench/liger.py --sizes 1024x32000 --hidden 256 --betas 0 0.5 1 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline import cpu_model  # noqa: E402


def _time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _run(which, h, W, ht, Wt, y, beta, liger):
    """Forward + backward of ktransfer ("k") or Liger ("l"); returns the value and the gradient of h."""
    from ktransfer import fused_linear_divergence

    hh = h.clone().requires_grad_(True)
    W.grad = None
    if which == "k":
        loss = fused_linear_divergence(hh, W, ht, Wt, "jsd", labels=y, lam=1.0, beta=beta).loss
    else:
        loss = liger(hh, W, ht, Wt, y)
    loss.backward()
    return float(loss.detach()), hh.grad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1024x32000"], help="N x V (default 1024x32000)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--betas", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compiled", action="store_true", help="Liger's compiled chunk (torch.compile; slow first call)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from importlib.metadata import version

    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    print(f"Machine: {cpu_model()}; torch {torch.__version__}; {args.threads} threads; liger-kernel "
          f"{version('liger-kernel')} (compiled={args.compiled}); load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| beta | N x V | H | ktransfer ms | Liger ms | Liger / ktransfer | value rel diff | grad rel diff |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        N, V = (int(x) for x in size.split("x"))
        g = torch.Generator().manual_seed(0)
        H = args.hidden
        h = torch.randn(N, H, generator=g)
        ht = torch.randn(N, H, generator=g)
        W = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(True)
        Wt = torch.randn(V, H, generator=g) / H**0.5
        y = torch.randint(0, V, (N,), generator=g)
        for beta in args.betas:
            liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                            compiled=args.compiled)

            def run(which, case=(h, W, ht, Wt, y, beta, liger)):
                return _run(which, *case)

            vk, gk = run("k")
            vl, gl = run("l")
            tk = _time(lambda: run("k"), args.repeats)
            tl = _time(lambda: run("l"), args.repeats)
            dv = abs(vl - vk) / max(abs(vk), 1e-30)
            dg = float((gl - gk).abs().max() / gk.abs().max())
            print(f"| {beta:g} | {N}x{V} | {H} | {tk * 1e3:,.0f} | {tl * 1e3:,.0f} | {tl / tk:.2f} | {dv:.1e} | "
                  f"{dg:.1e} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
