"""``ktransfer toy``: the paper's 4-action toy (Fig. 3), optionally the gradient picture (Fig. 2) and a sweep."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
Forward (KD) minimises sum_{y in S} q (log q - log p) on the teacher's top-k S; Backward (KA) minimises
sum_{y in S} p (log p - log q) on the learner's own top-k S, re-selected every epoch. An epoch is one full-batch
optimiser step on the learner's V logits. Terms outside S are dropped (not renormalised) unless --renormalize.

writes, in --output:
  toy.json            {"q", "k", "forward": {"p", "loss", "support"}, "backward": {...}, "settings", "summary"}
  toy.png             p_y over epochs (q_y dashed), the support S, the loss; Forward left, Backward right
  toy_gradients.png   with --gradients: G_{q||p} = 1 - q/p and G_{p||q} = log(p/q), Gaussian p vs mixture q
  toy_sweep.json/.md  with --sweep: final distances to q for renormalised or not x sgd/adam x 3 learning rates

examples:
  ktransfer toy -o runs/toy
  ktransfer toy --optimizer adam --lr 0.05 --epochs 500 -o runs/toy_adam
  ktransfer toy --renormalize --init-logits 0 0 1 1 -o runs/toy_renorm
  ktransfer toy --gradients --sweep --epochs 2000 -o runs/toy_all

what the runs show, with the mathematics of each formulation: docs/toy.md
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--q", type=float, nargs="+", default=[0.4, 0.3, 0.2, 0.1], metavar="Q",
                        help="teacher probabilities q_0 .. q_{V-1}, > 0, summing to 1 (default: 0.4 0.3 0.2 0.1)")
    parser.add_argument("--k", type=int, default=2, help="size of the top-k support S (default: 2)")
    parser.add_argument("--epochs", type=int, default=200,
                        help="optimiser steps, one full-batch step per epoch (default: 200)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                        help="plain SGD (no momentum) or Adam with torch defaults (default: sgd)")
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate (default: 0.5)")
    parser.add_argument("--init-logits", type=float, nargs="+", default=None, metavar="Z",
                        help="the learner's V logits at epoch 0 (default: log of q reversed, i.e. p = 0.1 0.2 0.3 0.4 "
                             "for the default q: the learner's top-2 is the teacher's bottom-2)")
    parser.add_argument("--renormalize", action="store_true",
                        help="renormalise p and q over S before the sum (default: drop the terms outside S, "
                             "the paper's Sec. 3.3 formula)")
    parser.add_argument("--tail", action="store_true",
                        help="keep the rest of the actions as one outcome beside S (a proper divergence of the "
                             "(k+1)-outcome coarsenings; not with --renormalize)")
    parser.add_argument("-o", "--output", default="runs/toy", help="output folder (default: runs/toy)")
    parser.add_argument("--gradients", action="store_true",
                        help="also write toy_gradients.png, the gradient picture of Fig. 2")
    parser.add_argument("--sweep", action="store_true",
                        help="also run renormalised/not x sgd/adam x 3 learning rates for --epochs each and write "
                             "toy_sweep.json and toy_sweep.md (a markdown table of the final distances to q)")


def _fmt(x) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in x) + ")"


def run(args: argparse.Namespace) -> int:
    from ktransfer.experiments import toy

    try:
        result = toy.run_toy(args.q, k=args.k, epochs=args.epochs, optimizer=args.optimizer, lr=args.lr,
                             init_logits=args.init_logits, renormalize=args.renormalize, tail=args.tail)
    except ValueError as e:
        print(f"ktransfer toy: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    written = [toy.save_json(result, out / "toy.json"), toy.plot_toy(result, out / "toy.png")]
    print(f"teacher q = {_fmt(result['q'])}, k = {args.k}, epochs = {args.epochs}, {args.optimizer} lr = {args.lr:g}, "
          f"{'renormalised' if args.renormalize else 'with the tail outcome' if args.tail else 'not renormalised'}")
    print(f"learner at epoch 0: p = {_fmt(result['forward']['p'][0])}")
    for order, s in result["summary"].items():
        first = "never" if s["first_switch_epoch"] is None else f"first at epoch {s['first_switch_epoch']}"
        kl = "inf" if s["kl_q_p"] is None else f"{s['kl_q_p']:.4f}"
        print(f"{order:>8}: final p = {_fmt(s['p_final'])}  TV = {s['tv']:.4f}  KL(q||p) = {kl}  "
              f"S: {result[order]['support'][0]} -> {s['support_final']}, {s['support_switches']} switches ({first})")
    if args.gradients:
        written.append(toy.plot_gradients(out / "toy_gradients.png"))
    if args.sweep:
        rows = toy.sweep(args.q, k=args.k, epochs=args.epochs, init_logits=args.init_logits)
        table = toy.format_sweep(rows)
        (out / "toy_sweep.json").write_text(json.dumps(rows, allow_nan=False, indent=1) + "\n")
        (out / "toy_sweep.md").write_text(table + "\n")
        written += [out / "toy_sweep.json", out / "toy_sweep.md"]
        print(table)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
