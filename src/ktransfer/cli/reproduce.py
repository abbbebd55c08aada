"""``ktransfer reproduce``: the paper's experiment (teacher, learner, fine-tuning with each objective and an nll
control, several seeds, test scores, significance, Sec. 5 analyses, report) as resumable stages in one folder."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  ktransfer reproduce quick --out runs/quick                      # ~25 minutes: teacher, learner, nll vs KD vs KA
  ktransfer reproduce smoke --out runs/smoke                      # a minute: every stage on tiny models
  ktransfer reproduce multi30k-cpu --out runs/m30k                # about 50 minutes on 2 idle cores (see --list)
  ktransfer reproduce multi30k-cpu --out runs/m30k seeds=1 stop_after=learner
  ktransfer reproduce multi30k-cpu --out runs/why seeds=1,2,3,4,5 sweep=none \
      objectives=kd,ka,kd-tail,ka-tail,ka-renorm,smooth     # why does KA help? (docs/results.md)
  ktransfer reproduce paper-then --out runs/then train.device=cuda finetune.objective.top_k=4 sweep=topk
  ktransfer reproduce --list                                      # the presets and what they do

Overrides (later ones win):
  SECTION.KEY=V          every training stage (train.num_threads=1, data.max_train_samples=5000, eval.beam=4)
  STAGE.SECTION.KEY=V    one stage: teacher, learner, finetune (with the nll control) or sweep
                         (teacher.train.epochs=3, finetune.objective.top_k=8)
  OPTION=V               seeds=1,2,3  objectives=kd,ka,half  control=true  sweep=topk|none
                         topk_values=2,4,8,16,V  analysis_sample=2000  table_sentences=3  max_predict_samples=N
                         bootstrap=1000  stop_after=bpe|teacher|learner|analysis0|finetune|sweep|eval|significance
                         prefixes=learner,mixed,teacher (extra rows: those prefix sources; teacher = seq-KD data)
                         prefix_objectives=kd,ka  prefix_seeds=1,2 (default: seeds)

Columns of objectives= (each a fine-tuning per seed):
  kd, ka, half, ...      a divergence from the preset (half = 1/2 KA + 1/2 KD)
  OBJ-tail, OBJ-renorm   OBJ with objective.tail=true (the rest of the vocabulary as one outcome: a proper top-k
                         divergence) or objective.renormalize=true (p and q renormalised on the top-k support)
  smooth                 the smoothing control: nll with label smoothing, no teacher; its strength is chosen on the
                         valid split so that the learner's entropy matches the smoothing_target column's
                         (smoothing_target=ka, smoothing_grid=0.02,0.05,0.1,0.2; rule and value in RUN/smoothing.json)

Run the same command again to continue a run that was stopped or killed: stages marked done in RUN/stages.json are
skipped and the stage in progress resumes from its checkpoints/last. Progress: RUN/reproduce.log (stage banners)
and each stage's train.log. The report is RUN/report.md (rebuild it with `ktransfer report RUN`); at the end the
command prints each model's test BLEU and chrF and, for each objective, the paired-bootstrap BLEU difference over the
nll control and its p-value. A corpus name missing from $KTRANSFER_DATA (default ~/.cache/ktransfer/data) that
`ktransfer data download` knows (multi30k-de-en) is downloaded there first.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("items", nargs="*", metavar="PRESET [KEY=VALUE ...]",
                        help="quick, smoke, multi30k-cpu, wmt-news-cpu, paper-deen or paper-then, then overrides "
                             "(below)")
    parser.add_argument("--out", "-o", default=None, metavar="RUN", help="run folder (default: runs/reproduce-PRESET)")
    parser.add_argument("--list", action="store_true", help="list the presets with their settings and exit")


def run(args: argparse.Namespace) -> int:
    from ktransfer.data.corpora import CorpusError
    from ktransfer.experiments.reproduce import MULTI30K_CPU_ESTIMATE, PRESETS, reproduce
    from ktransfer.models.checkpoint import CheckpointError
    from ktransfer.training.config import ConfigError

    items, out = list(args.items), args.out
    for flag in ("--out", "-o"):  # `--out RUN` after the preset lands among the items (argparse.REMAINDER)
        while flag in items:
            at = items.index(flag)
            out = items[at + 1] if at + 1 < len(items) else out
            del items[at:at + 2]
    args.list = args.list or "--list" in items
    items = [i for i in items if i != "--list"]
    preset = next((i for i in items if "=" not in i), None)
    overrides = [i for i in items if i != preset]
    if args.list or not preset:
        for name, p in PRESETS.items():
            print(f"{name}: {p.doc}")
            for kind in ("base", "teacher", "learner", "finetune", "sweep"):
                if getattr(p, kind):
                    print(f"    {kind}: {' '.join(getattr(p, kind))}")
            if p.options:
                print(f"    options: {p.options}")
            if name == "multi30k-cpu":
                print("    " + MULTI30K_CPU_ESTIMATE.replace("\n", "\n    ").rstrip())
        return 0 if args.list else 2
    out = out or f"runs/reproduce-{preset}"
    try:
        results = reproduce(preset, out, overrides)
    except ConfigError as e:
        print(f"ktransfer reproduce: config error: {e}", file=sys.stderr)
        return 2
    except (CorpusError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"ktransfer reproduce: error: {e}", file=sys.stderr)
        return 2
    from ktransfer.runtime import distributed

    if distributed.launch_rank() != 0:  # torchrun: rank 0 alone prints the summary
        return 0
    if "interrupted" in results:
        print(f"{out}: interrupted ({results['interrupted']}); run the same command again to resume", file=sys.stderr)
        return 130
    if "stopped_after" in results:
        print(f"{out}: stopped after the {results['stopped_after']} stages")
        return 0
    from ktransfer.experiments.summary import summary_table

    print(summary_table(results, out))
    return 0
