"""Step cost of knowledge transfer on Multi30k: how much a ka / kd training step costs over an NLL step plus one
teacher forward pass, for the CPU presets (learner ``cpu-learner``, teacher ``cpu-teacher``).

    OMP_NUM_THREADS=2 .venv/bin/python bench/step_cost.py --markdown           # ~5-10 minutes on 2 idle cores
    .venv/bin/python bench/step_cost.py --steps 2 --warmup 1 --max-tokens 1024   # a quick smoke run

On the same token batches (``TokenBatchSampler``, ``--max-tokens`` per side, epoch 0 of seed 0, as in
``bench/pipeline.py``), in one process, it times for each precision (fp32, bf16 autocast):

* ``nll``: one training step of the learner with objective nll (``ktransfer.training.train.train_step``: forward, loss,
  backward, gradient norm, AdamW update);
* ``teacher fwd``: one forward pass of the frozen teacher (eval mode, ``torch.no_grad``, the same autocast), exactly
  as ``train.compute_loss`` runs it;
* ``kd`` and ``ka``: one training step with objective kd / ka (``train_step``: learner forward, teacher forward,
  ``transfer_loss`` = (1 - lam) NLL + lam D, backward, gradient norm, AdamW update), over the full vocabulary and
  with ``objective.top_k`` = ``--top-k``;
* ``kd tail`` and ``ka tail`` (``--tail``): the same top-k steps with ``objective.tail=true`` (the rest of the
  vocabulary as one more outcome).

Each row is a real run built by ``ktransfer.training.train.setup`` (same seed, so the same initial learner); the
teacher is an
untrained ``cpu-teacher`` (speed does not depend on the weights). The rows are interleaved: batch k goes through
every row (in an order rotated from batch to batch) before batch k + 1 goes through any, so load from other processes
hits them alike. The first ``--warmup`` batches are not timed.

Reading the table
-----------------
* ``ratio`` = t(step) / (t(nll) + t(teacher fwd)), computed per batch (same batch, same precision) and summarised by
  its median over the timed batches, with the interquartile range in brackets. 1.00 means that transfer costs
  nothing beyond running the teacher; the excess is the divergence (forward and backward over [B, T, V] logits) and
  the teacher logits' top-k where used. Issue #5's target is <= 1.10.
* ``extra ms``: the median over batches of t(step) - t(nll) - t(teacher fwd).
* ``target tok/s``: median over batches of the batch's target tokens (the positions the loss averages over) / the
  row's time on it; ``median s``: the median time of the row.

Timings are only meaningful on an otherwise idle machine: the header prints the load average before and after.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import cpu_flags, cpu_model, load_average  # noqa: E402  (bench/pipeline.py)


def _summary(xs: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of xs (all three the value itself for one element)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="multi30k-de-en", help="corpus name or path (default: multi30k-de-en)")
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="$KTRANSFER_DATA when it is not set (default: ../shared/data)")
    parser.add_argument("--learner", default="cpu-learner", help="learner preset (default: cpu-learner)")
    parser.add_argument("--teacher", default="cpu-teacher", help="teacher preset, untrained (default: cpu-teacher)")
    parser.add_argument("--steps", type=int, default=20, help="timed batches per row (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before them (default: 3)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="batch size in tokens per side (default: 4096)")
    parser.add_argument("--vocab-size", type=int, default=10000, help="joint BPE vocabulary (default: 10000)")
    parser.add_argument("--top-k", type=int, default=8, help="objective.top_k of the top-k rows; 0: none (default: 8)")
    parser.add_argument("--lam", type=float, default=0.5,
                        help="objective.divergence_weight of kd / ka (default: 0.5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 rows")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables (default: aligned text)")
    parser.add_argument("--json", metavar="PATH", help="also write the per-batch times to PATH")
    parser.add_argument("--on-policy", action="store_true",
                        help="add the on-policy rows: 'sample' (the learner's samples of a batch alone) and 'kd "
                             "on-policy' (a kd step with objective.prefix=learner); their ratio is to the kd step")
    parser.add_argument("--tail", action="store_true",
                        help="add 'kd tail' and 'ka tail': the top-k steps with objective.tail=true (needs --top-k)")
    parser.add_argument("--sample-length", type=int, default=None,
                        help="objective.sample_max_length of the on-policy rows (default: not set, so the run's "
                             "defaults: eval.max_length, and 2x the reference + 8 tokens per sample)")
    parser.add_argument("--on-policy-only", action="store_true",
                        help="with --on-policy: only nll, teacher fwd, kd (all), sample and kd on-policy")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.tail and not args.top_k:
        parser.error("--tail needs a top-k support: --top-k > 0")
    if args.no_bf16 and args.no_fp32:
        parser.error("--no-bf16 and --no-fp32 leave nothing to measure")

    os.environ.setdefault("KTRANSFER_DATA", args.data)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from ktransfer.data.batching import TokenBatchSampler, collate, encode_pairs
    from ktransfer.data.corpora import read_split
    from ktransfer.models.checkpoint import save_checkpoint
    from ktransfer.models.family import build_model, count_parameters
    from ktransfer.models.tokenizer import train_tokenizer
    from ktransfer.training.config import load_config
    from ktransfer.training.train import setup, train_step

    load_before = load_average()
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    t0 = time.perf_counter()
    train = read_split(args.corpus, "train", "de", "en")
    tokenizer = train_tokenizer([s for pair in train for s in pair], vocab_size=args.vocab_size)
    src_ids, tgt_ids = encode_pairs(train, tokenizer, 128, log=lambda _: None)
    sampler = TokenBatchSampler([len(s) for s in src_ids], [len(t) for t in tgt_ids], args.max_tokens, seed=0)
    batches = [collate([src_ids[i] for i in b], [tgt_ids[i] for i in b], tokenizer.pad_id, tokenizer.pad_id)
               for b in sampler.epoch_batches(0)[:args.warmup + args.steps]]
    if len(batches) < args.warmup + args.steps:
        parser.error(f"only {len(batches)} batches in an epoch, fewer than --warmup + --steps")
    print(f"setup: {len(train)} training pairs, BPE vocabulary {tokenizer.vocab_size}, {len(batches)} batches "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="ktransfer-step-cost-"))  # run folders of the rows
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    tokenizer.save(work / "tokenizer.json")
    torch.manual_seed(0)
    save_checkpoint(work / "teacher", model=build_model(args.teacher, tokenizer), tokenizer=tokenizer, config={})

    def make_run(objective: str, bf16: bool, top_k: int | None, *extra: str, tag: str = ""):
        name = f"{objective}-{'bf16' if bf16 else 'fp32'}-{top_k or 'all'}{tag}"
        overrides = [f"data.corpus={args.corpus}", f"data.tokenizer={work / 'tokenizer.json'}",
                     "data.max_eval_samples=1", f"model.preset={args.learner}", f"objective.kind={objective}",
                     f"objective.divergence_weight={args.lam}",
                     f"train.bf16={bf16}", f"train.out_dir={work / name}", "train.seed=0",
                     f"train.num_threads={args.threads}", "train.device=cpu"]
        if top_k:
            overrides.append(f"objective.top_k={top_k}")
        if objective != "nll":
            overrides.append(f"model.teacher={work / 'teacher'}")
        return setup(load_config(None, [*overrides, *extra]))

    def sample_fn(run):
        from ktransfer.training.prefixes import SampleSettings

        def sample(batch):
            settings = SampleSettings.from_config(run.cfg, seed=0)
            sampled = run.family.on_policy_batch(run.model, run.tokenizer, batch, settings)
            return int((sampled["labels"] != -100).sum())
        return sample

    def step_fn(run):
        def step(batch):
            result = train_step(run, [batch])
            if not result["finite"]:
                raise RuntimeError(f"{run.cfg.train.out_dir}: non-finite step: {result}")
            return result["batch_tokens"]
        return step

    def teacher_fn(run):
        # As train.compute_loss runs the teacher: frozen (eval, no gradients), under the run's autocast.
        def forward(batch):
            inputs, _ = run.family.model_inputs(batch)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.cfg.train.bf16):
                logits = run.teacher(**inputs, use_cache=False).logits  # (B, T, V)
            del logits
            return int((batch["labels"] != -100).sum())
        return forward

    precisions = [bf16 for bf16, skip in ((False, args.no_fp32), (True, args.no_bf16)) if not skip]
    supports = [None] + ([args.top_k] if args.top_k and not args.on_policy_only else [])
    rows, params = [], {}
    for bf16 in precisions:
        nll = make_run("nll", bf16, None)
        nll_row = len(rows)
        rows.append(SimpleNamespace(bf16=bf16, step="nll", top_k=None, fn=step_fn(nll), times=[], tokens=[]))
        params["learner"] = count_parameters(nll.model)
        teacher_run = None
        for objective in ("kd",) if args.on_policy_only else ("kd", "ka"):
            for top_k in supports:
                run = make_run(objective, bf16, top_k)
                teacher_run = run if teacher_run is None else teacher_run
                rows.append(SimpleNamespace(bf16=bf16, step=objective, top_k=top_k, fn=step_fn(run), times=[],
                                            tokens=[]))
        params["teacher"] = count_parameters(teacher_run.teacher, trainable_only=False)
        for objective in ("kd", "ka") if args.tail else ():
            run = make_run(objective, bf16, args.top_k, "objective.tail=true", tag="-tail")
            rows.append(SimpleNamespace(bf16=bf16, step=f"{objective} tail", top_k=args.top_k, fn=step_fn(run),
                                        times=[], tokens=[]))
        if args.on_policy:
            length = [] if args.sample_length is None else [f"objective.sample_max_length={args.sample_length}"]
            on = make_run("kd", bf16, None, "objective.prefix=learner", *length, tag="-onpolicy")
            rows.append(SimpleNamespace(bf16=bf16, step="sample", top_k=None, fn=sample_fn(on), times=[], tokens=[]))
            rows.append(SimpleNamespace(bf16=bf16, step="kd on-policy", top_k=None, fn=step_fn(on), times=[],
                                        tokens=[]))
        rows.insert(nll_row + 1,
                    SimpleNamespace(bf16=bf16, step="teacher fwd", top_k=None, fn=teacher_fn(teacher_run), times=[],
                                    tokens=[]))

    for k, batch in enumerate(batches):
        shift = k % len(rows)
        for r in rows[shift:] + rows[:shift]:  # rotated, so that no row always runs first or last
            t = time.perf_counter()
            tokens = r.fn(batch)
            seconds = time.perf_counter() - t
            if k >= args.warmup:
                r.times.append(seconds)
                r.tokens.append(tokens)
        print(f"batch {k + 1}/{len(batches)} done{' (warm-up)' if k < args.warmup else ''}", file=sys.stderr)
    load_after = load_average()

    # Per-batch ratios against nll + teacher fwd of the same precision.
    def times_of(bf16, step):
        return next(r.times for r in rows if r.bf16 == bf16 and r.step == step)

    base = {bf16: [n + t for n, t in zip(times_of(bf16, "nll"), times_of(bf16, "teacher fwd"), strict=True)]
            for bf16 in precisions}
    table = []
    for r in rows:
        tok_s = _summary([n / t for n, t in zip(r.tokens, r.times, strict=True)])[1]
        entry = dict(precision="bf16 autocast" if r.bf16 else "fp32", step=r.step,
                     top_k="-" if r.step in ("nll", "teacher fwd") else (r.top_k or "all"),
                     median_s=statistics.median(r.times), target_tok_s=tok_s, times=r.times, tokens=r.tokens)
        if r.step in ("kd", "ka", "kd tail", "ka tail"):
            entry["ratio"] = _summary([t / b for t, b in zip(r.times, base[r.bf16], strict=True)])
            entry["extra_ms"] = statistics.median([(t - b) * 1e3 for t, b in zip(r.times, base[r.bf16], strict=True)])
        elif r.step in ("sample", "kd on-policy"):  # against the kd step on the reference prefixes
            kd = next(x.times for x in rows if x.bf16 == r.bf16 and x.step == "kd" and x.top_k is None)
            entry["ratio"] = _summary([t / b for t, b in zip(r.times, kd, strict=True)])
            entry["extra_ms"] = statistics.median([(t - b) * 1e3 for t, b in zip(r.times, kd, strict=True)])
        table.append(entry)

    bf16_hw = "yes" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "no"
    print(f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, native bf16 (avx512_bf16/amx): {bf16_hw}; "
          f"{torch.get_num_threads()} torch threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); "
          f"torch {torch.__version__}, Python {platform.python_version()}; {datetime.date.today().isoformat()}; "
          f"load average (1/5/15 min) {load_before} before, {load_after} after.")
    print(f"Command: `{command}`")
    print(f"Data: {args.corpus} train, BPE {tokenizer.vocab_size}, batches of <= {args.max_tokens} tokens per side, "
          f"{args.steps} timed batches after {args.warmup} warm-up, the same for every row; learner {args.learner} "
          f"({params['learner'] / 1e6:.1f}M), teacher {args.teacher} ({params['teacher'] / 1e6:.1f}M, untrained); "
          f"AdamW; kd = (1 - lam) NLL + lam KL(q || p), ka = (1 - lam) NLL + lam KL(p || q), lam {args.lam}.")
    print("ratio = t(step) / (t(nll) + t(teacher fwd)) per batch, median [interquartile range]; extra ms = median of "
          "t(step) - t(nll) - t(teacher fwd); target tok/s: median over batches.\n")
    header = ["precision", "step", "top_k", "median s", "target tok/s", "ratio", "extra ms"]
    cells = [header]
    for e in table:
        ratio = f"{e['ratio'][1]:.2f} [{e['ratio'][0]:.2f}-{e['ratio'][2]:.2f}]" if "ratio" in e else "-"
        extra = f"{e['extra_ms']:,.0f}" if "extra_ms" in e else "-"
        cells.append([e["precision"], e["step"], str(e["top_k"]), f"{e['median_s']:.3f}",
                      f"{e['target_tok_s']:,.0f}", ratio, extra])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|---|---|---|" + "---:|" * (len(header) - 3))
        for c in cells[1:]:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        for c in cells:
            print("  ".join(x.rjust(w) for x, w in zip(c, widths, strict=True)))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=command, machine=cpu_model(), threads=torch.get_num_threads(),
                           torch=torch.__version__, load_before=load_before, load_after=load_after,
                           max_tokens=args.max_tokens, steps=args.steps, warmup=args.warmup, rows=table), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
