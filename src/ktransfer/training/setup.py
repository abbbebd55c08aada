"""``setup(cfg)``: a ``Run`` built from a config, or restored from ``RUN/checkpoints/last``.

In order: the option rules (``ktransfer.training.rules``, before anything is read or loaded), the data, the run
folder and its lock, the train state (resumed or new), the models and tokenizer (``ktransfer.training.loading``), the
encoded data and batches, the loss spec and where the teacher's signal comes from (``ktransfer.training.signals``),
the process layout (``ktransfer.training.parallel``) and the optimiser. A new run folder that fails half-way is
removed again, whatever the error (a model, tokenizer or checkpoint that fails to load too), with the parent
folders made for it; a folder this process did not lock (another run's) is never touched.
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from ktransfer.data import formats
from ktransfer.data.batching import ExampleBatchSampler, TokenBatchSampler
from ktransfer.data.corpora import CorpusError, read_split, require_nonempty_pairs
from ktransfer.losses.spec import LossSpec
from ktransfer.models import checkpoint as ckpt_lib
from ktransfer.models import family as models
from ktransfer.runtime import distributed, runlock
from ktransfer.runtime.device import DeviceError, choose_device
from ktransfer.runtime.runlog import RunLog
from ktransfer.training import lengths, loading, runfolder, signals
from ktransfer.training.config import ConfigError, RunConfig, check_rules, config_to_dict, save_config
from ktransfer.training.metrics import MetricsFile, check_report_to, reporter
from ktransfer.training.parallel import Parallel
from ktransfer.training.run import Run, RunData, TrainState


def setup(cfg: RunConfig, *, require_resume: bool = False) -> Run:
    """Build (or restore from ``RUN/checkpoints/last``) everything a run needs.

    Raises:
        ConfigError: a setting that cannot work (naming its key): a broken option rule (checked before anything
            loads), missing teacher/init/tokenizer, teacher and learner with different tokenizers, a run folder
            that holds another run (``ktransfer.training.runfolder``), ...
        CorpusError: the corpus is missing or malformed.
    """
    parallel = Parallel.choose(cfg.train.distributed)
    check_rules(cfg, world=parallel.world)  # the option rules, before anything is read or loaded
    if (missing := check_report_to(cfg.train.report_to)) is not None:
        raise ConfigError(missing, key="train.report_to")
    out_dir = runfolder.choose(cfg)
    resume_from = _find_resume(cfg, out_dir / "checkpoints" / "last", require_resume)
    changes = runfolder.check_same_run(cfg, out_dir, parallel.world) if resume_from is not None else []
    distributed.barrier()  # every process has read the folder's config before the main one rewrites it
    data = _read_data(cfg)
    check_rules(cfg, world=parallel.world, fmt=data.format)  # data.format=auto is known now
    notes = [f"resuming with changed keys that cannot change the run: {'; '.join(changes)}"] if changes else []
    if not cfg.train.resume and distributed.is_main() and out_dir.is_dir() and any(out_dir.iterdir()):
        runlock.acquire(out_dir)  # not while another process writes it
        runlock.release(out_dir)
        notes.append(f"train.resume=false: moved the old run aside to {runfolder.move_aside(out_dir)}")
    created = _missing_folders(out_dir)  # a new run folder (and parents made for it) goes again if setup fails
    try:
        return _setup(cfg, out_dir, resume_from, data, parallel, notes)
    except BaseException:
        if created and distributed.is_main() and runlock.holds(out_dir):  # never another process's folder
            _remove_new(out_dir, created)
        raise


def _missing_folders(out_dir: Path) -> list[Path]:
    """``out_dir`` and those of its parents that do not exist yet, deepest first."""
    missing, folder = [], out_dir.absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_new(out_dir: Path, created: list[Path]) -> None:
    """Remove the run folder this setup created, and the parents it made when they are empty (another run may
    have begun in one meanwhile)."""
    runlock.release(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()
        except OSError:
            break


def _setup(cfg: RunConfig, out_dir: Path, resume_from: Path | None, read: ReadData, parallel: Parallel,
           notes: list[str]) -> Run:
    """``setup`` once the data is read: the run folder, models, tokenizer, encoded data, loss and optimiser."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    _seed_everything(cfg.train.seed)
    device = _device(cfg.train.device)
    log, metrics, resumed, state = _run_folder(cfg, out_dir, read, resume_from, notes)
    state.processes = parallel.world
    teacher, model, tokenizer, family, vocab_size = _models(cfg, resumed, read, device, log)
    data, dropped = _encode(cfg, read, family, model, teacher, tokenizer, log)
    spec = LossSpec.from_config(cfg.objective, vocab_size)
    _check_spec(spec, vocab_size or getattr(model.config, "vocab_size", None))
    cache = None
    if cfg.train.teacher_cache:
        from ktransfer.training.teacher_cache import open_for_run

        cache = open_for_run(cfg, spec, teacher, tokenizer, data.train_ids, family, model, device, log)
    try:
        parallel.wrap(model, teacher, device)
    except ValueError as e:
        raise ConfigError(f"train.distributed: {e}", key="train.distributed") from None
    optimizer, scheduler = _optimizer(cfg, model, resumed, parallel, state, data.sampler, log)
    chosen = signals.choose(cfg, spec, model=model, teacher=teacher, family=family, tokenizer=tokenizer, state=state,
                            device=device, cache=cache)
    log(f"learner: {sum(p.numel() for p in model.parameters()):,} parameters ({family.name}) on {device}"
        + parallel.describe(teacher is not None) + f"; objective {cfg.objective.kind}"
        + (f" (divergence_weight {cfg.objective.divergence_weight}) from teacher {cfg.model.teacher}"
           if teacher is not None else "")
        + f"; {len(data.train_ids[0])} training pairs in {len(data.sampler.epoch_batches(state.epoch))} batches, "
          f"{len(data.valid_ids[0])} validation pairs")
    if dropped:  # the last word of setup, on the terminal too: examples that will not be trained on as written
        log(f"warning: {dropped}")
    return Run(cfg=cfg, out_dir=out_dir, device=device, tokenizer=tokenizer, model=model, family=family,
               teacher=teacher, data=data, optimizer=optimizer, scheduler=scheduler, state=state, log=log,
               metrics=metrics, parallel=parallel, signals=chosen)


MIN_TEMPERATURE = 1e-6  # below it, logits divided by T overflow float32 (3.4e38) for logits of size 1e32 and less


def _check_spec(spec: LossSpec, vocab: int | None) -> None:
    """The loss settings that the vocabulary or float32 rule out, as config errors naming the key."""
    if spec.top_k is not None and vocab and spec.top_k > vocab:
        raise ConfigError(f"objective.top_k: {spec.top_k} is larger than the vocabulary ({vocab:,} ids the learner "
                          "and teacher share); choose at most that, or leave it unset for the full vocabulary",
                          key="objective.top_k")
    if spec.needs_teacher and spec.temperature < MIN_TEMPERATURE:
        raise ConfigError(f"objective.temperature: {spec.temperature:g} divides the logits into overflow (float32 "
                          f"ends at 3.4e38); use at least {MIN_TEMPERATURE:g} (near 0 the softmax is the argmax "
                          "already)", key="objective.temperature")


def _run_folder(cfg: RunConfig, out_dir: Path, read: ReadData, resume_from: Path | None, notes: list[str]):
    """The run folder (locked by rank 0, the one writer), its log and metrics file, and the state to start from;
    ``notes`` go to the log first."""
    main = distributed.is_main()
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:  # one writer per run folder (released by train(), or by the OS when this process dies)
        runlock.acquire(out_dir)
    log = RunLog(out_dir / "train.log", enabled=main)
    for note in notes:
        log(note)
    log(f"data: {read.format} ({read.why}): {len(read.train)} training and {len(read.valid)} validation examples")
    resumed, state = _train_state(cfg, resume_from, log)
    if main:
        save_config(cfg, out_dir / "config.yaml")
    metrics = MetricsFile(out_dir / "metrics.jsonl", keep_lines=state.metrics_lines if resumed else 0, enabled=main,
                          writer=reporter(cfg.train.report_to, out_dir, config_to_dict(cfg)) if main else None)
    return log, metrics, resumed, state


def _models(cfg: RunConfig, resumed, read: ReadData, device, log):
    """``(teacher, learner, tokenizer, family, vocab_size)``: loaded, moved, prepared for the data format and checked
    against each other; the teacher is None for ``nll`` (only its tokenizer was wanted)."""
    teacher, teacher_tokenizer = loading.load_teacher(cfg, device, log)
    model, tokenizer = loading.learner_and_tokenizer(cfg, resumed, teacher_tokenizer, read.train, log)
    model = model.to(device=device, dtype=loading.DTYPES[cfg.model.dtype])
    if cfg.train.gradient_checkpointing:
        loading.gradient_checkpointing(model, log)
    family = models.family_of(model)
    try:
        family.prepare(model, tokenizer, src_lang=cfg.data.src_lang, tgt_lang=cfg.data.tgt_lang, fmt=read.format,
                       instruction=cfg.data.instruction)
    except ValueError as e:
        raise ConfigError(f"data.format: {e}", key="data.format") from None
    vocab_size = loading.shared_vocab_size(cfg, teacher, model, teacher_tokenizer, tokenizer, log)
    if cfg.objective.kind == "nll":
        teacher = None  # its tokenizer was wanted, not its predictions
    if cfg.train.fused_head:
        loading.check_fused_head(model, teacher)
    return teacher, model, tokenizer, family, vocab_size


def _encode(cfg: RunConfig, read: ReadData, family, model, teacher, tokenizer, log) -> tuple[RunData, str | None]:
    """The examples as the family's ids, within what both models read (``ktransfer.training.lengths``), and the
    batches of each epoch; and a line on the training examples dropped or cut (None when none were).

    Raises:
        ConfigError: no training pair fits in ``data.max_length`` tokens.
    """
    train_pairs, valid_pairs = formats.to_pairs(read.train, tokenizer), formats.to_pairs(read.valid, tokenizer)
    if distributed.is_main():
        tokenizer.save(Path(cfg.train.out_dir) / "tokenizer")
    positions = min(family.positions(m) for m in (model, teacher) if m is not None)  # both models read each batch
    lim = lengths.limit(cfg.data.max_length, positions, tokenizer)
    log(f"longest training example: {lim.tokens} tokens ({lim.why})")
    counter = lengths.Counter(log)
    kw = {"model": model, "fmt": read.format, "truncate": cfg.data.truncate, "log": counter}
    src, tgt = family.encode(train_pairs, tokenizer, lim.tokens, **kw)
    if not src:
        raise ConfigError(f"data.max_length: no training example fits in {lim.tokens} tokens ({lim.why})",
                          key="data.max_length")
    if cfg.data.batch_size is not None:  # examples per batch (Hugging Face's per_device_train_batch_size)
        sampler = ExampleBatchSampler(len(src), cfg.data.batch_size, seed=cfg.train.seed)
    else:
        sampler = TokenBatchSampler(*family.lengths((src, tgt)), cfg.data.max_tokens, seed=cfg.train.seed)
    dropped = lengths.report("training examples", len(train_pairs), len(src), counter.cut, lim)
    return RunData(format=read.format, train_ids=(src, tgt),
                   valid_ids=family.encode(valid_pairs, tokenizer, positions, **kw), valid_pairs=valid_pairs,
                   sampler=sampler), dropped


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
    log(f"resuming from {resumed.path} (the same run): epoch {state.epoch}, batch {state.batch}, step {state.step}")
    return resumed, state


def _optimizer(cfg: RunConfig, model, resumed: ckpt_lib.Checkpoint | None, parallel: Parallel, state: TrainState,
               sampler, log):
    """AdamW and the learning-rate schedule; restored from ``resumed`` with the RNG states (last: nothing after this
    may draw random numbers)."""
    o = cfg.optim
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  fused=fused_adamw(trainable, parallel.sharded))
    if o.schedule in DECAYS:
        scheduler = DECAYS[o.schedule](optimizer, o.warmup_steps, _schedule_steps(cfg, state, sampler, parallel, log))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      lambda step: lr_factor(step, o.schedule, o.warmup_steps))
    if resumed is not None:
        parallel.load_optimizer_state(model, optimizer, resumed)
        scheduler.load_state_dict(resumed.scheduler_state)
        ckpt_lib.restore_rng(resumed.train_state)
    return optimizer, scheduler


def fused_adamw(params, sharded: bool) -> bool | None:
    """True (torch's fused AdamW: one kernel over every tensor, what HF Trainer's default ``adamw_torch_fused`` uses)
    when every parameter is a plain float tensor on the CPU or CUDA; None (torch's own choice) for FSDP's sharded
    parameters and other devices."""
    ok = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16,
                                                              torch.float64) for p in params)
    return True if ok and params and not sharded else None


# optim.schedule linear / cosine: transformers' own schedules (update k+1 uses the factor of step k: 0 at the first
# update when optim.warmup_steps > 0, as there), decaying to 0 at the run's total number of updates.
DECAYS = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}


def lr_factor(step: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate for update ``step + 1``: linear warm-up, then constant or 1/sqrt(step)."""
    n = step + 1
    if warmup_steps and n <= warmup_steps:
        return n / warmup_steps
    if schedule == "inverse_sqrt":
        return math.sqrt(max(warmup_steps, 1) / n)
    return 1.0


def total_steps(cfg: RunConfig, sampler, world: int = 1) -> int:
    """The updates of a whole run: ``train.max_steps`` when it comes first, else the updates of ``train.epochs``
    epochs (each ``ceil(batches / (optim.accumulate x world))``, batches as ``sampler`` cuts that epoch)."""
    per_step = cfg.optim.accumulate * world
    total, epoch = 0, 0
    while epoch < cfg.train.epochs and not (cfg.train.max_steps and total >= cfg.train.max_steps):
        total += -(-len(sampler.epoch_batches(epoch)) // per_step)
        epoch += 1
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def _schedule_steps(cfg: RunConfig, state: TrainState, sampler, parallel: Parallel, log) -> int:
    """The total updates the linear / cosine decay spans: fixed when the run starts and kept in the train state, so
    a resume continues the same schedule (also when train.epochs or train.max_steps changed since)."""
    now = total_steps(cfg, sampler, parallel.world)
    if state.schedule_steps is None:
        state.schedule_steps = now
    elif state.schedule_steps != now:
        log(f"optim.schedule={cfg.optim.schedule}: keeps the run's {state.schedule_steps} total updates (the config "
            f"now gives {now}); start a new run for another schedule")
    log(f"optim.schedule={cfg.optim.schedule}: warm-up {cfg.optim.warmup_steps} updates, then decay to 0 at update "
        f"{state.schedule_steps}")
    return state.schedule_steps


def _find_resume(cfg: RunConfig, last: Path, require: bool) -> Path | None:
    """``last`` when the run in it goes on (``runfolder.check_same_run`` then says whether it may), None for a new
    run (``train.resume=false`` moves an old one aside)."""
    exists = last.exists() or any(last.parent.glob(".last.old-*"))  # an interrupted swap leaves an aside copy
    if require and not cfg.train.resume:
        raise ConfigError("train.resume: --resume and train.resume=false contradict each other", key="train.resume")
    if require and not exists:
        raise ConfigError(f"train.out_dir: nothing to resume: no checkpoint at {last}", key="train.out_dir")
    return last if exists and cfg.train.resume else None


@dataclass
class ReadData:
    """The examples of a run as read (``ktransfer.data.formats``), and why that format."""

    format: str
    why: str
    train: formats.Examples
    valid: formats.Examples


def _read_data(cfg: RunConfig) -> ReadData:
    """The training examples (first data.max_train_samples) and validation examples (first data.max_eval_samples),
    in the format data.format names or ``auto`` infers; a single data file gives up a held-out validation share.

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
    valid_split, valid_why = formats.find_split(d.corpus, d.valid, fmt)  # data.valid, else validation/val/dev
    if fmt == "parallel":
        train_pairs = read_split(d.corpus, d.train, d.src_lang, d.tgt_lang)[:d.max_train_samples]
        require_nonempty_pairs(train_pairs, d.corpus, d.train, d.src_lang, d.tgt_lang)  # before any file is written
        valid_pairs = read_split(d.corpus, valid_split or d.valid, d.src_lang, d.tgt_lang)[:d.max_eval_samples]
        return ReadData(fmt, f"{why}; validation: {valid_why}", formats.Examples(fmt, train_pairs),
                        formats.Examples(fmt, valid_pairs))
    train = formats.read_examples(d.corpus, d.train, fmt, keys=keys)
    if valid_split is not None:
        valid = formats.read_examples(d.corpus, valid_split, fmt, keys=keys)
        why += f"; validation: {valid_why}"
    else:
        train, valid = formats.hold_out(train, d.valid_fraction, d.split_seed)
        why += (f"; validation: {len(valid)} examples held out of {train.source} (data.valid_fraction "
                f"{d.valid_fraction}, data.split_seed {d.split_seed})")
    return ReadData(fmt, why, train.head(d.max_train_samples), valid.head(d.max_eval_samples))


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
