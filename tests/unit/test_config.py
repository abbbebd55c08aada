"""Run config: defaults < YAML < key=value overrides, typed conversion, range checks, errors, and round trips."""

from __future__ import annotations

import dataclasses
import re

import pytest

from ktransfer.training.config import (
    SECTIONS,
    ConfigError,
    OptimConfig,
    RunConfig,
    all_keys,
    config_from_dict,
    config_help,
    config_to_dict,
    load_config,
    save_config,
    validate,
)


def test_defaults():
    cfg = load_config(None, [])
    assert cfg == RunConfig()
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.98) and cfg.optim.eps == 1e-8
    assert cfg.optim.weight_decay == 0 and cfg.optim.schedule == "constant" and cfg.optim.accumulate == 1
    assert cfg.objective.kind == "nll" and cfg.objective.divergence_weight == 0.5 and cfg.objective.top_k is None
    assert (cfg.objective.beta, cfg.objective.alpha, cfg.objective.renormalize) == (0.5, 0.1, False)
    assert cfg.data.vocab_size == 10000 and cfg.data.max_eval_samples is None and cfg.data.max_train_samples is None
    assert cfg.eval.beam == 6 and cfg.eval.length_penalty == 1.0
    assert cfg.train.max_steps is None and cfg.train.num_threads is None and cfg.train.bf16 is False


def test_every_field_has_help():
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    text = config_help()
    for key in all_keys():
        assert f"{key}=" in text
    assert "optim.lr=0.0001  (float, > 0.0)" in text


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "optim:\n  lr: 5e-4\n  betas: [0.8, 0.9]\n"
        "objective:\n  kind: ka\n  top_k: 8\n"
        "model:\n  teacher: runs/teacher/checkpoints/best\n"
        "train.epochs: 3\n"  # a dotted key at the top level works too
    )
    cfg = load_config(path, ["optim.lr=3e-4", "objective.temperature=2", "train.bf16=true",
                             "data.max_eval_samples=100"])
    assert cfg.optim.lr == 3e-4  # the override wins over the file
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.objective.kind == "ka" and cfg.objective.top_k == 8
    assert cfg.objective.temperature == 2.0 and isinstance(cfg.objective.temperature, float)
    assert cfg.train.epochs == 3 and cfg.train.bf16 is True and cfg.data.max_eval_samples == 100


@pytest.mark.parametrize(
    ("item", "field", "value"),
    [
        ("optim.betas=0.7,0.8", ("optim", "betas"), (0.7, 0.8)),
        ("optim.betas=[0.7, 0.8]", ("optim", "betas"), (0.7, 0.8)),
        ("optim.clip_norm=1", ("optim", "clip_norm"), 1.0),
        ("optim.clip_norm=null", ("optim", "clip_norm"), None),
        ("objective.top_k=None", ("objective", "top_k"), None),
        ("train.max_steps=1e4", ("train", "max_steps"), 10000),
        ("train.valid_bleu=yes", ("train", "valid_bleu"), True),
        ("objective.support=union", ("objective", "support"), "union"),
        ("train.out_dir=runs/1e-4", ("train", "out_dir"), "runs/1e-4"),
        ("train.out_dir=007", ("train", "out_dir"), "007"),  # string fields keep the text as typed
        ("data.tokenizer=", ("data", "tokenizer"), None),
    ],
)
def test_override_conversion(item, field, value):
    cfg = load_config(None, [item])
    assert getattr(getattr(cfg, field[0]), field[1]) == value


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("optim.lrr=1", r"override 'optim.lrr=1': unknown config key 'optim.lrr'; did you mean optim.lr"),
        ("lr=1", r"unknown config key 'lr'; did you mean optim.lr"),
        ("optimm.lr=1", r"unknown config key 'optimm.lr'; did you mean optim.lr"),
        ("optim.lr=abc", r"optim.lr: must be a finite number, got 'abc'"),
        ("optim.lr=-1", r"optim.lr: must be > 0.0, got -1.0"),
        ("optim.lr=nan", r"optim.lr: must be a finite number"),
        ("optim.betas=0.9,1.0", r"optim.betas: must be >= 0.0 and < 1.0, got \(0.9, 1.0\)"),
        ("optim.betas=0.9", r"optim.betas: must have 2 values"),
        ("optim.schedule=exponential", r"optim.schedule: must be one of constant, inverse_sqrt, linear, cosine, got "
                                        "'exponential'"),
        ("objective.kind=kdd", r"must be one of nll, kd, ka.*got 'kdd'; did you mean 'kd'"),
        ("objective.divergence_weight=1.5", r"objective.divergence_weight: must be >= 0.0 and <= 1.0, got 1.5"),
        ("objective.beta=1.5", r"objective.beta: must be >= 0.0 and <= 1.0, got 1.5"),
        ("objective.top_k=0", r"objective.top_k: must be >= 1, got 0"),
        ("train.epochs=2.5", r"train.epochs: must be an integer, got 2.5"),
        ("train.epochs=null", r"train.epochs: must be int, got None"),
        ("train.bf16=maybe", r"train.bf16: must be true or false, got 'maybe'"),
        ("train.device=gpu", r"train.device: must be auto, cpu"),
        ("data.tgt_lang=de", r"data.tgt_lang: must differ from data.src_lang"),
        ("model.preset=cpu-lerner", r"unknown preset 'cpu-lerner' and no such folder; did you mean cpu-learner"),
        ("eval.max_length=300", r"eval.max_length: 300 exceeds the 256 positions of model.preset='cpu-learner'"),
        ("optim", r"expected KEY=VALUE"),
        ("optim=1", r"'optim' is a section"),
    ],
)
def test_override_errors(item, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, [item])
    assert isinstance(e.value, ValueError)
    assert f"override {item!r}" in str(e.value) or "section" in str(e.value)


def test_distillation_needs_teacher():
    with pytest.raises(ConfigError, match="model.teacher: objective.kind='kd' needs a teacher"):
        load_config(None, ["objective.kind=kd"])
    cfg = load_config(None, ["objective.kind=kd", "model.teacher=runs/t/checkpoints/best"])
    assert cfg.model.teacher == "runs/t/checkpoints/best"


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-4\n  betas: [0.9, 0.98\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))}:\d+:\d+: invalid YAML"):
        load_config(bad, [])

    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  lr: 1e-4\n  warmup: 400\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(typo))}:3: unknown config key 'optim.warmup'") as e:
        load_config(typo, [])
    assert "did you mean optim.warmup_steps" in str(e.value)

    value = tmp_path / "value.yaml"
    value.write_text("eval:\n  beam: 6\n  batch_size: -2\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(value))}:3: eval.batch_size: must be >= 1, got -2"):
        load_config(value, [])

    section = tmp_path / "section.yaml"
    section.write_text("trian:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(section))}:1: unknown config key 'trian'"):
        load_config(section, [])

    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(lst))}:1: a config file must be a mapping"):
        load_config(lst, [])

    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml", [])

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_config(empty, []) == RunConfig()


def test_round_trip(tmp_path):
    cfg = load_config(None, [
        "optim.lr=3e-4", "optim.betas=0.85,0.99", "optim.eps=1e-9", "optim.clip_norm=0.5",
        "optim.schedule=inverse_sqrt",
        "objective.kind=half", "objective.top_k=16", "model.teacher=runs/t/checkpoints/best",
        "objective.support=teacher", "train.max_steps=100", "train.out_dir=runs/x y", "data.max_train_samples=1000",
        "model.dropout=0.1", "eval.length_penalty=0.6",
    ])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path, []) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    d = config_to_dict(cfg)
    assert d["optim"]["betas"] == [0.85, 0.99] and set(d) == set(SECTIONS)
    with pytest.raises(ConfigError, match="unknown config key 'optim.momentum'"):
        config_from_dict({"optim": {"momentum": 0.9}})


def test_direct_construction_is_checked():
    assert OptimConfig(lr="3e-4").lr == 3e-4  # converted like a YAML value
    with pytest.raises(ConfigError, match="optim.warmup_steps: must be >= 0, got -1"):
        OptimConfig(warmup_steps=-1)
    cfg = RunConfig()
    cfg.optim.lr = 0.0
    with pytest.raises(ConfigError, match="optim.lr: must be > 0.0"):
        validate(cfg)


def test_model_init_lifts_the_preset_position_limit():
    """``model.init`` replaces the preset, so the preset's 256 positions do not cap ``data.max_length`` (the loaded
    model's own positions do, when the data is encoded); without ``model.init`` the preset's limit holds."""
    with pytest.raises(ConfigError, match="data.max_length: 1000 exceeds the 256 positions of model.preset"):
        load_config(None, ["data.max_length=1000"])
    cfg = load_config(None, ["data.max_length=1000", "eval.max_length=600", "model.init=some/pretrained-model"])
    assert cfg.data.max_length == 1000 and cfg.eval.max_length == 600


@pytest.mark.parametrize("extra,match", [
    (("train.fused_head=true",), "train.fused_head: not with several processes"),
    (("train.distributed=fsdp", "train.fused_head=true"), "train.fused_head: not with several processes"),
    (("train.distributed=fsdp", "model.lora_r=4"), "model.lora_r: not with train.distributed=fsdp"),
    (("train.distributed=fsdp", "objective.kind=kd", "model.teacher=t", "objective.prefix=learner"),
     "objective.prefix: not with train.distributed=fsdp"),
])
def test_process_rules_are_checked_before_any_model_loads(tmp_path, monkeypatch, extra, match):
    """Under several processes, settings that cannot run there are refused by ``setup`` before any data is read or
    model loaded: here loading a model, reading the corpus or making the run folder would fail the test."""
    from ktransfer.models import family
    from ktransfer.runtime import distributed
    from ktransfer.training import setup as setup_module

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or the data was loaded before the option rules were checked")

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(family, "load_model", forbidden)
    monkeypatch.setattr(family, "build_model", forbidden)
    monkeypatch.setattr(setup_module, "_read_data", forbidden)
    cfg = load_config(None, [f"train.out_dir={tmp_path / 'run'}", "data.corpus=/nonexistent", *extra])
    with pytest.raises(ConfigError, match=match):
        setup_module.setup(cfg)
    assert not (tmp_path / "run").exists()


def test_help_config_prints_the_option_rules(capsys):
    from ktransfer.cli import main
    from ktransfer.training.rules import RULES

    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr=0.0001" in out  # the keys, then the rules
    for rule in RULES:
        assert f"{' + '.join(rule.keys)}  [" in out and f"{rule.keys[0]}: {rule.text}" in out
    assert "objective.tail + objective.top_k + objective.renormalize" in out
    assert "[when the models load]" in out  # the rules that need a loaded model say so


def test_rule_errors_name_their_key_and_source(tmp_path):
    """A rule over two options names its first key and, when that key came from a file, the file and line."""
    path = tmp_path / "c.yaml"
    path.write_text("objective:\n  top_k: 4\n  tail: true\n  renormalize: true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c.yaml:3: objective.tail: needs objective.top_k") as e:
        load_config(path)
    assert e.value.key == "objective.tail"
