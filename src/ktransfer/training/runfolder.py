"""The run folder of a config: its default name, whether a rerun is the same run, and moving an old run aside.

The rule (as Hugging Face ``Trainer`` and TRL: nothing is resumed by surprise): a folder that holds a run is resumed
only when the config asks for the same run, i.e. differs from the folder's ``config.yaml`` in ``SAFE_KEYS`` alone. Any
other difference is refused before anything is read or loaded, naming the keys and the two ways on: another
``train.out_dir``, or ``train.resume=false``, which moves the old run aside to ``RUN.old-<time>`` (never deleted) and
starts over in ``RUN``. Without ``train.out_dir`` the folder is ``runs/<objective>-<hash>``, the hash of every key but
``SAFE_KEYS``: the same command finds its folder again (and resumes it); two different experiments never meet.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ktransfer.models.checkpoint import STATE_FILE, run_config_of
from ktransfer.training import aliases
from ktransfer.training.config import ConfigError, RunConfig, config_from_dict, config_to_dict, load_config

# Keys a resumed run may change: none of them changes what the weights trained so far are, nor the updates still to
# come; they say where the files go, when to stop, how often to log, save or report, and how the work is spread.
SAFE_KEYS = (
    "train.out_dir",  # the folder itself (a relative or an absolute spelling of it)
    "train.resume",  # how to treat the folder
    "train.epochs", "train.max_steps", "train.patience",  # when to stop (extending a finished run goes on)
    "train.max_nonfinite",  # when to give up on non-finite steps
    "train.log_every", "train.save_every", "train.report_to",  # how often to log and save `last`, where to report
    "train.num_threads", "train.device",  # where it runs (the same float32 math on another device, not bitwise)
    "train.distributed",  # ddp or fsdp: the same update (docs/distributed.md); optim.accumulate is checked apart
    "eval.batch_size", "eval.valid_examples",  # validation batching, and generations shown in train.log
)
ACCUMULATE = "optim.accumulate"  # same update when `optim.accumulate x processes` is kept (docs/distributed.md)


def choose(cfg: RunConfig) -> Path:
    """The run folder: ``train.out_dir``, or (when it is None) ``default_out_dir(cfg)``, which is written into
    ``cfg`` so that the saved config names its folder."""
    if cfg.train.out_dir is None:
        cfg.train.out_dir = default_out_dir(cfg)
    return Path(cfg.train.out_dir)


def default_out_dir(cfg: RunConfig) -> str:
    """``runs/<objective>-<8 hex digits>``: a hash of every key of ``cfg`` but ``SAFE_KEYS``, each under the name it
    had before ``ktransfer.training.aliases.RENAMED`` (so a folder named before the renames is found again)."""
    flat = {aliases.old_name(k): v for k, v in _flat(config_to_dict(cfg)).items() if k not in SAFE_KEYS}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"runs/{cfg.objective.kind}-{digest}"


def check_same_run(cfg: RunConfig, out_dir: Path, processes: int) -> list[str]:
    """Refuse to resume ``out_dir`` with a config that is not its run's; returns the safe changes (``key: old ->
    new``) for the log.

    Raises:
        ConfigError: the config differs from the folder's in a key outside ``SAFE_KEYS`` (or in ``optim.accumulate x
            processes``), or the folder's config cannot be read.
    """
    saved, saved_processes = _saved(out_dir)
    now = _flat(config_to_dict(cfg))
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}
    before, after = changed.pop(ACCUMULATE, (now[ACCUMULATE], now[ACCUMULATE]))
    if before * saved_processes != after * processes:
        changed[f"{ACCUMULATE} x processes"] = (f"{before} x {saved_processes}", f"{after} x {processes}")
    unsafe = {k: v for k, v in changed.items() if k not in SAFE_KEYS}
    if unsafe:
        raise ConfigError(
            f"train.out_dir: {out_dir} holds another run; the config differs from its config.yaml in "
            + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in unsafe.items())
            + ". Choose another train.out_dir, or set train.resume=false to start over in it (the old run is moved "
            f"aside to {out_dir}.old-<time>, not deleted)", key="train.out_dir")
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items() if k != "train.out_dir"]


def move_aside(out_dir: Path) -> Path:
    """Rename ``out_dir`` to a new sibling ``<name>.old-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... when taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = out_dir.with_name(f"{out_dir.name}.old-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = out_dir.with_name(f"{out_dir.name}.old-{stamp}-{n}")
    out_dir.rename(aside)
    return aside


def _saved(out_dir: Path) -> tuple[dict[str, Any], int]:
    """The folder's config (``config.yaml``, else the ``last`` checkpoint's) as ``{dotted key: value}``, and the
    number of processes that wrote ``last`` (1 when not recorded)."""
    last, yaml_path = out_dir / "checkpoints" / "last", out_dir / "config.yaml"
    try:
        cfg = load_config(yaml_path, []) if yaml_path.is_file() else config_from_dict(run_config_of(last), str(last))
    except ConfigError as e:
        raise ConfigError(f"train.out_dir: cannot tell whether {out_dir} holds this run ({e}); choose another "
                          "train.out_dir, or set train.resume=false to start over in it", key="train.out_dir") from None
    try:
        state = json.loads((last / STATE_FILE).read_text(encoding="utf-8"))["train_state"]
        processes = int(state.get("processes", 1))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        processes = 1
    return _flat(config_to_dict(cfg)), processes


def _flat(d: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, sub in d.items() for key, value in sub.items()}
