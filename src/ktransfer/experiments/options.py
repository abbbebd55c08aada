"""``reproduce``'s overrides: ``key=value`` items split into the experiment's options and each stage's config
overrides, and the config of one training stage (preset < user overrides < the settings the layout fixes)."""

from __future__ import annotations

import dataclasses
import typing

from ktransfer.experiments.experiment import PREFIX_SOURCES, SMOOTHING, STAGE_KINDS, TRAIN_STAGES, Options, column
from ktransfer.experiments.presets import Preset
from ktransfer.training import aliases
from ktransfer.training.config import SECTIONS, ConfigError, RunConfig, convert_value, load_config

_TOPK_ALL = ("V", "v")  # topk_values: the whole vocabulary (None)


def parse_overrides(preset: Preset, items: list[str]) -> tuple[Options, dict[str, list[str]]]:
    """The experiment's options (preset, then overrides) and the config overrides by stage (``"all"`` = every stage).

    Raises:
        ConfigError: an item without ``=``, an unknown option or stage, or a bad option value.
    """
    opts = Options(**{**dataclasses.asdict(Options()), **preset.options})
    by_stage: dict[str, list[str]] = {"all": [], **{s: [] for s in TRAIN_STAGES}}
    names = {f.name for f in dataclasses.fields(Options)}
    for item in items:
        key, sep, value = item.partition("=")
        key = aliases.canonical(key.strip(), f"override {item!r}", aliases.RENAMED_OPTIONS)
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. train.num_threads=1, "
                              "teacher.train.epochs=3 or seeds=1,2,3)")
        head, _, rest = key.partition(".")
        if head in SECTIONS:
            by_stage["all"].append(f"{key}={value}")
        elif head in TRAIN_STAGES and rest.partition(".")[0] in SECTIONS:
            by_stage[head].append(f"{rest}={value}")
        elif key in names:
            setattr(opts, key, option_value(key, value))
        else:
            raise ConfigError(f"override {item!r}: unknown key {key!r}; use SECTION.KEY=V (every stage), "
                              f"STAGE.SECTION.KEY=V (STAGE in {', '.join(TRAIN_STAGES)}) or an option "
                              f"({', '.join(sorted(names))})", key=key)
    check_options(opts)
    return opts, by_stage


def option_value(key: str, value: str):
    """The text of option ``key`` as its ``Options`` type (config's converter: ``1,2,3`` is a list, ``none`` is
    None where the option may be None; in topk_values ``V`` is the whole vocabulary).

    Raises:
        ConfigError: a value of the wrong type, naming the option.
    """
    if key == "topk_values":
        value = ",".join("none" if x.strip() in _TOPK_ALL else x for x in value.strip().strip("[]").split(","))
    try:
        return convert_value(value.strip(), typing.get_type_hints(Options)[key], key)
    except ConfigError as e:
        raise ConfigError(f"option {e}", key=key) from None


def check_options(o: Options) -> None:
    """Raises ConfigError naming the option whose value is out of range or inconsistent with another."""
    from ktransfer.losses.objectives import OBJECTIVES

    if not o.seeds or len(set(o.seeds)) != len(o.seeds) or min(o.seeds) < 0:
        raise ConfigError(f"option seeds: distinct non-negative integers needed, got {o.seeds}", key="seeds")
    bad = [x for x in o.objectives if not _valid_column(x)]
    if bad or not o.objectives or len(set(o.objectives)) != len(o.objectives):
        raise ConfigError(f"option objectives: {bad or o.objectives or 'none given'} (bad value, repeated or none); "
                          f"choose among {', '.join(x for x in OBJECTIVES if x != 'nll')} (nll is the control), "
                          f"their variants OBJ-tail and OBJ-renorm (e.g. ka-tail) and {SMOOTHING} (nll with label "
                          "smoothing matched to the entropy of the column smoothing_target)", key="objectives")
    if SMOOTHING in o.objectives and o.smoothing_target not in o.objectives or o.smoothing_target == SMOOTHING:
        raise ConfigError(f"option smoothing_target: {o.smoothing_target!r} must be one of the other objectives "
                          f"({', '.join(x for x in o.objectives if x != SMOOTHING)}): the {SMOOTHING} column matches "
                          "its learner entropy", key="smoothing_target")
    if not o.smoothing_grid or any(not 0.0 < e < 1.0 for e in o.smoothing_grid):
        raise ConfigError(f"option smoothing_grid: label-smoothing epsilons in (0, 1) needed, got {o.smoothing_grid}",
                          key="smoothing_grid")
    if o.sweep not in ("none", "topk"):
        raise ConfigError(f"option sweep: none or topk, got {o.sweep!r}", key="sweep")
    bad = [x for x in o.prefixes if x not in PREFIX_SOURCES]
    if bad or len(set(o.prefixes)) != len(o.prefixes):
        raise ConfigError(f"option prefixes: {bad or o.prefixes} (bad value or repeated); distinct values among "
                          f"{', '.join(PREFIX_SOURCES)} (reference prefixes are the main rows)", key="prefixes")
    bad = [x for x in o.prefix_objectives if x not in OBJECTIVES or x == "nll"]
    if bad or not o.prefix_objectives or len(set(o.prefix_objectives)) != len(o.prefix_objectives):
        raise ConfigError(f"option prefix_objectives: {bad or o.prefix_objectives} (bad value, repeated or none); "
                          f"distinct values among {', '.join(x for x in OBJECTIVES if x != 'nll')}",
                          key="prefix_objectives")
    if o.prefix_seeds is not None and (not o.prefix_seeds or len(set(o.prefix_seeds)) != len(o.prefix_seeds)
                                       or min(o.prefix_seeds) < 0):
        raise ConfigError(f"option prefix_seeds: distinct non-negative integers or none (= seeds) needed, got "
                          f"{o.prefix_seeds}", key="prefix_seeds")
    if any(k is not None and k < 1 for k in o.topk_values) or not o.topk_values:
        raise ConfigError(f"option topk_values: positive integers or V, got {o.topk_values}", key="topk_values")
    if o.stop_after is not None and o.stop_after not in STAGE_KINDS:
        raise ConfigError(f"option stop_after: one of {', '.join(STAGE_KINDS)}, got {o.stop_after!r}",
                          key="stop_after")
    for key in ("analysis_sample", "table_sentences", "bootstrap"):
        if getattr(o, key) < (1 if key != "table_sentences" else 0):
            raise ConfigError(f"option {key}: must be positive, got {getattr(o, key)}", key=key)
    if o.max_predict_samples is not None and o.max_predict_samples < 1:
        raise ConfigError(f"option max_predict_samples: must be positive, got {o.max_predict_samples}",
                          key="max_predict_samples")


def _valid_column(name: str) -> bool:
    """A fine-tuning column ``objectives`` may name: an objective but nll, OBJ-tail / OBJ-renorm, or smooth."""
    from ktransfer.losses.objectives import OBJECTIVES

    if name == SMOOTHING:
        return True
    try:
        objective = column(name)[0]
    except ValueError:
        return False
    return objective in OBJECTIVES and objective != "nll"


def stage_config(preset: Preset, by_stage: dict[str, list[str]], kind: str, fixed: list[str]) -> RunConfig:
    """The config of one training stage: preset base < preset stage < user (every stage) < user stage < ``fixed``."""
    return load_config(None, [*preset.base, *getattr(preset, kind), *by_stage["all"], *by_stage[kind], *fixed])
