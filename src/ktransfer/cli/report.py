"""``ktransfer report``: rebuild RUN/results.json, RUN/figures and RUN/report.md of a ``reproduce`` run folder."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a run folder written by `ktransfer reproduce`")


def run(args: argparse.Namespace) -> int:
    from ktransfer.experiments.report import write_report

    try:
        write_report(args.run_dir)
    except FileNotFoundError as e:
        print(f"ktransfer report: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.run_dir}/report.md")
    return 0
