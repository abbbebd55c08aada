"""``reproduce``: the paper's experiment as resumable stages in one run folder.

Stages, in order (each is skipped when ``RUN/stages.json`` marks it done; a stage cut short resumes through
``train``'s own resume from its ``checkpoints/last``)::

    bpe                      RUN/tokenizer.json: one joint BPE, shared by every model
    teacher                  RUN/teacher/            the teacher q, NLL
    learner                  RUN/learner/            the learner p pre-trained with NLL
    analysis0                RUN/analysis/           entropy / top-16 of the pre-trained learner (epoch 0) and
                                                     the teacher's entropy on the analysis sample
    finetune/OBJ/seedS       RUN/finetune/OBJ/seedS/ the pre-trained learner (init: RUN/learner/checkpoints/best)
                                                     fine-tuned with OBJ in kd, ka, half, ..., a variant (kd-tail,
                                                     ka-renorm, ...: experiment.column) and with nll alone (the
                                                     control, same epochs); per-epoch analyses in .../analysis/
    smoothing/...            RUN/smoothing/, RUN/smoothing.json   (column smooth) label smoothing calibrated on the
                                                     valid split to the entropy of smoothing_target (SMOOTHING_RULE),
                                                     then finetune/smooth/seedS with the epsilon chosen
    seqkd                    RUN/seqkd/              (prefixes has teacher) seq-KD data: the teacher's beam search
                                                     (eval.beam, eval.max_length) of the fine-tuning pairs (first
                                                     data.train_limit of the training split); a corpus folder whose
                                                     valid and test splits are the original files, copied
    finetune/OBJ-P/seedS     RUN/finetune/OBJ-P/seedS/ (option prefixes) OBJ in prefix_objectives with prefix source
                                                     P: objective.prefix=P (learner, mixed;
                                                     ktransfer.training.prefixes) or
                                                     data.corpus=RUN/seqkd (teacher); per-epoch analyses as above
    sweep/OBJ/kK             RUN/sweep/OBJ/kK/       (sweep=topk) KD and KA with top-k = K, first seed; valid BLEU
    eval/NAME                RUN/eval/NAME/          test-split beam search and sacreBLEU scores of every model
    significance             RUN/significance.json   paired bootstrap resampling (sacreBLEU) per seed
    significance/prefixes    RUN/significance-prefixes.json   (option prefixes) each OBJ-P run against OBJ with
                                                     reference prefixes, same seed
    report                   RUN/results.json, RUN/report.md, RUN/figures/*.png

Overrides (``key=value``; later ones win):

- ``SECTION.KEY=V`` (e.g. ``train.num_threads=1``): every training stage;
- ``STAGE.SECTION.KEY=V`` with STAGE in teacher, learner, finetune, sweep (e.g. ``teacher.train.epochs=3``,
  ``finetune.objective.top_k=8``): that stage only (``finetune`` includes the nll control);
- options of the experiment: ``seeds=1,2,3``, ``objectives=kd,ka,half`` (columns: also ``OBJ-tail``, ``OBJ-renorm``
  and ``smooth``, with ``smoothing_target=ka`` and ``smoothing_grid=0.02,0.05,0.1,0.2``), ``control=true``,
  ``sweep=topk|none``,
  ``topk_values=2,4,8,16,V`` (``V`` = the whole vocabulary), ``analysis_sample=2000``, ``table_sentences=3``,
  ``test_limit=N``, ``bootstrap=1000``, ``stop_after=STAGE`` (bpe, teacher, learner, analysis0, finetune, sweep,
  eval, significance; finetune includes seqkd and the prefix-source runs);
- prefix sources (extra rows of Table 2; none by default): ``prefixes=learner,mixed,teacher``,
  ``prefix_objectives=kd,ka``, ``prefix_seeds=1,2`` (default: ``seeds``). Added to a finished run, only the new
  stages run (seqkd, finetune/OBJ-P/seedS, their eval/ stages, significance/prefixes), then the report.

Settings the layout needs are set by the stages themselves and cannot be overridden: ``train.out_dir``,
``data.tokenizer``, ``model.init`` and ``model.teacher`` (fine-tuning), ``objective.objective`` and ``train.seed``
(fine-tuning), ``objective.top_k`` (sweep), ``objective.prefix`` and ``data.corpus`` (prefix-source runs).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktransfer.experiments.experiment import (
    PREFIX_SOURCES,
    SMOOTHING,
    STAGE_KINDS,
    TRAIN_STAGES,
    Options,
    column,
    model_names,
    prefix_runs,
    variant_pairs,
)
from ktransfer.runtime import distributed
from ktransfer.runtime.runlog import RunLog
from ktransfer.training.config import SECTIONS, ConfigError, RunConfig, load_config


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    doc: str
    base: tuple[str, ...]  # every training stage
    teacher: tuple[str, ...] = ()
    learner: tuple[str, ...] = ()
    finetune: tuple[str, ...] = ()
    sweep: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


_PAPER = ("objective.lam=0.5", "eval.beam=6", "eval.length_penalty=1.0", "train.valid_bleu=true")


# The CPU presets share models, schedule and stages; only the corpus and decoding lengths differ.
_CPU_BASE = ("data.vocab_size=8000", "data.max_tokens=1200", "optim.lr=1e-3", "optim.warmup_steps=400",
             "optim.schedule=inverse_sqrt", "optim.clip_norm=1.0", "train.num_threads=2", "train.save_every=50",
             "train.log_every=20", "train.patience=0", "data.valid_subset=500", "eval.valid_beam=1", "eval.beam=5",
             "objective.lam=0.5", "objective.top_k=8", "model.dropout=0.1")
_CPU_FINETUNE = ("model.preset=cpu-learner", "data.train_limit=6000", "optim.warmup_steps=0",
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

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        doc="Seconds to a minute on 2 cores (the tests run it): tiny models, 300 Multi30k pairs, 1-2 epochs, "
            "2 seeds, greedy decoding of 30 test sentences.",
        base=("data.corpus=multi30k-de-en", "data.train_limit=300", "data.valid_subset=30", "data.vocab_size=400",
              "data.max_tokens=400", "model.preset=tiny", "optim.lr=1e-3", "train.epochs=1", "train.num_threads=1",
              "train.log_every=20", "train.save_every=0", "eval.beam=1", "eval.max_length=24", "objective.lam=0.5",
              "train.patience=0"),
        teacher=("train.epochs=2", "model.dropout=0.1"),
        finetune=("train.epochs=2", "objective.top_k=8"),
        sweep=("train.epochs=1",),
        options={"seeds": [1, 2], "topk_values": [2, None], "analysis_sample": 40, "table_sentences": 2,
                 "test_limit": 30, "bootstrap": 100},
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


# --------------------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------------------
def parse_overrides(preset: Preset, items: list[str]) -> tuple[Options, dict[str, list[str]]]:
    """The experiment's options (preset, then overrides) and the config overrides by stage (``"all"`` = every stage).

    Raises:
        ConfigError: an item without ``=``, an unknown option or stage, or a bad option value.
    """
    opts = Options(**{**dataclasses.asdict(Options()), **preset.options})
    by_stage: dict[str, list[str]] = {"all": [], **{s: [] for s in TRAIN_STAGES}}
    names = {f.name for f in dataclasses.fields(Options)}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. train.num_threads=1, "
                              "teacher.train.epochs=3 or seeds=1,2,3)")
        head, _, rest = key.partition(".")
        if head in SECTIONS:
            by_stage["all"].append(f"{key}={value}")
        elif head in TRAIN_STAGES and rest.partition(".")[0] in SECTIONS:
            by_stage[head].append(f"{rest}={value}")
        elif key in names:
            setattr(opts, key, _option_value(key, value))
        else:
            raise ConfigError(f"override {item!r}: unknown key {key!r}; use SECTION.KEY=V (every stage), "
                              f"STAGE.SECTION.KEY=V (STAGE in {', '.join(TRAIN_STAGES)}) or an option "
                              f"({', '.join(sorted(names))})", key=key)
    _check_options(opts)
    return opts, by_stage


def _option_value(key: str, value: str) -> Any:
    v = value.strip()
    try:
        if key == "prefix_seeds" and v.lower() in ("none", "null", ""):
            return None
        if key in ("seeds", "prefix_seeds"):
            return [int(x) for x in v.strip("[]").split(",") if x.strip()]
        if key in ("objectives", "prefixes", "prefix_objectives"):
            return [x.strip() for x in v.strip("[]").split(",") if x.strip()]
        if key == "smoothing_grid":
            return [float(x) for x in v.strip("[]").split(",") if x.strip()]
        if key == "topk_values":
            return [None if x.strip() in ("V", "v", "none", "None") else int(x)
                    for x in v.strip("[]").split(",") if x.strip()]
        if key == "control":
            if v.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(v)
            return v.lower() in ("true", "yes", "1")
        if key in ("analysis_sample", "table_sentences", "bootstrap"):
            return int(v)
        if key == "sweep":  # "none" is a value here, not None
            return v
        if key == "test_limit":
            return None if v.lower() in ("none", "null", "") else int(v)
        return None if v.lower() in ("none", "null", "") else v
    except ValueError:
        raise ConfigError(f"option {key}: bad value {value!r}", key=key) from None


def _check_options(o: Options) -> None:
    from ktransfer.losses.objectives import OBJECTIVES

    if not o.seeds or len(set(o.seeds)) != len(o.seeds) or min(o.seeds) < 0:
        raise ConfigError(f"option seeds: distinct non-negative integers needed, got {o.seeds}", key="seeds")
    bad = [x for x in o.objectives if not _valid_column(x)]
    if bad or not o.objectives or len(set(o.objectives)) != len(o.objectives):
        raise ConfigError(f"option objectives: {bad or o.objectives or 'none given'} (bad value, repeated or none); "
                          f"choose among {', '.join(x for x in OBJECTIVES if x != 'nll')} (nll is the control), "
                          f"their variants OBJ-tail and OBJ-renorm (e.g. ka-tail) and {SMOOTHING} (nll with label "
                          "smoothing matched to the entropy of the column smoothing_target)", key="objectives")
    if SMOOTHING in o.objectives and o.smoothing_target not in o.objectives or o.smoothing_target == SMOOTHING:
        raise ConfigError(f"option smoothing_target: {o.smoothing_target!r} must be one of the other objectives "
                          f"({', '.join(x for x in o.objectives if x != SMOOTHING)}): the {SMOOTHING} column matches "
                          "its learner entropy", key="smoothing_target")
    if not o.smoothing_grid or any(not 0.0 < e < 1.0 for e in o.smoothing_grid):
        raise ConfigError(f"option smoothing_grid: label-smoothing epsilons in (0, 1) needed, got {o.smoothing_grid}",
                          key="smoothing_grid")
    if o.sweep not in ("none", "topk"):
        raise ConfigError(f"option sweep: none or topk, got {o.sweep!r}", key="sweep")
    bad = [x for x in o.prefixes if x not in PREFIX_SOURCES]
    if bad or len(set(o.prefixes)) != len(o.prefixes):
        raise ConfigError(f"option prefixes: {bad or o.prefixes} (bad value or repeated); distinct values among "
                          f"{', '.join(PREFIX_SOURCES)} (reference prefixes are the main rows)", key="prefixes")
    bad = [x for x in o.prefix_objectives if x not in OBJECTIVES or x == "nll"]
    if bad or not o.prefix_objectives or len(set(o.prefix_objectives)) != len(o.prefix_objectives):
        raise ConfigError(f"option prefix_objectives: {bad or o.prefix_objectives} (bad value, repeated or none); "
                          f"distinct values among {', '.join(x for x in OBJECTIVES if x != 'nll')}",
                          key="prefix_objectives")
    if o.prefix_seeds is not None and (not o.prefix_seeds or len(set(o.prefix_seeds)) != len(o.prefix_seeds)
                                       or min(o.prefix_seeds) < 0):
        raise ConfigError(f"option prefix_seeds: distinct non-negative integers or none (= seeds) needed, got "
                          f"{o.prefix_seeds}", key="prefix_seeds")
    if any(k is not None and k < 1 for k in o.topk_values) or not o.topk_values:
        raise ConfigError(f"option topk_values: positive integers or V, got {o.topk_values}", key="topk_values")
    if o.stop_after is not None and o.stop_after not in STAGE_KINDS:
        raise ConfigError(f"option stop_after: one of {', '.join(STAGE_KINDS)}, got {o.stop_after!r}",
                          key="stop_after")
    for key in ("analysis_sample", "table_sentences", "bootstrap"):
        if getattr(o, key) < (1 if key != "table_sentences" else 0):
            raise ConfigError(f"option {key}: must be positive, got {getattr(o, key)}", key=key)
    if o.test_limit is not None and o.test_limit < 1:
        raise ConfigError(f"option test_limit: must be positive, got {o.test_limit}", key="test_limit")


def _valid_column(name: str) -> bool:
    """A fine-tuning column ``objectives`` may name: an objective but nll, OBJ-tail / OBJ-renorm, or smooth."""
    from ktransfer.losses.objectives import OBJECTIVES

    if name == SMOOTHING:
        return True
    try:
        objective = column(name)[0]
    except ValueError:
        return False
    return objective in OBJECTIVES and objective != "nll"


def stage_config(preset: Preset, by_stage: dict[str, list[str]], kind: str, fixed: list[str]) -> RunConfig:
    """The config of one training stage: preset base < preset stage < user (every stage) < user stage < ``fixed``."""
    return load_config(None, [*preset.base, *getattr(preset, kind), *by_stage["all"], *by_stage[kind], *fixed])


# --------------------------------------------------------------------------------------------------------------
# Stage bookkeeping
# --------------------------------------------------------------------------------------------------------------
class Stages:
    """``RUN/stages.json``: per stage, whether it is done and its wall time (all sessions together)."""

    def __init__(self, run_dir: Path, log):
        self.path, self.log = run_dir / "stages.json", log
        self.data: dict[str, dict] = _on_main(lambda: json.loads(self.path.read_text()) if self.path.exists() else {})

    def done(self, name: str, key: Any = None) -> bool:
        entry = self.data.get(name, {})
        return bool(entry.get("done")) and (key is None or entry.get("key") == key)

    def run(self, name: str, fn, *, index: str = "", key: Any = None) -> Any:
        """Run ``fn()`` as stage ``name`` unless it is done; record its wall time.

        ``key`` (JSON data) names what the stage was computed from (e.g. the runs a significance stage compares): a
        stage done with another key is redone, so that a rerun with more seeds or prefix sources updates it.
        """
        if self.done(name, key):
            self.log(f"---- {index} {name}: done already, skipped")
            return None
        if self.data.get(name, {}).get("done"):
            self.log(f"---- {index} {name}: done for other runs ({self.data[name].get('key')}), redone")
        self.log(f"==== {index} {name} " + "=" * max(4, 60 - len(name)))
        entry = self.data.setdefault(name, {"done": False, "wall_s": 0.0, "sessions": 0})
        entry["done"] = False
        if key is not None:
            entry["key"] = key
        t0 = time.time()
        try:
            result = fn()
        finally:
            entry["wall_s"] = round(entry["wall_s"] + time.time() - t0, 2)
            entry["sessions"] += 1
            self._save()
        entry["done"], entry["finished"] = True, time.strftime("%Y-%m-%d %H:%M:%S")
        self._save()
        self.log(f"---- {name}: done in {time.time() - t0:.1f}s")
        distributed.barrier()  # several processes: none starts the next stage before rank 0 wrote this one's files
        return result

    def _save(self) -> None:
        if not distributed.is_main():
            return
        tmp = self.path.with_name(".stages.json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


class StopAfter(Exception):
    """Raised internally when ``stop_after`` is reached."""


class Interrupted(Exception):
    """A training stage stopped by SIGINT/SIGTERM: it saved ``checkpoints/last`` but is not done; the same
    ``reproduce`` command resumes it."""


def _on_main(fn):
    """``fn()`` on rank 0 alone (files that one process writes: BPE, analyses, significance, report); every process
    waits for it and gets its result. One process: just ``fn()``."""
    if not distributed.is_distributed():
        return fn()
    result = fn() if distributed.is_main() else None
    return distributed.broadcast(result)


def _train(cfg: RunConfig, **kwargs) -> dict:
    """``train.train``, except that a run stopped by a signal raises ``Interrupted`` (so its stage is not marked
    done)."""
    from ktransfer.training.train import train

    result = train(cfg, **kwargs)
    if str(result.get("stopped") or "").startswith("signal:"):
        raise Interrupted(f"{cfg.train.out_dir}: stopped by {result['stopped'][7:]} at epoch {result['epoch']}, "
                          f"step {result['step']}")
    return result


# --------------------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------------------
def reproduce(preset_name: str, run_dir: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """Run (or resume) every stage of ``preset_name`` in ``run_dir``; returns the results (``results.json``).

    Raises:
        ConfigError: unknown preset, bad override, or a config a stage cannot use.
    """
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown reproduce preset {preset_name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    opts, by_stage = parse_overrides(preset, list(overrides))
    run = Path(run_dir)
    device = stage_config(preset, by_stage, "teacher", []).train.device
    with distributed.session(device):  # torchrun: one process group for the whole run; train/evaluate join it
        return _reproduce(preset_name, preset, opts, by_stage, run, overrides)


def _reproduce(preset_name: str, preset: Preset, opts: Options, by_stage, run: Path, overrides) -> dict:
    log = RunLog(run / "reproduce.log")
    spec = {"preset": preset_name, "overrides": list(overrides), "options": dataclasses.asdict(opts)}
    spec_path = run / "reproduce.json"

    def read_spec():
        run.mkdir(parents=True, exist_ok=True)
        return json.loads(spec_path.read_text()) if spec_path.exists() else None

    saved = _on_main(read_spec)
    if saved is not None:
        if saved.get("preset") != preset_name:
            raise ConfigError(f"{run} holds a reproduce run of preset {saved.get('preset')!r}, not {preset_name!r}")
        if saved.get("overrides") != spec["overrides"]:
            log(f"warning: overrides differ from the run's first call ({saved.get('overrides')} -> "
                f"{spec['overrides']}); stages done already are not redone")
    _on_main(lambda: spec_path.write_text(json.dumps(spec, indent=1) + "\n"))
    stages = Stages(run, log)
    log(f"reproduce {preset_name} in {run} (overrides: {' '.join(overrides) or 'none'})")
    try:
        _run_stages(preset, opts, by_stage, run, stages, log)
    except StopAfter:
        log(f"stopped after the {opts.stop_after} stages (stop_after); run the same command without it to go on")
        return {"stopped_after": opts.stop_after}
    except Interrupted as e:
        log(f"interrupted: {e}; run the same command again to resume")
        return {"interrupted": str(e)}
    from ktransfer.experiments.report import write_report

    results = _on_main(lambda: write_report(run))
    log(f"report: {run / 'report.md'}")
    return results


def _run_stages(preset: Preset, opts: Options, by_stage, run: Path, stages: Stages, log) -> None:
    tok = str(run / "tokenizer.json")
    teacher_ckpt, learner_ckpt = str(run / "teacher/checkpoints/best"), str(run / "learner/checkpoints/best")

    def cfg(kind: str, out: str, *fixed: str) -> RunConfig:
        return stage_config(preset, by_stage, kind, [f"train.out_dir={run / out}", f"data.tokenizer={tok}", *fixed])

    def stop(kind: str) -> None:
        if opts.stop_after == kind:
            raise StopAfter

    base_cfg = stage_config(preset, by_stage, "teacher", [])
    stages.run("bpe", lambda: _on_main(lambda: _train_bpe(base_cfg, run / "tokenizer.json", log)), index="[bpe]")
    stop("bpe")
    stages.run("teacher", lambda: _train(cfg("teacher", "teacher", "objective.objective=nll")), index="[teacher]")
    stop("teacher")
    stages.run("learner", lambda: _train(cfg("learner", "learner", "objective.objective=nll")), index="[learner]")
    stop("learner")
    sample_cfg = cfg("finetune", "analysis", f"model.init={learner_ckpt}", f"model.teacher={teacher_ckpt}")
    stages.run("analysis0", lambda: _on_main(lambda: _analysis0(sample_cfg, opts, run, teacher_ckpt, learner_ckpt)),
               index="[analysis]")
    stop("analysis0")

    from ktransfer.evaluation.analysis import EpochAnalyzer

    sample = _analysis_sample(sample_cfg, opts)
    columns = [*opts.objectives, *(["nll"] if opts.control else [])]
    runs = [(c, s) for s in opts.seeds for c in columns if c != SMOOTHING]
    smooth_runs = [(SMOOTHING, s) for s in opts.seeds] if SMOOTHING in columns else []

    def fine_tune(c: RunConfig, name: str):
        folder = run / name / "analysis"

        def copy_epoch0():  # epoch 0: the pre-trained learner, shared by every run
            folder.mkdir(parents=True, exist_ok=True)
            for suffix in ("json", "safetensors"):
                shutil.copyfile(run / "analysis" / f"epoch0.{suffix}", folder / f"epoch0.{suffix}")

        _on_main(copy_epoch0)
        return _train(c, on_epoch_end=EpochAnalyzer(folder, sample, opts.table_sentences))

    def column_cfg(name: str, out: str, seed: int, *extra: str) -> RunConfig:
        objective, fixed = column(name)
        # the nll columns have no teacher and no prefix source but the reference (whatever finetune.* says)
        teacher = [f"model.teacher={teacher_ckpt}"] if objective != "nll" else ["objective.prefix=reference"]
        return cfg("finetune", out, f"model.init={learner_ckpt}", *teacher, f"objective.objective={objective}",
                   *fixed, *extra, f"train.seed={seed}")

    def run_column(i: int, name: str, seed: int, *extra: str) -> None:
        out = f"finetune/{name}/seed{seed}"
        c = column_cfg(name, out, seed, *extra)
        stages.run(out, lambda: fine_tune(c, out), index=f"[finetune {i}/{len(runs) + len(smooth_runs)}]")

    for i, (name, seed) in enumerate(runs, 1):
        run_column(i, name, seed)
    if smooth_runs:  # after the others: the calibration matches the entropy of one of them
        epsilon = _calibrate_smoothing(
            lambda eps: column_cfg(SMOOTHING, f"smoothing/eps{eps:g}", opts.seeds[0],
                                   f"objective.label_smoothing={eps:g}"), opts, run, stages)
        for i, (name, seed) in enumerate(smooth_runs, len(runs) + 1):
            run_column(i, name, seed, f"objective.label_smoothing={epsilon:g}")

    # the prefix sources (option prefixes): seq-KD data from the teacher, then finetune/OBJ-P/seedS
    seqkd_dir = run / "seqkd"
    if "teacher" in opts.prefixes:
        seqkd_cfg = cfg("finetune", "seqkd")
        stages.run("seqkd", lambda: _on_main(lambda: _seqkd(seqkd_cfg, teacher_ckpt, seqkd_dir, log)),
                   index="[seqkd]")
    extra = prefix_runs(opts)
    for i, (objective, prefix, seed) in enumerate(extra, 1):
        name = f"finetune/{objective}-{prefix}/seed{seed}"
        source = f"data.corpus={seqkd_dir}" if prefix == "teacher" else f"objective.prefix={prefix}"
        c = cfg("finetune", name, f"model.init={learner_ckpt}", f"model.teacher={teacher_ckpt}",
                f"objective.objective={objective}", f"train.seed={seed}", source)
        stages.run(name, lambda c=c, name=name: fine_tune(c, name), index=f"[prefixes {i}/{len(extra)}]")
    stop("finetune")

    sweeps = [(o, k) for o in ("kd", "ka") for k in opts.topk_values] if opts.sweep == "topk" else []
    for i, (objective, k) in enumerate(sweeps, 1):
        name = f"sweep/{objective}/k{'V' if k is None else k}"
        c = cfg("sweep", name, f"model.init={learner_ckpt}", f"model.teacher={teacher_ckpt}",
                f"objective.objective={objective}", f"objective.top_k={'null' if k is None else k}",
                f"train.seed={opts.seeds[0]}")
        stages.run(name, lambda c=c, name=name: _train_and_validate(c, run / "eval" / name),
                   index=f"[sweep {i}/{len(sweeps)}]")
    stop("sweep")

    test_cfg = cfg("finetune", "eval", f"model.init={learner_ckpt}", f"model.teacher={teacher_ckpt}")
    names = model_names(opts)
    for i, name in enumerate(names, 1):
        stages.run(f"eval/{name}", lambda name=name: _evaluate(test_cfg, run / name, run / "eval" / name,
                                                               test_cfg.data.test, opts.test_limit),
                   index=f"[eval {i}/{len(names)}]")
    stop("eval")
    # Each stage is keyed by the (seed, baseline, system) tests it runs: more seeds or prefix sources redo it.
    paired = [("significance", _significance_tests(opts), run / "significance.json")]
    if opts.prefixes:
        paired.append(("significance/prefixes", _prefix_tests(opts), run / "significance-prefixes.json"))
    for name, tests, path in paired:
        stages.run(name, lambda tests=tests, path=path: _on_main(
            lambda: _write_paired_tests(test_cfg, opts, run, tests, path)), index="[significance]",
                   key=[list(t) for t in tests])
    stop("significance")


SMOOTHING_RULE = (
    "label smoothing epsilon of the smooth column: each epsilon of smoothing_grid fine-tunes the pre-trained learner "
    "with nll + label smoothing (first seed, the fine-tuning settings); the mean token entropy of its final weights "
    "(checkpoints/last), teacher-forced on the whole valid split, is compared with that of the smoothing_target "
    "column's first seed; if two grid points bracket the target, one more epsilon, linearly interpolated between "
    "them, is tried; the epsilon whose entropy is closest to the target is chosen")


def _calibrate_smoothing(cfg_of, opts: Options, run: Path, stages: Stages) -> float:
    """The label smoothing of the ``smooth`` column (``SMOOTHING_RULE``), chosen on the valid split; every run and
    entropy is a stage of its own (resumable) and the outcome is ``RUN/smoothing.json``."""
    target_dir = run / "finetune" / opts.smoothing_target / f"seed{opts.seeds[0]}"
    folder = run / "smoothing"
    probe = cfg_of(opts.smoothing_grid[0])
    stages.run("smoothing/target", lambda: _on_main(lambda: _write_entropy(probe, target_dir, folder / "target.json")),
               index="[smoothing]")
    target = _read(folder / "target.json")["valid_entropy"]

    def tried() -> dict[float, float]:
        return {e: _read(folder / f"eps{e:g}" / "valid_entropy.json")["valid_entropy"] for e in epsilons}

    def try_epsilon(eps: float) -> None:
        c = cfg_of(eps)

        def train_and_measure():
            _train(c)
            _on_main(lambda: _write_entropy(c, Path(c.train.out_dir), Path(c.train.out_dir) / "valid_entropy.json"))

        stages.run(f"smoothing/eps{eps:g}", train_and_measure, index="[smoothing]")

    epsilons = sorted({float(f"{e:g}") for e in opts.smoothing_grid})
    for eps in epsilons:
        try_epsilon(eps)
    refined = _interpolate(tried(), target)
    if refined is not None and refined not in epsilons:
        epsilons.append(refined)
        try_epsilon(refined)
    entropies = tried()
    chosen = min(entropies, key=lambda e: (abs(entropies[e] - target), e))
    record = {"rule": SMOOTHING_RULE, "target": {"column": opts.smoothing_target, "seed": opts.seeds[0],
                                                 "valid_entropy": target},
              "tried": [{"epsilon": e, "valid_entropy": entropies[e]} for e in sorted(entropies)],
              "refined": refined, "chosen": chosen, "valid_split": probe.data.valid}
    stages.run("smoothing", lambda: _on_main(lambda: (run / "smoothing.json").write_text(
        json.dumps(record, indent=1) + "\n")), index="[smoothing]", key=[[e, entropies[e]] for e in sorted(entropies)])
    return chosen


def _interpolate(entropies: dict[float, float], target: float) -> float | None:
    """The epsilon, linearly interpolated, between the two neighbouring grid points whose entropies bracket
    ``target`` (rounded to 3 significant digits); None when no neighbours bracket it."""
    points = sorted(entropies.items())
    for (e0, h0), (e1, h1) in itertools.pairwise(points):
        if min(h0, h1) <= target <= max(h0, h1) and h0 != h1:
            return float(f"{e0 + (target - h0) * (e1 - e0) / (h1 - h0):.3g}")
    return None


def _use_threads(cfg: RunConfig) -> None:
    """torch's intra-op threads from ``train.num_threads`` (0: torch's default) for a stage that runs no training."""
    if cfg.train.num_threads:
        import torch

        torch.set_num_threads(cfg.train.num_threads)


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_entropy(cfg: RunConfig, model_dir: Path, out: Path) -> None:
    """``{"valid_entropy", "positions", "checkpoint"}`` of ``model_dir/checkpoints/last``: its mean token entropy,
    teacher-forced on the whole valid split (``data.valid``), into ``out``."""
    from ktransfer.data.corpora import read_split
    from ktransfer.evaluation.analysis import analyze_model
    from ktransfer.models.family import load_model

    _use_threads(cfg)
    d = cfg.data
    checkpoint = model_dir / "checkpoints" / "last"
    model, tokenizer = load_model(checkpoint)
    summary, _ = analyze_model(model, tokenizer, read_split(d.corpus, d.valid, d.src_lang, d.tgt_lang),
                               table_sentences=0, max_length=d.max_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"valid_entropy": summary["entropy"], "positions": summary["positions"],
                               "checkpoint": str(checkpoint)}) + "\n")


def _train_bpe(cfg: RunConfig, path: Path, log) -> None:
    """One joint BPE on the training split (first data.train_limit pairs), shared by every model."""
    from ktransfer.data.corpora import read_split
    from ktransfer.models.tokenizer import train_tokenizer

    d = cfg.data
    pairs = read_split(d.corpus, d.train, d.src_lang, d.tgt_lang)[:d.train_limit]
    tokenizer = train_tokenizer([t for pair in pairs for t in pair], vocab_size=d.vocab_size)
    tokenizer.save(path)
    log(f"joint BPE of {tokenizer.vocab_size} tokens on {len(pairs)} pairs of {d.corpus}/{d.train}: {path}")


def _analysis_sample(cfg: RunConfig, opts: Options) -> list[tuple[str, str]]:
    from ktransfer.data.corpora import read_split
    from ktransfer.evaluation.analysis import sample_pairs

    d = cfg.data
    pairs = read_split(d.corpus, d.train, d.src_lang, d.tgt_lang)[:d.train_limit]
    return sample_pairs(pairs, opts.analysis_sample)


def _analysis0(cfg: RunConfig, opts: Options, run: Path, teacher_ckpt: str, learner_ckpt: str) -> None:
    """Epoch 0 of the analyses (the pre-trained learner) and the teacher's entropy, on the fixed sample."""
    from ktransfer.evaluation.analysis import analyze_model, save_epoch
    from ktransfer.models.family import load_model

    _use_threads(cfg)
    sample = _analysis_sample(cfg, opts)
    learner, tokenizer = load_model(learner_ckpt)
    summary, top16 = analyze_model(learner, tokenizer, sample, table_sentences=opts.table_sentences,
                                   max_length=cfg.data.max_length)
    save_epoch(run / "analysis", 0, summary, top16)
    teacher, _ = load_model(teacher_ckpt)
    t_summary, _ = analyze_model(teacher, tokenizer, sample, table_sentences=0, max_length=cfg.data.max_length)
    (run / "analysis" / "teacher.json").write_text(json.dumps(
        {"entropy": t_summary["entropy"], "positions": t_summary["positions"], "sample": len(sample)}) + "\n")


def _evaluate(cfg: RunConfig, model_dir: Path, out_dir: Path, split: str, limit: int | None) -> dict:
    """Beam search (eval.*) of ``split`` with ``model_dir/checkpoints/best``; scores in ``out_dir``."""
    from ktransfer.evaluation.evaluate import evaluate

    _use_threads(cfg)
    d, e = cfg.data, cfg.eval
    result = evaluate(model_dir / "checkpoints" / "best", corpus=d.corpus, split=split, src_lang=d.src_lang,
                      tgt_lang=d.tgt_lang, beam=e.beam, length_penalty=e.length_penalty, max_length=e.max_length,
                      batch_size=e.batch_size, out_dir=out_dir, limit=limit, device=cfg.train.device)
    if distributed.is_main():
        print(f"  {out_dir}: {split} BLEU {result['bleu']:.2f} chrF {result['chrf']:.2f}", file=sys.stderr)
    return result


def _seqkd(cfg: RunConfig, teacher_ckpt: str, out: Path, log) -> dict:
    """Sequence-level KD data (``ktransfer.evaluation.seqkd``): the teacher's beam search (eval.beam,
    eval.length_penalty,
    eval.max_length, eval.batch_size) of the first data.train_limit pairs of the training split, the fine-tuning
    data; ``out`` is a corpus folder whose other splits (valid, test) are the original files, copied."""
    from ktransfer.evaluation.seqkd import distill_corpus

    _use_threads(cfg)
    d, e = cfg.data, cfg.eval
    return distill_corpus(teacher_ckpt, out, corpus=d.corpus, split=d.train, src_lang=d.src_lang, tgt_lang=d.tgt_lang,
                          beam=e.beam, length_penalty=e.length_penalty, max_length=e.max_length,
                          batch_size=e.batch_size, limit=d.train_limit, device=cfg.train.device, log=log)


def _train_and_validate(cfg: RunConfig, out_dir: Path) -> dict:
    """A sweep point: fine-tune, then the valid BLEU of its best checkpoint (beam eval.beam, data.valid_subset)."""
    _train(cfg)
    return _evaluate(cfg, Path(cfg.train.out_dir), out_dir, cfg.data.valid, cfg.data.valid_subset)


def _significance_tests(opts: Options) -> list[tuple[int, str, str]]:
    """(seed, baseline, system) of the paired bootstrap on the test split (``RUN/significance.json``), per seed: KA
    against KD, the smoothing target against the smooth control, each variant (OBJ-tail, OBJ-renorm) against its
    objective, KA-V against KD-V where both variant columns run, and every column against the nll control."""
    pairs = []
    if "kd" in opts.objectives and "ka" in opts.objectives:
        pairs.append(("kd", "ka"))
    if SMOOTHING in opts.objectives:
        pairs.append((SMOOTHING, opts.smoothing_target))
    pairs += [(base, o) for o in opts.objectives if o != SMOOTHING and (base := column(o)[0]) != o
              and base in opts.objectives]
    pairs += variant_pairs(opts.objectives)
    if opts.control:
        pairs += [("nll", o) for o in opts.objectives]
    return [(seed, base, system) for seed in opts.seeds for base, system in pairs]


def _prefix_tests(opts: Options) -> list[tuple[int, str, str]]:
    """(seed, baseline, system) of ``RUN/significance-prefixes.json``: each prefix-source run against the same objective
    with reference prefixes and the same seed, where that run exists (the objective among ``objectives``, the seed
    among ``seeds``)."""
    return [(s, o, f"{o}-{p}") for o, p, s in prefix_runs(opts) if o in opts.objectives and s in opts.seeds]


def _write_paired_tests(cfg: RunConfig, opts: Options, run: Path, pairs: list[tuple[int, str, str]],
                        path: Path) -> None:
    """Paired bootstrap (seed, baseline, system) of ``RUN/eval/finetune/NAME/seedS`` hypotheses, into ``path``."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    from ktransfer.data.corpora import read_split

    d = cfg.data
    refs = [t for _, t in read_split(d.corpus, d.test, d.src_lang, d.tgt_lang)][:opts.test_limit]
    tests, signature = [], None
    for seed, base, system in pairs:
        hyps = {}
        for o in (base, system):
            hyp_file = next((run / "eval" / "finetune" / o / f"seed{seed}").glob(f"hyp.{d.test}.*"))
            hyps[o] = hyp_file.read_text(encoding="utf-8").split("\n")[:len(refs)]
        test = PairedTest([(base, hyps[base]), (system, hyps[system])], {"BLEU": BLEU()}, [refs],
                          test_type="bs", n_samples=opts.bootstrap)
        sigs, res = test()
        signature = str(sigs["BLEU"])
        b, s = res["BLEU"]
        identical = hyps[base] == hyps[system]  # the bootstrap's p is meaningless then
        tests.append({"seed": seed, "baseline": base, "system": system, "baseline_bleu": b.score,
                      "system_bleu": s.score, "delta": s.score - b.score,
                      "p_value": None if identical else s.p_value, "identical": identical})
    path.write_text(json.dumps(
        {"test": "paired bootstrap resampling (sacreBLEU), per seed, on the test split", "split": d.test,
         "sentences": len(refs), "signature": signature, "tests": tests}, indent=1) + "\n")
