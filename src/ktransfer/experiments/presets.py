"""The presets of ``ktransfer reproduce``: corpus, model sizes, schedules and experiment options per stage kind.

A preset's settings are ``key=value`` overrides: ``base`` for every training stage, then one tuple per stage kind
(teacher, learner, finetune, sweep); ``options`` are the experiment's (``ktransfer.experiments.experiment.Options``).
``ktransfer reproduce --list`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    doc: str
    base: tuple[str, ...]  # every training stage
    teacher: tuple[str, ...] = ()
    learner: tuple[str, ...] = ()
    finetune: tuple[str, ...] = ()
    sweep: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


# data.max_length=128: every preset keeps the limit its runs were measured with (the default before it became what
# the model reads, issue 26), so a reproduce folder of the last release resumes as the same run
_KEEP = ("data.max_length=128",)
_PAPER = (*_KEEP, "objective.divergence_weight=0.5", "eval.beam=6", "eval.length_penalty=1.0", "train.valid_bleu=true")


# The CPU presets share models, schedule and stages; only the corpus and decoding lengths differ.
_CPU_BASE = (*_KEEP, "data.vocab_size=8000", "data.max_tokens=1200", "optim.lr=1e-3", "optim.warmup_steps=400",
             "optim.schedule=inverse_sqrt", "optim.clip_norm=1.0", "train.num_threads=2", "train.save_every=50",
             "train.log_every=20", "train.patience=0", "data.max_eval_samples=500", "eval.valid_beam=1", "eval.beam=5",
             "objective.divergence_weight=0.5", "objective.top_k=8", "model.dropout=0.1")
_CPU_FINETUNE = ("model.preset=cpu-learner", "data.max_train_samples=6000", "optim.warmup_steps=0",
                 "optim.schedule=constant", "optim.lr=2e-4")


def _cpu_preset(doc: str, data: tuple[str, ...]) -> Preset:
    return Preset(
        doc=doc,
        base=(*data, *_CPU_BASE),
        teacher=("model.preset=cpu-teacher", "train.epochs=5"),
        learner=("model.preset=cpu-learner", "train.epochs=6"),
        finetune=(*_CPU_FINETUNE, "train.epochs=3", "train.valid_bleu=true"),
        sweep=(*_CPU_FINETUNE, "train.epochs=1"),
        options={"seeds": [1, 2, 3], "sweep": "topk", "topk_values": [2, 8, None], "analysis_sample": 1000},
    )

# The first command (README): teacher, learner, nll / KD / KA fine-tuning, one seed, 24 minutes on 2 idle cores.
_QUICK_BASE = (*_KEEP, "data.corpus=multi30k-de-en", "data.test=test2016", "eval.length_penalty=1.0",
               "eval.max_length=80",
               "data.vocab_size=6000", "data.max_tokens=1200", "optim.lr=1e-3", "optim.warmup_steps=400",
               "optim.schedule=inverse_sqrt", "optim.clip_norm=1.0", "train.num_threads=2", "train.save_every=200",
               "train.log_every=50", "train.patience=0", "data.max_eval_samples=500", "eval.valid_beam=1",
               "eval.beam=5", "objective.divergence_weight=0.5", "objective.top_k=8", "model.dropout=0.1")

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        doc="The README's first command: distillation in 24 minutes on 2 idle cores (measured 2026-12-07; the "
            "smallest budget that showed a significant gain, docs/results.md). Multi30k de-en, one 6K joint BPE, "
            "cpu-teacher (7.2M) and cpu-learner (1.5M) 2 epochs each, then 2 epochs on the first 6,000 pairs with nll "
            "(the control), KD and KA (weight 0.5, top-k 8, seed 1), beam 5 on test2016 and a paired bootstrap of KD "
            "and KA against the control. Measured: teacher 29.20, learner 14.92, nll 16.40, KD 17.87 (p 0.001), KA "
            "17.61 (p 0.001) BLEU.",
        base=_QUICK_BASE,
        teacher=("model.preset=cpu-teacher", "train.epochs=2"),
        learner=("model.preset=cpu-learner", "train.epochs=2"),
        finetune=("model.preset=cpu-learner", "data.max_train_samples=6000", "optim.warmup_steps=0",
                  "optim.schedule=constant", "optim.lr=5e-4", "train.epochs=2", "train.valid_bleu=true"),
        options={"seeds": [1], "objectives": ["kd", "ka"], "sweep": "none", "analysis_sample": 200,
                 "table_sentences": 2},
    ),
    "smoke": Preset(
        doc="Seconds to a minute on 2 cores (the tests run it): tiny models, 300 Multi30k pairs, 1-2 epochs, "
            "2 seeds, greedy decoding of 30 test sentences.",
        base=(*_KEEP, "data.corpus=multi30k-de-en", "data.max_train_samples=300", "data.max_eval_samples=30",
              "data.vocab_size=400",
              "data.max_tokens=400", "model.preset=tiny", "optim.lr=1e-3", "train.epochs=1", "train.num_threads=1",
              "train.log_every=20", "train.save_every=0", "eval.beam=1", "eval.max_length=24",
              "objective.divergence_weight=0.5",
              "train.patience=0"),
        teacher=("train.epochs=2", "model.dropout=0.1"),
        finetune=("train.epochs=2", "objective.top_k=8"),
        sweep=("train.epochs=1",),
        options={"seeds": [1, 2], "topk_values": [2, None], "analysis_sample": 40, "table_sentences": 2,
                 "max_predict_samples": 30, "bootstrap": 100},
    ),
    "multi30k-cpu": _cpu_preset(
        doc="The whole Multi30k de-en (29k pairs; valid; test2016 as test), cpu-teacher (7.7M) / cpu-learner (1.75M), "
            "one 8K joint BPE, batches of 1,200 tokens, lam 0.5, top-k 8, 3 seeds, beam 5 on the test set. Teacher 5 "
            "epochs, learner 6, then fine-tuning 3 epochs on the first 6,000 training pairs (kd, ka, half and the "
            "nll control), and the top-k sweep (2, 8, |V|). About 50 minutes on 2 idle cores; see "
            "MULTI30K_CPU_ESTIMATE and docs/results.md.",
        data=("data.corpus=multi30k-de-en", "data.test=test2016", "eval.length_penalty=1.0", "eval.max_length=80"),
    ),
    "wmt-news-cpu": _cpu_preset(
        doc="wmt-news-de-en (27.5k news pairs) with newstest2016 as the valid split; the corpus has no test split, "
            "so data.test is valid too until you name another (data.test=SPLIT). multi30k-cpu's models and "
            "settings; news sentences are about twice as long, so expect about twice its time (not measured).",
        data=("data.corpus=wmt-news-de-en", "data.valid=valid", "data.test=valid", "eval.max_length=128"),
    ),
    "paper-deen": Preset(
        doc="The paper's De-En sizes (Table 1: 6/6x1024 teacher, 6/1x512 learner), lam 0.5, beam 6, length penalty "
            "1.0, top-k tuned on valid with sweep=topk over {2,4,8,16,|V|}. Needs WMT'17 De-En (4M pairs, not "
            "shipped: point data.corpus at it) and a GPU; the epochs here are placeholders to set for that data.",
        base=("data.corpus=wmt-news-de-en", "data.valid=valid", "data.test=valid", "data.vocab_size=32000",
              "data.max_tokens=8192", "optim.lr=5e-4", "optim.warmup_steps=4000", "optim.schedule=inverse_sqrt",
              "optim.clip_norm=1.0", "train.bf16=true", "train.patience=5", *_PAPER, "objective.top_k=8"),
        teacher=("model.preset=paper-deen-teacher", "train.epochs=30"),
        learner=("model.preset=paper-deen-learner", "train.epochs=30"),
        finetune=("model.preset=paper-deen-learner", "train.epochs=10", "optim.warmup_steps=0"),
        sweep=("model.preset=paper-deen-learner", "train.epochs=5", "optim.warmup_steps=0"),
        options={"seeds": [1, 2, 3], "sweep": "topk"},
    ),
    "paper-then": Preset(
        doc="The paper's Th-En sizes (Table 1: 3/1x256 teacher, 1/1x128 learner), lam 0.5, beam 6, length penalty "
            "1.0, top-k tuned on valid with sweep=topk over {2,4,8,16,|V|}, on th-en-lowres (4k training pairs; "
            "the paper's IWSLT'15 dev and test sets). A GPU makes it quick; 2 CPU cores take a few hours.",
        base=("data.corpus=th-en-lowres", "data.src_lang=th", "data.tgt_lang=en", "data.test=test",
              "data.vocab_size=8000", "data.max_tokens=4096", "optim.lr=5e-4", "optim.warmup_steps=500",
              "optim.schedule=inverse_sqrt", "optim.clip_norm=1.0", "train.patience=10", *_PAPER,
              "objective.top_k=8"),
        teacher=("model.preset=paper-then-teacher", "train.epochs=60"),
        learner=("model.preset=paper-then-learner", "train.epochs=60"),
        finetune=("model.preset=paper-then-learner", "train.epochs=20", "optim.warmup_steps=0"),
        sweep=("model.preset=paper-then-learner", "train.epochs=10", "optim.warmup_steps=0"),
        options={"seeds": [1, 2, 3], "sweep": "topk"},
    ),
}

MULTI30K_CPU_ESTIMATE = """\
Measured on 2026-11-28 (2-core AMD EPYC, float32, 2 threads unless said; docs/results.md): batches of 1,200 tokens
per side give 391 batches per epoch of the whole corpus and 80 for the 6,000-pair fine-tuning subset.

    teacher   5 epochs, ~2,500 target tok/s idle (1,400 at 1 thread)   ~14 min idle (33.6 min in the real run, shared)
    learner   6 epochs, ~7,000 target tok/s                          6.1 min
    finetune  3 seeds x 3 epochs: kd, ka, half ~2 min each,
              the nll control ~1 min each                            ~21 min
    sweep     (kd, ka) x top-k (2, 8, |V|), 1 epoch each             ~4.5 min
    test      14 models x 1,000 sentences, beam 5, ~10 s each        ~2.5 min
    analyses, bootstrap, report                                      <1 min
    total                                                            ~50 min idle (67.5 min in the real run)

Prefix sources (prefixes=learner,teacher prefix_seeds=1,2) add a seq-KD stage (the teacher translates the 6,000
fine-tuning sources with beam 5: ~2.5 min) and 8 fine-tunings (see docs/results.md for their times).

The "why does KA help?" run (seeds=1,2,3,4,5 sweep=none objectives=kd,ka,kd-tail,ka-tail,ka-renorm,smooth),
measured on 2026-12-03 (2-core Intel Xeon, a fresh folder): 79 min from start to report. Teacher 17.7 min, learner
5.3 min, 35 fine-tunings (kd, ka, ka-renorm ~83 s each; kd-tail, ka-tail ~100 s, on the Python path then: the C++
kernel now has the tail, whose step costs about a top-k step; nll and smooth ~41 s), the smoothing calibration (5
one-seed nll trainings, 3.1 min), 37 test decodings (11 s each).
"""
