"""What a ``ktransfer reproduce`` run is made of: its options and the names of its stages and models.

``ktransfer.experiments.reproduce`` runs the stages; ``ktransfer.experiments.report`` reads the run folder back. Both
take the layout from
here, so that a report can be rebuilt from the run folder alone (``reproduce.json`` holds the options).
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGE_KINDS = ("bpe", "teacher", "learner", "analysis0", "finetune", "sweep", "eval", "significance")
TRAIN_STAGES = ("teacher", "learner", "finetune", "sweep")
PREFIX_SOURCES = ("learner", "mixed", "teacher")  # option prefixes: objective.prefix=learner|mixed, or seq-KD data

# Fine-tuning columns beyond the objectives themselves. ``OBJ-tail`` / ``OBJ-renorm``: OBJ with the top-k support
# coarsened by a tail bucket / renormalised (``ktransfer.losses.divergences``). ``smooth``: the teacher-free control,
# nll
# with label smoothing whose epsilon ``reproduce`` calibrates on the valid split (RUN/smoothing.json).
VARIANTS = {"tail": "objective.tail=true", "renorm": "objective.renormalize=true"}
SMOOTHING = "smooth"


def variant_pairs(objectives: list[str]) -> list[tuple[str, str]]:
    """(kd-V, ka-V) for every variant V whose KD and KA columns are both among ``objectives``: the two orders of the
    divergence compared under the same support treatment (e.g. both with the tail, both proper divergences)."""
    return [(f"kd-{v}", f"ka-{v}") for v in VARIANTS if f"kd-{v}" in objectives and f"ka-{v}" in objectives]


@dataclass
class Options:
    """Settings of the experiment (not of one training run); ``key=value`` overrides set them too."""

    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    objectives: list[str] = field(default_factory=lambda: ["kd", "ka", "half"])
    control: bool = True  # also fine-tune with nll alone, for the same epochs
    sweep: str = "none"  # "topk": KD and KA with each of topk_values (Fig. 4a)
    topk_values: list[int | None] = field(default_factory=lambda: [2, 4, 8, 16, None])  # None = |V|
    analysis_sample: int = 2000  # training pairs of the Sec. 5 analyses
    table_sentences: int = 3  # sentences of the sample whose top-10 tokens are kept (Table 3)
    max_predict_samples: int | None = None  # only the first N test sentences
    bootstrap: int = 1000  # paired bootstrap resamples
    stop_after: str | None = None  # a stage kind: stop once its stages are done
    prefixes: list[str] = field(default_factory=list)  # extra prefix sources: learner, mixed, teacher (seq-KD)
    prefix_objectives: list[str] = field(default_factory=lambda: ["kd", "ka"])  # objectives run with each
    prefix_seeds: list[int] | None = None  # None = seeds
    smoothing_target: str = "ka"  # column "smooth": label smoothing matched to this column's learner entropy
    smoothing_grid: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2])  # epsilons tried first

    @classmethod
    def saved(cls, values: dict, source: str) -> Options:
        """The options saved in ``source`` (``reproduce.json``, ``results.json``); old option names
        (``ktransfer.training.aliases.RENAMED_OPTIONS``) are read as their new ones."""
        from ktransfer.training import aliases

        return cls(**{aliases.canonical(k, source, aliases.RENAMED_OPTIONS): v for k, v in values.items()})


def column(name: str) -> tuple[str, tuple[str, ...]]:
    """The objective and the fixed overrides of a fine-tuning column: ``ka`` -> ("ka", ()), ``ka-tail`` -> ("ka",
    ("objective.tail=true",)), ``smooth`` -> ("nll", ()) (its label smoothing comes from the calibration).

    Raises:
        ValueError: a suffix that is not in ``VARIANTS``.
    """
    if name == SMOOTHING:
        return "nll", ()
    base, _, suffix = name.rpartition("-")
    if not base:
        return name, ()
    if suffix not in VARIANTS:
        raise ValueError(f"column {name!r}: unknown variant {suffix!r}; variants: "
                         f"{', '.join(f'OBJ-{v}' for v in VARIANTS)} and {SMOOTHING}")
    return base, (VARIANTS[suffix],)


def model_names(opts: Options) -> list[str]:
    """Every model evaluated on the test split: teacher, learner, then finetune/OBJ/seedS (nll = the control)."""
    objectives = [*opts.objectives, *(["nll"] if opts.control else [])]
    return ["teacher", "learner", *(f"finetune/{o}/seed{s}" for o in objectives for s in opts.seeds),
            *(f"finetune/{o}-{p}/seed{s}" for p in opts.prefixes for o in opts.prefix_objectives
              for s in prefix_seeds(opts))]


def prefix_seeds(opts: Options) -> list[int]:
    """The seeds of the prefix-source runs (``prefix_seeds``, default ``seeds``)."""
    return list(opts.seeds if opts.prefix_seeds is None else opts.prefix_seeds)


def prefix_runs(opts: Options) -> list[tuple[str, str, int]]:
    """(objective, prefix source, seed) of every ``finetune/OBJ-P/seedS`` run, in the order they are trained."""
    return [(o, p, s) for s in prefix_seeds(opts) for p in opts.prefixes for o in opts.prefix_objectives]


def sweep_names(opts: Options) -> list[str]:
    """The top-k sweep runs (Fig. 4a): sweep/OBJ/kK for KD and KA, K = V for the full vocabulary."""
    if opts.sweep != "topk":
        return []
    return [f"sweep/{o}/k{'V' if k is None else k}" for o in ("kd", "ka") for k in opts.topk_values]
