"""Typed run configuration: nested dataclasses filled from defaults < a YAML file < ``key=value`` overrides.

A run is described by one ``RunConfig`` with six sections (``data``, ``model``, ``optim``, ``objective``, ``train``,
``eval``). Keys are dotted: ``optim.lr=3e-4``, ``objective.top_k=8``. Values are read as YAML scalars and converted to
the field's type (``1e-4`` is a float, ``null``/``none`` is None for optional fields, ``0.9,0.98`` or ``[0.9, 0.98]`` a
tuple). Every field carries help text and a range check; a bad key or value raises ``ConfigError`` naming the key, the
value and where it came from (``file.yaml:LINE`` or the override), with close key names suggested for typos. Old key
names (``ktransfer.training.aliases.RENAMED``) are read as their new names, each use logging a deprecation line.

The resolved config is saved with each run (``save_config``) and loads back equal (``load_config(saved, [])``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from ktransfer.losses.divergences import SUPPORTS
from ktransfer.losses.spec import OBJECTIVES
from ktransfer.models.generation import DEFAULT_BEAM
from ktransfer.training import aliases, remote_code, rules
from ktransfer.training.values import (
    ConfigError,
    bounds_text,
    check_bounds,
    convert_value,
    hints,
    is_union,
    option,
    type_name,
)

Objective = Literal[OBJECTIVES]  # "nll", "kd", "ka", and every divergence kind
Support = Literal[SUPPORTS]
Schedule = Literal["constant", "inverse_sqrt", "linear", "cosine"]
ReportTo = Literal["none", "tensorboard", "wandb"]


class _Section:
    """Base of the config sections: converts every field to its declared type and checks its bounds."""

    name: ClassVar[str] = ""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        types_of = hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.name}.{f.name}"
            value = convert_value(getattr(self, f.name), types_of[f.name], key)
            check_bounds(value, f.metadata, key)
            object.__setattr__(self, f.name, value)
        self._check_more()

    def _check_more(self) -> None:
        """Checks that involve more than one field or more than a type and bounds."""


@dataclass
class DataConfig(_Section):
    name: ClassVar[str] = "data"
    corpus: str = option("multi30k-de-en", "the data: a corpus name (under $KTRANSFER_DATA), a folder of SPLIT.LANG "
                         "files, a .jsonl/.json/.txt file, a folder of SPLIT.jsonl files, or a datasets save_to_disk "
                         "folder")
    format: str = option("auto", "parallel, prompt_completion, chat, text, or auto (from the path and the first "
                         "record's keys; the log says which)")
    prompt_key: str = option("prompt", "JSONL/datasets column of the prompt (prompt_completion)")
    completion_key: str = option("completion", "JSONL/datasets column of the completion (prompt_completion)")
    messages_key: str = option("messages", "JSONL/datasets column of the [{role, content}] list (chat)")
    text_key: str = option("text", "JSONL/datasets column of the text (text)")
    instruction: str | None = option(None, "text put before every prompt (None = 'Translate German to English:' for "
                                     "parallel data with a causal model, nothing otherwise; '' = nothing)")
    truncate: bool = option(False, "cut an over-long completion to data.max_length (causal models) instead of "
                            "dropping the example")
    valid_fraction: float = option(0.05, "share of a single data file held out for validation when data.valid "
                                   "names no split or file", gt=0.0, lt=1.0)
    split_seed: int = option(0, "seed of the held-out validation examples", ge=0)
    src_lang: str = option("de", "source language suffix of the corpus files")
    tgt_lang: str = option("en", "target language suffix of the corpus files")
    train: str = option("train", "name of the training split")
    valid: str = option("valid", "name of the validation split (early stopping, best checkpoint)")
    test: str = option("test2016", "name of the test split")
    max_tokens: int = option(4096, "batch size in tokens: padded rows x longest sentence, per side (training "
                             "batches unless data.batch_size is set; validation batches always)", ge=1)
    batch_size: int | None = option(None, "training batch size in examples (as Hugging Face's "
                                    "per_device_train_batch_size): shuffled batches of exactly N examples, the last "
                                    "of an epoch shorter; when set it replaces data.max_tokens for training batches "
                                    "(None = batches of data.max_tokens tokens)", ge=1)
    max_length: int | None = option(None, "longest training example kept, in tokens including </s> (None = what "
                                    "the models read: their max positions, capped by the tokenizer's "
                                    "model_max_length; ktransfer.training.lengths)", ge=2)
    vocab_size: int = option(10000, "joint BPE vocabulary size when a tokenizer is trained", ge=4)
    tokenizer: str | None = option(None, "tokenizer.json to reuse; None = the teacher's, else train one on train")
    max_eval_samples: int | None = option(None, "use only the first N validation examples (None = the whole split; "
                                          "formerly data.valid_subset)", ge=1)
    max_train_samples: int | None = option(None, "use only the first N training examples (None = all; formerly "
                                           "data.train_limit)", ge=1)

    def _check_more(self) -> None:
        from ktransfer.data.formats import FORMATS

        if self.format not in ("auto", *FORMATS):
            raise ConfigError(f"data.format: {self.format!r}; choose auto, {', '.join(FORMATS)}", key="data.format")


@dataclass
class ModelConfig(_Section):
    name: ClassVar[str] = "model"
    preset: str = option("cpu-learner", "the learner: a preset name (ktransfer.models.family.PRESETS, sized to the "
                         "tokenizer), a Hugging Face model folder, a hub id, or a ktransfer run/checkpoint folder")
    init: str | None = option(None, "weights that start training: a ktransfer run/checkpoint folder, a Hugging Face "
                              "folder or a hub id (None = model.preset)")
    teacher: str | None = option(None, "the frozen teacher (every objective but nll): a ktransfer run/checkpoint "
                                 "folder, a Hugging Face folder or a hub id; its tokenizer is the learner's too")
    dropout: float | None = option(None, "dropout on the residual stream (None = the preset's, 0.3)", ge=0.0, lt=1.0)
    trust_remote_code: bool = option(False, "allow a model folder's own Python code (config.json auto_map); read "
                                     "that code first")
    lora_r: int | None = option(None, "LoRA rank: train low-rank adapters of the learner's linear layers only "
                                "(None = train every weight; needs peft and a pretrained learner: model.init or a "
                                "folder)", ge=1)
    lora_alpha: float = option(16.0, "LoRA scale numerator: the update is (lora_alpha / lora_r) * B A", gt=0.0)
    lora_dropout: float = option(0.0, "dropout on the LoRA branch's input", ge=0.0, lt=1.0)
    lora_target_modules: tuple[str, ...] | None = option(None, "names of the linear layers that get adapters, e.g. "
                                                         "q_proj,v_proj (None = every linear layer but the head)")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "the learner's weights (and so its optimiser state); float32 keeps master weights exact, "
        "train.bf16 adds autocast on top")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "the frozen teacher's weights: auto = bfloat16 on a CUDA device that supports it (half the memory, "
        "logits to bf16 precision), float32 elsewhere")

    def _check_more(self) -> None:
        from ktransfer.models.family import PRESETS

        p, names = self.preset, list(PRESETS)  # seq2seq (Marian) and decoder-only presets
        if p not in names and not ("/" in p or os.sep in p or p.startswith(".") or Path(p).exists()):
            close = difflib.get_close_matches(p, names, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(
                f"model.preset: unknown preset {p!r} and no such folder{hint} (presets: {', '.join(names)})",
                key="model.preset",
            )


@dataclass
class OptimConfig(_Section):
    name: ClassVar[str] = "optim"
    lr: float = option(1e-4, "peak learning rate (Adam)", gt=0.0)
    betas: tuple[float, float] = option((0.9, 0.98), "Adam beta1, beta2", ge=0.0, lt=1.0)
    eps: float = option(1e-8, "Adam epsilon", gt=0.0)
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW)", ge=0.0)
    schedule: Schedule = option("constant", "learning-rate schedule after warm-up: constant, inverse_sqrt, or "
                                "linear / cosine decay to 0 at the run's last update (transformers' "
                                "get_linear_schedule_with_warmup / get_cosine_schedule_with_warmup; the total is "
                                "train.max_steps, else the updates of train.epochs, fixed when the run starts)")
    warmup_steps: int = option(0, "linear warm-up from 0 over this many updates", ge=0)
    clip_norm: float | None = option(None, "clip the gradient's global L2 norm to this (None = no clipping)", gt=0.0)
    accumulate: int = option(1, "batches whose gradients are summed per update", ge=1)


@dataclass
class ObjectiveConfig(_Section):
    name: ClassVar[str] = "objective"
    kind: Objective = option(
        "nll", "nll (no teacher), kd (forward KL), ka (reverse KL), half, or a divergence kind of "
        "ktransfer.losses.divergences (formerly objective.objective)"
    )
    divergence_weight: float = option(0.5, "weight w of the divergence: (1 - w) * NLL + w * D (formerly "
                                      "objective.lam; not TRL's lmbda, which is objective.on_policy_fraction)",
                                      ge=0.0, le=1.0)
    top_k: int | None = option(None, "restrict the divergence to the top-k support (None = all of V)", ge=1)
    temperature: float = option(1.0, "softmax temperature of both models inside the divergence", gt=0.0)
    label_smoothing: float = option(0.0, "label smoothing of the NLL term", ge=0.0, lt=1.0)
    support: Support | None = option(None, "top-k support: learner, teacher or union (None = the kind's default)")
    beta: float = option(0.5, "mixture weight of jsd (0: forward_kl, 1: reverse_kl, as TRL)", ge=0.0, le=1.0)
    alpha: float = option(0.1, "skew of skew_forward_kl / skew_reverse_kl", gt=0.0, lt=1.0)
    renormalize: bool = option(False, "renormalise p and q over the top-k support")
    tail: bool = option(False, "add the rest of the vocabulary as one outcome beside the top-k support (a proper "
                        "divergence of the (k+1)-outcome coarsenings; needs objective.top_k, not with renormalize)")
    prefix: Literal["reference", "learner", "mixed"] = option(
        "reference", "prefixes the divergence is computed on: reference (the paper), learner (sampled from the "
        "learner, on-policy), or mixed (learner with probability on_policy_fraction per batch); "
        "see ktransfer.training.prefixes")
    on_policy_fraction: float = option(0.5, "probability that a batch uses learner samples when prefix=mixed",
                                       ge=0.0, le=1.0)
    sample_temperature: float = option(1.0, "softmax temperature of the learner when sampling prefixes", gt=0.0)
    sample_top_p: float = option(1.0, "nucleus (top-p) mass kept when sampling prefixes (1 = full distribution)",
                                 gt=0.0, le=1.0)
    sample_top_k: int = option(0, "sample among the top_k most likely tokens only when sampling prefixes (0 = all)",
                               ge=0)
    sample_max_length: int | None = option(None, "most tokens sampled per prefix (None = eval.max_length)", ge=1)
    sample_length_scale: float | None = option(
        1.5, "a sample stops after ceil(scale x its reference's tokens) + sample_length_margin tokens, at most "
        "sample_max_length (None = sample_max_length alone)", gt=0.0)
    sample_length_margin: int = option(4, "tokens added to the reference-bounded sample length", ge=0)


@dataclass
class TrainConfig(_Section):
    name: ClassVar[str] = "train"
    out_dir: str | None = option(None, "run folder: config, tokenizer, metrics, checkpoints (None = runs/<objective>-"
                                 "<hash of the config>: the same command finds its folder again, another never)")
    epochs: int = option(10, "passes over the training data", ge=1)
    max_steps: int | None = option(None, "stop after this many updates (None = after the epochs)", ge=1)
    patience: int = option(0, "stop after this many validations without improvement (0 = never stop early, as "
                           "Hugging Face Trainer without EarlyStoppingCallback)", ge=0)
    eval_every: int | None = option(None, "validate (best checkpoint, early stopping) every N updates instead of "
                                    "after each epoch, and once more at the end when the last update was not "
                                    "validated (None = after each epoch)", ge=1)
    report_to: ReportTo = option("none", "where the training and validation numbers also go besides metrics.jsonl: "
                                 "none, tensorboard (RUN/tensorboard; pip install 'ktransfer[tensorboard]') or wandb "
                                 "(Weights & Biases; pip install 'ktransfer[wandb]', WANDB_PROJECT / WANDB_MODE "
                                 "respected)")
    seed: int = option(1, "seed of every random generator", ge=0)
    bf16: bool = option(False, "bfloat16 autocast for forward passes (weights and optimiser stay float32)")
    distributed: Literal["ddp", "fsdp"] = option(
        "ddp", "several processes (torchrun): ddp (a learner replica per process) or fsdp (FSDP2: learner and "
        "teacher sharded per transformer block; checkpoints gathered into one HF folder)")
    gradient_checkpointing: bool = option(False, "recompute the learner's layer activations in the backward pass "
                                          "instead of keeping them: less memory, ~30% more compute, same gradients")
    log_every: int = option(100, "log training metrics every this many updates", ge=1)
    save_every: int = option(500, "also save checkpoints/last every this many updates (0 = only after each epoch)",
                             ge=0)
    max_nonfinite: int = option(5, "stop after this many consecutive steps with a non-finite loss or gradient", ge=1)
    valid_bleu: bool = option(False, "select and stop early on validation BLEU (beam search) instead of loss")
    num_threads: int | None = option(None, "torch CPU threads (None = torch's default)", ge=1)
    resume: bool = option(True, "continue from out_dir/checkpoints/last when it holds this same run (a config that "
                          "differs in more than ktransfer.training.runfolder.SAFE_KEYS is refused); false: move an "
                          "old run aside to out_dir.old-<time> and start over")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    fused_head: bool = option(False, "fuse the output layer with the loss (ktransfer.losses.fused_linear): "
                              "the [B, T, V] logits of learner and teacher are never held; same loss and gradients "
                              "(Marian and causal LMs with a plain lm_head, one process)")
    teacher_cache: str | None = option(None, "folder of the teacher's top-k on the training data "
                                       "(ktransfer.training.teacher_cache; built when missing): no teacher pass in "
                                       "training steps; exact for kd / teacher-support divergences with top_k, else "
                                       "refused")

    def _check_more(self) -> None:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device: must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}",
                              key="train.device")


@dataclass
class EvalConfig(_Section):
    name: ClassVar[str] = "eval"
    beam: int = option(DEFAULT_BEAM, "beam size (the default of evaluate/translate/distill-data --beam too)", ge=1)
    length_penalty: float = option(1.0, "beam-search length penalty (exponent on length; 1.0 = average log-prob)")
    max_length: int = option(256, "longest translation in sub-words", ge=1)
    batch_size: int = option(64, "sentences per beam-search batch", ge=1)
    valid_beam: int | None = option(None, "beam of the per-epoch validation BLEU (None = beam with valid_bleu, else 1)",
                                    ge=1)
    valid_examples: int = option(0, "generations of the first N validation prompts written to train.log at each "
                                 "validation (data that is not parallel)", ge=0)


@dataclass
class RunConfig:
    """A whole run: data, model, optimiser, objective, training loop and evaluation settings."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name}: must be a {cls.__name__}, got {type(getattr(self, name)).__name__}",
                                  key=name)
        _check_run(self)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def _check_run(cfg: RunConfig) -> None:
    check_rules(cfg)


def check_rules(cfg: RunConfig, *, world: int = 1, fmt: str | None = None) -> None:
    """Raise ConfigError for the first rule over several options (``ktransfer.training.rules``) that ``cfg``
    breaks with ``world`` processes and data format ``fmt`` (None: as configured)."""
    facts = rules.Facts(world=world, format=fmt)
    for rule in rules.broken(cfg, facts)[:1]:
        raise ConfigError(rule.error(cfg, facts), key=rule.keys[0])


def validate(cfg: RunConfig) -> RunConfig:
    """Re-run every check (after fields were changed in code); returns ``cfg``. Raises ConfigError."""
    for name in SECTIONS:
        getattr(cfg, name).check()
    _check_run(cfg)
    return cfg


# --- keys ---------------------------------------------------------------------------------------------------------
def all_keys() -> list[str]:
    """Every dotted key, e.g. ``optim.lr``."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str, source: str) -> ConfigError:
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in close]
    hint = f"; did you mean {' or '.join(close[:3])}?" if close else "; run with --help-config for every key"
    return ConfigError(f"{source}: unknown config key {key!r}{hint}", key=key)


def _field_type(key: str, source: str) -> Any:
    section, _, name = key.partition(".")
    if section in SECTIONS and not name:
        raise ConfigError(f"{source}: {key!r} is a section; set its keys as {key}.KEY=VALUE", key=key)
    cls = SECTIONS.get(section)
    if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
        raise _unknown_key(key, source)
    return hints(cls)[name]


def _parse_text(raw: str, tp: Any) -> Any:
    """A ``key=value`` override's value: plain text for string fields, otherwise a YAML scalar."""
    if tp is str or (is_union(tp) and str in typing.get_args(tp)):
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw  # converted (or reported) against the field type


def _yaml_entries(path: Path) -> list[tuple[str, Any, str]]:
    """(dotted key, value, 'file:line') for every key of a YAML config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: a config file must be a mapping of sections to keys")
    constructor = yaml.SafeLoader("")
    entries = []

    def visit(node: yaml.MappingNode, prefix: str) -> None:
        for knode, vnode in node.value:
            key = f"{prefix}{knode.value}"
            source = f"{path}:{knode.start_mark.line + 1}"
            if isinstance(vnode, yaml.MappingNode) and not prefix and knode.value in SECTIONS:
                visit(vnode, key + ".")
            else:
                try:
                    value = constructor.construct_object(vnode, deep=True)
                except yaml.YAMLError as e:
                    raise ConfigError(f"{source}: {key}: invalid YAML value: {e}") from None
                entries.append((key, value, source))

    visit(root, "")
    return entries


def _build(entries: list[tuple[str, Any, str]]) -> RunConfig:
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    sources: dict[str, str] = {}
    for old, value, source in entries:
        key = aliases.canonical(old, source)
        _field_type(key, source)
        section, _, name = key.partition(".")
        values[section][name] = value
        sources[key] = source
    try:
        sections = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
        return RunConfig(**sections)
    except ConfigError as e:
        source = sources.get(e.key or "")
        raise ConfigError(f"{source}: {e}" if source else str(e), key=e.key) from None


# --- public API -----------------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config: defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides in order.

    Raises:
        ConfigError: unreadable or invalid YAML (file and line), unknown key (with close matches), a value of the
            wrong type or out of range (key, value and its source).
    """
    entries = _yaml_entries(Path(path)) if path is not None else []
    refused = remote_code.refused_in_files(entries)  # only the command line or the environment may allow it
    if refused:
        raise ConfigError(refused, key=remote_code.KEY)
    overrides = [*remote_code.from_env(), *overrides]
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        source = f"override {item!r}"
        if not sep or not key:
            raise ConfigError(f"{source}: expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")
        tp = _field_type(aliases.RENAMED.get(key, key), source)  # _build resolves (and logs) the old name
        entries.append((key, _parse_text(raw, tp), source))
    return _build(entries)


def config_from_dict(d: dict[str, Any], source: str = "config") -> RunConfig:
    """A RunConfig from a nested dict (``config_to_dict`` output, e.g. a checkpoint's); unknown keys are errors."""
    entries = []
    for section, sub in d.items():
        if isinstance(sub, dict):
            entries += [(f"{section}.{k}", v, source) for k, v in sub.items()]
        else:
            entries.append((section, sub, source))
    return _build(entries)


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` with plain YAML/JSON types (tuples become lists)."""
    return {
        name: {f.name: list(v) if isinstance(v := getattr(getattr(cfg, name), f.name), tuple) else v
               for f in dataclasses.fields(getattr(cfg, name))}
        for name in SECTIONS
    }


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (atomically: temporary file, then rename); ``load_config(path, [])`` gives it back
    (``model.trust_remote_code`` saved false: each run that needs it says so on its command line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# ktransfer run config (resolved: defaults < YAML < overrides)\n"
    text += f"# {remote_code.KEY} is never saved: give it on the command line of each run that needs it\n"
    values = config_to_dict(cfg)
    values["model"]["trust_remote_code"] = False  # a config file may not set it (ktransfer.training.remote_code)
    text += yaml.safe_dump(values, sort_keys=False, default_flow_style=None, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name it
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def config_help(cfg: RunConfig | None = None) -> str:
    """Every key with its type, current value (defaults when ``cfg`` is None) and help text, section by section."""
    cfg = RunConfig() if cfg is None else cfg
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        types_of = hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, name), f.name)
            bounds = bounds_text(f.metadata)
            typ = type_name(types_of[f.name]) + (f", {bounds}" if bounds else "")
            lines.append(f"  {name}.{f.name}={_show(value)}  ({typ})")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines) + "\n\n" + rules.describe()


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)
