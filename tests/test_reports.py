"""reports/: leaderboard, paired comparisons and plots from records written by real tiny runs (tests/report_study.py:
one session-scoped study of 12 tiny runs and 2 base-model evaluations). Every number checked here comes from those runs; a test that
needs a broken or relabelled record derives it from a real one."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from report_study import build_study  # noqa: E402  (tests/ is on sys.path under pytest)

from reports import build_report  # noqa: E402
from reports import cli as report_cli  # noqa: E402
from reports.leaderboard import build_rows  # noqa: E402
from reports.plots import partition_alpha, rank_cv, round_losses  # noqa: E402
from reports.records import load_records  # noqa: E402
from reports.stats import MDD_FACTOR  # noqa: E402

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
PLOTS = ("score_vs_rank_heterogeneity", "score_vs_data_heterogeneity", "noise_vs_round", "score_vs_communication",
         "paired_vs_rank_heterogeneity")


@pytest.fixture(scope="session")
def study(tmp_path_factory, shared_data) -> Path:
    """The study's results folder. REPORT_STUDY=<dir> reuses one built by `python -m tests.report_study <dir>`
    (when working on reports/ alone)."""
    import os

    if os.environ.get("REPORT_STUDY"):
        return Path(os.environ["REPORT_STUDY"]) / "results"
    return build_study(tmp_path_factory.mktemp("study"), shared_data)


@pytest.fixture(scope="session")
def built(study, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("built") / "out"
    return out, build_report([str(study)], str(out), plots=True)


def _records(study: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(study.glob("*.json"))}


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _row(rows: list[dict], **want) -> dict:
    hits = [r for r in rows if all(r[k] == v for k, v in want.items())]
    assert len(hits) == 1, (want, hits)
    return hits[0]


def _copy(study: Path, dest: Path, names=None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in study.glob("*.json"):
        if names is None or p.stem in names:
            shutil.copy(p, dest / p.name)
    return dest


def _token_mean(entry: dict) -> float:
    return sum(entry["loss_sums"]) / sum(entry["tokens"])


# ------------------------------------------------------------------------------------------- leaderboard

def test_leaderboard_rows_and_reference_rows(study, built):
    out, s = built
    assert s["skipped"] == [] and s["records"] == 16
    rows = _csv(out / "leaderboard.csv")
    # fedit/flexlora × {4,4,4; 4,2,2}, fedit iid, fedit bf16, centralized, local-only, base
    assert len(rows) == s["rows"] == 9
    refs = {r["method"] for r in rows if r["reference"] == "True"}
    assert refs == {"base", "centralized", "local-only"}
    assert {r["method"] for r in rows if r["reference"] == "False"} == {"fedit", "flexlora"}
    hetero = _row(rows, method="fedit", ranks="4,2,2", partition="dirichlet(alpha=1)", eval_dtype="float32")
    assert hetero["n_seeds"] == "2" and hetero["seeds"] == "0;1" and hetero["test_loss_ci_basis"] == "seeds+examples"
    # piqa has two choices per document: the chance level comes from the per-sample files
    assert float(hetero["piqa_chance"]) == 0.5
    md = (out / "LEADERBOARD.md").read_text()
    assert "piqa (acc; chance 0.50)" in md
    assert "| centralized (reference) |" in md and "| local-only (reference) |" in md and "| base (reference) |" in md
    # within a setting, reference rows come first
    table = md.split("## Leaderboard")[1]
    lines = [ln for ln in table.splitlines() if "| 4,2,2 |" in ln and "dirichlet" in ln and "bfloat16" not in ln]
    names = [ln.split("|")[1].strip() for ln in lines]
    assert set(names[:2]) == {"centralized (reference)", "local-only (reference)"} and "(reference)" not in names[-1]


def test_point_estimates_are_the_records(study, built):
    """Each row's mean is the mean over seeds of what the records hold."""
    out, _ = built
    recs = _records(study)
    rows = _csv(out / "leaderboard.csv")
    fedit = [recs[f"fedit-r4-2-2-s{s}"] for s in (0, 1)]
    row = _row(rows, method="fedit", ranks="4,2,2", partition="dirichlet(alpha=1)", eval_dtype="float32")
    assert float(row["test_loss"]) == pytest.approx(np.mean([r["test"]["loss"] for r in fedit]), rel=1e-5)
    assert float(row["piqa"]) == pytest.approx(np.mean([r["eval"]["tasks"]["piqa"]["value"] for r in fedit]))
    client = np.mean([np.mean([_token_mean(c) for c in r["test"]["per_client"]]) for r in fedit])
    assert float(row["client_loss"]) == pytest.approx(client, rel=1e-5)
    # fedit keeps no personal state: each client's model is the global one
    assert row["personal_loss"] == row["client_loss"]
    local = _row(rows, method="local-only")
    lo = [recs[f"local-only-r4-2-2-s{s}"] for s in (0, 1)]
    own = [np.mean([_token_mean(c) for c in r["personalized"]["per_client"]]) for r in lo]
    assert float(local["personal_loss"]) == pytest.approx(np.mean(own), rel=1e-5)
    # local-only's pooled row is the mean over clients of each client's own model (the engine's definition)
    assert float(local["test_loss"]) == pytest.approx(np.mean([r["test"]["loss"] for r in lo]), rel=1e-5)
    for r in rows:
        for m in ("test_loss", "piqa", "personal_loss"):
            if r[m] and r[f"{m}_ci_low"]:
                assert float(r[f"{m}_ci_low"]) <= float(r[m]) <= float(r[f"{m}_ci_high"])


def test_eval_dtypes_never_pool(study, built):
    out, s = built
    rows = _csv(out / "leaderboard.csv")
    bf16 = _row(rows, method="fedit", ranks="4,2,2", partition="dirichlet(alpha=1)", eval_dtype="bfloat16")
    fp32 = _row(rows, method="fedit", ranks="4,2,2", partition="dirichlet(alpha=1)", eval_dtype="float32")
    assert (bf16["n_seeds"], fp32["n_seeds"]) == ("1", "2")
    paired = _csv(out / "paired.csv")
    # the bf16 row has no bf16 baseline, and the float32-scored base model never joins its context
    assert not [p for p in paired if p["eval_dtype"] == "bfloat16"]
    assert "Eval dtype" in (out / "LEADERBOARD.md").read_text()


def _unscored(rec: dict) -> dict:
    """The record as a run without an eval step writes it: held-out losses only."""
    rec = json.loads(json.dumps(rec))
    rec["eval"] = None
    rec["dtypes"]["eval"] = None
    return rec


def test_seeds_without_task_scores_join_the_scored_row(study, tmp_path):
    """A study scores a few seeds on tasks and every seed on held-out loss: the unscored seeds join the row of the
    scored ones (one eval dtype there), the task column averages the scored seeds only; where the scored records
    of that setting used two eval dtypes, an unscored one stays a row of its own."""
    res = _copy(study, tmp_path / "res")
    recs = _records(study)
    for name in ("fedit-r4-4-4-s1", "fedit-r4-2-2-s1"):
        (res / f"{name}.json").write_text(json.dumps(_unscored(recs[name])))
    build_report([str(res)], str(tmp_path / "out"))
    rows = _csv(tmp_path / "out" / "leaderboard.csv")
    row = _row(rows, method="fedit", ranks="4,4,4", eval_dtype="float32")
    both = [recs[f"fedit-r4-4-4-s{s}"] for s in (0, 1)]
    assert row["n_seeds"] == "2" and row["piqa_n"] == "1"
    assert float(row["test_loss"]) == pytest.approx(np.mean([r["test"]["loss"] for r in both]), rel=1e-5)
    assert float(row["piqa"]) == pytest.approx(recs["fedit-r4-4-4-s0"]["eval"]["tasks"]["piqa"]["value"])
    # 4,2,2 / Dirichlet 1 was scored in float32 and in bfloat16: the unscored seed 1 cannot say which row it is
    apart = _row(rows, method="fedit", ranks="4,2,2", partition="dirichlet(alpha=1)", eval_dtype="")
    assert apart["n_seeds"] == "1" and apart["piqa"] == ""
    # the same seed scored and unscored (a record evaluated later, its old copy left beside it): the scored one wins
    (res / "fedit-r4-4-4-s0-old.json").write_text(json.dumps(_unscored(recs["fedit-r4-4-4-s0"])))
    s = build_report([str(res)], str(tmp_path / "out2"))
    row = _row(_csv(tmp_path / "out2" / "leaderboard.csv"), method="fedit", ranks="4,4,4", eval_dtype="float32")
    assert row["n_seeds"] == "2" and row["piqa_n"] == "1"
    assert [x["reason"][:12] for x in s["skipped"] if x["file"].endswith("fedit-r4-4-4-s0-old.json")] == ["duplicate of"]
    # nothing of a setting scored, one eval dtype in the whole report (no bfloat16 record): it takes that one
    res3 = _copy(study, tmp_path / "res3", names=[n for n in recs if not n.endswith("-bf16")])
    for seed in (0, 1):
        (res3 / f"fedit-r4-4-4-s{seed}.json").write_text(json.dumps(_unscored(recs[f"fedit-r4-4-4-s{seed}"])))
    build_report([str(res3)], str(tmp_path / "out3"))
    rows = _csv(tmp_path / "out3" / "leaderboard.csv")
    assert {r["eval_dtype"] for r in rows} == {"float32"}
    assert _row(rows, method="fedit", ranks="4,4,4")["piqa"] == ""


# ------------------------------------------------------------------------------------------- paired comparisons

def test_paired_differences_are_paired_by_seed_and_example(study, built):
    out, s = built
    recs = _records(study)
    paired = _csv(out / "paired.csv")
    assert s["baseline"] == "fedit" and s["metric"] == "test_loss" and s["comparisons"] > 0
    p = _row(paired, method="flexlora", baseline="fedit", metric="test_loss", ranks="4,2,2",
             partition="dirichlet(alpha=1)")
    direct = np.mean([recs[f"flexlora-r4-2-2-s{s}"]["test"]["loss"] - recs[f"fedit-r4-2-2-s{s}"]["test"]["loss"]
                      for s in (0, 1)])
    assert float(p["diff"]) == pytest.approx(direct, rel=1e-4, abs=1e-9)
    assert p["n_seeds"] == "2" and p["seeds"] == "0;1"
    assert float(p["examples_per_seed"]) == len(recs["fedit-r4-2-2-s0"]["test"]["loss_sums"])
    lo, hi, se = float(p["ci_low"]), float(p["ci_high"]), float(p["se"])
    assert lo <= float(p["diff"]) <= hi and se > 0
    assert float(p["mdd"]) == pytest.approx(MDD_FACTOR * se, rel=1e-4) and MDD_FACTOR == pytest.approx(2.8016, abs=1e-4)
    for q in paired:
        if q["ci_low"]:
            assert (q["significant"] == "True") == (float(q["ci_low"]) > 0 or float(q["ci_high"]) < 0)
    # pairing by example: the same held-out examples are hard for both models, so the paired interval is far
    # narrower than the two rows' own intervals combined as if independent
    rows = _csv(out / "leaderboard.csv")
    half = [(float(r["test_loss_ci_high"]) - float(r["test_loss_ci_low"])) / 2 for r in
            (_row(rows, method=m, ranks="4,2,2", partition="dirichlet(alpha=1)", eval_dtype="float32")
             for m in ("fedit", "flexlora"))]
    assert (hi - lo) / 2 < 0.5 * math.hypot(*half)


def test_sampled_rank_distribution_pools_its_seeds_draws(study, tmp_path):
    """Under a sampled rank distribution each seed draws its own ranks (the same for every method at the seed): the
    row is the distribution with all its seeds, paired by seed. Seed 0 here drew 4,4,4 and seed 1 drew 4,2,2."""
    recs = _records(study)
    res = tmp_path / "res"
    res.mkdir()
    drawn = {0: "4-4-4", 1: "4-2-2"}
    for m in ("fedit", "flexlora"):
        for seed, ranks in drawn.items():
            rec = recs[f"{m}-r{ranks}-s{seed}"]
            rec["setting"]["rank_distribution"] = "uniform"
            (res / f"{m}-uniform-s{seed}.json").write_text(json.dumps(rec))
    out = tmp_path / "out"
    build_report([str(res)], str(out), plots=True)
    rows = _csv(out / "leaderboard.csv")
    for m in ("fedit", "flexlora"):
        row = _row(rows, method=m, rank_distribution="uniform")
        assert row["ranks"] == "" and row["n_seeds"] == "2" and row["seeds"] == "0;1"
    p = _row(_csv(out / "paired.csv"), method="flexlora", metric="test_loss", rank_distribution="uniform")
    direct = np.mean([recs[f"flexlora-r{r}-s{s}"]["test"]["loss"] - recs[f"fedit-r{r}-s{s}"]["test"]["loss"]
                      for s, r in drawn.items()])
    assert float(p["diff"]) == pytest.approx(direct, rel=1e-4, abs=1e-9) and p["n_seeds"] == "2"


def test_paired_table_is_at_the_top_with_the_mdd(built):
    out, s = built
    md = (out / "LEADERBOARD.md").read_text()
    top, board = md.split("## Leaderboard")
    assert "## Which method, and by how much: paired differences against fedit" in top
    assert "Minimum detectable difference on Test loss" in top and "80% power" in top
    assert "| Partition | Ranks | Method | Seeds | Δ Test loss [95% CI] | MDD |" in top
    paired = _csv(out / "paired.csv")
    shown = [p for p in paired if p["metric"] in ("test_loss", "client_loss", "personal_loss", "avg")]
    assert ("★" in top) == any(p["significant"] == "True" for p in shown)
    # every non-baseline row of a fedit setting is compared, references included (base on the task it has)
    compared = {(p["method"], p["ranks"], p["partition"]) for p in paired}
    assert ("base", "4,2,2", "dirichlet(alpha=1)") in compared and ("local-only", "4,2,2", "dirichlet(alpha=1)") in compared
    assert {p["metric"] for p in paired if p["method"] == "base"} == {"piqa", "avg"}
    html = (out / "leaderboard.html").read_text()
    assert html.index('<table id="paired"') < html.index('<table id="leaderboard"')


def test_baseline_option_reverses_the_comparison(study, built, tmp_path):
    out, _ = built
    s = build_report([str(study)], str(tmp_path / "o"), baseline="flexlora")
    assert s["baseline"] == "flexlora"
    rev = _csv(tmp_path / "o" / "paired.csv")
    assert {p["baseline"] for p in rev} == {"flexlora"}
    fwd = _row(_csv(out / "paired.csv"), method="flexlora", metric="test_loss", ranks="4,4,4")
    back = _row(rev, method="fedit", metric="test_loss", ranks="4,4,4")
    assert float(back["diff"]) == pytest.approx(-float(fwd["diff"]), rel=1e-4, abs=1e-9)
    assert "paired differences against flexlora" in (tmp_path / "o" / "LEADERBOARD.md").read_text()


@pytest.mark.parametrize("flag,value,field,offered", [("--baseline", "fedprox", "baseline", "flexlora"),
                                                       ("--metric", "mmlu", "metric", "test_loss")])
def test_bad_option_is_one_error_line(study, tmp_path, capsys, flag, value, field, offered):
    import argparse

    parser = argparse.ArgumentParser()
    report_cli.add_arguments(parser)
    out = tmp_path / "o"
    assert report_cli.main(parser.parse_args(["--results", str(study), "--out", str(out), flag, value])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}: ") and value in err[0] and flag in err[0]
    assert offered in err[0]  # names what there is
    assert not out.exists()


def test_default_baseline_absent_is_a_note_not_an_error(study, tmp_path):
    res = _copy(study, tmp_path / "res", {"flexlora-r4-2-2-s0", "flexlora-r4-2-2-s1"})
    s = build_report([str(res)], str(tmp_path / "o"))
    assert s["comparisons"] == 0 and s["baseline"] is None
    assert "no rows for the default baseline 'fedit'" in (tmp_path / "o" / "LEADERBOARD.md").read_text()
    assert _csv(tmp_path / "o" / "paired.csv") == []


def test_held_out_sets_that_differ_are_not_paired(study, tmp_path):
    """A record whose held-out examples differ (here: one example fewer) pairs on nothing, and a note says so."""
    res = _copy(study, tmp_path / "res", {"fedit-r4-2-2-s0", "flexlora-r4-2-2-s0"})
    p = res / "flexlora-r4-2-2-s0.json"
    rec = json.loads(p.read_text())
    rec["test"]["loss_sums"], rec["test"]["tokens"] = rec["test"]["loss_sums"][:-1], rec["test"]["tokens"][:-1]
    p.write_text(json.dumps(rec))
    s = build_report([str(res)], str(tmp_path / "o"))
    metrics = {q["metric"] for q in _csv(tmp_path / "o" / "paired.csv")}
    assert "test_loss" not in metrics and "piqa" in metrics
    assert any("Test loss: not paired at seed(s) 0" in n for n in s["notes"])


# ------------------------------------------------------------------------------------------- records

def _as_v1(rec: dict) -> dict:
    """The shape schema 1 had: settings as strings, no per-example losses."""
    old = {k: v for k, v in rec.items() if k not in ("test", "method_info", "dtypes", "engine")}
    old["schema_version"] = 1
    old["setting"] = dict(rec["setting"], ranks=f"hetero[{','.join(map(str, rec['setting']['ranks']))}]",
                          partition="dirichlet(alpha=1.0)")
    return old


def test_old_partial_and_broken_records_are_skipped_and_named(study, tmp_path):
    res = _copy(study, tmp_path / "res", {"fedit-r4-2-2-s0", "flexlora-r4-2-2-s0"})
    rec = json.loads((res / "fedit-r4-2-2-s0.json").read_text())
    (res / "v1.json").write_text(json.dumps(_as_v1(rec)))
    (res / "malformed.json").write_text(json.dumps(rec)[:200])
    (res / "future.json").write_text(json.dumps(dict(rec, schema_version=99)))
    (res / "partial.json").write_text(json.dumps(dict(rec, rounds=rec["rounds"][:1], seed=5)))
    (res / "nocomm.json").write_text(json.dumps({k: v for k, v in rec.items() if k != "communication"}))
    (res / "ragged.json").write_text(json.dumps(dict(rec, seed=6, test=dict(rec["test"], tokens=rec["test"]["tokens"][:-1]))))
    (res / "rerun.json").write_text(json.dumps(dict(rec, run_id=rec["run_id"] + "-rerun")))
    s = build_report([str(res)], str(tmp_path / "o"))
    reasons = {Path(x["file"]).name: x["reason"] for x in s["skipped"]}
    assert set(reasons) == {"v1.json", "malformed.json", "future.json", "partial.json", "nocomm.json", "ragged.json",
                            "fedit-r4-2-2-s0.json"}
    assert "schema_version 1" in reasons["v1.json"] and "re-run it with the current code" in reasons["v1.json"]
    assert "not valid JSON" in reasons["malformed.json"]
    assert "schema_version 99" in reasons["future.json"]
    assert "1 of 2 rounds" in reasons["partial.json"]
    assert "communication" in reasons["nocomm.json"]
    assert "test.loss_sums" in reasons["ragged.json"] and "same length" in reasons["ragged.json"]
    assert "duplicate of rerun.json" in reasons["fedit-r4-2-2-s0.json"]
    assert s["records"] == 2
    md = (tmp_path / "o" / "LEADERBOARD.md").read_text()
    assert "`v1.json`" in md and "## Skipped records" in md


def test_reference_and_run_records_load_with_structured_settings(study):
    records, skipped = load_records([str(study)])
    assert skipped == []
    rows = build_rows(records, [])
    base = [r for r in rows if r.kind == "reference"]
    assert len(base) == 1 and base[0].setting["ranks"] is None and base[0].reference
    runs = [r for r in rows if r.method == "fedit" and r.setting["ranks"] == [4, 2, 2]]
    assert sorted(json.dumps(r.setting["partition"], sort_keys=True) for r in runs) == [
        '{"alpha": 1.0, "kind": "dirichlet"}', '{"alpha": 1.0, "kind": "dirichlet"}', '{"kind": "iid"}']
    assert sorted(partition_alpha(r.setting["partition"]) for r in runs) == [1.0, 1.0, math.inf]
    assert rank_cv(runs[0].setting["ranks"]) > rank_cv([4, 4, 4]) == 0
    assert partition_alpha({"kind": "shards", "per_client": 2}) is None


def test_per_sample_files_found_beside_committed_records(study, tmp_path):
    """A record moved off the machine that made it finds its samples under <results>/samples/<run_id>/."""
    res = _copy(study, tmp_path / "res", {"fedit-r4-2-2-s0"})
    rec = json.loads((res / "fedit-r4-2-2-s0.json").read_text())
    src = Path(rec["eval"]["tasks"]["piqa"]["samples"])
    (res / "samples" / rec["run_id"]).mkdir(parents=True)
    shutil.copy(src, res / "samples" / rec["run_id"] / src.name)
    rec["eval"]["tasks"]["piqa"]["samples"] = str(tmp_path / "gone" / src.name)
    (res / "fedit-r4-2-2-s0.json").write_text(json.dumps(rec))
    s = build_report([str(res)], str(tmp_path / "o"))
    assert _csv(tmp_path / "o" / "leaderboard.csv")[0]["piqa_ci_basis"] == "examples"
    (res / "samples" / rec["run_id"] / src.name).unlink()
    s = build_report([str(res)], str(tmp_path / "o"))
    assert _csv(tmp_path / "o" / "leaderboard.csv")[0]["piqa_ci_basis"] == ""
    assert any("no per-sample file for task 'piqa'" in n for n in s["notes"])


# ------------------------------------------------------------------------------------------- plots

def _check_png(path: Path):
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert (img[..., :3] < 0.9).any(axis=-1).mean() > 0.01, f"{path} is (almost) blank"


def _check_svg(path: Path):
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg") and len(list(root.iter())) > 50
    assert "<dc:date>" not in path.read_text()


def test_plots(built):
    out, s = built
    names = {Path(f).name for f in s["files"] if "/plots/" in f}
    for stem in PLOTS:
        assert any(n.startswith(stem) and n.endswith(".png") for n in names), stem
        assert any(n.startswith(stem) and n.endswith(".svg") for n in names), stem
    for n in names:
        (_check_png if n.endswith(".png") else _check_svg)(out / "plots" / n)
    # α=1 and iid exist only for ranks 4,2,2: one data-heterogeneity figure; 4,4,4 is named as the single one
    assert "score_vs_data_heterogeneity.png" in names
    assert any(p["plot"] == "score_vs_data_heterogeneity" and "ranks=4,4,4" in p["reason"] for p in s["plots_skipped"])


def test_noise_panels_follow_traits_and_recorded_losses(study, tmp_path):
    """Factor averaging (trait averages_factors) gives aggregation noise, FlexLoRA's clients give truncation loss;
    a method the registry has never heard of gets its panel from its record alone."""
    records, _ = load_records([str(study)])
    rows = {(r.method, tuple(r.setting["ranks"]), json.dumps(r.setting["partition"]), r.dtypes["eval"]): r
            for r in build_rows(records, []) if r.kind == "run"}
    key = ((4, 2, 2), json.dumps({"kind": "dirichlet", "alpha": 1.0}), "float32")
    fedit, flex = rows[("fedit", *key)], rows[("flexlora", *key)]
    assert sorted(round_losses(fedit, "noise")) == [1, 2] and round_losses(fedit, "truncation_loss") == {}
    assert round_losses(flex, "noise") == {}   # it records noise 0.0, but it does not average factors
    trunc = round_losses(flex, "truncation_loss")
    assert sorted(trunc) == [2] and all(0 < v < 1 for v in trunc[2])   # round 1 starts fresh: nothing truncated
    res = _copy(study, tmp_path / "res", {"fedit-r4-2-2-s0", "fedit-r4-2-2-s1"})
    for p in res.glob("*.json"):
        rec = json.loads(p.read_text())
        p.write_text(json.dumps(dict(rec, method="my-average")))
    s = build_report([str(res)], str(tmp_path / "o"), plots=True)
    assert "noise_vs_round.png" in {Path(f).name for f in s["files"]}


def test_same_input_identical_bytes(study, built, tmp_path):
    a, _ = built
    b = tmp_path / "b"
    build_report([str(study)], str(b), plots=True)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 4 + 2 * len(PLOTS)
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_empty_results_folder(tmp_path):
    (tmp_path / "results").mkdir()
    s = build_report([str(tmp_path / "results")], str(tmp_path / "out"), plots=True)
    assert s["rows"] == 0 and {p["plot"] for p in s["plots_skipped"]} == set(PLOTS) | {"privacy_utility"}
    assert "No complete records" in (tmp_path / "out" / "LEADERBOARD.md").read_text()


# ------------------------------------------------------------------------------------------- HTML in Chromium

def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_and_sorts_in_headless_chromium(built, tmp_path):
    out, s = built
    page = (out / "leaderboard.html").resolve().as_uri()
    dom = _chromium(["--dump-dom", page], tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    board = dom.stdout.split('<table id="leaderboard"')[1]
    assert board.count('<tr class="reference">') == 3 and board.count('<tr class="run">') == s["rows"] - 3
    shot = tmp_path / "shot.png"
    r = _chromium([f"--screenshot={shot}", "--window-size=1400,900", page], tmp_path / "profile2")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    _check_png(shot)
    # the inline sorter: a click on the leaderboard's "Test loss" header sorts its rows, empty cells last
    text = (out / "leaderboard.html").read_text()
    heads = re.findall(r'<th scope="col">(.*?)</th>', text.split('<table id="leaderboard"')[1])
    col = heads.index("Test loss")
    clicked = out.parent / "clicked.html"
    clicked.write_text(text.replace("</body>", "<script>document.getElementById('leaderboard').tHead.rows[0]"
                                               f".cells[{col}].click();</script>\n</body>"))
    dom = _chromium(["--dump-dom", clicked.resolve().as_uri()], tmp_path / "profile3")
    body = dom.stdout.split('<table id="leaderboard"')[1].split("<tbody>")[1].split("</tbody>")[0]
    keys = [re.findall(r'data-sort="([^"]*)"', tr)[col] for tr in body.split("</tr>")[:-1]]
    vals = [float(k) for k in keys if k]
    assert len(vals) == sum(1 for r in _csv(out / "leaderboard.csv") if r["test_loss"]) and vals == sorted(vals)
    assert keys[len(vals):] == [""] * (len(keys) - len(vals))
