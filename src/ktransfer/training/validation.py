"""Validation of a run: the loss (the training objective, with reference prefixes), NLL and perplexity; BLEU and
chrF of the translations of translation pairs, or a few generations written to ``train.log`` for other data; and
once at the start of a distillation, the teacher's own validation NLL.

Several processes: under DDP each rank computes a share and the sums go over the processes; under FSDP every rank
runs everything (``ktransfer.training.parallel.Parallel.valid_*``).
"""

from __future__ import annotations

import math
import time

import torch

from ktransfer.data.batching import TokenBatchSampler
from ktransfer.runtime import distributed
from ktransfer.training.run import Run, collate_batch


@torch.no_grad()
def validate(run: Run) -> dict:
    """Validation loss (the training objective, NLL and divergence; token means) and perplexity; for translation
    pairs also BLEU/chrF of the translations of the validation sources (beam ``eval.valid_beam``; other ``eval.*``
    settings); for other data the generations of the first ``eval.valid_examples`` prompts, in ``train.log``."""
    model, cfg = run.model, run.cfg
    model.eval()
    valid = valid_loss(run)
    if run.data.format == "parallel":
        valid.update(_valid_bleu(run))
    else:
        valid.update(bleu=None, chrf=None, beam=None, sentences=len(run.data.valid_ids[0]))
        _log_examples(run, cfg.eval.valid_examples)
    model.train()
    return valid


def valid_batches(run: Run) -> list[list[int]]:
    """This rank's validation batches (indices into ``run.data.valid_ids``, token-batched): a share of them with
    several processes; all of them on every rank under FSDP, where each forward is a collective."""
    sampler = TokenBatchSampler(*run.family.lengths(run.data.valid_ids), run.cfg.data.max_tokens, shuffle=False)
    return run.parallel.valid_share(sampler.epoch_batches(0))


def valid_loss(run: Run) -> dict:
    """Token means of the objective, its NLL and divergence, and the perplexity ``exp(nll)``, of the learner on the
    validation examples, with reference prefixes (``run.signals.valid``)."""
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, nll, divergence (token sums), tokens
    for idx in valid_batches(run):
        batch = collate_batch(run, run.data.valid_ids, idx)
        n = int((batch["labels"] != -100).sum())
        out = run.signals.valid.loss(run.model, batch)
        for i, value in enumerate((out.loss, out.nll, out.divergence)):
            sums[i] += float(value) * n
        sums[3] += n
    *sums, total = run.parallel.valid_sum(sums)
    valid = {k: v / max(total, 1) for k, v in zip(("loss", "nll", "divergence"), sums, strict=True)}
    valid["ppl"] = math.exp(min(valid["nll"], 50.0))
    return valid


def _valid_bleu(run: Run) -> dict:
    """BLEU and chrF of the learner's translations of the validation sources."""
    from ktransfer.evaluation.evaluate import score, translate

    cfg = run.cfg
    beam = cfg.eval.valid_beam or (cfg.eval.beam if cfg.train.valid_bleu else 1)
    sources, references = [p[0] for p in run.data.valid_pairs], [p[1] for p in run.data.valid_pairs]
    t0 = time.time()

    def translate_part(part):
        return translate(run.model, run.tokenizer, part, beam=beam, length_penalty=cfg.eval.length_penalty,
                         max_length=cfg.eval.max_length, batch_size=cfg.eval.batch_size)

    hyps = run.parallel.valid_map(translate_part, sources)  # hypotheses in source order on every rank
    scores = distributed.broadcast(score(hyps, references) if distributed.is_main() else None)  # rank 0 scores
    return {"bleu": scores["bleu"], "chrf": scores["chrf"], "beam": beam, "sentences": len(sources),
            "translate_s": time.time() - t0, "bleu_signature": scores["bleu_signature"]}


def _log_examples(run: Run, n: int) -> None:
    """Greedy generations of the learner for the first ``n`` validation prompts, beside their references."""
    if n <= 0 or not run.parallel.runs_examples():  # FSDP: every rank generates (collectives), 0 logs
        return
    from ktransfer.models.generation import DecodeSettings

    prompts, references = run.data.valid_ids[0][:n], run.data.valid_ids[1]
    settings = DecodeSettings(beam=1, length_penalty=1.0, max_length=run.cfg.eval.max_length)
    outputs = run.family.complete(run.model, run.tokenizer, prompts, settings, batch_size=n)
    for i, out in enumerate(outputs):
        run.log(f"  example {i + 1}: prompt {run.tokenizer.decode(prompts[i])!r}\n    learner   {out!r}\n"
                f"    reference {run.tokenizer.decode(references[i])!r}")


@torch.no_grad()
def teacher_valid(run: Run) -> None:
    """The teacher's validation NLL and perplexity, once at the start of a run (the learner's target to approach):
    one teacher forward per validation batch, the batches of ``valid_loss``."""
    from ktransfer.evaluation.evaluate import completion_nll

    total, tokens = completion_nll(run.teacher, run.tokenizer, *run.data.valid_ids, batches=valid_batches(run))
    total, tokens = run.parallel.valid_sum([total, tokens])
    nll = total / max(tokens, 1)
    # "valid_tokens", not "tokens": every metrics row's "tokens" is the training tokens so far
    valid = {"nll": nll, "ppl": math.exp(min(nll, 50.0)), "valid_tokens": int(tokens)}
    run.metrics.write(run.state, {"kind": "teacher_valid", **valid})
    run.log(f"teacher on the validation examples: nll {valid['nll']:.4f} ppl {valid['ppl']:.2f} "
            f"({valid['valid_tokens']} tokens)")


def metric_name(run: Run) -> str:
    return "BLEU" if run.cfg.train.valid_bleu else "valid loss"
