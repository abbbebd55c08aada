"""Pipeline benchmark on Multi30k: training tokens/s of the CPU presets (nll, and ka with its teacher forward; fp32 and
bf16 autocast) and decoding sentences/s (beam 6 and greedy) of untrained models.

    OMP_NUM_THREADS=2 .venv/bin/python bench/pipeline.py                 # ~3-4 minutes on 2 idle cores
    .venv/bin/python bench/pipeline.py --steps 3 --warmup 1 --sentences 20   # a quick smoke run

Training: the same token batches (``TokenBatchSampler``, ``max_tokens`` per side, epoch 0 of seed 0) for every row;
one step is the training loop's ``train_step``: forward (+ the frozen teacher's forward for ka), ``transfer_loss``,
backward, gradient norm and an AdamW update. Tokens/s
counts target tokens (the positions the loss averages over); source tokens/s is shown beside it. The teacher of the ka
rows is an untrained ``cpu-teacher`` (speed does not depend on the weights).

Decoding: ``ktransfer.evaluation.evaluate.translate`` on the first ``--sentences`` test2016 sources. An untrained model
rarely emits ``</s>``, so every hypothesis runs to ``--max-length`` tokens: the figures are a lower bound for trained
models, whose outputs on Multi30k are ~15 tokens.

Prints a markdown table with the machine (CPU model, threads, torch version).
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="multi30k-de-en", help="corpus name or path (default: multi30k-de-en)")
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="$KTRANSFER_DATA when it is not set (default: ../shared/data)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per row (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default: 3)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="batch size in tokens per side (default: 4096)")
    parser.add_argument("--vocab-size", type=int, default=10000, help="joint BPE vocabulary (default: 10000)")
    parser.add_argument("--sentences", type=int, default=200, help="test2016 sentences decoded (default: 200)")
    parser.add_argument("--max-length", type=int, default=64, help="decoding length cap in tokens (default: 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="decoding batch in sentences (default: 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    args = parser.parse_args(argv)

    os.environ.setdefault("KTRANSFER_DATA", args.data)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from ktransfer.data.batching import TokenBatchSampler, collate, encode_pairs
    from ktransfer.data.corpora import read_split
    from ktransfer.evaluation.evaluate import translate
    from ktransfer.models.checkpoint import save_checkpoint
    from ktransfer.models.family import build_model, count_parameters
    from ktransfer.models.tokenizer import train_tokenizer
    from ktransfer.training.config import load_config
    from ktransfer.training.train import setup, train_step

    load_before = load_average()
    t0 = time.perf_counter()
    train = read_split(args.corpus, "train", "de", "en")
    test = read_split(args.corpus, "test2016", "de", "en")[:args.sentences]
    tokenizer = train_tokenizer([s for pair in train for s in pair], vocab_size=args.vocab_size)
    src_ids, tgt_ids = encode_pairs(train, tokenizer, 128, log=lambda _: None)
    sampler = TokenBatchSampler([len(s) for s in src_ids], [len(t) for t in tgt_ids], args.max_tokens, seed=0)
    batches = [collate([src_ids[i] for i in b], [tgt_ids[i] for i in b], tokenizer.pad_id, tokenizer.pad_id)
               for b in sampler.epoch_batches(0)[:args.warmup + args.steps]]
    setup_s = time.perf_counter() - t0
    print(f"setup: {len(train)} training pairs, BPE vocabulary {tokenizer.vocab_size}, {len(batches)} batches "
          f"({setup_s:.1f} s)", file=sys.stderr)

    def fresh(preset: str):
        torch.manual_seed(0)
        return build_model(preset, tokenizer)

    work = Path(tempfile.mkdtemp(prefix="ktransfer-bench-"))  # run folders of the training rows
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    tokenizer.save(work / "tokenizer.json")
    save_checkpoint(work / "teacher", model=fresh("cpu-teacher"), tokenizer=tokenizer, config={})

    def make_row(preset: str, objective: str, bf16: bool) -> SimpleNamespace:
        # A real training run (ktransfer.training.train.setup) whose steps are ktransfer.training.train.train_step:
        # forward, teacher forward, transfer_loss, backward, gradient norm, AdamW update. Only the batches are ours (the
        # same for all).
        name = f"{preset}-{objective}-{'bf16' if bf16 else 'fp32'}"
        overrides = [f"data.corpus={args.corpus}", f"data.tokenizer={work / 'tokenizer.json'}",
                     "data.max_eval_samples=1",
                     f"model.preset={preset}", f"objective.kind={objective}", f"train.bf16={bf16}",
                     f"train.out_dir={work / name}", "train.seed=0", f"train.num_threads={args.threads}",
                     "train.device=cpu"]
        if objective != "nll":
            overrides.append(f"model.teacher={work / 'teacher'}")  # an untrained cpu-teacher
        run = setup(load_config(None, overrides))
        return SimpleNamespace(preset=preset, objective=objective, bf16=bf16, run=run, times=[], tgt=[], src=[])

    precisions = [False] if args.no_bf16 else [False, True]
    rows = [make_row(preset, objective, bf16)
            for preset, objective in (("cpu-teacher", "nll"), ("cpu-learner", "nll"), ("cpu-learner", "ka"))
            for bf16 in precisions]
    # Interleaved: step k of every row before step k + 1 of any, so that a burst of load from other processes
    # slows every row alike instead of one row entirely.
    for step, batch in enumerate(batches):
        for r in rows:
            t = time.perf_counter()
            result = train_step(r.run, [batch])
            seconds = time.perf_counter() - t
            if not result["finite"]:
                raise RuntimeError(f"{r.preset} {r.objective}: non-finite step {step}: {result}")
            if step >= args.warmup:
                r.times.append(seconds)
                r.tgt.append(result["batch_tokens"])
                r.src.append(int(batch["attention_mask"].sum()))
        print(f"train step {step + 1}/{len(batches)} done", file=sys.stderr)

    sources = [s for s, _ in test]
    chunks = [sources[i:i + args.batch_size] for i in range(0, len(sources), args.batch_size)]
    decoders = [SimpleNamespace(preset=preset, beam=beam, model=fresh(preset), times=[], hyps=[])
                for preset in ("cpu-teacher", "cpu-learner") for beam in (6, 1)]
    for chunk in chunks:  # interleaved too: batch k of every decoder before batch k + 1
        for d in decoders:
            t = time.perf_counter()
            d.hyps += translate(d.model, tokenizer, chunk, beam=d.beam, max_length=args.max_length,
                                batch_size=args.batch_size)
            d.times.append(time.perf_counter() - t)
        print(f"decode batch {len(decoders[0].times)}/{len(chunks)} done", file=sys.stderr)

    bf16_hw = "yes" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "no"
    print(f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}), {os.cpu_count()} logical CPUs, native bf16 (avx512_bf16/amx): "
          f"{bf16_hw}; torch {torch.__version__}, Python {platform.python_version()}; load average (1/5/15 min) "
          f"{load_before} before, {load_average()} after.")
    print(f"Data: {args.corpus} train, BPE {tokenizer.vocab_size}, batches of <= {args.max_tokens} tokens per side, "
          f"{args.steps} timed steps after {args.warmup} warm-up; AdamW; ka = 0.5 NLL + 0.5 KL(p || q).\n")
    print("Training tokens/s: total over the timed steps / their time, and the fastest single step (closest to an "
          "idle machine when other processes share the cores).\n")
    print("| preset | params | objective | precision | target tok/s | best step tok/s | source tok/s | s/step |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        obj = r.objective + (" (+ cpu-teacher fwd)" if r.objective != "nll" else "")
        total = sum(r.times)
        best = max(n / t for n, t in zip(r.tgt, r.times, strict=True))
        print(f"| {r.preset} | {count_parameters(r.run.model) / 1e6:.1f}M | {obj} | "
              f"{'bf16 autocast' if r.bf16 else 'fp32'} | {sum(r.tgt) / total:,.0f} | {best:,.0f} | "
              f"{sum(r.src) / total:,.0f} | {total / len(r.times):.2f} |")
    print(f"\nDecoding {len(sources)} test2016 sentences with ktransfer.evaluation.evaluate.translate, "
          f"untrained models (every "
          f"hypothesis runs to the cap), max length {args.max_length} tokens, batches of {args.batch_size} sentences, "
          "fp32:\n")
    print("| preset | search | sentences/s | best batch sentences/s | mean hypothesis length (sub-words) |")
    print("|---|---|---:|---:|---:|")
    for d in decoders:
        search = f"beam {d.beam}" if d.beam > 1 else "greedy"
        best = max(len(c) / t for c, t in zip(chunks, d.times, strict=True))
        mean_len = sum(len(tokenizer.encode(h)) for h in d.hyps) / len(d.hyps)
        print(f"| {d.preset} | {search} | {len(sources) / sum(d.times):.1f} | {best:.1f} | {mean_len:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
