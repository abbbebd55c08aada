"""The ``ktransfer`` command line: a thin layer that parses arguments and calls library functions.

Each sub-command lives in its own module ``ktransfer.cli.<name>`` with two functions:

- ``add_arguments(parser: argparse.ArgumentParser) -> None`` declares its options (with help text);
- ``run(args: argparse.Namespace) -> int`` calls the library and returns the exit status.

Only the module of the command being run is imported, so ``ktransfer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Exceptions that mean bad input (a file, folder, option or device the user gave): rc 2 with one line. Set
# KTRANSFER_TRACEBACK=1 to see the traceback instead.
USER_ERRORS = (ValueError, LookupError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               UnicodeError, RecursionError)


def one_line(error: BaseException) -> str:
    """``error`` as one line: its message's lines joined (a path it names kept), or its type when it has none."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if not isinstance(error, (KeyError, RecursionError)) else f"{type(error).__name__}: {text}"

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("ktransfer.cli.toy", "the paper's 4-action toy experiment (Fig. 3) and gradient picture (Fig. 2)"),
    "data": ("ktransfer.cli.data", "download, check and inspect parallel corpora"),
    "train": ("ktransfer.cli.train", "train a teacher or learner (nll) or distil a learner (kd, ka, half, ...)"),
    "evaluate": ("ktransfer.cli.evaluate", "beam-search a corpus split or file and score it with sacreBLEU"),
    "translate": ("ktransfer.cli.translate", "translate stdin to stdout with a trained model"),
    "generate": ("ktransfer.cli.generate", "a causal model's generations for prompts (chat template applied), JSONL"),
    "reproduce": ("ktransfer.cli.reproduce", "the paper's experiment as resumable stages, with analyses and report"),
    "report": ("ktransfer.cli.report", "rebuild the report (tables, figures) of a `reproduce` run folder"),
    "distill-data": ("ktransfer.cli.distill_data", "sequence-level KD data: the teacher's translations of a split"),
    "export": ("ktransfer.cli.export", "a checkpoint as a plain Hugging Face model folder (LoRA adapters merged)"),
    "build-kernel": ("ktransfer.cli.build_kernel", "build the C++ CPU kernel ahead of the first run (optional)"),
}

DESCRIPTION = """\
ktransfer: knowledge transfer for sequence generation.

A small learner p learns from a frozen teacher q by minimising
    L = (1 - lam) * NLL(reference) + lam * sum_t D(p(.|h_t), q(.|h_t))
where D is forward KL(q || p) (KD: the teacher tells) or backward KL(p || q)
(KA: the learner proposes, the teacher judges), or another divergence.

Run `ktransfer COMMAND --help` for the options of one command.
"""


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser that takes options anywhere among its positional items (``train A=1 --save-every 1
    B=2``), through argparse's intermixed parsing; one with sub-commands of its own (``data``) parses as usual."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module is imported to declare its options."""
    parser = argparse.ArgumentParser(
        prog="ktransfer", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from ktransfer import __version__

    parser.add_argument("--version", action="version", version=f"ktransfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars for every checkpoint read or written
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as e:  # bad input a command did not catch itself: one line, not a traceback
        if os.environ.get("KTRANSFER_TRACEBACK"):
            raise
        print(f"ktransfer {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ktransfer ... | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
