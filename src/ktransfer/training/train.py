"""The training loop: pre-training with NLL, and distillation of a learner from a frozen teacher, with exact resume.

Stages, in the order a reader meets them (torchtune-recipe style):

- ``setup(cfg)``: run folder, tokenizer, data, learner, teacher, optimiser and schedule, or all of them restored from
  ``RUN/checkpoints/last``;
- ``train(cfg)``: the epochs; each one ends with ``validate`` (loss and BLEU), the ``best`` and ``last`` checkpoints
  and the early-stopping check;
- ``train_step(run, batches)``: one update from one or more (accumulated) batches;
- ``save_checkpoint(run, name)``: everything needed to continue exactly.

Exact resume: a checkpoint holds the weights, the optimiser and schedule, the RNG states (dropout), the epoch and how
many batches of it were used. The batches of an epoch are a function of ``(seed, epoch)``, so a resumed run skips the
used ones and goes on with the same random stream: killed and resumed, it ends with the weights of a run that was
never interrupted.

Several processes (``torchrun``, see ``ktransfer.runtime.distributed`` and ``docs/distributed.md``): the learner is
wrapped in
``DistributedDataParallel``; a global step takes ``optim.accumulate x world_size`` consecutive batches of the epoch,
rank r the r-th of each run of ``world_size``; losses divide by the global token count, so an update equals the
single-process update with ``optim.accumulate x world_size``. Rank 0 alone writes the run folder; checkpoints hold the
unwrapped learner and the global batch position, so they resume with any number of processes.

A run folder::

    RUN/config.yaml  tokenizer/  metrics.jsonl  train.log
    RUN/checkpoints/last/  RUN/checkpoints/best/      (Hugging Face folders + training_state.json)

The model family (``ktransfer.models.family.family_of``: seq2seq or causal) decides how examples become batches and
which
logits meet which labels; nothing here asks which family it holds.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ktransfer.data import formats
from ktransfer.data.batching import TokenBatchSampler
from ktransfer.data.corpora import CorpusError, read_split, require_nonempty_pairs
from ktransfer.losses.objectives import TransferLoss, transfer_loss
from ktransfer.models import checkpoint as ckpt_lib
from ktransfer.models import family as models
from ktransfer.models.tokenizer import Tokenizer, compare_tokenizers, from_rust, load_tokenizer, train_tokenizer
from ktransfer.runtime import distributed, nofollow, runlock
from ktransfer.runtime.device import DeviceError, choose_device
from ktransfer.runtime.runlog import RunLog, append_text, kept_records
from ktransfer.training.config import ConfigError, RunConfig, config_to_dict, save_config


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; ``last`` was saved before raising."""


# --------------------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint (with the RNG states) so that a resume continues exactly."""

    epoch: int = 0  # current epoch, 0-based (== train.epochs when all are done)
    batch: int = 0  # batches of `epoch` already used
    step: int = 0  # optimizer updates done (skipped non-finite steps excluded)
    tokens: int = 0  # target tokens trained on
    best: float | None = None  # best validation value (BLEU with train.valid_bleu, else loss)
    best_epoch: int | None = None
    bad_validations: int = 0  # validations since the best one (early stopping)
    nonfinite: int = 0  # consecutive non-finite steps
    metrics_lines: int = 0  # lines of metrics.jsonl written up to this state
    elapsed: float = 0.0  # seconds spent training (validation included)
    stopped: str | None = None  # why training ended: epochs, max_steps, early_stopping, nonfinite, signal:NAME

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class Run:
    """Everything ``setup`` built; ``train`` and its helpers read and update it."""

    cfg: RunConfig
    out_dir: Path
    device: torch.device
    tokenizer: Tokenizer
    model: torch.nn.Module  # the learner itself (checkpoints, validation, translation)
    family: models.ModelFamily  # seq2seq or causal: encoding, batches, aligned logits and labels, generation
    vocab_size: int  # ids shared by learner and teacher: logits are sliced to them
    teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: TokenBatchSampler
    train_ids: tuple[list[list[int]], list[list[int]]]  # (source, target) or (prompt, response) ids: family.encode
    valid_ids: tuple[list[list[int]], list[list[int]]]
    valid_pairs: list[tuple[str, str]]  # (prompt, completion) text of the validation (subset): BLEU, examples
    state: TrainState
    log: RunLog
    metrics: MetricsFile
    writer: Any = None  # a TensorBoard SummaryWriter when tensorboard is installed
    ddp: torch.nn.Module | None = None  # the learner in DistributedDataParallel (several processes), else None
    stop_signal: list[int] = field(default_factory=list)  # filled by the SIGINT/SIGTERM handler
    on_epoch_end: Any = None  # optional callable(run) run after each validation, before `last` is saved
    clock: float = field(default_factory=time.perf_counter)  # when state.elapsed was last brought up to date
    teacher_cache: Any = None  # a ktransfer.training.teacher_cache.TeacherCache (train.teacher_cache), else None
    data_format: str = "parallel"  # ktransfer.data.formats: parallel, prompt_completion, chat, text
    fsdp: bool = False  # learner and teacher sharded (train.distributed=fsdp under torchrun): every rank runs alike

    def trained_model(self) -> torch.nn.Module:
        """What training steps run forward/backward through: the DDP wrapper when there is one, else the learner."""
        return self.model if self.ddp is None else self.ddp

    def elapsed(self) -> float:
        """Seconds of training in this run folder so far, resumed sessions included."""
        now = time.perf_counter()
        self.state.elapsed, self.clock = self.state.elapsed + now - self.clock, now
        return self.state.elapsed


# --------------------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------------------
def setup(cfg: RunConfig, *, require_resume: bool = False) -> Run:
    """Build (or restore from ``RUN/checkpoints/last``) everything a run needs.

    Raises:
        ConfigError: a setting that cannot work (naming its key): missing teacher/init/tokenizer, teacher and learner
            with different tokenizers, a run folder that holds a run while ``train.resume`` is false, ...
        CorpusError: the corpus is missing or malformed.
    """
    out_dir = Path(cfg.train.out_dir)
    resume_from = _find_resume(cfg, out_dir / "checkpoints" / "last", require_resume)
    data = _read_data(cfg)
    fresh = not out_dir.exists()  # a new run folder is removed again if setup fails (nothing written half)
    try:
        return _setup(cfg, out_dir, resume_from, data)
    except (ConfigError, CorpusError, ValueError):
        if fresh and distributed.is_main():
            runlock.release(out_dir)
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _setup(cfg: RunConfig, out_dir: Path, resume_from: Path | None, data: RunData) -> Run:
    """``setup`` once the data is read: the run folder, models, tokenizer, encoded data and optimiser."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    _seed_everything(cfg.train.seed)
    device = _device(cfg.train.device)
    main = distributed.is_main()  # rank 0 alone writes into the run folder
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:  # one writer per run folder (released by train(), or by the OS when this process dies)
        runlock.acquire(out_dir)
    log = RunLog(out_dir / "train.log", enabled=main)
    log(f"data: {data.format} ({data.why}): {len(data.train)} training and {len(data.valid)} validation examples")
    resumed, state = _train_state(cfg, resume_from, log)
    if main:
        save_config(cfg, out_dir / "config.yaml")
    metrics = MetricsFile(out_dir / "metrics.jsonl", keep_lines=state.metrics_lines if resumed else 0, enabled=main)

    teacher, teacher_tokenizer = _load_teacher(cfg, device, log)
    model, tokenizer = _learner_and_tokenizer(cfg, resumed, teacher_tokenizer, data.train, log)
    train_pairs, valid_pairs = formats.to_pairs(data.train, tokenizer), formats.to_pairs(data.valid, tokenizer)
    if main:
        tokenizer.save(out_dir / "tokenizer")
    model = model.to(device=device, dtype=DTYPES[cfg.model.dtype])
    if cfg.train.gradient_checkpointing:
        _gradient_checkpointing(model, log)
    family = models.family_of(model)
    try:
        family.prepare(model, tokenizer, src_lang=cfg.data.src_lang, tgt_lang=cfg.data.tgt_lang, fmt=data.format,
                       instruction=cfg.data.instruction)
    except ValueError as e:
        raise ConfigError(f"data.format: {e}", key="data.format") from None
    if cfg.train.valid_bleu and data.format != "parallel":
        raise ConfigError(f"train.valid_bleu: BLEU needs translation pairs, the data is {data.format}; select on "
                          "the validation loss (train.valid_bleu=false)", key="train.valid_bleu")
    vocab_size = _check_teacher(cfg, teacher, model, teacher_tokenizer, tokenizer, log)
    if cfg.objective.objective == "nll":
        teacher = None  # its tokenizer was wanted, not its predictions

    (src, tgt), valid_ids = _encode_pairs(cfg, data.format, family, model, teacher, tokenizer, train_pairs,
                                          valid_pairs, log)
    sampler = TokenBatchSampler(*family.lengths((src, tgt)), cfg.data.max_tokens, seed=cfg.train.seed)
    cache = _fused_head_and_cache(cfg, model, teacher, tokenizer, (src, tgt), device, log)
    fsdp = _fsdp(cfg, model, teacher, log)
    ddp = None if fsdp else _ddp(model, device)
    optimizer, scheduler = _optimizer(cfg, model, resumed, fsdp=fsdp)

    log(f"learner: {sum(p.numel() for p in model.parameters()):,} parameters ({family.name}) on {device}"
        + (f" x {distributed.world_size()} processes (DDP)" if ddp is not None else "")
        + (f" sharded over {distributed.world_size()} processes (FSDP2)" if fsdp else "")
        + f"; objective {cfg.objective.objective}"
        + (f" (lam {cfg.objective.lam}) from teacher {cfg.model.teacher}" if teacher is not None else "")
        + f"; {len(src)} training pairs in {len(sampler.epoch_batches(state.epoch))} batches, "
          f"{len(valid_ids[0])} validation pairs")
    return Run(cfg=cfg, out_dir=out_dir, device=device, tokenizer=tokenizer, model=model, family=family,
               vocab_size=vocab_size, teacher=teacher, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
               train_ids=(src, tgt), valid_ids=valid_ids, valid_pairs=valid_pairs, state=state, log=log,
               metrics=metrics, writer=_tensorboard(out_dir) if main else None, ddp=ddp, teacher_cache=cache,
               data_format=data.format, fsdp=fsdp)


def _encode_pairs(cfg: RunConfig, fmt: str, family, model, teacher, tokenizer, train_pairs, valid_pairs, log):
    """``((src, tgt), valid ids)``: the pairs of format ``fmt`` as the family's ids, within what both models read.

    Raises:
        ConfigError: no training pair fits in ``data.max_length`` tokens.
    """
    positions = min(family.positions(m) for m in (model, teacher) if m is not None)  # both models read each batch
    max_length = min(cfg.data.max_length, positions)
    kw = {"model": model, "fmt": fmt, "truncate": cfg.data.truncate, "log": log}
    src, tgt = family.encode(train_pairs, tokenizer, max_length, **kw)
    if not src:
        raise ConfigError(f"data.max_length: no training example fits in {max_length} tokens", key="data.max_length")
    return (src, tgt), family.encode(valid_pairs, tokenizer, positions, **kw)


def _gradient_checkpointing(model, log) -> None:
    """Recompute the learner's layer activations in backward (``transformers``' own checkpointing, non-reentrant:
    the same gradients; dropout masks are replayed from the saved RNG state).

    Raises:
        ConfigError: a model class without gradient checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it",
                          key="train.gradient_checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    log("gradient checkpointing: the learner's layer activations are recomputed in the backward pass")


def _fsdp(cfg: RunConfig, model, teacher, log) -> bool:
    """Shard the learner and the teacher (``ktransfer.runtime.fsdp``) when ``train.distributed=fsdp`` with several
    processes; whether it did.

    Raises:
        ConfigError: settings that need every rank to run its own number of forward passes or a whole model
            (on-policy prefixes, the teacher cache, the fused head, LoRA), or a model without transformer blocks.
    """
    if cfg.train.distributed != "fsdp" or distributed.world_size() <= 1:
        return False
    refused = {"objective.prefix": cfg.objective.prefix != "reference", "train.teacher_cache": cfg.train.teacher_cache,
               "train.fused_head": cfg.train.fused_head, "model.lora_r": cfg.model.lora_r is not None}
    for key, on in refused.items():
        if on:
            raise ConfigError(f"{key}: not with train.distributed=fsdp (use ddp)", key=key)
    from ktransfer.runtime import fsdp

    try:
        for m in (model, teacher):
            if m is not None:
                fsdp.shard(m)
    except ValueError as e:
        raise ConfigError(f"train.distributed: {e}", key="train.distributed") from None
    log(f"FSDP2: learner{' and teacher' if teacher is not None else ''} sharded per transformer block over "
        f"{distributed.world_size()} processes")
    return True


def _ddp(model, device: torch.device):
    """The learner wrapped in DistributedDataParallel under torchrun (None for one process). The teacher stays
    outside: frozen, it has no gradients to synchronise."""
    if distributed.world_size() <= 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _train_state(cfg: RunConfig, resume_from: Path | None, log) -> tuple[ckpt_lib.Checkpoint | None, TrainState]:
    """The checkpoint to resume (None for a new run) and the train state to start from."""
    if resume_from is None:
        log(f"new run in {cfg.train.out_dir}")
        return None, TrainState()
    resumed = ckpt_lib.load_checkpoint(resume_from)
    state = TrainState.from_dict(resumed.train_state)
    if state.stopped == "nonfinite":
        state.nonfinite = 0  # the user changed something; count afresh
    state.stopped = None  # a stopped run goes on; a finished one finds it has nothing left to do
    log(f"resuming from {resumed.path}: epoch {state.epoch}, batch {state.batch}, step {state.step}")
    _warn_config_changes(log, resumed.config, config_to_dict(cfg))
    return resumed, state


def _optimizer(cfg: RunConfig, model, resumed: ckpt_lib.Checkpoint | None, *, fsdp: bool = False):
    """AdamW and the learning-rate schedule; restored from ``resumed`` with the RNG states (last: nothing after this
    may draw random numbers)."""
    o = cfg.optim
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, o.schedule, o.warmup_steps))
    if resumed is not None:
        if fsdp:  # the single-process layout of the checkpoint, scattered to the shards
            from ktransfer.runtime import fsdp as fsdp_lib

            fsdp_lib.load_optimizer_state(model, optimizer, resumed.optimizer_state)
        else:
            ckpt_lib.restore_optimizer(optimizer, resumed)
        scheduler.load_state_dict(resumed.scheduler_state)
        ckpt_lib.restore_rng(resumed.train_state)
    return optimizer, scheduler


def _check_teacher(cfg: RunConfig, teacher, model, teacher_tokenizer, tokenizer, log) -> int:
    """The ids learner and teacher share (``models.check_compatible``); the tokenizer's size without a teacher."""
    if teacher is None:
        return tokenizer.vocab_size
    try:
        return models.check_compatible(teacher, model, teacher_tokenizer, tokenizer, log=log)
    except ValueError as e:
        raise ConfigError(f"model.teacher: {cfg.model.teacher}: {e}", key="model.teacher") from None


def lr_factor(step: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate for update ``step + 1``: linear warm-up, then constant or 1/sqrt(step)."""
    n = step + 1
    if warmup_steps and n <= warmup_steps:
        return n / warmup_steps
    if schedule == "inverse_sqrt":
        return math.sqrt(max(warmup_steps, 1) / n)
    return 1.0


def _fused_head_and_cache(cfg: RunConfig, model, teacher, tokenizer, train_ids, device, log):
    """Check ``train.fused_head`` (both models' output layers can be fused, one process); open (or build) the
    ``train.teacher_cache`` and return it, else None. Raises ConfigError naming the key."""
    if cfg.train.fused_head:
        from ktransfer.losses.fused_linear import output_head

        if distributed.world_size() > 1:
            raise ConfigError("train.fused_head: not with several processes (DDP must run the learner's forward; "
                              "the fused path calls its body and head separately)", key="train.fused_head")
        for name, m in (("learner", model), ("teacher", teacher)):
            try:
                if m is not None:
                    output_head(m)
            except ValueError as e:
                raise ConfigError(f"train.fused_head: the {name}: {e}", key="train.fused_head") from None
    if not cfg.train.teacher_cache:
        return None
    from ktransfer.training.teacher_cache import open_for_run

    if teacher is None:
        raise ConfigError("train.teacher_cache: objective nll uses no teacher", key="train.teacher_cache")
    return open_for_run(cfg, teacher, tokenizer, train_ids, models.family_of(model), model, device, log)


def _find_resume(cfg: RunConfig, last: Path, require: bool) -> Path | None:
    exists = last.exists() or any(last.parent.glob(".last.old-*"))  # an interrupted swap leaves an aside copy
    if require and not exists:
        raise ConfigError(f"train.out_dir: nothing to resume: no checkpoint at {last}", key="train.out_dir")
    if exists and not (cfg.train.resume or require):
        raise ConfigError(
            f"train.resume: {cfg.train.out_dir} already holds a run ({last}); resume it (train.resume=true or "
            "--resume) or choose another train.out_dir", key="train.resume")
    return last if exists else None


@dataclass
class RunData:
    """The examples of a run as read (``ktransfer.data.formats``), and why that format."""

    format: str
    why: str
    train: formats.Examples
    valid: formats.Examples


def _read_data(cfg: RunConfig) -> RunData:
    """The training examples (first data.train_limit) and validation examples (first data.valid_subset), in the
    format data.format names or ``auto`` infers; a single data file gives up a held-out validation share.

    Raises:
        ConfigError: nothing at data.corpus. CorpusError: bad data (naming the file and line).
    """
    d = cfg.data
    keys = formats.Keys(d.prompt_key, d.completion_key, d.messages_key, d.text_key)
    try:
        path = formats.locate(d.corpus)
    except CorpusError as e:
        raise ConfigError(f"data.corpus: {e}", key="data.corpus") from None
    fmt, why = (d.format, "data.format") if d.format != "auto" else formats.infer_format(path, keys)
    if fmt == "parallel":
        train_pairs = read_split(d.corpus, d.train, d.src_lang, d.tgt_lang)[:d.train_limit]
        require_nonempty_pairs(train_pairs, d.corpus, d.train, d.src_lang, d.tgt_lang)  # before any file is written
        valid_pairs = read_split(d.corpus, d.valid, d.src_lang, d.tgt_lang)[:d.valid_subset]
        return RunData(fmt, why, formats.Examples(fmt, train_pairs), formats.Examples(fmt, valid_pairs))
    train = formats.read_examples(d.corpus, d.train, fmt, keys=keys)
    if formats.has_split(d.corpus, d.valid, fmt):
        valid = formats.read_examples(d.corpus, d.valid, fmt, keys=keys)
    else:
        train, valid = formats.hold_out(train, d.valid_fraction, d.split_seed)
        why += (f"; validation: {len(valid)} examples held out of {train.source} (data.valid_fraction "
                f"{d.valid_fraction}, data.split_seed {d.split_seed})")
    return RunData(fmt, why, train.head(d.train_limit), valid.head(d.valid_subset))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(name: str) -> torch.device:
    """``train.device`` as a device (``runtime.device.choose_device``); an unavailable one is a config error."""
    try:
        return choose_device(name)
    except DeviceError as e:
        raise ConfigError(f"train.device: {e}", key="train.device") from e


def _load(cfg: RunConfig, key: str, source: str, device="cpu", **overrides):
    """``models.load_model(source)`` with its errors as a ConfigError naming ``key``."""
    try:
        return models.load_model(source, device=device, trust_remote_code=cfg.model.trust_remote_code, **overrides)
    except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}: {e}", key=key) from None


def _load_teacher(cfg: RunConfig, device: torch.device, log) -> tuple[torch.nn.Module | None, Tokenizer | None]:
    """The teacher of ``model.teacher`` (any model source), frozen: eval mode, no gradients; ``(None, None)``
    without one. A teacher folder without tokenizer files takes ``data.tokenizer``."""
    if not cfg.model.teacher:
        return None, None
    teacher, tokenizer = _load(cfg, "model.teacher", cfg.model.teacher, device)
    if tokenizer is None:
        tokenizer = _given_tokenizer(cfg)
        if tokenizer is None:
            raise ConfigError(f"model.teacher: {cfg.model.teacher} has no tokenizer files: give data.tokenizer",
                              key="data.tokenizer")
    teacher.eval().requires_grad_(False)
    dtype = teacher_dtype(cfg.model.teacher_dtype, device)
    teacher.to(dtype)
    log(f"teacher: {cfg.model.teacher} ({type(teacher).__name__}, {sum(p.numel() for p in teacher.parameters()):,} "
        f"parameters, frozen, {str(dtype).removeprefix('torch.')})")
    return teacher, tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.teacher_dtype``: ``auto`` is bfloat16 on a CUDA device that supports it, else float32."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def _given_tokenizer(cfg: RunConfig) -> Tokenizer | None:
    if not cfg.data.tokenizer:
        return None
    try:
        return load_tokenizer(cfg.data.tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}", key="data.tokenizer") from None


def _learner_and_tokenizer(cfg: RunConfig, resumed, teacher_tokenizer, train_examples, log):
    """The learner (train mode) and its tokenizer: a resumed run's; else ``model.init``'s (any model source); else a
    new model of ``model.preset`` (a preset or a model source) for data.tokenizer, the teacher's tokenizer, or a
    joint BPE trained on the training split, in that order."""
    overrides = {} if cfg.model.dropout is None else {"dropout": cfg.model.dropout}
    given = _given_tokenizer(cfg)
    start, key = (resumed.path, "train.out_dir") if resumed is not None else (cfg.model.init, "model.init")
    if start:
        model, tokenizer = _load(cfg, key, start, **overrides)
        if tokenizer is None:
            tokenizer = given or teacher_tokenizer
            if tokenizer is None:
                raise ConfigError(f"{key}: {start} has no tokenizer files: give data.tokenizer", key="data.tokenizer")
        elif given is not None and resumed is None:
            try:
                compare_tokenizers(tokenizer, given, f"model.init {start}", f"data.tokenizer {cfg.data.tokenizer}")
            except ValueError as e:
                raise ConfigError(f"data.tokenizer: {e}", key="data.tokenizer") from None
        if resumed is None:
            log(f"learner initialised from {start} (model.preset not used)")
            model = _with_lora(cfg, model, log)
        return model.train(), tokenizer
    tokenizer = given or teacher_tokenizer or _train_bpe(cfg, train_examples, log)
    try:
        model = models.build_model(cfg.model.preset, tokenizer, trust_remote_code=cfg.model.trust_remote_code,
                                   **overrides)
    except ValueError as e:
        raise ConfigError(f"model.preset: {e}", key="model.preset") from None
    return _with_lora(cfg, model, log).train(), tokenizer


def _with_lora(cfg: RunConfig, model, log):
    """The learner with fresh LoRA adapters when ``model.lora_r`` is set (``ktransfer.models.adapters``), else
    itself."""
    m = cfg.model
    if m.lora_r is None:
        return model
    from ktransfer.models import adapters

    try:
        model = adapters.add_lora(model, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                                  target_modules=m.lora_target_modules, causal=models.family_of(model).name == "causal")
    except ImportError as e:
        raise ConfigError(f"model.lora_r: {e}", key="model.lora_r") from None
    except ValueError as e:
        raise ConfigError(str(e), key="model.lora_r") from None
    log(f"LoRA: rank {m.lora_r}, alpha {m.lora_alpha}, dropout {m.lora_dropout}, "
        f"{adapters.parameter_summary(model)}")
    return model


def _train_bpe(cfg: RunConfig, train_examples, log) -> Tokenizer:
    """A joint BPE on the training split; with several processes every rank takes rank 0's (a tie could differ)."""
    t0 = time.time()
    tokenizer = train_tokenizer(formats.texts(train_examples), vocab_size=cfg.data.vocab_size)
    if distributed.world_size() > 1:
        from tokenizers import Tokenizer as RustTokenizer

        body = distributed.broadcast(tokenizer.hf.backend_tokenizer.to_str())
        tokenizer = from_rust(RustTokenizer.from_str(body))
    log(f"trained a joint BPE tokenizer on {len(train_examples)} examples: {tokenizer.vocab_size} tokens "
        f"({time.time() - t0:.1f}s)" + ("" if train_examples.format == "parallel" else
                                        "; it folds whitespace runs into one space: give a Hugging Face tokenizer "
                                        "(data.tokenizer, or the teacher's) to keep whitespace exactly"))
    return tokenizer


def _warn_config_changes(log, saved: dict, now: dict) -> None:
    changed = [f"{s}.{k}: {saved.get(s, {}).get(k)!r} -> {v!r}" for s, sec in now.items() for k, v in sec.items()
               if s in saved and k in saved[s] and saved[s][k] != v]
    if changed:
        log("warning: config differs from the checkpoint's (the resumed run is not exact): " + "; ".join(changed))


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
def train(cfg: RunConfig, *, require_resume: bool = False, on_epoch_end=None) -> dict:
    """Train (or distil) as ``cfg`` says; resumes from ``RUN/checkpoints/last`` when it exists and
    ``train.resume`` is true (``require_resume``: fail when there is nothing to resume). ``on_epoch_end(run)``, if
    given, runs after each epoch's validation and before its ``last`` checkpoint (per-epoch analyses); it must not
    draw random numbers (exact resume).

    Returns:
        The final metrics: ``epoch``, ``step``, ``best``, ``best_epoch``, ``stopped``, ``valid`` (last validation),
        ``out_dir``.

    Raises:
        ConfigError, CorpusError: see ``setup``.
        NonFiniteLossError: ``train.max_nonfinite`` consecutive non-finite steps (``last`` is saved first).
    """
    with distributed.session(cfg.train.device):  # joins torchrun's process group; a no-op for one process
        run = setup(cfg, require_resume=require_resume)
        run.on_epoch_end = on_epoch_end
        try:
            if run.teacher is not None and run.state.step == 0 and run.state.batch == 0:
                _teacher_valid(run)
            with _stop_on_signals(run):
                _train_loop(run)
        finally:
            runlock.release(run.out_dir)
            if run.writer is not None:
                run.writer.close()
    s = run.state
    return {"epoch": s.epoch, "step": s.step, "tokens": s.tokens, "best": s.best, "best_epoch": s.best_epoch,
            "stopped": s.stopped, "valid": run.metrics.last_valid, "out_dir": str(run.out_dir)}


@torch.no_grad()
def _teacher_valid(run: Run) -> None:
    """The teacher's validation NLL and perplexity, once at the start of a run (the learner's target to approach):
    one teacher forward per validation batch, the batches of ``valid_loss``."""
    from ktransfer.evaluation.evaluate import completion_nll

    total, tokens = completion_nll(run.teacher, run.tokenizer, *run.valid_ids, batches=valid_batches(run))
    if not run.fsdp:  # FSDP: every rank ran every batch (each forward is a collective)
        total, tokens = distributed.all_reduce_sum([total, tokens])
    nll = total / max(tokens, 1)
    # "valid_tokens", not "tokens": every metrics row's "tokens" is the training tokens so far
    valid = {"nll": nll, "ppl": math.exp(min(nll, 50.0)), "valid_tokens": int(tokens)}
    run.metrics.write(run, {"kind": "teacher_valid", **valid})
    run.log(f"teacher on the validation examples: nll {valid['nll']:.4f} ppl {valid['ppl']:.2f} "
            f"({valid['valid_tokens']} tokens)")


def _train_loop(run: Run) -> None:
    cfg, s = run.cfg, run.state
    if _finished(run):
        run.log(f"nothing to do: the run is complete ({s.stopped})")
        return
    save_every = cfg.train.save_every
    # one update takes `per_step` consecutive batches of the epoch, whatever the number of processes holding them
    per_step = cfg.optim.accumulate * distributed.world_size()
    while not _finished(run):
        batches = run.sampler.epoch_batches(s.epoch)
        bar, window = _progress(run, len(batches)), _Throughput()
        while s.batch < len(batches) and not _stop_requested(run):
            group = batches[s.batch:s.batch + per_step]
            mine, padding = rank_batches(group, distributed.rank(), distributed.world_size())
            result = train_step(run, [_training_batch(run, idx) for idx in mine], padding=padding)
            s.batch += len(group)
            bar.update(len(group))
            if not result["finite"]:
                _skip_nonfinite(run, result)
                continue
            s.step, s.tokens, s.nonfinite = s.step + 1, s.tokens + result["batch_tokens"], 0
            window.add(result["batch_tokens"])
            bar.set_postfix(loss=f"{result['loss']:.3f}", lr=f"{result['lr']:.2e}", tok_s=f"{window.rate():.0f}")
            if s.step % cfg.train.log_every == 0:
                run.metrics.write(run, {"kind": "train", **result, "tokens_per_s": window.rate()})
                run.log(f"epoch {s.epoch} batch {s.batch}/{len(batches)} step {s.step}: loss {result['loss']:.4f} "
                        f"nll {result['nll']:.4f} div {result['divergence']:.4f} lr {result['lr']:.2e} "
                        f"|g| {result['grad_norm']:.3f} {window.rate():.0f} tok/s")
                window = _Throughput()
            if cfg.train.max_steps and s.step >= cfg.train.max_steps:
                break
            if save_every and s.step % save_every == 0 and s.batch < len(batches):
                save_checkpoint(run, "last")
        bar.close()
        if _stop_requested(run):
            return _stop_for_signal(run)
        if s.batch >= len(batches):
            s.epoch, s.batch = s.epoch + 1, 0
        _end_of_epoch(run)  # also after max_steps mid-epoch: validate and save before stopping
    run.log(f"done ({s.stopped}): {s.step} steps, {s.tokens:,} target tokens, "
            f"{run.elapsed():.0f}s; best {_metric_name(run)} {s.best} after epoch {s.best_epoch}")


def rank_batches(group: list[list[int]], rank: int, world: int) -> tuple[list[list[int]], int]:
    """Rank ``rank``'s micro-batches of one global step's ``group`` of batches: the ``rank``-th of each run of
    ``world`` consecutive ones (``group[rank::world]``), and how many stand-ins end the list.

    Every rank must run the same number of forward/backward passes (DDP synchronises each update); where the group
    does not divide evenly (the end of an epoch) the short ranks repeat the group's first batch as a stand-in whose
    loss ``train_step`` multiplies by 0. For one process this is ``(group, 0)``.
    """
    mine = group[rank::world]
    steps = -(-len(group) // world)  # ceil
    padding = steps - len(mine)
    return mine + [group[0]] * padding, padding


def train_step(run: Run, batches: list[dict], *, padding: int = 0) -> dict:
    """One update from ``batches`` (one, or ``optim.accumulate`` of them): their gradients are summed with each
    loss divided by the tokens of all of them, so the update equals that of one batch holding them all.

    Several processes: each passes its own micro-batches (``rank_batches``; the last ``padding`` are stand-ins that
    count nothing). The token count is summed over processes, and each loss is multiplied by the number of
    processes before ``backward`` because DDP averages gradients: the update equals the single-process one on the
    batches of all processes. Gradients are synchronised on the last micro-batch only (``no_sync`` before).

    A non-finite loss or gradient norm skips the update (the gradients are dropped); ``finite`` tells.
    """
    model, o, world = run.trained_model(), run.cfg.optim, distributed.world_size()
    real = len(batches) - padding
    num_tokens = sum(int((b["labels"] != -100).sum()) for b in batches[:real])
    num_tokens = int(distributed.all_reduce_sum([num_tokens])[0])  # global count: the loss denominator
    loss = nll = div = 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with run.ddp.no_sync() if run.ddp is not None and not last else contextlib.nullcontext():
            out = compute_loss(run, batch, num_tokens, model=model)
            (out.loss * (world if i < real else 0.0)).backward()  # x world: DDP divides the summed gradients by it
        if i < real:
            loss, nll, div = loss + out.loss.item(), nll + out.nll.item(), div + out.divergence.item()
    loss, nll, div = distributed.all_reduce_sum([loss, nll, div])  # every rank agrees on skipping a step
    clip = o.clip_norm if o.clip_norm is not None else float("inf")  # inf: only measure the norm
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    lr = run.optimizer.param_groups[0]["lr"]
    if finite:
        run.optimizer.step()
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "nll": nll, "divergence": div, "grad_norm": grad_norm, "lr": lr,
            "batch_tokens": num_tokens, "finite": finite}


def compute_loss(run: Run, batch: dict, num_tokens: int | None = None, *, model=None) -> TransferLoss:
    """The objective on one batch: ``(1 - lam) * NLL + lam * D(learner, teacher)`` (plain NLL for ``nll``).

    The teacher runs under ``torch.no_grad`` in eval mode; ``num_tokens`` replaces the batch's own token count as
    the denominator (gradient accumulation, several processes). ``model``: the learner to run (default
    ``run.model``; ``train_step`` passes the DDP wrapper).

    ``objective.prefix`` learner/mixed: a training batch (learner in train mode, gradients on) goes to
    ``ktransfer.training.prefixes.compute_loss`` (divergence on the learner's samples); validation keeps the reference
    prefix.
    """
    ob = run.cfg.objective
    if ob.prefix != "reference" and run.model.training and torch.is_grad_enabled():
        from ktransfer.training import prefixes

        out = prefixes.compute_loss(run, batch, num_tokens, model=model)
        if out is not None:  # None: a `mixed` batch whose coin kept the reference prefix
            return out
    inputs, labels = run.family.model_inputs(batch)  # model(**inputs).logits[:, t] is scored against labels[:, t]
    extra = {"support": ob.support} if ob.support is not None else {}
    if run.cfg.train.fused_head:  # logits never materialised (ktransfer.losses.fused_linear); checked in setup
        from ktransfer.losses.fused_linear import fused_model_loss

        with _autocast(run):
            return fused_model_loss(run.model if model is None else model, run.teacher, inputs, labels,
                                    objective=ob.objective, lam=ob.lam, top_k=ob.top_k, temperature=ob.temperature,
                                    label_smoothing=ob.label_smoothing, num_tokens=num_tokens, beta=ob.beta,
                                    alpha=ob.alpha, renormalize=ob.renormalize, tail=ob.tail, **extra)
    with _autocast(run):
        logits = (run.model if model is None else model)(**inputs, use_cache=False).logits  # (B, T, V)
        teacher_logits = None
        if run.teacher_cache is not None and "example_index" in batch:  # training batch: the cached teacher
            from ktransfer.training.teacher_cache import first_targets

            teacher_logits = run.teacher_cache.teacher_logits(batch["example_index"], labels.shape[1],
                                                              shift=first_targets(labels), device=logits.device)
        elif run.teacher is not None:
            with torch.no_grad():
                teacher_logits = run.teacher(**inputs, use_cache=False).logits  # (B, T, V)
    # logits over the shared ids only (embedding padding rows, e.g. 32064 vs 32000, dropped)
    logits, teacher_logits = models.shared_logits(logits, teacher_logits, run.vocab_size)
    return transfer_loss(logits, teacher_logits, labels, objective=ob.objective, lam=ob.lam,
                         top_k=ob.top_k, temperature=ob.temperature, label_smoothing=ob.label_smoothing,
                         num_tokens=num_tokens, beta=ob.beta, alpha=ob.alpha, renormalize=ob.renormalize, tail=ob.tail,
                         **extra)


def _skip_nonfinite(run: Run, result: dict) -> None:
    s, limit = run.state, run.cfg.train.max_nonfinite
    s.nonfinite += 1
    run.log(f"warning: non-finite loss {result['loss']} / gradient norm {result['grad_norm']} at epoch {s.epoch} "
            f"batch {s.batch}: update skipped ({s.nonfinite} in a row, stop at {limit})")
    run.metrics.write(run, {"kind": "nonfinite", **result})
    if s.nonfinite >= limit:
        s.stopped = "nonfinite"
        path = save_checkpoint(run, "last")
        message = (f"{s.nonfinite} consecutive non-finite steps: training stopped at epoch {s.epoch}, step {s.step} "
                   f"(weights saved to {path} are those before the first of them); lower optim.lr, set "
                   "optim.clip_norm, or check the data")
        run.log(message)
        raise NonFiniteLossError(message)


def _finished(run: Run) -> bool:
    """Whether training is over; sets ``state.stopped`` to the reason (but for a run of all epochs)."""
    cfg, s = run.cfg, run.state
    if s.epoch >= cfg.train.epochs:
        s.stopped = "epochs"
        return True
    if cfg.train.max_steps and s.step >= cfg.train.max_steps:
        s.stopped = "max_steps"
        return True
    if cfg.train.patience and s.bad_validations >= cfg.train.patience:
        s.stopped = "early_stopping"
        return True
    return False


# --------------------------------------------------------------------------------------------------------------
# Validation and the end of an epoch
# --------------------------------------------------------------------------------------------------------------
def _end_of_epoch(run: Run) -> None:
    """Validate, keep the best checkpoint, save ``last``, count validations without improvement."""
    s = run.state
    valid = validate(run)
    value = valid["bleu"] if run.cfg.train.valid_bleu else valid["loss"]
    improved = s.best is None or (value > s.best if run.cfg.train.valid_bleu else value < s.best)
    if improved:
        s.best, s.best_epoch, s.bad_validations = value, s.epoch, 0
    else:
        s.bad_validations += 1
    run.metrics.write(run, {"kind": "valid", **valid, "best": s.best, "improved": improved,
                            "elapsed": run.elapsed()})
    bleu = f" BLEU {valid['bleu']:.2f} (beam {valid['beam']})" if valid["bleu"] is not None else ""
    run.log(f"epoch {s.epoch}/{run.cfg.train.epochs} (step {s.step}): valid loss {valid['loss']:.4f} "
            f"nll {valid['nll']:.4f} ppl {valid['ppl']:.2f}{bleu}"
            + (" (best)" if improved else f" (best {_metric_name(run)} {s.best:.4f} after epoch {s.best_epoch})"))
    if improved:
        save_checkpoint(run, "best")
    if run.on_epoch_end is not None:  # before `last`: a kill in the hook redoes the epoch, and the hook, on resume
        run.on_epoch_end(run)
    save_checkpoint(run, "last")


@torch.no_grad()
def validate(run: Run) -> dict:
    """Validation loss (the training objective, NLL and divergence; token means) and perplexity; for translation
    pairs also BLEU/chrF of the translations of the validation sources (beam ``eval.valid_beam``; other ``eval.*``
    settings); for other data the generations of the first ``eval.valid_examples`` prompts, in ``train.log``."""
    model, cfg = run.model, run.cfg
    model.eval()
    valid = valid_loss(run)
    if run.data_format == "parallel":
        valid.update(_valid_bleu(run))
    else:
        valid.update(bleu=None, chrf=None, beam=None, sentences=len(run.valid_ids[0]))
        _log_examples(run, cfg.eval.valid_examples)
    model.train()
    return valid


def valid_batches(run: Run) -> list[list[int]]:
    """This rank's validation batches (indices into ``run.valid_ids``, token-batched): a share of them with several
    processes; all of them on every rank under FSDP, where each forward is a collective."""
    sampler = TokenBatchSampler(*run.family.lengths(run.valid_ids), run.cfg.data.max_tokens, shuffle=False)
    batches = sampler.epoch_batches(0)
    return batches if run.fsdp else distributed.shard(batches)


def valid_loss(run: Run) -> dict:
    """Token means of the objective, its NLL and divergence, and the perplexity ``exp(nll)``, of the learner on the
    validation examples, with reference prefixes."""
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, nll, divergence (token sums), tokens
    for idx in valid_batches(run):
        batch = collate_batch(run, run.valid_ids, idx)
        n = int((batch["labels"] != -100).sum())
        out = compute_loss(run, batch)
        for i, value in enumerate((out.loss, out.nll, out.divergence)):
            sums[i] += float(value) * n
        sums[3] += n
    *sums, total = sums if run.fsdp else distributed.all_reduce_sum(sums)
    valid = {k: v / max(total, 1) for k, v in zip(("loss", "nll", "divergence"), sums, strict=True)}
    valid["ppl"] = math.exp(min(valid["nll"], 50.0))
    return valid


def _valid_bleu(run: Run) -> dict:
    """BLEU and chrF of the learner's translations of the validation sources."""
    from ktransfer.evaluation.evaluate import score, translate

    cfg = run.cfg
    beam = cfg.eval.valid_beam or (cfg.eval.beam if cfg.train.valid_bleu else 1)
    sources, references = [p[0] for p in run.valid_pairs], [p[1] for p in run.valid_pairs]
    t0 = time.time()
    def translate_part(part):
        return translate(run.model, run.tokenizer, part, beam=beam, length_penalty=cfg.eval.length_penalty,
                         max_length=cfg.eval.max_length, batch_size=cfg.eval.batch_size)

    # several processes: each translates a share, hypotheses in source order; FSDP: every rank translates them all
    hyps = translate_part(sources) if run.fsdp else distributed.map_sharded(translate_part, sources)
    scores = distributed.broadcast(score(hyps, references) if distributed.is_main() else None)  # rank 0 scores
    return {"bleu": scores["bleu"], "chrf": scores["chrf"], "beam": beam, "sentences": len(sources),
            "translate_s": time.time() - t0, "bleu_signature": scores["bleu_signature"]}


def _log_examples(run: Run, n: int) -> None:
    """Greedy generations of the learner for the first ``n`` validation prompts, beside their references."""
    if n <= 0 or not (distributed.is_main() or run.fsdp):  # FSDP: every rank generates (collectives), 0 logs
        return
    from ktransfer.models.generation import DecodeSettings

    prompts = run.valid_ids[0][:n]
    settings = DecodeSettings(beam=1, length_penalty=1.0, max_length=run.cfg.eval.max_length)
    outputs = run.family.complete(run.model, run.tokenizer, prompts, settings, batch_size=n)
    for i, out in enumerate(outputs):
        run.log(f"  example {i + 1}: prompt {run.tokenizer.decode(prompts[i])!r}\n    learner   {out!r}\n"
                f"    reference {run.tokenizer.decode(run.valid_ids[1][i])!r}")


def _metric_name(run: Run) -> str:
    return "BLEU" if run.cfg.train.valid_bleu else "valid loss"


# --------------------------------------------------------------------------------------------------------------
# Checkpoints, signals
# --------------------------------------------------------------------------------------------------------------
def save_checkpoint(run: Run, name: str) -> Path:
    """Save ``RUN/checkpoints/NAME``: weights, optimiser, schedule, train state and RNG states (atomically).

    Several processes: rank 0 writes (the unwrapped learner and its own RNG states) while the others wait at a
    barrier, so none goes on before the checkpoint is whole; the weights and optimiser are the same on every rank.
    """
    run.elapsed()
    path = run.out_dir / "checkpoints" / name
    gathered = {}
    if run.fsdp:  # every rank takes part in gathering the full weights and optimiser state; rank 0 writes them
        from ktransfer.runtime import fsdp

        gathered = {"state_dict": fsdp.full_model_state(run.model),
                    "optimizer_state": fsdp.full_optimizer_state(run.model, run.optimizer)}
    if distributed.is_main():
        ckpt_lib.save_checkpoint(path, model=run.model, tokenizer=run.tokenizer, config=config_to_dict(run.cfg),
                                 optimizer=run.optimizer, scheduler=run.scheduler, train_state=asdict(run.state),
                                 **gathered)
    distributed.barrier()
    return path


@contextlib.contextmanager
def _stop_on_signals(run: Run):
    """SIGINT/SIGTERM ask the loop to stop after the current step (it saves ``last``); a second SIGINT interrupts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if run.stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.stop_signal.append(signum)
        print(f"\n{signal.Signals(signum).name}: saving checkpoints/last after this step", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_requested(run: Run) -> bool:
    """Whether SIGINT/SIGTERM arrived; with several processes, whether it arrived at any of them (a collective:
    every rank calls it at the same point, so all stop after the same step)."""
    signum = distributed.all_reduce_max(run.stop_signal[0] if run.stop_signal else 0)
    if signum and not run.stop_signal:
        run.stop_signal.append(signum)
    return bool(signum)


def _stop_for_signal(run: Run) -> None:
    s = run.state
    s.stopped = f"signal:{signal.Signals(run.stop_signal[0]).name}"
    path = save_checkpoint(run, "last")
    run.log(f"stopped by {s.stopped[7:]} at epoch {s.epoch}, batch {s.batch}, step {s.step}; saved {path} "
            "(run the same command again to resume)")


# --------------------------------------------------------------------------------------------------------------
# Small helpers: batches, autocast, logging, throughput
# --------------------------------------------------------------------------------------------------------------
def collate_batch(run: Run, ids, idx: list[int]) -> dict:
    """The padded tensors (``family.collate``) of examples ``idx`` of ``ids`` (``family.encode`` output), on the
    device."""
    src, tgt = ids
    batch = run.family.collate([src[i] for i in idx], [tgt[i] for i in idx], run.model, run.tokenizer)
    return {k: v.to(run.device) for k, v in batch.items()}


def _training_batch(run: Run, idx: list[int]) -> dict:
    """``collate_batch`` of training examples ``idx``; with a teacher cache also ``example_index`` [B] (CPU), the
    keys of the cached teacher rows that ``compute_loss`` reads instead of running the teacher."""
    batch = collate_batch(run, run.train_ids, idx)
    if run.teacher_cache is not None:
        batch["example_index"] = torch.as_tensor(idx, dtype=torch.long)
    return batch


def _autocast(run: Run):
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.cfg.train.bf16)


def _progress(run: Run, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=run.state.batch, desc=f"epoch {run.state.epoch}", unit="batch",
                file=sys.stderr, dynamic_ncols=True, disable=None if distributed.is_main() else True, leave=False)


class _Throughput:
    """Target tokens per second since it was made."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)


class MetricsFile:
    """``metrics.jsonl``: one JSON object a line (train steps, validations, skipped steps).

    On resume the file is cut back to the lines the checkpoint had seen, so no line appears twice. Not ``enabled``
    (ranks other than 0): counts the lines, remembers the last validation, touches no file.
    """

    def __init__(self, path: Path, keep_lines: int = 0, *, enabled: bool = True):
        self.path, self.last_valid, self.enabled = path, None, enabled
        if not enabled:
            self.lines = keep_lines
            return
        kept = kept_records(path, keep_lines)  # a corrupt line: FILE:LINE
        nofollow.write_text(path, "".join(line for line, _ in kept))  # never through a link
        self.lines = len(kept)
        for _, record in kept:  # the last validation, for a resumed run that has nothing left to do
            if record.get("kind") == "valid":
                self.last_valid = record

    def write(self, run: Run, record: dict) -> None:
        s = run.state
        record = {"kind": record["kind"], "epoch": s.epoch, "batch": s.batch, "step": s.step, "tokens": s.tokens,
                  "time": time.time(), **record}
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}  # JSON
        if record["kind"] == "valid":
            self.last_valid = record
        if self.enabled:
            append_text(self.path, json.dumps(record) + "\n")
        self.lines += 1
        s.metrics_lines = self.lines
        if run.writer is not None:
            for key, value in record.items():
                if type(value) in (int, float) and key not in ("epoch", "batch", "step", "time"):  # bools excluded
                    run.writer.add_scalar(f"{record['kind']}/{key}", value, s.step)
