"""The terminal summary of a ``reproduce`` run: one row per model of Table 2 (teacher, learner, the nll control, then
each objective) with its test BLEU and chrF, and for each objective the paired-bootstrap difference in BLEU over the
nll control and its p-value (``RUN/significance.json``), then where the report and the models are."""

from __future__ import annotations

from pathlib import Path

from ktransfer.experiments.experiment import Options, model_names

_ORDER = ("teacher", "learner", "nll")  # then the objectives, in the run's order


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def control_tests(results: dict) -> dict[str, list[dict]]:
    """The paired bootstrap tests of each column against the nll control, by column (one per seed)."""
    tests = (results.get("significance") or {}).get("tests", [])
    by_system: dict[str, list[dict]] = {}
    for t in tests:
        if t["baseline"] == "nll":
            by_system.setdefault(t["system"], []).append(t)
    return by_system


def summary_rows(results: dict) -> list[dict]:
    """``{"key", "name", "bleu", "chrf", "seeds", "delta", "p"}`` per row: BLEU and chrF are means over the seeds,
    ``delta`` the mean BLEU difference over the nll control (None for teacher, learner and control), ``p`` the
    bootstrap p-value per seed."""
    rows = {r["key"]: r for r in results["table2"]}
    against = control_tests(results)
    keys = [k for k in _ORDER if k in rows] + [k for k in rows if k not in _ORDER]
    out = []
    for key in keys:
        r, tests = rows[key], against.get(key, [])
        out.append({"key": key, "name": r["name"], "bleu": r["bleu_mean"], "chrf": r["chrf_mean"], "seeds": r["n"],
                    "delta": _mean([t["delta"] for t in tests]), "p": [t["p_value"] for t in tests]})
    return out


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def summary_table(results: dict, run: str | Path) -> str:
    """The summary as text: a table, then the report and model folders of ``run``."""
    rows = summary_rows(results)
    split, n = results.get("test_split"), results.get("test_sentences")
    seeds = Options.saved(results["options"], "results.json").seeds
    title = f"{split} ({n} sentences), BLEU / chrF" + (f", mean of seeds {seeds}" if len(seeds) > 1 else "")
    width = max(len(r["name"]) for r in rows) if rows else 10
    lines = [title, f"{'model':{width}s}  {'BLEU':>6s}  {'chrF':>6s}  {'Δ BLEU vs nll':>13s}  p (paired bootstrap)"]
    for r in rows:
        delta = "" if r["delta"] is None else f"{r['delta']:+.2f}"
        p = ", ".join("-" if v is None else f"{v:.4f}" for v in r["p"])
        lines.append(f"{r['name']:{width}s}  {_cell(r['bleu'], '6.2f')}  {_cell(r['chrf'], '6.2f')}  "
                     f"{delta:>13s}  {p}".rstrip())
    run = Path(run)
    names = model_names(Options.saved(results["options"], "results.json"))
    lines += [f"report: {run / 'report.md'}",
              f"models: {run}/NAME/checkpoints/best for NAME in {', '.join(names)} (Hugging Face folders)"]
    return "\n".join(lines)
