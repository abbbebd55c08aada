"""``ktransfer build-kernel``: build (or check) the C++ CPU kernel ahead of the first run; optional."""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("The kernel is otherwise built by the first divergence call (~45 s, once). It is cached per "
                     "Python environment under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).")
    parser.add_argument("--where", action="store_true", help="only print the cache folder of this environment")


def run(args: argparse.Namespace) -> int:
    from ktransfer.losses import native

    folder = native.build_folder()
    if args.where:
        print(folder)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    native.use_native(True)
    if native.kernel() is None:
        print(f"ktransfer build-kernel: error: the CPU kernel could not be built in {folder} (see above); "
              "ktransfer runs its Python path", file=sys.stderr)
        return 1
    print(f"ktransfer's CPU kernel is built: {folder}")
    return 0
