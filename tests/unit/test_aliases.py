"""The renamed config keys (issue 26, point 8): the new names are the keys, the old ones still load for this release
(YAML, overrides, a saved config dict, reproduce's options) as the same config, each use logging one deprecation line
that names the new key (``ktransfer.training.aliases``)."""

from __future__ import annotations

import logging

import pytest

from ktransfer.experiments.experiment import Options
from ktransfer.experiments.options import parse_overrides
from ktransfer.experiments.presets import PRESETS
from ktransfer.training.aliases import RENAMED
from ktransfer.training.config import ConfigError, all_keys, config_from_dict, config_to_dict, load_config

OLD = ["objective.objective=kd", "objective.lam=0.3", "data.train_limit=7", "data.valid_subset=5",
       "model.teacher=runs/t"]
NEW = ["objective.kind=kd", "objective.divergence_weight=0.3", "data.max_train_samples=7", "data.max_eval_samples=5",
       "model.teacher=runs/t"]


def deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


def test_new_names_are_the_keys_and_old_ones_are_not():
    keys = set(all_keys())
    assert {"objective.kind", "objective.divergence_weight", "data.max_train_samples", "data.max_eval_samples"} <= keys
    assert not keys & set(RENAMED)  # the old names are aliases, not fields: a saved config holds the new names only
    cfg = load_config(None, NEW)
    assert (cfg.objective.kind, cfg.objective.divergence_weight) == ("kd", 0.3)
    assert (cfg.data.max_train_samples, cfg.data.max_eval_samples) == (7, 5)


def test_old_names_in_overrides_give_the_same_config_with_one_line_each(caplog):
    caplog.set_level(logging.WARNING)
    old = load_config(None, OLD)
    assert config_to_dict(old) == config_to_dict(load_config(None, NEW))
    lines = deprecations(caplog)
    assert len(lines) == 4
    for item, new in zip(OLD, NEW, strict=True):
        if item != new:
            (line,) = [x for x in lines if item.split("=")[0] + " is deprecated" in x]
            assert new.split("=")[0] in line and repr(item) in line  # names the new key and where the old one was


def test_old_names_in_yaml_and_in_a_saved_dict(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    path = tmp_path / "old.yaml"
    path.write_text("objective:\n  objective: ka\n  lam: 0.25\ndata:\n  train_limit: 9\n  valid_subset: 3\n"
                    "model:\n  teacher: runs/t\n")
    cfg = load_config(path, [])
    assert (cfg.objective.kind, cfg.objective.divergence_weight) == ("ka", 0.25)
    assert (cfg.data.max_train_samples, cfg.data.max_eval_samples) == (9, 3)
    assert any(f"{path}:2: objective.objective is deprecated" in x and "objective.kind" in x
               for x in deprecations(caplog))
    saved = config_to_dict(cfg)
    saved["objective"]["lam"] = saved["objective"].pop("divergence_weight")  # a checkpoint of the last release
    assert config_to_dict(config_from_dict(saved)) == config_to_dict(cfg)


def test_old_name_values_are_still_checked_under_the_new_key():
    with pytest.raises(ConfigError, match=r"objective.divergence_weight: must be >= 0.0 and <= 1.0, got 1.5"):
        load_config(None, ["objective.lam=1.5"])
    with pytest.raises(ConfigError, match=r"must be one of nll, kd, ka.*got 'kdd'"):
        load_config(None, ["objective.objective=kdd"])


def test_reproduce_option_test_limit_is_max_predict_samples(caplog):
    caplog.set_level(logging.WARNING)
    opts, by_stage = parse_overrides(PRESETS["smoke"], ["test_limit=11", "data.train_limit=50"])
    assert opts.max_predict_samples == 11 and by_stage["all"] == ["data.train_limit=50"]
    assert any("test_limit is deprecated" in x and "max_predict_samples" in x for x in deprecations(caplog))
    assert Options.saved({"seeds": [1], "test_limit": 4}, "reproduce.json").max_predict_samples == 4
    opts, _ = parse_overrides(PRESETS["smoke"], ["max_predict_samples=12"])
    assert opts.max_predict_samples == 12


def test_the_prefix_source_is_described_for_the_run_log():
    """train.log states the prefix source at start (issue 26, point 8): reference, or on-policy with its fraction,
    temperature, top-p/top-k and length rule (the mixed case is checked in train.log by tests/training/
    test_prefixes.py)."""
    from ktransfer.training.prefixes import describe_source

    base = ["objective.kind=kd", "model.teacher=t"]
    assert "prefixes: reference" in describe_source(load_config(None, base))
    text = describe_source(load_config(None, [*base, "objective.prefix=learner", "objective.sample_temperature=0.7",
                                              "objective.sample_top_k=5", "objective.sample_length_scale=null",
                                              "objective.sample_max_length=30"]))
    assert "prefixes: learner" in text and "on every batch" in text and "probability" not in text
    assert "temperature 0.7, top-p 1, top-k 5" in text and "at most 30 tokens per sample" in text
