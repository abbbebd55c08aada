"""The rules over several options of a run, in one table, checked before any model loads.

Each ``Rule`` names the keys it ties (the first is the key an error names), says the rule in words (``ktransfer train
--help-config`` prints the table), and, where it can be decided from the config, the number of processes and the
data format alone, a predicate that is true when the config breaks it. ``ktransfer.training.config`` runs the
predicates on every config it builds (one process, data format as configured); ``ktransfer.training.setup`` runs
them again once it knows the number of processes and the data format (``data.format=auto``), before any model loads.

Rules marked ``load`` need a loaded model, tokenizer or cache (vocabulary sizes, tokenizer compatibility, a model's
output layer or blocks); they are enforced where those are loaded and listed here so the table is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Facts:
    """What is known besides the config: the number of processes, and the data format once the data was read."""

    world: int = 1
    format: str | None = None  # None: not known yet (data.format=auto before the data is read)


@dataclass(frozen=True)
class Rule:
    keys: tuple[str, ...]  # the options it ties; keys[0] is named by the error
    text: str  # the rule in words (--help-config)
    when: str = "config"  # config (every config), processes (under torchrun), data (once read), load (see above)
    broken: Callable[[Any, Facts], bool] | None = None  # (cfg, facts) -> whether cfg breaks it; None: at load
    message: Callable[[Any, Facts], str] | None = None  # the error after "KEY: "; default: text

    def error(self, cfg, facts: Facts) -> str:
        return f"{self.keys[0]}: {self.message(cfg, facts) if self.message else self.text}"


def exact_for(objective: str, top_k: int | None, support: str | None, k: int | None = None) -> str | None:
    """None when ``objective`` with ``top_k``/``support`` reads the teacher only on its top-``top_k`` tokens (so a
    teacher cache of K >= top_k gives it exactly); else the reason it does not."""
    from ktransfer.losses.divergences import terms_of
    from ktransfer.losses.spec import ALIASES

    kind = ALIASES.get(objective, objective)
    if kind == "nll":
        return "objective nll uses no teacher"
    if top_k is None:
        return (f"objective {objective!r} on the full vocabulary reads the teacher's probability of every token, "
                "but the cache keeps only its top-K (set objective.top_k)")
    off = sorted({t.kind for t in terms_of(kind, top_k, support) if t.support != "teacher"})
    if off:
        return (f"objective {objective!r} reads the teacher on a support other than its own top-k ({', '.join(off)}: "
                f"support {support or 'default'}), where the cache only has the teacher's top-K; only divergences on "
                "the teacher's support (kd, skew_forward_kl, or support=teacher) are exact")
    if k is not None and top_k > k:
        return f"objective.top_k={top_k} exceeds the cache's K={k}"
    return None


def _preset_positions(cfg) -> int | None:
    """Positions of ``model.preset`` when a new model of that preset is built (``model.init`` unset), else None."""
    from ktransfer.models.family import PRESETS

    if cfg.model.init:
        return None  # model.init replaces the preset: its own positions count, checked when the data is encoded
    return PRESETS.get(cfg.model.preset, {}).get("max_position_embeddings")


def _fsdp(cfg, facts: Facts) -> bool:
    return cfg.train.distributed == "fsdp" and facts.world > 1


def _fsdp_refuses(key: str, on: Callable[[Any], bool]) -> Rule:
    return Rule((key, "train.distributed"), "not with train.distributed=fsdp under several processes (use ddp): "
                "every rank must run the same forward passes on whole-model shards", "processes",
                lambda c, f: _fsdp(c, f) and on(c), lambda c, f: "not with train.distributed=fsdp (use ddp)")


RULES: tuple[Rule, ...] = (
    Rule(("data.tgt_lang", "data.src_lang", "data.format"), "differs from data.src_lang for parallel data",
         broken=lambda c, f: c.data.format in ("auto", "parallel") and c.data.src_lang == c.data.tgt_lang,
         message=lambda c, f: f"must differ from data.src_lang, both are {c.data.src_lang!r}"),
    Rule(("objective.tail", "objective.top_k", "objective.renormalize"), "needs objective.top_k (the rest is what "
         "lies outside the top-k) and excludes objective.renormalize",
         broken=lambda c, f: c.objective.tail and (c.objective.top_k is None or c.objective.renormalize)),
    Rule(("objective.prefix", "objective.kind"), "learner or mixed prefixes need a divergence objective",
         broken=lambda c, f: c.objective.prefix != "reference" and c.objective.kind == "nll",
         message=lambda c, f: f"{c.objective.prefix!r} needs a divergence objective (kd, ka, ...): with "
                           "objective.kind=nll there is no teacher term to compute on the sampled prefixes, and "
                           "NLL is always on the reference (use objective.prefix=reference)"),
    Rule(("data.max_length", "model.preset", "model.init"), "at most the positions of model.preset, when model.init "
         "is unset (with model.init the model's own positions cap it when the data is encoded)",
         broken=lambda c, f: (p := _preset_positions(c)) is not None and (c.data.max_length or 0) > p,
         message=lambda c, f: f"{c.data.max_length} exceeds the {_preset_positions(c)} positions of "
                           f"model.preset={c.model.preset!r}"),
    Rule(("eval.max_length", "model.preset", "model.init"), "at most the positions of model.preset, when "
         "model.init is unset",
         broken=lambda c, f: (p := _preset_positions(c)) is not None and c.eval.max_length > p,
         message=lambda c, f: f"{c.eval.max_length} exceeds the {_preset_positions(c)} positions of "
                           f"model.preset={c.model.preset!r}"),
    Rule(("model.teacher", "objective.kind"), "every objective but nll needs a teacher",
         broken=lambda c, f: c.objective.kind != "nll" and not c.model.teacher,
         message=lambda c, f: f"objective.kind={c.objective.kind!r} needs a teacher checkpoint (set "
                           "model.teacher=PATH, or use objective.kind=nll)"),
    Rule(("train.valid_bleu", "data.format"), "BLEU needs translation pairs (parallel data; data.format=auto is "
         "decided when the data is read)", "data",
         broken=lambda c, f: c.train.valid_bleu and (f.format or c.data.format) not in ("auto", "parallel"),
         message=lambda c, f: f"BLEU needs translation pairs, the data is {f.format or c.data.format}; select on "
                              "the validation loss (train.valid_bleu=false)"),
    Rule(("train.teacher_cache", "objective.kind", "objective.top_k", "objective.support"),
         "the cache serves only divergences on the teacher's top-k support (kd, skew_forward_kl, or "
         "support=teacher, with objective.top_k)",
         broken=lambda c, f: bool(c.train.teacher_cache)
         and exact_for(c.objective.kind, c.objective.top_k, c.objective.support) is not None,
         message=lambda c, f: f"the cache cannot give objective.kind={c.objective.kind!r} exactly: "
                           f"{exact_for(c.objective.kind, c.objective.top_k, c.objective.support)}"),
    Rule(("train.teacher_cache", "objective.prefix"), "the cache holds the teacher on the reference prefixes only",
         broken=lambda c, f: bool(c.train.teacher_cache) and c.objective.prefix != "reference",
         message=lambda c, f: f"objective.prefix={c.objective.prefix!r}: the cache holds the teacher on the reference "
                           "prefixes only; use objective.prefix=reference"),
    Rule(("train.teacher_cache", "train.fused_head"), "not with train.fused_head (the cache replaces the teacher's "
         "logits, the fused head needs its hidden states)",
         broken=lambda c, f: bool(c.train.teacher_cache) and c.train.fused_head,
         message=lambda c, f: "not with train.fused_head=true (the cache replaces the teacher's logits, the fused head "
                           "needs its hidden states); set one of them"),
    Rule(("train.fused_head", "train.distributed"), "one process only (DDP must run the learner's forward; the "
         "fused path calls its body and head separately)", "processes",
         broken=lambda c, f: c.train.fused_head and f.world > 1,
         message=lambda c, f: "not with several processes (DDP must run the learner's forward; the fused path calls "
                           "its body and head separately)"),
    _fsdp_refuses("objective.prefix", lambda c: c.objective.prefix != "reference"),
    _fsdp_refuses("train.teacher_cache", lambda c: bool(c.train.teacher_cache)),
    _fsdp_refuses("model.lora_r", lambda c: c.model.lora_r is not None),
    Rule(("model.teacher", "data.tokenizer"), "teacher and learner are of one family (seq2seq or causal) and share "
         "a tokenizer (or the learner's is the first ids of the teacher's); output rows beyond it are sliced away",
         "load"),
    Rule(("train.fused_head",), "both models have a plain linear output layer (a MarianMTModel, or a transformers "
         "*ForCausalLM without logit scaling)", "load"),
    Rule(("train.distributed",), "fsdp needs models with transformer blocks to shard", "load"),
    Rule(("train.gradient_checkpointing",), "the learner's class supports gradient checkpointing", "load"),
    Rule(("model.lora_r", "model.init"), "LoRA needs peft and a pretrained learner (model.init or a model folder)",
         "load"),
    Rule(("train.teacher_cache",), "an existing cache folder was built for this run (teacher, tokenizer, data, "
         "temperature, bf16, vocabulary, K >= objective.top_k)", "load"),
    Rule(("data.max_length",), "at least one training example fits in it (and in both models' positions)", "load"),
)

WHEN = {"config": "with the config", "processes": "at start, under torchrun", "data": "once the data is read",
        "load": "when the models load"}


def broken(cfg, facts: Facts = Facts()) -> list[Rule]:
    """The rules ``cfg`` breaks, in table order, among those decidable from ``cfg`` and ``facts``."""
    return [r for r in RULES if r.broken is not None and r.broken(cfg, facts)]


def describe() -> str:
    """The table as ``--help-config`` prints it: the keys, the rule, and when it is checked."""
    lines = ["rules over several options (checked before any model loads unless marked 'when the models load'):"]
    for r in RULES:
        lines.append(f"  {' + '.join(r.keys)}  [{WHEN[r.when]}]")
        lines.append(f"      {r.keys[0]}: {r.text}")
    return "\n".join(lines)
