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
                                                     data.max_train_samples of the training split); a corpus folder
                                                     whose valid and test splits are the original files, copied
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
  ``max_predict_samples=N`` (formerly ``test_limit``), ``bootstrap=1000``, ``stop_after=STAGE`` (bpe, teacher,
  learner, analysis0, finetune, sweep, eval, significance; finetune includes seqkd and the prefix-source runs);
- prefix sources (extra rows of Table 2; none by default): ``prefixes=learner,mixed,teacher``,
  ``prefix_objectives=kd,ka``, ``prefix_seeds=1,2`` (default: ``seeds``). Added to a finished run, only the new
  stages run (seqkd, finetune/OBJ-P/seedS, their eval/ stages, significance/prefixes), then the report.

The modules: ``presets`` (the presets), ``options`` (overrides and stage configs), ``stages`` (``RUN/stages.json``,
resume), ``steps`` (the stage bodies); ``experiment`` names the stages and models, ``report`` reads the run back.

Settings the layout needs are set by the stages themselves and cannot be overridden: ``train.out_dir``,
``data.tokenizer``, ``model.init`` and ``model.teacher`` (fine-tuning), ``objective.kind`` and ``train.seed``
(fine-tuning), ``objective.top_k`` (sweep), ``objective.prefix`` and ``data.corpus`` (prefix-source runs).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ktransfer.experiments.experiment import TRAIN_STAGES, Options, model_names
from ktransfer.experiments.options import parse_overrides, stage_config
from ktransfer.experiments.presets import MULTI30K_CPU_ESTIMATE, PRESETS, Preset
from ktransfer.experiments.stages import Interrupted, Stages, StopAfter, on_main
from ktransfer.experiments.steps import STEPS, Context
from ktransfer.runtime import distributed
from ktransfer.runtime.runlog import RunLog
from ktransfer.training.config import ConfigError

__all__ = ["MULTI30K_CPU_ESTIMATE", "PRESETS", "Preset", "model_names", "parse_overrides", "reproduce",
           "stage_config"]


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
    on_main(lambda: _fetch_corpora(preset, by_stage))  # before the run folder is made: a failure leaves nothing
    log = RunLog(run / "reproduce.log")
    _check_spec(run, {"preset": preset_name, "overrides": list(overrides), "options": dataclasses.asdict(opts)}, log)
    ctx = Context(preset, opts, by_stage, run, Stages(run, log), log)
    log(f"reproduce {preset_name} in {run} (overrides: {' '.join(overrides) or 'none'})")
    try:
        for kind, step in STEPS.items():
            step(ctx)
            if opts.stop_after == kind:
                raise StopAfter
    except StopAfter:
        log(f"stopped after the {opts.stop_after} stages (stop_after); run the same command without it to go on")
        return {"stopped_after": opts.stop_after}
    except Interrupted as e:
        log(f"interrupted: {e}; run the same command again to resume")
        return {"interrupted": str(e)}
    from ktransfer.experiments.report import write_report

    results = on_main(lambda: write_report(run))
    log(f"report: {run / 'report.md'}")
    return results


def _fetch_corpora(preset: Preset, by_stage: dict[str, list[str]]) -> None:
    """Every training stage's ``data.corpus`` is there: a corpus name missing from ``$KTRANSFER_DATA`` that
    ``ktransfer data download`` knows is downloaded first (``ktransfer.data.download.ensure_corpus``).

    Raises:
        CorpusError: a corpus that is missing and cannot be downloaded (one line: the folder to fill and how).
    """
    from ktransfer.data.formats import locate

    for corpus in dict.fromkeys(stage_config(preset, by_stage, kind, []).data.corpus for kind in TRAIN_STAGES):
        locate(corpus)


def _check_spec(run: Path, spec: dict, log) -> None:
    """``RUN/reproduce.json``: the preset, overrides and options of the run; a folder of another preset is refused,
    changed overrides are logged."""
    spec_path = run / "reproduce.json"

    def read_spec():
        run.mkdir(parents=True, exist_ok=True)
        return json.loads(spec_path.read_text()) if spec_path.exists() else None

    saved = on_main(read_spec)
    if saved is not None:
        if saved.get("preset") != spec["preset"]:
            raise ConfigError(f"{run} holds a reproduce run of preset {saved.get('preset')!r}, not {spec['preset']!r}")
        if saved.get("overrides") != spec["overrides"]:
            log(f"warning: overrides differ from the run's first call ({saved.get('overrides')} -> "
                f"{spec['overrides']}); stages done already are not redone")
    on_main(lambda: spec_path.write_text(json.dumps(spec, indent=1) + "\n"))
