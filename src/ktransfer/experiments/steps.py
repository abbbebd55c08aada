"""``reproduce``'s steps: the bodies of its stages, one function per stage kind (``STEPS``, in the order they run).

Each step takes the run's ``Context`` and runs its stages through ``Context.stages`` (skipped when done): the joint
BPE, the teacher, the learner, the epoch-0 analyses, the fine-tuning columns (with the smoothing calibration, the
seq-KD data and the prefix-source runs), the top-k sweep, the test evaluations and the paired bootstrap tests.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ktransfer.experiments.experiment import (
    SMOOTHING,
    Options,
    column,
    model_names,
    prefix_runs,
    sweep_names,
    variant_pairs,
)
from ktransfer.experiments.options import stage_config
from ktransfer.experiments.presets import Preset
from ktransfer.experiments.stages import Stages, on_main, train_stage
from ktransfer.runtime import distributed
from ktransfer.training.config import RunConfig


@dataclass(frozen=True)
class Context:
    """One run: its preset, options and overrides, its folder, its stages and its log."""

    preset: Preset
    opts: Options
    by_stage: dict[str, list[str]]
    run: Path
    stages: Stages
    log: Callable[[str], None]

    @property
    def teacher_ckpt(self) -> str:
        return str(self.run / "teacher/checkpoints/best")

    @property
    def learner_ckpt(self) -> str:
        return str(self.run / "learner/checkpoints/best")

    def cfg(self, kind: str, out: str, *fixed: str) -> RunConfig:
        """The config of a ``kind`` stage writing to ``RUN/out``, with the run's tokenizer and ``fixed``."""
        return stage_config(self.preset, self.by_stage, kind,
                            [f"train.out_dir={self.run / out}", f"data.tokenizer={self.run / 'tokenizer.json'}",
                             *fixed])

    def tuned(self, out: str, *fixed: str, kind: str = "finetune") -> RunConfig:
        """The config of a stage that starts from the pre-trained learner, with the teacher, then ``fixed``."""
        return self.cfg(kind, out, f"model.init={self.learner_ckpt}", f"model.teacher={self.teacher_ckpt}", *fixed)


# --------------------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------------------
def bpe(ctx: Context) -> None:
    ctx.stages.run("bpe", lambda: _train_bpe(stage_config(ctx.preset, ctx.by_stage, "teacher", []),
                                             ctx.run / "tokenizer.json", ctx.log), index="[bpe]")


def teacher(ctx: Context) -> None:
    ctx.stages.run("teacher", lambda: train_stage(ctx.cfg("teacher", "teacher", "objective.kind=nll")),
                   index="[teacher]")


def learner(ctx: Context) -> None:
    ctx.stages.run("learner", lambda: train_stage(ctx.cfg("learner", "learner", "objective.kind=nll")),
                   index="[learner]")


def analysis0(ctx: Context) -> None:
    sample_cfg = ctx.tuned("analysis")
    ctx.stages.run("analysis0", lambda: on_main(lambda: _analysis0(sample_cfg, ctx)), index="[analysis]")


def finetune(ctx: Context) -> None:
    """The fine-tuning columns (objectives, the nll control, then the smoothing control after its calibration),
    then the prefix-source runs (option prefixes) with the seq-KD data they need."""
    opts = ctx.opts
    columns = [*opts.objectives, *(["nll"] if opts.control else [])]
    runs = [(c, s) for s in opts.seeds for c in columns if c != SMOOTHING]
    smooth_runs = [(SMOOTHING, s) for s in opts.seeds] if SMOOTHING in columns else []
    tune = _FineTune(ctx)
    for i, (name, seed) in enumerate(runs, 1):
        tune.column(f"[finetune {i}/{len(runs) + len(smooth_runs)}]", name, seed)
    if smooth_runs:  # after the others: the calibration matches the entropy of one of them
        epsilon = _calibrate_smoothing(lambda eps: tune.column_cfg(SMOOTHING, f"smoothing/eps{eps:g}", opts.seeds[0],
                                                                   f"objective.label_smoothing={eps:g}"), ctx)
        for i, (name, seed) in enumerate(smooth_runs, len(runs) + 1):
            tune.column(f"[finetune {i}/{len(runs) + len(smooth_runs)}]", name, seed,
                        f"objective.label_smoothing={epsilon:g}")

    seqkd_dir = ctx.run / "seqkd"
    if "teacher" in opts.prefixes:
        seqkd_cfg = ctx.cfg("finetune", "seqkd")
        ctx.stages.run("seqkd", lambda: on_main(lambda: _seqkd(seqkd_cfg, ctx.teacher_ckpt, seqkd_dir, ctx.log)),
                       index="[seqkd]")
    extra = prefix_runs(opts)
    for i, (objective, prefix, seed) in enumerate(extra, 1):
        name = f"finetune/{objective}-{prefix}/seed{seed}"
        source = f"data.corpus={seqkd_dir}" if prefix == "teacher" else f"objective.prefix={prefix}"
        c = ctx.tuned(name, f"objective.kind={objective}", f"train.seed={seed}", source)
        ctx.stages.run(name, lambda c=c, name=name: tune(c, name), index=f"[prefixes {i}/{len(extra)}]")


def sweep(ctx: Context) -> None:
    """The top-k sweep (option sweep=topk): KD and KA with each top-k, first seed; valid BLEU of each."""
    names = sweep_names(ctx.opts)
    for i, name in enumerate(names, 1):
        _, objective, k = name.split("/")  # sweep/OBJ/kK, K = V for the whole vocabulary
        c = ctx.tuned(name, f"objective.kind={objective}", f"objective.top_k={'null' if k == 'kV' else k[1:]}",
                      f"train.seed={ctx.opts.seeds[0]}", kind="sweep")
        ctx.stages.run(name, lambda c=c, name=name: _train_and_validate(c, ctx.run / "eval" / name),
                       index=f"[sweep {i}/{len(names)}]")


def evaluation(ctx: Context) -> None:
    """Beam search of the test split with every model (``model_names``)."""
    test_cfg = ctx.tuned("eval")
    names = model_names(ctx.opts)
    for i, name in enumerate(names, 1):
        ctx.stages.run(f"eval/{name}", lambda name=name: _evaluate(test_cfg, ctx.run / name, ctx.run / "eval" / name,
                                                                   test_cfg.data.test, ctx.opts.max_predict_samples),
                       index=f"[eval {i}/{len(names)}]")


def significance(ctx: Context) -> None:
    """Paired bootstrap tests. Each stage is keyed by the (seed, baseline, system) tests it runs: more seeds or
    prefix sources redo it."""
    test_cfg = ctx.tuned("eval")
    paired = [("significance", significance_tests(ctx.opts), ctx.run / "significance.json")]
    if ctx.opts.prefixes:
        paired.append(("significance/prefixes", prefix_tests(ctx.opts), ctx.run / "significance-prefixes.json"))
    for name, tests, path in paired:
        ctx.stages.run(name, lambda tests=tests, path=path: on_main(
            lambda: _write_paired_tests(test_cfg, ctx.opts, ctx.run, tests, path)), index="[significance]",
                       key=[list(t) for t in tests])


STEPS: dict[str, Callable[[Context], None]] = {  # keys: the stage kinds of option stop_after
    "bpe": bpe, "teacher": teacher, "learner": learner, "analysis0": analysis0, "finetune": finetune,
    "sweep": sweep, "eval": evaluation, "significance": significance}


# --------------------------------------------------------------------------------------------------------------
# Stage bodies
# --------------------------------------------------------------------------------------------------------------
class _FineTune:
    """Fine-tuning runs from the pre-trained learner, each with its per-epoch analyses on the fixed sample
    (``RUN/NAME/analysis``; epoch 0, the pre-trained learner, copied from ``RUN/analysis``)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.sample = _analysis_sample(ctx.tuned("analysis"), ctx.opts)

    def __call__(self, c: RunConfig, name: str) -> dict:
        from ktransfer.evaluation.analysis import EpochAnalyzer

        run = self.ctx.run
        folder = run / name / "analysis"

        def copy_epoch0():  # epoch 0: the pre-trained learner, shared by every run
            folder.mkdir(parents=True, exist_ok=True)
            for suffix in ("json", "safetensors"):
                shutil.copyfile(run / "analysis" / f"epoch0.{suffix}", folder / f"epoch0.{suffix}")

        on_main(copy_epoch0)
        return train_stage(c, on_epoch_end=EpochAnalyzer(folder, self.sample, self.ctx.opts.table_sentences))

    def column_cfg(self, name: str, out: str, seed: int, *extra: str) -> RunConfig:
        """The config of column ``name`` (``experiment.column``) with ``seed``; the nll columns have no teacher and no
        prefix source but the reference (whatever finetune.* says)."""
        objective, fixed = column(name)
        ctx = self.ctx
        teacher = [f"model.teacher={ctx.teacher_ckpt}"] if objective != "nll" else ["objective.prefix=reference"]
        return ctx.cfg("finetune", out, f"model.init={ctx.learner_ckpt}", *teacher, f"objective.kind={objective}",
                       *fixed, *extra, f"train.seed={seed}")

    def column(self, index: str, name: str, seed: int, *extra: str) -> None:
        out = f"finetune/{name}/seed{seed}"
        c = self.column_cfg(name, out, seed, *extra)
        self.ctx.stages.run(out, lambda: self(c, out), index=index)


SMOOTHING_RULE = (
    "label smoothing epsilon of the smooth column: each epsilon of smoothing_grid fine-tunes the pre-trained learner "
    "with nll + label smoothing (first seed, the fine-tuning settings); the mean token entropy of its final weights "
    "(checkpoints/last), teacher-forced on the whole valid split, is compared with that of the smoothing_target "
    "column's first seed; if two grid points bracket the target, one more epsilon, linearly interpolated between "
    "them, is tried; the epsilon whose entropy is closest to the target is chosen")


def _calibrate_smoothing(cfg_of, ctx: Context) -> float:
    """The label smoothing of the ``smooth`` column (``SMOOTHING_RULE``), chosen on the valid split; every run and
    entropy is a stage of its own (resumable) and the outcome is ``RUN/smoothing.json``."""
    opts, run, stages = ctx.opts, ctx.run, ctx.stages
    target_dir = run / "finetune" / opts.smoothing_target / f"seed{opts.seeds[0]}"
    folder = run / "smoothing"
    probe = cfg_of(opts.smoothing_grid[0])
    stages.run("smoothing/target", lambda: on_main(lambda: _write_entropy(probe, target_dir, folder / "target.json")),
               index="[smoothing]")
    target = _read(folder / "target.json")["valid_entropy"]

    def tried() -> dict[float, float]:
        return {e: _read(folder / f"eps{e:g}" / "valid_entropy.json")["valid_entropy"] for e in epsilons}

    def try_epsilon(eps: float) -> None:
        c = cfg_of(eps)

        def train_and_measure():
            train_stage(c)
            on_main(lambda: _write_entropy(c, Path(c.train.out_dir), Path(c.train.out_dir) / "valid_entropy.json"))

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
    stages.run("smoothing", lambda: on_main(lambda: (run / "smoothing.json").write_text(
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
    """One joint BPE on the training split (first data.max_train_samples pairs), shared by every model: training's own
    (``ktransfer.training.bpe``), saved by rank 0."""
    from ktransfer.data.corpora import read_split
    from ktransfer.data.formats import Examples
    from ktransfer.training.bpe import train_joint_bpe

    d = cfg.data
    pairs = read_split(d.corpus, d.train, d.src_lang, d.tgt_lang)[:d.max_train_samples]
    tokenizer = train_joint_bpe(Examples("parallel", pairs), d.vocab_size, log)
    on_main(lambda: tokenizer.save(path))
    log(f"the joint BPE of {d.corpus}/{d.train}, shared by every model: {path}")


def _analysis_sample(cfg: RunConfig, opts: Options) -> list[tuple[str, str]]:
    from ktransfer.data.corpora import read_split
    from ktransfer.evaluation.analysis import sample_pairs

    d = cfg.data
    pairs = read_split(d.corpus, d.train, d.src_lang, d.tgt_lang)[:d.max_train_samples]
    return sample_pairs(pairs, opts.analysis_sample)


def _analysis0(cfg: RunConfig, ctx: Context) -> None:
    """Epoch 0 of the analyses (the pre-trained learner) and the teacher's entropy, on the fixed sample."""
    from ktransfer.evaluation.analysis import analyze_model, save_epoch
    from ktransfer.models.family import load_model

    _use_threads(cfg)
    opts, run = ctx.opts, ctx.run
    sample = _analysis_sample(cfg, opts)
    learner_model, tokenizer = load_model(ctx.learner_ckpt)
    summary, top16 = analyze_model(learner_model, tokenizer, sample, table_sentences=opts.table_sentences,
                                   max_length=cfg.data.max_length)
    save_epoch(run / "analysis", 0, summary, top16)
    teacher_model, _ = load_model(ctx.teacher_ckpt)
    t_summary, _ = analyze_model(teacher_model, tokenizer, sample, table_sentences=0, max_length=cfg.data.max_length)
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
    eval.length_penalty, eval.max_length, eval.batch_size) of the first data.max_train_samples pairs of the training
    split, the fine-tuning data; ``out`` is a corpus folder whose other splits (valid, test) are the original files,
    copied."""
    from ktransfer.evaluation.seqkd import distill_corpus

    _use_threads(cfg)
    d, e = cfg.data, cfg.eval
    return distill_corpus(teacher_ckpt, out, corpus=d.corpus, split=d.train, src_lang=d.src_lang, tgt_lang=d.tgt_lang,
                          beam=e.beam, length_penalty=e.length_penalty, max_length=e.max_length,
                          batch_size=e.batch_size, limit=d.max_train_samples, device=cfg.train.device, log=log)


def _train_and_validate(cfg: RunConfig, out_dir: Path) -> dict:
    """A sweep point: fine-tune, then the valid BLEU of its best checkpoint (beam eval.beam, data.max_eval_samples)."""
    train_stage(cfg)
    return _evaluate(cfg, Path(cfg.train.out_dir), out_dir, cfg.data.valid, cfg.data.max_eval_samples)


def significance_tests(opts: Options) -> list[tuple[int, str, str]]:
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


def prefix_tests(opts: Options) -> list[tuple[int, str, str]]:
    """(seed, baseline, system) of ``RUN/significance-prefixes.json``: each prefix-source run against the same
    objective with reference prefixes and the same seed, where that run exists (the objective among ``objectives``,
    the seed among ``seeds``)."""
    return [(s, o, f"{o}-{p}") for o, p, s in prefix_runs(opts) if o in opts.objectives and s in opts.seeds]


def _write_paired_tests(cfg: RunConfig, opts: Options, run: Path, pairs: list[tuple[int, str, str]],
                        path: Path) -> None:
    """Paired bootstrap (seed, baseline, system) of ``RUN/eval/finetune/NAME/seedS`` hypotheses, into ``path``."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    from ktransfer.data.corpora import read_split

    d = cfg.data
    refs = [t for _, t in read_split(d.corpus, d.test, d.src_lang, d.tgt_lang)][:opts.max_predict_samples]
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
