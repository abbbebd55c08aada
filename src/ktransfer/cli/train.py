"""``ktransfer train``: train a teacher or learner with NLL, or distil a learner from a frozen teacher."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

EPILOG = """\
examples:
  ktransfer train model.preset=cpu-teacher objective.kind=nll train.out_dir=runs/teacher
  torchrun --nproc_per_node 8 -m ktransfer train model.preset=cpu-teacher train.out_dir=runs/teacher
  ktransfer train runs/teacher train.epochs=20        # a run folder stands for its config.yaml (here: more epochs)
  ktransfer train model.preset=cpu-learner model.teacher=runs/teacher/checkpoints/best \\
      objective.kind=ka objective.divergence_weight=0.5 train.out_dir=runs/ka
  ktransfer train --resume runs/ka          # continue a run folder exactly where it stopped
  ktransfer train runs/ka objective.divergence_weight=0.2 train.resume=false   # start over there (old run moved aside)
  ktransfer train --help-config             # every key, its default and help; the rules over options

  # a Hugging Face teacher (folder or cached hub id): the learner takes its tokenizer, no BPE is trained
  ktransfer train model.teacher=Helsinki-NLP/opus-mt-de-en model.preset=cpu-learner objective.kind=kd
  # your own data: prompt/completion or chat JSONL, text, a datasets folder (data.format=auto says which)
  ktransfer train data.corpus=chat.jsonl model.teacher=llama-teacher/ model.init=small-llama/ \\
      model.lora_r=16 train.gradient_checkpointing=true objective.kind=ka objective.top_k=8

Settings: defaults < CONFIG.yaml < KEY=VALUE overrides (dotted keys; --help-config lists them all). The run folder
(train.out_dir) receives config.yaml, tokenizer/, metrics.jsonl, train.log and checkpoints/{last,best}: Hugging
Face folders (AutoModelFor*.from_pretrained reads them) with ktransfer's training_state.json beside them. Without
train.out_dir the folder is runs/<objective>-<hash of the config>. A run folder that holds checkpoints/last is
resumed when the config is the same run (it may change only when to stop, logging, threads, device); any other
change is refused (status 2): choose another train.out_dir, or train.resume=false moves the old run aside to
RUN.old-<time> and starts over. SIGINT or SIGTERM saves checkpoints/last and exits with status 130 or 143; a
configuration error exits with status 2.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("items", nargs="*", metavar="CONFIG.yaml | RUN | KEY=VALUE",
                        help="a YAML config file or a run folder (its config.yaml), then KEY=VALUE overrides")
    parser.add_argument("--resume", action="store_true",
                        help="continue from train.out_dir/checkpoints/last; an error when there is none (or with "
                        "train.resume=false)")
    parser.add_argument("--save-every", type=int, default=None, metavar="N",
                        help="same as train.save_every=N: also save checkpoints/last every N updates")
    parser.add_argument("--max-nonfinite", type=int, default=None, metavar="N",
                        help="same as train.max_nonfinite=N: stop after N consecutive non-finite steps")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its default and help, then the rules over several options")


def _split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """(config file or None, overrides); a run folder stands for its config.yaml."""
    from ktransfer.training.config import ConfigError

    files = [i for i in items if "=" not in i]
    if len(files) > 1:
        raise ConfigError(f"expected one config file and KEY=VALUE overrides, got several files: {files}")
    path = files[0] if files else None
    overrides = [i for i in items if "=" in i]
    if path is not None and Path(path).is_dir():  # a run folder: its resolved config, training into that folder
        overrides.insert(0, f"train.out_dir={path}")
        path = str(Path(path) / "config.yaml")
    return path, overrides


def run(args: argparse.Namespace) -> int:
    from ktransfer.training.config import ConfigError, config_help, load_config

    if args.help_config:
        print(config_help())
        return 0
    from ktransfer.data.corpora import CorpusError
    from ktransfer.models.checkpoint import CheckpointError
    from ktransfer.runtime.distributed import launch_rank
    from ktransfer.runtime.runlock import RunFolderBusy
    from ktransfer.training.train import NonFiniteLossError, train

    try:
        path, overrides = _split_items(args.items)
        for key, value in (("train.save_every", args.save_every), ("train.max_nonfinite", args.max_nonfinite)):
            if value is not None:
                overrides.append(f"{key}={value}")  # checked, and saved with the run, like any override
        cfg = load_config(path, overrides)
        result = train(cfg, require_resume=args.resume)
    except ConfigError as e:
        print(f"ktransfer train: config error: {e}", file=sys.stderr)
        return 2
    except (CorpusError, CheckpointError, ValueError) as e:  # bad input: a corpus, model folder, device
        print(f"ktransfer train: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, RunFolderBusy) as e:
        print(f"ktransfer train: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, read-only folder, permission: one line naming the path
        where = e.filename or "a file of the run folder"
        print(f"ktransfer train: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    stopped = result["stopped"] or ""
    if stopped.startswith("signal:"):
        return 128 + int(signal.Signals[stopped.removeprefix("signal:")])
    if launch_rank() != 0:  # torchrun: rank 0 alone reports
        return 0
    valid = result["valid"] or {}
    last = (f"last valid BLEU {valid['bleu']:.2f}" if valid.get("bleu") is not None else
            f"last valid ppl {valid.get('ppl', float('nan')):.2f}")
    print(f"{result['out_dir']}: {result['stopped']} after {result['step']} steps; best "
          f"{'BLEU' if cfg.train.valid_bleu else 'valid loss'} {result['best']} (epoch {result['best_epoch']}, "
          f"step {result['best_step']}); "
          f"{last}")
    return 0
