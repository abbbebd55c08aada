"""``reproduce``: the smoke preset end to end (every stage, results, report), stop-and-resume, skipping of done
stages, ``ktransfer report`` rebuilding the same report; the Sec. 5 analyses against direct computations.

One smoke run (tiny models, 200 Multi30k pairs, one thread) is shared by the module's end-to-end tests.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from ktransfer.evaluation.analysis import novel_token_counts, token_entropy
from ktransfer.experiments.reproduce import PRESETS, model_names, parse_overrides, reproduce
from ktransfer.training.config import ConfigError

FAST = ["data.max_train_samples=200", "data.max_eval_samples=20", "data.vocab_size=300", "max_predict_samples=20",
        "analysis_sample=20", "sweep=topk", "topk_values=2", "bootstrap=50"]


@pytest.fixture(scope="module")
def smoke(shared_data, tmp_path_factory):
    """A smoke run stopped after the teacher, then run to completion with the same command minus stop_after."""
    with pytest.MonkeyPatch.context() as mp:  # corpus names resolve under the shared data (module scope)
        mp.setenv("KTRANSFER_DATA", str(shared_data))
        yield _smoke_run(tmp_path_factory.mktemp("smoke"))


def _smoke_run(run: Path) -> dict:
    stopped = reproduce("smoke", run, [*FAST, "stop_after=teacher"])
    stages_then = json.loads((run / "stages.json").read_text())
    teacher_ckpt = run / "teacher/checkpoints/best/model.safetensors"
    teacher_state = (teacher_ckpt.stat().st_mtime_ns, (run / "teacher/train.log").read_text())
    t0 = time.time()
    results = reproduce("smoke", run, FAST)
    return {"run": run, "stopped": stopped, "stages_then": stages_then, "teacher_state": teacher_state,
            "results": results, "seconds": time.time() - t0}


def test_stop_after_then_resume(smoke):
    assert smoke["stopped"] == {"stopped_after": "teacher"}
    assert list(smoke["stages_then"]) == ["bpe", "teacher"]
    run = smoke["run"]
    # the rerun went on from the learner: the teacher was neither retrained nor resumed
    mtime, log = smoke["teacher_state"]
    assert (run / "teacher/checkpoints/best/model.safetensors").stat().st_mtime_ns == mtime
    assert (run / "teacher/train.log").read_text() == log
    assert "teacher: done already, skipped" in (run / "reproduce.log").read_text()


def test_smoke_end_to_end(smoke):
    run, results = smoke["run"], smoke["results"]
    opts, _ = parse_overrides(PRESETS["smoke"], FAST)
    names = model_names(opts)
    assert len(names) == 2 + 4 * len(opts.seeds)  # teacher, learner, (kd, ka, half, nll) x seeds
    for name in names:
        assert (run / name / "checkpoints/best/model.safetensors").is_file(), name  # every model kept
        assert 0 <= results["models"][name]["bleu"] <= 100, name
    saved = json.loads((run / "results.json").read_text())
    assert set(saved["models"]) == set(names) and all(m["bleu"] is not None for m in saved["models"].values())
    assert {r["key"] for r in saved["table2"]} == {"teacher", "learner", "nll", "kd", "ka", "half"}
    assert all(r["n"] == len(opts.seeds) for r in saved["table2"] if r["key"] not in ("teacher", "learner"))
    tests = saved["significance"]["tests"]
    assert len(tests) == len(opts.seeds) * 4  # KA vs KD, and kd, ka, half vs nll, per seed
    assert {(t["baseline"], t["system"]) for t in tests} == {("kd", "ka"), ("nll", "kd"), ("nll", "ka"),
                                                              ("nll", "half")}
    assert set(saved["sweep"]) == {"kd", "ka"} and all(v["2"] is not None for v in saved["sweep"].values())
    for objective in ("kd", "ka", "half", "nll"):
        for seed in map(str, opts.seeds):
            a = saved["analysis"][objective][seed]
            assert a["epochs"] == [0, 1, 2] and len(a["novel"]) == 3 and a["novel"][1] > 0
            assert all(e > 0 for e in a["entropy"])
    report = (run / "report.md").read_text()
    for needle in ("## Table 2", "| KA |", "| KD |", "| 1/2KA+1/2KD |", "| Learner + nll (control) |",
                   "| Teacher |", "paper BLEU (De-En / Th-En)", "| 32.24 / 13.36 |", "BLEU signature",
                   "## Significance", "## Table 3", "## Wall time per stage", "## Resolved configs"):
        assert needle in report, needle
    for figure in ("fig3_toy.png", "fig4a_topk.png", "fig4b_novel.png", "fig5_entropy.png", "bleu_seeds.png"):
        assert (run / "figures" / figure).stat().st_size > 1000, figure
        assert f"figures/{figure}" in report


def test_rerun_skips_completed_stages(smoke):
    run = smoke["run"]
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("**/checkpoints/*/model.safetensors")}
    stages = (run / "stages.json").read_text()
    log_lines = len((run / "reproduce.log").read_text().splitlines())
    report = (run / "report.md").read_text()
    t0 = time.time()
    reproduce("smoke", run, FAST)
    elapsed = time.time() - t0
    assert {p: p.stat().st_mtime_ns for p in run.glob("**/checkpoints/*/model.safetensors")} == stamps
    assert (run / "stages.json").read_text() == stages
    new = (run / "reproduce.log").read_text().splitlines()[log_lines:]
    assert not any("====" in line for line in new)  # no stage started
    assert sum("skipped" in line for line in new) == len(json.loads(stages))
    assert (run / "report.md").read_text() == report
    assert elapsed < smoke["seconds"] / 2


def test_interrupted_stage_resumes_through_train(smoke):
    """A stage killed after its training ended but before it was marked done: rerun, train finds nothing to do."""
    run, name = smoke["run"], "finetune/ka/seed2"
    stages = json.loads((run / "stages.json").read_text())
    stages[name]["done"] = False
    (run / "stages.json").write_text(json.dumps(stages))
    weights = (run / name / "checkpoints/best/model.safetensors").read_bytes()
    reproduce("smoke", run, FAST)
    assert json.loads((run / "stages.json").read_text())[name]["done"]
    assert "nothing to do: the run is complete" in (run / name / "train.log").read_text()
    assert (run / name / "checkpoints/best/model.safetensors").read_bytes() == weights


def test_stage_stopped_by_a_signal_is_not_marked_done(shared_data, tmp_path, monkeypatch):
    """SIGTERM during a training stage: train saves ``last`` and returns; the stage must stay not-done (it was once
    marked done, and the rerun skipped a half-trained teacher), and the same command resumes it."""
    import signal

    import ktransfer.training.loop as loop_module

    monkeypatch.setenv("KTRANSFER_DATA", str(shared_data))

    def stop_after_two_steps(run):  # what the SIGTERM handler leaves behind, at a known step
        if run.state.step >= 2:
            run.stop_signal[:] = [signal.SIGTERM]
            return True
        return False

    with monkeypatch.context() as mp:
        mp.setattr(loop_module, "stop_requested", stop_after_two_steps)
        result = reproduce("smoke", tmp_path, [*FAST, "stop_after=teacher"])
    assert "interrupted" in result and "SIGTERM" in result["interrupted"]
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert stages["bpe"]["done"] and not stages["teacher"]["done"]
    assert not (tmp_path / "teacher/checkpoints/best").exists()
    assert reproduce("smoke", tmp_path, [*FAST, "stop_after=teacher"]) == {"stopped_after": "teacher"}
    assert json.loads((tmp_path / "stages.json").read_text())["teacher"]["done"]
    assert "resuming from" in (tmp_path / "teacher/train.log").read_text()
    assert "interrupted" in (tmp_path / "reproduce.log").read_text()


def test_report_command_rebuilds_the_same_report(smoke):
    from ktransfer.cli import main

    run = smoke["run"]
    before = (run / "report.md").read_text()
    (run / "report.md").unlink()
    for png in (run / "figures").glob("*.png"):
        png.unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == before
    assert len(list((run / "figures").glob("*.png"))) == 5


# ----------------------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------------------
def test_overrides_split_by_stage_and_options():
    opts, by_stage = parse_overrides(PRESETS["smoke"], [
        "train.num_threads=1", "teacher.train.epochs=3", "finetune.objective.top_k=4", "seeds=1,2,3",
        "objectives=kd,ka", "topk_values=2,V", "control=false", "stop_after=learner"])
    assert by_stage["all"] == ["train.num_threads=1"]
    assert by_stage["teacher"] == ["train.epochs=3"] and by_stage["finetune"] == ["objective.top_k=4"]
    assert opts.seeds == [1, 2, 3] and opts.objectives == ["kd", "ka"] and opts.topk_values == [2, None]
    assert opts.control is False and opts.stop_after == "learner"
    for bad in ("nonsense=1", "teacher.nonsense=1", "objectives=nll", "stop_after=lunch", "seeds=1,1", "noequals"):
        with pytest.raises(ConfigError):
            parse_overrides(PRESETS["smoke"], [bad])
    with pytest.raises(ConfigError, match="unknown reproduce preset"):
        reproduce("nope", "/nonexistent", [])


def test_prefix_options():
    opts, _ = parse_overrides(PRESETS["smoke"], ["prefixes=learner,mixed,teacher", "prefix_seeds=2", "sweep=none"])
    assert opts.prefixes == ["learner", "mixed", "teacher"] and opts.prefix_objectives == ["kd", "ka"]
    assert opts.prefix_seeds == [2] and opts.sweep == "none"
    names = model_names(opts)
    assert names[-6:] == [f"finetune/{o}-{p}/seed2" for p in ("learner", "mixed", "teacher") for o in ("kd", "ka")]
    assert parse_overrides(PRESETS["smoke"], [])[0].prefixes == []
    for bad, word in (("prefixes=bogus", "bogus"), ("prefixes=learner,learner", "learner"),
                      ("prefix_objectives=nll", "nll"), ("prefix_seeds=1,1", "1, 1")):
        with pytest.raises(ConfigError, match=word):
            parse_overrides(PRESETS["smoke"], [bad])


def test_cli_lists_presets(capsys):
    from ktransfer.cli import main

    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


# ----------------------------------------------------------------------------------------------------------------
# Analyses against direct computations
# ----------------------------------------------------------------------------------------------------------------
def test_token_entropy_matches_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    total, count = token_entropy(logits, labels)
    direct = []
    for b, t in ((0, 0), (0, 1), (1, 0)):
        p = [math.exp(x) for x in logits[b, t].tolist()]
        p = [x / sum(p) for x in p]
        direct.append(-sum(x * math.log(x) for x in p))
    assert count == 3
    assert total == pytest.approx(sum(direct), rel=1e-5)
    uniform, n = token_entropy(torch.zeros(1, 2, 8), torch.tensor([[0, 0]]))
    assert uniform / n == pytest.approx(math.log(8))


def test_novel_token_counts_match_sets():
    torch.manual_seed(1)
    V, N, k, epochs = 12, 5, 4, 5
    tops = [torch.stack([torch.randperm(V)[:k] for _ in range(N)]) for _ in range(epochs)]  # (N, k) per epoch
    expected, seen = [0], [set(tops[0][i].tolist()) for i in range(N)]
    for top in tops[1:]:
        expected.append(sum(len(set(top[i].tolist()) - seen[i]) for i in range(N)))
        for i in range(N):
            seen[i] |= set(top[i].tolist())
    assert novel_token_counts(tops, V) == expected
    # hand-built: position 0 gains token 9 at epoch 1, then nothing new; position 1 swaps in 7 then back
    a = torch.tensor([[1, 2], [3, 4]])
    b = torch.tensor([[1, 9], [3, 7]])
    c = torch.tensor([[9, 2], [4, 3]])
    assert novel_token_counts([a, b, c], 10) == [0, 2, 0]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_gives_valid_stage_configs(name):
    from ktransfer.experiments.reproduce import stage_config

    preset = PRESETS[name]
    opts, by_stage = parse_overrides(preset, ["train.num_threads=1", "finetune.objective.top_k=4"])
    configs = {kind: stage_config(preset, by_stage, kind, ["train.out_dir=/tmp/unused"])
               for kind in ("teacher", "learner", "finetune", "sweep")}
    assert all(c.train.num_threads == 1 for c in configs.values())
    assert configs["finetune"].objective.top_k == 4 and configs["teacher"].objective.top_k != 4
    assert opts.seeds and preset.doc


# ----------------------------------------------------------------------------------------------------------------
# Prefix sources (option prefixes): extra fine-tuning runs and rows
# ----------------------------------------------------------------------------------------------------------------
def test_prefix_sources_add_stages_rows_and_resume(shared_data, tmp_path):
    """prefixes=learner,teacher: seq-KD data from the teacher, finetune/ka-learner and ka-teacher runs, their test
    scores, significance against ka with reference prefixes, extra Table 2 rows; a second call skips everything."""
    import yaml

    run = tmp_path
    overrides = [*FAST, "sweep=none", "seeds=1", "objectives=ka", "control=false", "prefixes=learner,teacher",
                 "prefix_objectives=ka", "teacher.train.epochs=1", "finetune.train.epochs=1"]
    reproduce("smoke", run, overrides)
    stages = json.loads((run / "stages.json").read_text())
    models = ["teacher", "learner", "finetune/ka/seed1", "finetune/ka-learner/seed1", "finetune/ka-teacher/seed1"]
    assert list(stages) == ["bpe", "teacher", "learner", "analysis0", "finetune/ka/seed1", "seqkd",
                            "finetune/ka-learner/seed1", "finetune/ka-teacher/seed1", *(f"eval/{m}" for m in models),
                            "significance", "significance/prefixes"]
    assert all(s["done"] for s in stages.values())

    # seq-KD corpus: the 200 fine-tuning sources unchanged, the teacher's translations, valid/test copied byte for byte
    original = shared_data / "multi30k-de-en"
    src = (original / "train.de").read_text(encoding="utf-8").splitlines()[:200]
    assert (run / "seqkd/train.de").read_text(encoding="utf-8").splitlines() == [s.strip() for s in src]
    targets = (run / "seqkd/train.en").read_text(encoding="utf-8").splitlines()
    assert len(targets) == 200
    assert targets != [t.strip() for t in (original / "train.en").read_text(encoding="utf-8").splitlines()[:200]]
    for split in ("valid", "test2016"):
        for lang in ("de", "en"):
            assert (run / f"seqkd/{split}.{lang}").read_bytes() == (original / f"{split}.{lang}").read_bytes()

    def config(name):
        return yaml.safe_load((run / name / "config.yaml").read_text())

    learner_ckpt = str(run / "learner/checkpoints/best")
    c = config("finetune/ka-learner/seed1")
    assert c["objective"]["prefix"] == "learner" and c["objective"]["kind"] == "ka"
    assert c["data"]["corpus"] == "multi30k-de-en" and c["model"]["init"] == learner_ckpt
    c = config("finetune/ka-teacher/seed1")
    assert c["data"]["corpus"] == str(run / "seqkd") and c["objective"]["prefix"] == "reference"
    assert c["model"]["teacher"] == str(run / "teacher/checkpoints/best") and c["train"]["seed"] == 1

    results = json.loads((run / "results.json").read_text())
    rows = {r["key"]: r for r in results["table2"]}
    assert [r["key"] for r in results["table2"]] == ["learner", "teacher", "ka", "ka-learner", "ka-teacher"]
    for key in ("ka-learner", "ka-teacher"):
        score = json.loads(next((run / "eval/finetune" / key / "seed1").glob("scores.*.json")).read_text())
        assert rows[key]["n"] == 1 and rows[key]["bleu"] == [score["bleu"]]
        assert results["analysis"][key]["1"]["epochs"] == [0, 1]
    tests = json.loads((run / "significance-prefixes.json").read_text())["tests"]
    assert [(t["seed"], t["baseline"], t["system"]) for t in tests] == [(1, "ka", "ka-learner"),
                                                                         (1, "ka", "ka-teacher")]
    assert tests[1]["system_bleu"] == pytest.approx(rows["ka-teacher"]["bleu"][0])
    report = (run / "report.md").read_text()
    for needle in ("| KA, learner prefixes | 1 |", "| KA, teacher prefixes (seq-KD) | 1 |",
                   "### Prefix sources against reference prefixes", "Seq-KD data: 200 `train` pairs"):
        assert needle in report, needle

    log_lines = len((run / "reproduce.log").read_text().splitlines())
    before = (run / "stages.json").read_text()
    reproduce("smoke", run, overrides)
    new = (run / "reproduce.log").read_text().splitlines()[log_lines:]
    assert not any("====" in line for line in new) and sum("skipped" in line for line in new) == len(stages)
    assert (run / "stages.json").read_text() == before and (run / "report.md").read_text() == report

    # one more prefix source later: its run is trained and scored, and the significance stage that compares prefix
    # sources is redone for the new set of runs (the main one, whose runs did not change, is not)
    more = [o if not o.startswith("prefixes=") else "prefixes=learner,mixed,teacher" for o in overrides]
    log_lines = len((run / "reproduce.log").read_text().splitlines())
    reproduce("smoke", run, more)
    new = (run / "reproduce.log").read_text().splitlines()[log_lines:]
    started = [line.split("==== ", 1)[1].split(" ====")[0] for line in new if "==== " in line]
    assert any("finetune/ka-mixed/seed1" in s for s in started) and any("significance/prefixes" in s for s in started)
    assert not any(s.endswith(" significance") for s in started)
    tests = json.loads((run / "significance-prefixes.json").read_text())["tests"]
    assert [(t["seed"], t["baseline"], t["system"]) for t in tests] == [
        (1, "ka", "ka-learner"), (1, "ka", "ka-mixed"), (1, "ka", "ka-teacher")]


# ----------------------------------------------------------------------------------------------------------------
# Columns beyond the objectives: OBJ-tail, OBJ-renorm and the smoothing control
# ----------------------------------------------------------------------------------------------------------------
def test_significance_pairs_of_the_why_columns():
    """The issue #17 run: KA vs KD, the smoothing target vs smooth, each variant vs its objective, KA+tail vs KD+tail
    (both proper divergences), every column vs nll; the same pairs for every seed."""
    from ktransfer.experiments.experiment import Options
    from ktransfer.experiments.steps import significance_tests

    opts = Options(seeds=[1, 2], objectives=["kd", "ka", "kd-tail", "ka-tail", "ka-renorm", "smooth"])
    tests = significance_tests(opts)
    pairs = [(b, s) for seed, b, s in tests if seed == 1]
    assert pairs == [("kd", "ka"), ("smooth", "ka"), ("kd", "kd-tail"), ("ka", "ka-tail"), ("ka", "ka-renorm"),
                     ("kd-tail", "ka-tail"), *(("nll", o) for o in opts.objectives)]
    assert [(b, s) for seed, b, s in tests if seed == 2] == pairs and len(tests) == 2 * len(pairs)
    assert ("kd-renorm", "ka-renorm") not in pairs  # only where both columns run


def _valid_entropy_float64(checkpoint: Path, pairs) -> float:
    """Mean token entropy of a checkpoint on ``pairs``, teacher-forced, from its logits in float64."""
    from ktransfer.models.family import family_of, load_model

    model, tokenizer = load_model(checkpoint)
    family = family_of(model)
    src, tgt = family.encode(pairs, tokenizer, 128, model=model, log=lambda _: None)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(src), 16):
            batch = family.collate(src[start:start + 16], tgt[start:start + 16], model, tokenizer)
            inputs, labels = family.model_inputs(batch)
            logp = torch.log_softmax(model(**inputs).logits[..., :tokenizer.vocab_size].double(), dim=-1)
            h = -(logp.exp() * logp).sum(-1)
            total, count = total + float(h[labels != -100].sum()), count + int((labels != -100).sum())
    return total / count


def test_variant_and_smoothing_columns(shared_data, tmp_path):
    """objectives=ka,ka-tail,ka-renorm,smooth: the variants train with objective.tail / renormalize, the smoothing
    control's epsilon is calibrated on the valid split to KA's entropy (grid, one interpolated point, the closest
    chosen), every column is scored, tested against its baseline and reported; a second call skips everything."""
    import yaml

    from ktransfer.data.corpora import read_split

    run = tmp_path
    overrides = [*FAST, "sweep=none", "seeds=1", "objectives=ka,ka-tail,ka-renorm,smooth", "control=false",
                 "teacher.train.epochs=1", "finetune.train.epochs=1", "smoothing_grid=0.05,0.4"]
    reproduce("smoke", run, overrides)
    stages = list(json.loads((run / "stages.json").read_text()))
    calibration = [s for s in stages if s.startswith("smoothing")]
    assert stages.index("finetune/ka/seed1") < stages.index("smoothing/target") < stages.index("finetune/smooth/seed1")
    assert calibration[:3] == ["smoothing/target", "smoothing/eps0.05", "smoothing/eps0.4"]

    def config(name):
        return yaml.safe_load((run / name / "config.yaml").read_text())["objective"]

    assert config("finetune/ka-tail/seed1")["tail"] is True and config("finetune/ka-tail/seed1")["top_k"] == 8
    assert config("finetune/ka-renorm/seed1")["renormalize"] is True and not config("finetune/ka/seed1")["tail"]
    smoothing = json.loads((run / "smoothing.json").read_text())
    smooth = config("finetune/smooth/seed1")
    assert smooth["kind"] == "nll" and smooth["label_smoothing"] == pytest.approx(smoothing["chosen"])
    assert yaml.safe_load((run / "finetune/smooth/seed1/config.yaml").read_text())["model"]["teacher"] is None

    # the entropies are those of the models' final weights on the whole valid split (float64 recomputation)
    valid = read_split(shared_data / "multi30k-de-en", "valid", "de", "en")
    target = smoothing["target"]["valid_entropy"]
    assert target == pytest.approx(_valid_entropy_float64(run / "finetune/ka/seed1/checkpoints/last", valid),
                                   rel=1e-4)
    tried = {t["epsilon"]: t["valid_entropy"] for t in smoothing["tried"]}
    assert tried[0.4] == pytest.approx(_valid_entropy_float64(run / "smoothing/eps0.4/checkpoints/last", valid),
                                       rel=1e-4)
    assert tried[0.4] > tried[0.05]  # label smoothing flattens the learner
    if tried[0.05] <= target <= tried[0.4]:  # bracketed: one interpolated epsilon between them was tried
        assert smoothing["refined"] is not None and 0.05 < smoothing["refined"] < 0.4
        assert calibration[3] == f"smoothing/eps{smoothing['refined']:g}"
    assert smoothing["chosen"] == min(tried, key=lambda e: abs(tried[e] - target))

    tests = json.loads((run / "significance.json").read_text())["tests"]
    assert [(t["baseline"], t["system"]) for t in tests] == [("smooth", "ka"), ("ka", "ka-tail"), ("ka", "ka-renorm")]
    report = (run / "report.md").read_text()
    for needle in ("| KA + tail | 1 |", "| KA renormalised | 1 |", "| Learner + label smoothing (control) | 1 |",
                   f"label smoothing ε = **{smoothing['chosen']:g}**", "| 1 | KA + tail | KA |"):
        assert needle in report, needle
    results = json.loads((run / "results.json").read_text())
    assert set(results["analysis"]) == {"ka", "ka-tail", "ka-renorm", "smooth"}

    before = (run / "stages.json").read_text()
    log_lines = len((run / "reproduce.log").read_text().splitlines())
    reproduce("smoke", run, overrides)
    new = (run / "reproduce.log").read_text().splitlines()[log_lines:]
    assert not any("====" in line for line in new) and (run / "stages.json").read_text() == before

    from ktransfer.cli import main  # the report, smoothing notes included, is rebuilt from the run folder alone

    (run / "report.md").unlink()
    (run / "results.json").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == report


def test_column_options_are_checked():
    opts, _ = parse_overrides(PRESETS["smoke"], ["objectives=kd,ka,kd-tail,ka-renorm,smooth", "smoothing_grid=0.1,0.3"])
    assert opts.smoothing_grid == [0.1, 0.3] and opts.smoothing_target == "ka"
    assert "finetune/kd-tail/seed1" in model_names(opts) and "finetune/smooth/seed2" in model_names(opts)
    for bad, word in (("objectives=ka-bogus", "ka-bogus"), ("objectives=nll-tail", "nll-tail"),
                      ("objectives=kd,smooth", "smoothing_target"), ("objectives=ka,ka", "repeated"),
                      ("smoothing_grid=0,0.1", "smoothing_grid")):
        with pytest.raises(ConfigError, match=word):
            parse_overrides(PRESETS["smoke"], [bad])


# ----------------------------------------------------------------------------------------------------------------
# The first command: `ktransfer reproduce quick`, tiny
# ----------------------------------------------------------------------------------------------------------------
QUICK_TINY = ["model.preset=tiny", "data.max_train_samples=300", "data.max_eval_samples=30", "data.vocab_size=400",
              "data.max_tokens=400", "train.epochs=1", "train.num_threads=1", "train.save_every=0", "eval.beam=2",
              "eval.max_length=24", "max_predict_samples=40", "analysis_sample=20", "bootstrap=100"]


def test_quick_prints_the_table_and_resumes(shared_data, tmp_path, capsys):
    """The README's first command at tiny sizes: stopped after the teacher, then run on with the same command; the
    table it prints holds teacher, learner, nll, KD and KA with the scores and bootstrap tests the run wrote, and
    where the report and models are; a rerun trains nothing and prints the same table."""
    from ktransfer.cli import main

    run = tmp_path / "quick"
    assert main(["reproduce", "quick", "--out", str(run), *QUICK_TINY, "stop_after=teacher"]) == 0
    teacher_weights = (run / "teacher/checkpoints/best/model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["reproduce", "quick", "--out", str(run), *QUICK_TINY]) == 0
    table = capsys.readouterr().out
    assert (run / "teacher/checkpoints/best/model.safetensors").stat().st_mtime_ns == teacher_weights
    stages = json.loads((run / "stages.json").read_text())
    models = ["teacher", "learner", "finetune/nll/seed1", "finetune/kd/seed1", "finetune/ka/seed1"]
    assert all(stages[f"eval/{m}"]["done"] for m in models) and "significance" in stages
    assert not any(name.startswith("sweep/") for name in stages)  # quick has no top-k sweep

    rows = {}
    for line in table.splitlines():
        for name in ("Teacher", "Learner (pre-trained)", "Learner + nll (control)", "KD", "KA"):
            if line.startswith(name + "  "):
                rows[name] = line[len(name):].split()
    assert list(rows) == ["Teacher", "Learner (pre-trained)", "Learner + nll (control)", "KD", "KA"], table
    tests = {t["system"]: t for t in json.loads((run / "significance.json").read_text())["tests"]
             if t["baseline"] == "nll"}
    for name, model in zip(rows, models, strict=True):
        scores = json.loads(next((run / "eval" / model).glob("scores.test2016.json")).read_text())
        assert scores["sentences"] == 40
        assert rows[name][:2] == [f"{scores['bleu']:.2f}", f"{scores['chrf']:.2f}"], (name, rows[name])
    for name, key in (("KD", "kd"), ("KA", "ka")):
        t = tests[key]
        p = "-" if t["p_value"] is None else f"{t['p_value']:.4f}"
        assert rows[name][2:] == [f"{t['delta']:+.2f}", p], (name, rows[name], t)
    assert len(rows["Teacher"]) == 2 and len(rows["Learner + nll (control)"]) == 2  # no Δ, no p
    assert f"report: {run / 'report.md'}" in table and (run / "report.md").is_file()
    assert f"models: {run}/NAME/checkpoints/best" in table
    assert all((run / m / "checkpoints/best/config.json").is_file() for m in models)

    log_lines = len((run / "reproduce.log").read_text().splitlines())
    assert main(["reproduce", "quick", "--out", str(run), *QUICK_TINY]) == 0
    assert capsys.readouterr().out == table
    new = (run / "reproduce.log").read_text().splitlines()[log_lines:]
    assert not any("====" in line for line in new)
