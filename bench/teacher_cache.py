"""Teacher cache (``train.teacher_cache``): one training epoch with and without it, the build time and the disk size.

A random (untrained: the cost does not depend on the weights) ``--teacher`` and a random ``--learner`` on the first
``--pairs`` Multi30k training pairs with a joint BPE of ``--vocab-size``; objective kd on the teacher's top-``--top-k``.
Each variant runs ``ktransfer.training.train.setup`` in a fresh run folder and then the training steps of epoch 0
(``train_step``, no validation), timed with ``perf_counter``; ``--repeats`` alternates the variants. The cache is built
once (timed) before the first cached epoch and reused after.

    python bench/teacher_cache.py                                  # 2000 pairs, cpu-learner / cpu-teacher, 1 thread
    python bench/teacher_cache.py --pairs 100 --learner tiny --teacher tiny --vocab-size 500   # a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def _epoch(cfg) -> tuple[float, int, float, float]:
    """Seconds of the training steps of epoch 0, batches, mean loss and divergence; setup is not timed."""
    from ktransfer.training.train import setup, train_step, training_batch

    run = setup(cfg)
    batches = run.data.sampler.epoch_batches(0)
    loss = div = 0.0
    t0 = time.perf_counter()
    for idx in batches:
        r = train_step(run, [training_batch(run, idx)])
        loss, div = loss + r["loss"], div + r["divergence"]
    return time.perf_counter() - t0, len(batches), loss / len(batches), div / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000, help="training pairs (the first N of multi30k-de-en train)")
    ap.add_argument("--learner", default="cpu-learner", help="learner preset")
    ap.add_argument("--teacher", default="cpu-teacher", help="teacher preset (random weights)")
    ap.add_argument("--vocab-size", type=int, default=8000, help="joint BPE size trained on the pairs")
    ap.add_argument("--top-k", type=int, default=8, help="objective.top_k and the cache's K")
    ap.add_argument("--max-tokens", type=int, default=4096, help="data.max_tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--repeats", type=int, default=1, help="epochs per variant (alternating)")
    ap.add_argument("--corpus", default=None, help="corpus folder (default $KTRANSFER_DATA/multi30k-de-en)")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    args = ap.parse_args()

    import torch

    from ktransfer.data.corpora import read_split, resolve_corpus
    from ktransfer.models.checkpoint import save_checkpoint
    from ktransfer.models.family import build_model
    from ktransfer.models.tokenizer import train_tokenizer
    from ktransfer.training.config import load_config
    from ktransfer.training.teacher_cache import disk_bytes

    torch.set_num_threads(args.threads)
    corpus = Path(args.corpus) if args.corpus else resolve_corpus("multi30k-de-en")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ktransfer-bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        pairs = read_split(corpus, "train", "de", "en")[:args.pairs]
        tok = train_tokenizer([x for p in pairs for x in p], vocab_size=args.vocab_size)
        torch.manual_seed(0)
        teacher_dir = work / "teacher"
        if not teacher_dir.exists():
            save_checkpoint(teacher_dir, model=build_model(args.teacher, tok).eval(), tokenizer=tok, config=None)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)

        def cfg(name: str, cached: bool):
            shutil.rmtree(work / name, ignore_errors=True)
            return load_config(None, [
                f"data.corpus={corpus}", f"data.max_train_samples={args.pairs}", "data.max_eval_samples=1",
                f"data.max_tokens={args.max_tokens}", f"model.preset={args.learner}", f"model.teacher={teacher_dir}",
                "objective.kind=kd", "objective.divergence_weight=0.5", f"objective.top_k={args.top_k}",
                f"train.num_threads={args.threads}", f"train.out_dir={work / name}", "train.device=cpu",
                *([f"train.teacher_cache={cache}"] if cached else [])])

        rows = {"live teacher": [], "teacher cache": []}
        for r in range(args.repeats):
            for name, cached in (("live teacher", False), ("teacher cache", True)):
                rows[name].append(_epoch(cfg(f"run-{int(cached)}-{r}", cached)))
        import json

        manifest = json.loads((cache / "manifest.json").read_text())
        size = disk_bytes(cache)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s); load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"data: {args.pairs} pairs, BPE {tok.vocab_size}, {manifest['positions']:,} target positions; learner "
          f"{args.learner}, teacher {args.teacher} (random); kd top-{args.top_k}, max_tokens {args.max_tokens}")
    print(f"cache: built in {manifest['build_seconds']:.2f} s (one teacher pass), {size / 2**20:.2f} MiB on disk "
          f"({size / manifest['positions']:.0f} bytes per position, {manifest['dtype']})")
    print()
    print("| variant | epoch s (each repeat) | batches | mean loss | mean KD |")
    print("|---|---|---:|---:|---:|")
    for name, results in rows.items():
        times = ", ".join(f"{t:.2f}" for t, *_ in results)
        _, n, loss, div = results[-1]
        print(f"| {name} | {times} | {n} | {loss:.4f} | {div:.4f} |")
    live = min(t for t, *_ in rows["live teacher"])
    cached = min(t for t, *_ in rows["teacher cache"])
    print(f"\nspeed-up of the epoch (best of each): {live / cached:.2f}x; the build pays for itself after "
          f"{manifest['build_seconds'] / max(live - cached, 1e-9):.1f} epochs")


if __name__ == "__main__":
    main()
