"""The training loop: ``train(cfg)`` runs the epochs of a run that ``ktransfer.training.setup`` built; each epoch
ends with validation (``ktransfer.training.validation``), the ``best`` and ``last`` checkpoints and the
early-stopping check (with ``train.eval_every``: validation, ``best`` and early stopping every N updates instead).

- ``train_step(run, batches)``: one update from one or more (accumulated) batches;
- ``compute_loss(run, batch)``: the objective on one batch, from the source of the teacher's signal that setup chose
  (``run.signals``, ``ktransfer.training.signals``);
- ``save_checkpoint(run, name)``: everything needed to continue exactly;
- SIGINT/SIGTERM stop after the current step with ``last`` saved.

Several processes (``torchrun``, see ``docs/distributed.md``): a global step takes ``optim.accumulate x world_size``
consecutive batches of the epoch, rank r the r-th of each run of ``world_size``; losses divide by the global token
count, so an update equals the single-process update with ``optim.accumulate x world_size``. Rank 0 alone writes the
run folder; checkpoints hold the unwrapped learner and the global batch position, so they resume with any number of
processes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from ktransfer.losses.objectives import TransferLoss
from ktransfer.models import checkpoint as ckpt_lib
from ktransfer.runtime import distributed, runlock
from ktransfer.training.config import RunConfig, config_to_dict
from ktransfer.training.metrics import Throughput
from ktransfer.training.run import NonFiniteLossError, Run, collate_batch
from ktransfer.training.setup import setup
from ktransfer.training.validation import metric_name, teacher_valid, validate


def train(cfg: RunConfig, *, require_resume: bool = False, on_epoch_end=None) -> dict:
    """Train (or distil) as ``cfg`` says; resumes from ``RUN/checkpoints/last`` when it holds this same run and
    ``train.resume`` is true (``ktransfer.training.runfolder``; ``require_resume``: fail when there is nothing to
    resume). ``on_epoch_end(run)``, if
    given, runs after each epoch's validation and before its ``last`` checkpoint (per-epoch analyses); it must not
    draw random numbers (exact resume).

    Returns:
        The final metrics: ``epoch``, ``step``, ``best``, ``best_epoch``, ``best_step``, ``stopped``, ``valid`` (last
        validation), ``out_dir``.

    Raises:
        ConfigError, CorpusError: see ``setup``.
        NonFiniteLossError: ``train.max_nonfinite`` consecutive non-finite steps (``last`` is saved first).
    """
    with distributed.session(cfg.train.device):  # joins torchrun's process group; a no-op for one process
        run = setup(cfg, require_resume=require_resume)
        run.on_epoch_end = on_epoch_end
        try:
            if run.teacher is not None and run.state.step == 0 and run.state.batch == 0:
                teacher_valid(run)
            with _stop_on_signals(run):
                _train_loop(run)
        finally:
            runlock.release(run.out_dir)
            run.metrics.close()
    s = run.state
    return {"epoch": s.epoch, "step": s.step, "tokens": s.tokens, "best": s.best, "best_epoch": s.best_epoch,
            "best_step": s.best_step, "stopped": s.stopped, "valid": run.metrics.last_valid,
            "out_dir": str(run.out_dir)}


def _train_loop(run: Run) -> None:
    cfg, s = run.cfg, run.state
    if _finished(run):
        run.log(f"nothing to do: the run is complete ({s.stopped})")
        return
    save_every = cfg.train.save_every
    # one update takes `per_step` consecutive batches of the epoch, whatever the number of processes holding them
    world = run.parallel.world
    per_step = cfg.optim.accumulate * world
    while not _finished(run):
        batches = run.data.sampler.epoch_batches(s.epoch)
        bar, window = _progress(run, len(batches)), Throughput()
        while s.batch < len(batches) and not stop_requested(run):
            group = batches[s.batch:s.batch + per_step]
            mine, padding = rank_batches(group, distributed.rank(), world)
            result = train_step(run, [training_batch(run, idx) for idx in mine], padding=padding)
            s.batch += len(group)
            bar.update(len(group))
            if not result["finite"]:
                _skip_nonfinite(run, result)
                continue
            s.step, s.tokens, s.nonfinite = s.step + 1, s.tokens + result["batch_tokens"], 0
            window.add(result["batch_tokens"])
            bar.set_postfix(loss=f"{result['loss']:.3f}", lr=f"{result['lr']:.2e}", tok_s=f"{window.rate():.0f}")
            if s.step % cfg.train.log_every == 0:
                run.metrics.write(run.state, {"kind": "train", **result, "tokens_per_s": window.rate()})
                run.log(f"epoch {s.epoch} batch {s.batch}/{len(batches)} step {s.step}: loss {result['loss']:.4f} "
                        f"nll {result['nll']:.4f} div {result['divergence']:.4f} lr {result['lr']:.2e} "
                        f"|g| {result['grad_norm']:.3f} {window.rate():.0f} tok/s")
                window = Throughput()
            if cfg.train.eval_every and s.step % cfg.train.eval_every == 0:
                validate_and_keep(run)
                if _finished(run):  # early stopping
                    break
            if cfg.train.max_steps and s.step >= cfg.train.max_steps:
                break
            if save_every and s.step % save_every == 0 and s.batch < len(batches):
                save_checkpoint(run, "last")
        bar.close()
        if stop_requested(run):
            return _stop_for_signal(run)
        if s.batch >= len(batches):
            s.epoch, s.batch = s.epoch + 1, 0
        _end_of_epoch(run)  # also after max_steps mid-epoch: validate and save before stopping
    run.log(f"done ({s.stopped}): {s.step} steps, {s.tokens:,} target tokens, "
            f"{run.elapsed():.0f}s; best {metric_name(run)} {s.best} after epoch {s.best_epoch} (step {s.best_step})")


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
    model, o, world = run.trained_model(), run.cfg.optim, run.parallel.world
    real = len(batches) - padding
    num_tokens = sum(int((b["labels"] != -100).sum()) for b in batches[:real])
    num_tokens = int(run.parallel.sum([num_tokens])[0])  # global count: the loss denominator
    loss = nll = div = 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with run.parallel.no_sync(last):
            out = run.signals.train.loss(model, batch, num_tokens)
            (out.loss * (world if i < real else 0.0)).backward()  # x world: DDP divides the summed gradients by it
        if i < real:
            loss, nll, div = loss + out.loss.item(), nll + out.nll.item(), div + out.divergence.item()
    loss, nll, div = run.parallel.sum([loss, nll, div])  # every rank agrees on skipping a step
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

    A training batch (learner in train mode, gradients on) goes to ``run.signals.train``, anything else to
    ``run.signals.valid`` (reference prefixes, the live teacher). ``num_tokens`` replaces the batch's own token
    count as the denominator (gradient accumulation, several processes); ``model``: the learner to run (default
    ``run.model``; ``train_step`` passes the DDP wrapper).
    """
    training = run.model.training and torch.is_grad_enabled()
    source = run.signals.train if training else run.signals.valid
    return source.loss(run.model if model is None else model, batch, num_tokens)


def training_batch(run: Run, idx: list[int]) -> dict:
    """``collate_batch`` of training examples ``idx``, with ``example_index`` [B] (CPU): the keys of the cached
    teacher rows when the run reads a teacher cache (``ktransfer.training.signals.CachedTeacher``)."""
    batch = collate_batch(run, run.data.train_ids, idx)
    if run.cfg.train.teacher_cache:
        batch["example_index"] = torch.as_tensor(idx, dtype=torch.long)
    return batch


def _skip_nonfinite(run: Run, result: dict) -> None:
    s, limit = run.state, run.cfg.train.max_nonfinite
    s.nonfinite += 1
    run.log(f"warning: non-finite loss {result['loss']} / gradient norm {result['grad_norm']} at epoch {s.epoch} "
            f"batch {s.batch}: update skipped ({s.nonfinite} in a row, stop at {limit})")
    run.metrics.write(run.state, {"kind": "nonfinite", **result})
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


def _end_of_epoch(run: Run) -> None:
    """Validate (after each epoch; with ``train.eval_every`` only at the end of training, when the last update was
    not validated yet), run the epoch hook, save ``last``."""
    s = run.state
    if run.cfg.train.eval_every is None or (_finished(run) and s.valid_step != s.step):
        validate_and_keep(run)
    if run.on_epoch_end is not None:  # before `last`: a kill in the hook redoes the epoch, and the hook, on resume
        run.on_epoch_end(run)
    save_checkpoint(run, "last")


def validate_and_keep(run: Run) -> dict:
    """Validate, keep the best checkpoint, count validations without improvement (early stopping); returns the
    validation metrics."""
    s = run.state
    valid = validate(run)
    value = valid["bleu"] if run.cfg.train.valid_bleu else valid["loss"]
    improved = s.best is None or (value > s.best if run.cfg.train.valid_bleu else value < s.best)
    if improved:
        s.best, s.best_epoch, s.best_step, s.bad_validations = value, s.epoch, s.step, 0
    else:
        s.bad_validations += 1
    s.valid_step = s.step
    run.metrics.write(run.state, {"kind": "valid", **valid, "best": s.best, "improved": improved,
                            "elapsed": run.elapsed()})
    bleu = f" BLEU {valid['bleu']:.2f} (beam {valid['beam']})" if valid["bleu"] is not None else ""
    run.log(f"epoch {s.epoch}/{run.cfg.train.epochs} (step {s.step}): valid loss {valid['loss']:.4f} "
            f"nll {valid['nll']:.4f} ppl {valid['ppl']:.2f}{bleu}"
            + (" (best)" if improved else f" (best {metric_name(run)} {s.best:.4f} at step {s.best_step})"))
    if improved:
        save_checkpoint(run, "best")
    return valid


def save_checkpoint(run: Run, name: str) -> Path:
    """Save ``RUN/checkpoints/NAME``: weights, optimiser, schedule, train state and RNG states (atomically).

    Several processes: rank 0 writes (the unwrapped learner and its own RNG states) while the others wait at a
    barrier, so none goes on before the checkpoint is whole; the weights and optimiser are the same on every rank.
    """
    run.elapsed()
    path = run.out_dir / "checkpoints" / name
    gathered = run.parallel.full_state(run.model, run.optimizer)  # FSDP: every rank gathers, rank 0 writes
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


def stop_requested(run: Run) -> bool:
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


def _progress(run: Run, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=run.state.batch, desc=f"epoch {run.state.epoch}", unit="batch",
                file=sys.stderr, dynamic_ncols=True, disable=None if distributed.is_main() else True, leave=False)
