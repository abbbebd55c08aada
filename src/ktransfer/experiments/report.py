"""The report of a ``reproduce`` run, rebuilt from what the run folder stores (``ktransfer report RUN``).

``build_results(run)`` gathers ``RUN/eval/*/scores.*.json``, ``RUN/significance.json``, the per-epoch analyses and
``RUN/stages.json`` into ``RUN/results.json``; ``write_report(run)`` also draws ``RUN/figures/*.png`` (Fig. 3, 4a, 4b,
5) and writes ``RUN/report.md``: Table 2's layout (mean +- std over seeds, BLEU and chrF, signatures), the paired
bootstrap tests, Table 3, the resolved configs and the wall time of every stage. Nothing in it depends on when it was
written, so rebuilding it from the same data gives the same text.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from ktransfer.experiments.experiment import SMOOTHING, variant_pairs

ROW_NAMES = {"teacher": "Teacher", "learner": "Learner (pre-trained)", "nll": "Learner + nll (control)",
             "kd": "KD", "ka": "KA", "half": "1/2KA+1/2KD", SMOOTHING: "Learner + label smoothing (control)"}
PREFIX_NAMES = {"learner": "learner prefixes", "mixed": "mixed prefixes", "teacher": "teacher prefixes (seq-KD)"}
VARIANT_NAMES = {"tail": "+ tail", "renorm": "renormalised"}
# The paper's Table 2 (BLEU): WMT'17 De-En and IWSLT'15 Th-En.
PAPER_BLEU = {"learner": (30.23, 12.37), "teacher": (34.10, 17.55), "kd": (31.13, 12.70), "ka": (32.24, 13.36),
              "half": (31.51, 12.93)}


def row_name(key: str) -> str:
    """The table name of a row key: ``ka`` -> KA, ``ka-learner`` -> "KA, learner prefixes" (prefix sources),
    ``ka-tail`` -> "KA + tail", ``ka-renorm`` -> "KA renormalised" (variants)."""
    objective, _, suffix = key.rpartition("-")
    if not objective:
        return ROW_NAMES.get(key, key)
    if suffix in PREFIX_NAMES:
        return f"{ROW_NAMES.get(objective, objective)}, {PREFIX_NAMES[suffix]}"
    if suffix in VARIANT_NAMES:
        return f"{ROW_NAMES.get(objective, objective)} {VARIANT_NAMES[suffix]}"
    return ROW_NAMES.get(key, key)


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _scores(folder: Path) -> dict | None:
    files = sorted(folder.glob("scores.*.json")) if folder.is_dir() else []
    return _read_json(files[0]) if files else None


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))  # sample std


def build_results(run_dir: str | os.PathLike) -> dict:
    """Everything the report shows, from the files of ``run_dir``; written to ``RUN/results.json``."""
    from ktransfer.evaluation.analysis import collect
    from ktransfer.experiments.experiment import Options, model_names, prefix_seeds, sweep_names
    from ktransfer.models.tokenizer import Tokenizer

    run = Path(run_dir)
    spec = _read_json(run / "reproduce.json")
    if spec is None:
        raise FileNotFoundError(f"{run} is not a reproduce run folder (no reproduce.json)")
    opts = Options.saved(spec["options"], str(run / "reproduce.json"))
    models = {}
    for name in model_names(opts):
        s = _scores(run / "eval" / name)
        models[name] = None if s is None else {k: s.get(k) for k in (
            "bleu", "chrf", "bleu_signature", "chrf_signature", "decode_signature", "bleu_detail", "split",
            "sentences", "hyp_file", "checkpoint")}
    rows = []
    for key in ("learner", "teacher", "nll", *opts.objectives):
        names = [key] if key in ("teacher", "learner") else [f"finetune/{key}/seed{s}" for s in opts.seeds]
        if key == "nll" and not opts.control:
            continue
        got = [models[n] for n in names if models.get(n)]
        bleu, chrf = [g["bleu"] for g in got], [g["chrf"] for g in got]
        rows.append({"key": key, "name": row_name(key), "n": len(got), "bleu": bleu, "chrf": chrf,
                     "bleu_mean": _mean_std(bleu)[0], "bleu_std": _mean_std(bleu)[1],
                     "chrf_mean": _mean_std(chrf)[0], "chrf_std": _mean_std(chrf)[1]})
    prefix_keys = [f"{o}-{p}" for p in opts.prefixes for o in opts.prefix_objectives]  # after the main rows
    for key in prefix_keys:
        got = [models[n] for n in (f"finetune/{key}/seed{s}" for s in prefix_seeds(opts)) if models.get(n)]
        bleu, chrf = [g["bleu"] for g in got], [g["chrf"] for g in got]
        rows.append({"key": key, "name": row_name(key), "n": len(got), "bleu": bleu, "chrf": chrf,
                     "bleu_mean": _mean_std(bleu)[0], "bleu_std": _mean_std(bleu)[1],
                     "chrf_mean": _mean_std(chrf)[0], "chrf_std": _mean_std(chrf)[1]})
    sweep: dict[str, dict[str, float | None]] = {}
    for name in sweep_names(opts):
        _, objective, k = name.split("/")
        s = _scores(run / "eval" / name)
        sweep.setdefault(objective, {})[k[1:]] = None if s is None else s["bleu"]
    vocab_size = Tokenizer.load(run / "tokenizer.json").vocab_size if (run / "tokenizer.json").is_file() else 0
    analysis = {}
    for objective in [*opts.objectives, *(["nll"] if opts.control else [])]:
        for seed in opts.seeds:
            folder = run / "finetune" / objective / f"seed{seed}" / "analysis"
            if folder.is_dir():
                analysis.setdefault(objective, {})[str(seed)] = collect(folder, vocab_size)
    for key in prefix_keys:  # extra curves of Fig. 4b and 5
        for seed in prefix_seeds(opts):
            folder = run / "finetune" / key / f"seed{seed}" / "analysis"
            if folder.is_dir():
                analysis.setdefault(key, {})[str(seed)] = collect(folder, vocab_size)
    first = next((m for m in models.values() if m), None) or {}
    results = {
        "preset": spec["preset"], "overrides": spec["overrides"], "options": spec["options"],
        "models": models, "table2": rows, "significance": _read_json(run / "significance.json"),
        "sweep": sweep, "analysis": analysis, "teacher_analysis": _read_json(run / "analysis" / "teacher.json"),
        "signatures": {k: first.get(k) for k in ("bleu_signature", "chrf_signature", "decode_signature")},
        "test_split": first.get("split"), "test_sentences": first.get("sentences"),
        "stages": _read_json(run / "stages.json") or {},
    }
    if SMOOTHING in opts.objectives:
        results["smoothing"] = _read_json(run / "smoothing.json")
    if opts.prefixes:  # only then, so that the results of runs without prefix sources are unchanged
        results["significance_prefixes"] = _read_json(run / "significance-prefixes.json")
        seqkd = _read_json(run / "seqkd" / ".seqkd.json") if "teacher" in opts.prefixes else None
        results["seqkd"] = None if seqkd is None else {k: seqkd.get(k) for k in (
            "lines", "empty_hypotheses", "decode", "copied_splits", "split")}
    tmp = run / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, run / "results.json")
    return results


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fig3(out: Path) -> str:
    """The toy figure: docs/figures/toy_default.png of the source tree, else drawn by ``ktransfer.experiments.toy``."""
    source = Path(__file__).resolve().parents[3] / "docs" / "figures" / "toy_default.png"
    if source.is_file():
        shutil.copyfile(source, out)
        return "copied from docs/figures/toy_default.png (`ktransfer toy`)"
    from ktransfer.experiments.toy import plot_toy, run_toy

    plot_toy(run_toy(), out)
    return "drawn by `ktransfer.experiments.toy.run_toy()` with its defaults"


def _curves(analysis: dict, key: str, first_epoch: int) -> dict[str, tuple[list[int], list[float]]]:
    """Per objective: epochs and the mean over seeds of ``key`` (only epochs every seed has)."""
    out = {}
    for objective, seeds in analysis.items():
        n = min(len(a["epochs"]) for a in seeds.values())
        epochs = list(range(first_epoch, n))
        if not epochs:
            continue
        out[objective] = (epochs, [sum(a[key][e] for a in seeds.values()) / len(seeds) for e in epochs])
    return out


def draw_figures(results: dict, figures: Path) -> dict[str, str]:
    """PNG files of Fig. 3, 4a, 4b, 5 in ``figures``; returns {figure: note} for the ones drawn."""
    plt = _plt()
    figures.mkdir(parents=True, exist_ok=True)
    notes = {"fig3": _fig3(figures / "fig3_toy.png")}
    seeds = len(results["options"]["seeds"])

    if results["sweep"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for objective, points in results["sweep"].items():
            ks = list(points)
            ax.plot(range(len(ks)), [points[k] if points[k] is not None else float("nan") for k in ks], "o-",
                    label=row_name(objective))
            ax.set_xticks(range(len(ks)), ["|V|" if k == "V" else k for k in ks])
        ax.set(xlabel="top-k of the divergence", ylabel="valid BLEU", title="Fig. 4a: valid BLEU against top-k")
        ax.legend()
        fig.tight_layout()
        fig.savefig(figures / "fig4a_topk.png", dpi=120)
        plt.close(fig)
        notes["fig4a"] = "first seed, best checkpoint, beam search on the valid split (data.max_eval_samples)"

    novel = _curves(results["analysis"], "novel", 1)
    entropy = _curves(results["analysis"], "entropy", 0)
    if novel:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for objective, (epochs, values) in novel.items():
            ax.plot(epochs, values, "o-", label=row_name(objective))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(xlabel="fine-tuning epoch", ylabel="novel tokens in the learner's top-16",
               title="Fig. 4b: novel tokens per epoch")
        ax.legend()
        fig.tight_layout()
        fig.savefig(figures / "fig4b_novel.png", dpi=120)
        plt.close(fig)
        notes["fig4b"] = f"mean over {seeds} seed(s); epoch 0 = the pre-trained learner"
    if entropy:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for objective, (epochs, values) in entropy.items():
            ax.plot(epochs, values, "o-", label=row_name(objective))
        teacher = results.get("teacher_analysis")
        if teacher:
            ax.axhline(teacher["entropy"], color="gray", linestyle="--", label="teacher")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(xlabel="fine-tuning epoch", ylabel="mean token entropy (nats)",
               title="Fig. 5: learner entropy (teacher-forced)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(figures / "fig5_entropy.png", dpi=120)
        plt.close(fig)
        notes["fig5"] = f"mean over {seeds} seed(s); epoch 0 = the pre-trained learner"
    if _seed_figure(plt, results["table2"], figures / "bleu_seeds.png"):
        notes["seeds"] = f"{results.get('test_split') or 'test'}; a dot per seed, a bar at the mean"
    return notes


def _seed_figure(plt, rows: list[dict], out: Path) -> bool:
    """Test BLEU of every fine-tuned row of Table 2, a dot per seed and a bar at the mean, with the pre-trained
    learner as a dotted line; False (nothing drawn) when no fine-tuning has a score."""
    tuned = [r for r in rows if r["key"] not in ("teacher", "learner") and r["bleu"]]
    if not tuned:
        return False
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(tuned) + 2), 4))
    for i, r in enumerate(tuned):
        ax.plot([i] * len(r["bleu"]), r["bleu"], "o", color="C0", alpha=0.6)
        ax.hlines(r["bleu_mean"], i - 0.3, i + 0.3, color="C1", linewidth=2)
    learner = next((r for r in rows if r["key"] == "learner" and r["bleu"]), None)
    if learner:
        ax.axhline(learner["bleu_mean"], color="gray", linestyle=":", label="pre-trained learner")
        ax.legend()
    ax.set_xticks(range(len(tuned)), [r["name"] for r in tuned], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="test BLEU", title="Test BLEU of every seed")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------------------
def _pm(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _spread_note(rows: dict, a: str, b: str) -> str | None:
    """'KA - KD = +0.40 BLEU: smaller than the seed spread (std 0.55)' or None when a row is missing."""
    if a not in rows or b not in rows or rows[a]["bleu_mean"] is None or rows[b]["bleu_mean"] is None:
        return None
    diff = rows[a]["bleu_mean"] - rows[b]["bleu_mean"]
    stds = [s for s in (rows[a]["bleu_std"], rows[b]["bleu_std"]) if s is not None]
    text = f"{rows[a]['name']} − {rows[b]['name']} = {diff:+.2f} BLEU (mean over seeds)"
    if not stds:
        return text + ": one seed, so no seed spread to compare with"
    spread = max(stds)
    if abs(diff) <= spread:
        return text + f": not larger than the seed spread (std up to {spread:.2f}), not a difference this run shows"
    return text + f": larger than the seed spread (std up to {spread:.2f})"


def render_report(results: dict, notes: dict[str, str], run: Path) -> str:
    opts = results["options"]
    rows = {r["key"]: r for r in results["table2"]}
    lines = [f"# Reproduction report: preset `{results['preset']}`", "",
             f"Overrides: `{' '.join(results['overrides']) or 'none'}`; seeds {opts['seeds']}; "
             f"objectives {opts['objectives']}" + (" + nll control" if opts["control"] else "") + ".", "",
             "## Table 2: test scores", "",
             f"Test split `{results['test_split']}`, {results['test_sentences']} sentences; mean ± sample std over "
             "seeds (fine-tuned rows); teacher and pre-trained learner are one model each.", "",
             "| Model | seeds | BLEU | chrF | per seed BLEU | paper BLEU (De-En / Th-En) |",
             "|---|---|---|---|---|---|"]
    for r in results["table2"]:
        per_seed = ", ".join(f"{b:.2f}" for b in r["bleu"]) if r["key"] not in ("teacher", "learner") else ""
        paper = PAPER_BLEU.get(r["key"])
        lines.append(f"| {r['name']} | {r['n']} | {_pm(r['bleu_mean'], r['bleu_std'])} | "
                     f"{_pm(r['chrf_mean'], r['chrf_std'])} | {per_seed} | "
                     f"{f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else '(not in the paper)'} |")
    sig = results["signatures"]
    lines += ["", "The paper column is the paper's Table 2 (WMT'17 De-En, IWSLT'15 Th-En; other data, models and "
              "sizes than a CPU preset): compare the differences between rows, not the numbers.", "",
              f"- BLEU signature: `{sig.get('bleu_signature')}`", f"- chrF signature: `{sig.get('chrf_signature')}`",
              f"- decoding: `{sig.get('decode_signature')}`", ""]
    if opts.get("prefixes"):
        lines[-1:] = _prefix_notes(results)
    if results.get("smoothing"):
        lines[-1:] = _smoothing_notes(results["smoothing"])
    derived = [(r["key"], r["key"].rpartition("-")[0]) for r in results["table2"] if "-" in r["key"]]
    target = opts.get("smoothing_target", "ka")
    for a, b in (("ka", "kd"), ("half", "kd"), ("ka", "half"), (target, SMOOTHING),
                 *((o, "nll") for o in opts["objectives"]), *derived,
                 *((ka, kd) for kd, ka in variant_pairs(opts["objectives"]))):
        note = _spread_note(rows, a, b)
        if note:
            lines.append(f"- {note}")

    s = results.get("significance")
    if s:
        lines += ["", "## Significance: paired bootstrap resampling", "",
                  f"{s['test']}; {s['sentences']} sentences of `{s['split']}`; signature `{s['signature']}`. "
                  "p is sacreBLEU's paired-bootstrap p-value of the null hypothesis that system and baseline score "
                  "the same (two-sided, on |Δ|; the sign of Δ says which is ahead); one test per seed, each on that "
                  "seed's hypotheses.", "",
                  "| seed | system | baseline | system BLEU | baseline BLEU | Δ BLEU | p |",
                  "|---|---|---|---|---|---|---|"]
        for t in s["tests"]:
            p = "identical output" if t.get("identical") else "-" if t["p_value"] is None else f"{t['p_value']:.4f}"
            lines.append(f"| {t['seed']} | {row_name(t['system'])} | "
                         f"{row_name(t['baseline'])} | {t['system_bleu']:.2f} | "
                         f"{t['baseline_bleu']:.2f} | {t['delta']:+.2f} | {p} |")
    s = results.get("significance_prefixes")
    if s:
        lines += ["", "### Prefix sources against reference prefixes", "",
                  "Each prefix-source run against the same objective with reference prefixes and the same seed "
                  f"(paired bootstrap as above; signature `{s['signature']}`).", "",
                  "| seed | system | baseline | system BLEU | baseline BLEU | Δ BLEU | p |",
                  "|---|---|---|---|---|---|---|"]
        for t in s["tests"]:
            p = "identical output" if t.get("identical") else "-" if t["p_value"] is None else f"{t['p_value']:.4f}"
            lines.append(f"| {t['seed']} | {row_name(t['system'])} | {row_name(t['baseline'])} | "
                         f"{t['system_bleu']:.2f} | {t['baseline_bleu']:.2f} | {t['delta']:+.2f} | {p} |")

    lines += ["", "## Figures", "", f"Fig. 3 (toy, {notes.get('fig3')}):", "", "![Fig. 3](figures/fig3_toy.png)", ""]
    missing = {"fig4a": "sweep=topk not set", "fig4b": "no analyses", "fig5": "no analyses"}  # said when not drawn
    for key, file, title in (("fig4a", "fig4a_topk.png", "Fig. 4a: valid BLEU against top-k"),
                             ("fig4b", "fig4b_novel.png", "Fig. 4b: novel tokens in the learner's top-16"),
                             ("fig5", "fig5_entropy.png", "Fig. 5: learner entropy over fine-tuning epochs"),
                             ("seeds", "bleu_seeds.png", "Test BLEU of every seed")):
        if key in notes:
            lines += [f"{title} ({notes[key]}):", "", f"![{title}](figures/{file})", ""]
        elif key in missing:
            lines += [f"{title}: not run ({missing[key]}).", ""]
    if results["sweep"]:
        lines += ["| objective | " + " | ".join(("k=V (all)" if k == "V" else f"k={k}")
                                                for k in next(iter(results["sweep"].values()))) + " |",
                  "|---|" + "---|" * len(next(iter(results["sweep"].values())))]
        for objective, points in results["sweep"].items():
            lines.append(f"| {ROW_NAMES.get(objective, objective)} | "
                         + " | ".join("-" if v is None else f"{v:.2f}" for v in points.values()) + " |")
        lines.append("")
    lines += _analysis_tables(results)
    lines += _table3(results)
    lines += ["## Wall time per stage", "", "| stage | wall time | sessions | done |", "|---|---|---|---|"]
    total = 0.0
    for name, st in results["stages"].items():
        total += st.get("wall_s", 0.0)
        lines.append(f"| {name} | {_duration(st.get('wall_s', 0.0))} | {st.get('sessions')} | "
                     f"{'yes' if st.get('done') else 'no'} |")
    lines += [f"| total | {_duration(total)} | | |", ""]
    lines += ["## Resolved configs", ""]
    first = f"finetune/{opts['objectives'][0]}/seed{opts['seeds'][0]}"
    for name in ("teacher", "learner", first):
        path = run / name / "config.yaml"
        if path.is_file():
            lines += [f"<details><summary>{name}/config.yaml</summary>", "", "```yaml",
                      path.read_text(encoding="utf-8").rstrip(), "```", "", "</details>", ""]
    lines += ["Other fine-tuning runs differ only in `objective.kind`, `train.seed`, `train.out_dir` "
              "(and no `model.teacher` for the nll control); see each `RUN/finetune/OBJ/seedS/config.yaml`.", ""]
    if any("-" in o or o == SMOOTHING for o in opts["objectives"]):
        lines += ["Variant columns add `objective.tail=true` (OBJ-tail) or `objective.renormalize=true` "
                  "(OBJ-renorm); the smoothing control is the nll control with `objective.label_smoothing` set.", ""]
    if opts.get("prefixes"):
        lines += ["The prefix-source runs `RUN/finetune/OBJ-P/seedS` differ in addition in `objective.prefix` "
                  "(P = learner, mixed) or `data.corpus` (P = teacher: `RUN/seqkd`, with "
                  "`objective.prefix=reference`).",
                  ""]
    return "\n".join(lines)


def _prefix_notes(results: dict) -> list[str]:
    """Lines under Table 2 saying what the prefix-source rows are (only for runs with the option prefixes)."""
    opts = results["options"]
    seeds = opts["seeds"] if opts.get("prefix_seeds") is None else opts["prefix_seeds"]
    lines = ["", f"Prefix sources (rows after the main ones; seeds {seeds}): the same fine-tuning with the divergence "
             "taken on other prefixes than the reference. *learner*: the learner's own samples "
             "(`objective.prefix=learner`); *mixed*: the learner's samples on a fraction of the batches "
             "(`objective.prefix=mixed`); *teacher*: sequence-level KD, the training targets replaced by the "
             "teacher's beam-search translations (`data.corpus=RUN/seqkd`). Validation and test use the reference. "
             "In Fig. 4b / 5 and the analysis tables they are extra curves (same analysis sample, reference "
             "prefixes, teacher-forced)."]
    seqkd = results.get("seqkd")
    if seqkd:
        lines += ["", f"Seq-KD data: {seqkd['lines']} `{seqkd['split']}` pairs translated by the teacher "
                     f"(`{seqkd['decode']['signature']}`), {seqkd['empty_hypotheses']} empty translations; "
                     f"splits copied unchanged: {', '.join(seqkd['copied_splits']) or 'none'}."]
    return [*lines, ""]


def _smoothing_notes(smoothing: dict) -> list[str]:
    """Lines under Table 2 on how the smoothing control's epsilon was chosen (``RUN/smoothing.json``)."""
    target = smoothing["target"]
    tried = ", ".join(f"{t['epsilon']:g} → {t['valid_entropy']:.3f}" for t in smoothing["tried"])
    return ["", f"Smoothing control: nll with label smoothing ε = **{smoothing['chosen']:g}**, chosen on the "
            f"`{smoothing['valid_split']}` split to match the learner entropy of {row_name(target['column'])} (seed "
            f"{target['seed']}: {target['valid_entropy']:.3f} nats). Rule: {smoothing['rule']}. Tried (ε → valid "
            f"entropy, nats): {tried}.", ""]


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _analysis_tables(results: dict) -> list[str]:
    analysis = results["analysis"]
    if not analysis:
        return []
    lines = ["## Sec. 5 analyses (numbers behind Fig. 4b and 5)", "",
             f"On a fixed sample of {results['options']['analysis_sample']} training pairs (teacher-forced); "
             "mean over seeds; epoch 0 = the pre-trained learner."
             + (f" Teacher entropy: {results['teacher_analysis']['entropy']:.3f} nats."
                if results.get("teacher_analysis") else ""), "",
             "| objective | epoch | entropy (nats) | novel top-16 tokens |", "|---|---|---|---|"]
    entropy, novel = _curves(analysis, "entropy", 0), _curves(analysis, "novel", 0)
    for objective, (epochs, values) in entropy.items():
        for e, v in zip(epochs, values, strict=True):
            n = novel.get(objective, ([], []))[1]
            lines.append(f"| {row_name(objective)} | {e} | {v:.3f} | "
                         f"{'-' if e == 0 or e >= len(n) else f'{n[e]:.0f}'} |")
    return [*lines, ""]


def _table3(results: dict) -> list[str]:
    """Top-10 tokens over epochs, KD and KA side by side (first seed), at the middle position of each sentence."""
    analysis = results["analysis"]
    seed = str(results["options"]["seeds"][0])
    if "kd" not in analysis or "ka" not in analysis or seed not in analysis["kd"] or seed not in analysis["ka"]:
        return []
    kd, ka = analysis["kd"][seed], analysis["ka"][seed]
    lines = ["## Table 3: top-10 tokens over epochs (KD and KA, first seed)", "",
             "At the middle target position of the first sample sentences (teacher-forced; `▁` starts a word).", ""]
    epochs = min(len(kd["table"]), len(ka["table"]))
    if not epochs:
        return []
    sentences = sorted({row["sentence"] for row in kd["table"][0]})
    for sentence in sentences:
        positions = [row for row in kd["table"][0] if row["sentence"] == sentence]
        mid = positions[len(positions) // 2]["position"]

        def top(table, s=sentence, m=mid):
            row = next(r for r in table if r["sentence"] == s and r["position"] == m)
            return row, " ".join(f"`{tok}`" for tok, _ in row["top"])

        ref = top(kd["table"][0])[0]["reference"]
        lines += [f"Sentence {sentence}, position {mid} (reference token `{ref}`):", "",
                  "| epoch | KD top-10 | KA top-10 |", "|---|---|---|"]
        for e in range(epochs):
            lines.append(f"| {e} | {top(kd['table'][e])[1]} | {top(ka['table'][e])[1]} |")
        lines.append("")
    return lines


def write_report(run_dir: str | os.PathLike) -> dict:
    """``RUN/results.json``, ``RUN/figures/*.png`` and ``RUN/report.md`` from the run folder; returns the results."""
    run = Path(run_dir)
    results = build_results(run)
    notes = draw_figures(results, run / "figures")
    text = render_report(results, notes, run)
    tmp = run / ".report.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, run / "report.md")
    return results
