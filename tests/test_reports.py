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

from bench import BenchError  # noqa: E402
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


def _paired(path: Path, family: str = "paired") -> list[dict]:
    """paired.csv's lines of one family: "paired" (against the baseline method) or "gate"."""
    return [r for r in _csv(path) if r["family"] == family]


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
    # fedit/flexlora × {4,4,4; 4,2,2}, fedit iid, fedit bf16, centralized, local-only, base; and the trivial
    # baselines of piqa (majority label, chance) under each of the 4 scored settings
    assert len(rows) == s["rows"] == 9 + 4 * 2
    refs = {r["method"] for r in rows if r["reference"] == "True"}
    assert refs == {"base", "centralized", "local-only", "majority-label", "chance"}
    assert {r["method"] for r in rows if r["kind"] == "baseline"} == {"majority-label", "chance"}
    assert {r["method"] for r in rows if r["reference"] == "False"} == {"fedit", "flexlora"}
    hetero = _row(rows, method="fedit", ranks="4,2,2", partition="dirichlet(alpha=1)", eval_dtype="float32")
    assert hetero["n_seeds"] == "2" and hetero["seeds"] == "0;1" and hetero["test_loss_ci_basis"] == "seeds+examples"
    # piqa has two choices per document: the chance level comes from the per-sample files
    assert float(hetero["piqa_chance"]) == 0.5
    md = (out / "LEADERBOARD.md").read_text()
    assert "piqa (acc; chance 0.50)" in md
    assert "| centralized (reference) |" in md and "| local-only (reference) |" in md and "| base (reference) |" in md
    assert "| majority-label (baseline) |" in md and "| chance (baseline) |" in md
    # within a setting, reference rows come first
    table = md.split("## Leaderboard")[1]
    lines = [ln for ln in table.splitlines() if "| 4,2,2 |" in ln and "dirichlet" in ln and "bfloat16" not in ln]
    names = [ln.split("|")[1].strip() for ln in lines]
    assert set(names[:4]) == {"centralized (reference)", "local-only (reference)", "majority-label (baseline)",
                              "chance (baseline)"}
    assert not names[-1].endswith(")")
    # the capability metric leads: the task column comes first, the held-out losses after it
    header = next(ln for ln in table.splitlines() if ln.startswith("| Method |")).split(" | ")
    assert header.index("piqa (acc; chance 0.50)") < header.index("Test loss")


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
    paired = _paired(out / "paired.csv")
    # the float32-scored base model never joins the bf16 context; only the bf16 setting's trivial baselines do
    assert {p["method"] for p in paired if p["eval_dtype"] == "bfloat16"} == {"majority-label", "chance"}
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
    paired = _paired(out / "paired.csv")
    # piqa is the records' capability metric: it is the main one unless --metric says otherwise
    assert s["baseline"] == "fedit" and s["metric"] == "piqa" and s["comparisons"] > 0
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
            assert (q["ci_excludes_0"] == "True") == (float(q["ci_low"]) > 0 or float(q["ci_high"]) < 0)
        # ★ is the seed-level test's, after Holm: its CI excludes 0 exactly where Holm rejects
        if q["seed_ci_low"]:
            assert (q["significant"] == "True") == (float(q["seed_ci_low"]) > 0 or float(q["seed_ci_high"]) < 0)
            assert (q["significant"] == "True") == (float(q["holm_p"]) < 0.05)
        else:
            assert q["significant"] == "False" and q["n_seeds"] == "1"
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
    p = _row(_paired(out / "paired.csv"), method="flexlora", metric="test_loss", rank_distribution="uniform")
    direct = np.mean([recs[f"flexlora-r{r}-s{s}"]["test"]["loss"] - recs[f"fedit-r{r}-s{s}"]["test"]["loss"]
                      for s, r in drawn.items()])
    assert float(p["diff"]) == pytest.approx(direct, rel=1e-4, abs=1e-9) and p["n_seeds"] == "2"


def test_paired_table_is_at_the_top_with_the_mdd(built):
    out, s = built
    md = (out / "LEADERBOARD.md").read_text()
    top, board = md.split("## Leaderboard")
    assert "## Which method, and by how much: paired differences against fedit" in top
    paired = _paired(out / "paired.csv")
    k = sum(1 for p in paired if p["metric"] == "piqa" and p["seed_p"])
    assert 0 < k < sum(1 for p in paired if p["metric"] == "piqa")   # the one-seed comparisons are n/a, not tested
    assert {p["family_size"] for p in paired if p["metric"] == "piqa" and p["seed_p"]} == {str(k)}
    assert "Minimum detectable difference on piqa (acc; chance 0.50) at the seed level" in top and "80% power" in top
    assert f"α = 0.05/{k}" in top
    assert (f"| Partition | Ranks | Eval dtype | Method | Seeds | Δ piqa (acc; chance 0.50) [95% CI] | "
            f"Seed-level CI (Holm, k={k}) | MDD (seeds) | Δ Test loss [seed-level CI, Holm, k=") in top
    shown = [p for p in paired if p["metric"] in ("piqa", "test_loss", "client_loss", "personal_loss", "avg")]
    assert ("★" in top) == any(p["significant"] == "True" for p in shown)
    assert "| n/a |" in top   # the one-seed comparisons (bf16, iid, base) have no seed-level CI
    # every non-baseline row of a fedit setting is compared, references included (base on the task it has)
    compared = {(p["method"], p["ranks"], p["partition"]) for p in paired}
    assert ("base", "4,2,2", "dirichlet(alpha=1)") in compared and ("local-only", "4,2,2", "dirichlet(alpha=1)") in compared
    assert {p["metric"] for p in paired if p["method"] == "base"} == {"piqa"}   # one task: no Avg repeating it
    html = (out / "leaderboard.html").read_text()
    assert html.index('<table id="paired"') < html.index('<table id="leaderboard"')


def test_baseline_option_reverses_the_comparison(study, built, tmp_path):
    out, _ = built
    s = build_report([str(study)], str(tmp_path / "o"), baseline="flexlora")
    assert s["baseline"] == "flexlora"
    rev = _paired(tmp_path / "o" / "paired.csv")
    assert {p["baseline"] for p in rev} == {"flexlora"}
    fwd = _row(_paired(out / "paired.csv"), method="flexlora", metric="test_loss", ranks="4,4,4")
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
    assert _paired(tmp_path / "o" / "paired.csv") == []


def test_held_out_sets_that_differ_are_not_paired(study, tmp_path):
    """A record whose held-out examples differ (here: one example fewer) pairs on nothing, and a note says so."""
    res = _copy(study, tmp_path / "res", {"fedit-r4-2-2-s0", "flexlora-r4-2-2-s0"})
    p = res / "flexlora-r4-2-2-s0.json"
    rec = json.loads(p.read_text())
    rec["test"]["loss_sums"], rec["test"]["tokens"] = rec["test"]["loss_sums"][:-1], rec["test"]["tokens"][:-1]
    p.write_text(json.dumps(rec))
    s = build_report([str(res)], str(tmp_path / "o"))
    metrics = {q["metric"] for q in _paired(tmp_path / "o" / "paired.csv")}
    assert "test_loss" not in metrics and "piqa" in metrics
    assert any("Test loss: not paired at seed(s) 0" in n for n in s["notes"])


# ------------------------------------------------------------------------------------------- seed-level inference

SYNTHETIC_SETTING = {"model": "synthetic-model", "dataset": "synthetic", "partition": {"kind": "iid"}, "ranks": [4, 4],
                     "rank_distribution": "explicit", "num_clients": 2, "client_fraction": 1.0, "rounds": 1,
                     "preset": "synthetic"}


def _write_synthetic(folder: Path, method: str, seed: int, test: dict | None = None, tasks: dict | None = None,
                     lr: float | None = None) -> dict:
    """A record built by the engine's own writer (bench.record.build_record) around synthetic numbers."""
    from bench.io import atomic_write_json
    from bench.record import build_record

    run_id = f"{method}-s{seed}" + (f"-lr{lr:g}" if lr is not None else "")
    config = {"method": method, "seed": seed, **({"lr": lr} if lr is not None else {})}
    rec = build_record(kind="run", run_id=run_id, method=method, setting=json.loads(json.dumps(SYNTHETIC_SETTING)),
                       seed=seed, config=config, config_hash="0" * 64, provenance={},
                       dtypes={"export": "float32", "eval": "float32" if tasks else None}, timings={"total_s": 1.0},
                       run_dir=f"runs/{run_id}", rounds=[{"round": 1, "clients": []}], test=test,
                       eval={"backend": "hf", "dtype": "float32", "tasks": tasks} if tasks else None)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / f"{run_id}.json", rec)
    return rec


def _held_out(offset: float, seed: int, n: int = 400) -> dict:
    """Per-example losses on a seed's held-out set: a difficulty shared by every method at that seed (cancels in a
    paired difference), the method's offset, and a little per-example noise of its own."""
    shared = np.random.default_rng(seed)
    tokens = shared.integers(5, 20, size=n)
    difficulty = shared.gamma(2.0, 0.5, size=n)
    own = np.random.default_rng([seed, int(abs(offset) * 1e4), int(offset < 0)]).normal(0, 0.02, size=n)
    sums = (2.0 + difficulty + offset + own) * tokens
    return {"loss": float(sums.sum() / tokens.sum()), "examples": n, "loss_sums": sums.tolist(),
            "tokens": tokens.tolist()}


# test-loss offsets against fedit at seeds 0, 1, 2 (lower is better)
OFFSETS = {"strong": [-0.30, -0.31, -0.29],   # clear at the seed level, even after Holm
           "mid": [-0.20, -0.15, -0.25],      # its uncorrected seed-level CI excludes 0, Holm's does not
           "wide": [-0.50, -0.10, -0.30],     # every seed better: the bootstrap CI excludes 0, the seed-level CI not
           "null": [0.05, -0.04, 0.0]}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    res = tmp_path_factory.mktemp("synthetic") / "results"
    for seed in range(3):
        _write_synthetic(res, "fedit", seed, _held_out(0.0, seed))
        for method, offsets in OFFSETS.items():
            _write_synthetic(res, method, seed, _held_out(offsets[seed], seed))
    _write_synthetic(res, "single", 0, _held_out(-0.4, 0))   # one seed: no seed-level CI
    return res


def _holm_by_hand(p: dict, alpha: float = 0.05) -> tuple[dict, dict, dict]:
    """Textbook Holm: H_(i) is rejected iff p_(j) < α/(k − j + 1) for every j ≤ i; adjusted p_(i) = max over j ≤ i
    of min(1, (k − j + 1) p_(j)); the level each is drawn at: its own step's while rejected, then the first
    unrejected step's."""
    order = sorted(p, key=p.get)
    k = len(order)
    rejected = {m: all(p[order[j]] < alpha / (k - j) for j in range(i + 1)) for i, m in enumerate(order)}
    adjusted = {m: max(min(1.0, (k - j) * p[order[j]]) for j in range(i + 1)) for i, m in enumerate(order)}
    first_kept = next((i for i, m in enumerate(order) if not rejected[m]), k)
    level = {m: alpha / (k - min(i, first_kept)) for i, m in enumerate(order)}
    return rejected, adjusted, level


def test_seed_level_ci_and_holm_match_an_independent_computation(synthetic, tmp_path):
    from scipy import stats

    s = build_report([str(synthetic)], str(tmp_path / "o"))
    assert s["metric"] == "test_loss"   # no capability metric in these records: the held-out loss leads
    paired = {p["method"]: p for p in _paired(tmp_path / "o" / "paired.csv") if p["metric"] == "test_loss"}
    assert set(paired) == {*OFFSETS, "single"}
    recs = _records(synthetic)

    def value(name):
        t = recs[name]["test"]
        return sum(t["loss_sums"]) / sum(t["tokens"])

    diffs = {m: np.array([value(f"{m}-s{s}") - value(f"fedit-s{s}") for s in range(3)]) for m in OFFSETS}
    se = {m: d.std(ddof=1) / math.sqrt(3) for m, d in diffs.items()}
    p = {m: float(2 * stats.t.sf(abs(d.mean() / se[m]), df=2)) for m, d in diffs.items()}
    rejected, adjusted, level = _holm_by_hand(p)
    for m, d in diffs.items():
        row = paired[m]
        half = stats.t.ppf(1 - level[m] / 2, df=2) * se[m]
        assert [float(x) for x in row["seed_diffs"].split(";")] == pytest.approx(d.tolist(), rel=1e-5)
        assert float(row["diff"]) == pytest.approx(d.mean(), rel=1e-5)
        assert float(row["seed_se"]) == pytest.approx(se[m], rel=1e-5)
        assert float(row["seed_p"]) == pytest.approx(p[m], rel=1e-5)
        assert float(row["holm_p"]) == pytest.approx(adjusted[m], rel=1e-5)
        assert float(row["holm_alpha"]) == pytest.approx(level[m], rel=1e-5) and row["family_size"] == "4"
        assert float(row["seed_ci_low"]) == pytest.approx(d.mean() - half, rel=1e-5)
        assert float(row["seed_ci_high"]) == pytest.approx(d.mean() + half, rel=1e-5)
        assert (row["significant"] == "True") == rejected[m]
        mdd = (stats.t.ppf(1 - 0.05 / 4 / 2, df=2) + stats.t.ppf(0.80, df=2)) * se[m]
        assert float(row["seed_mdd"]) == pytest.approx(mdd, rel=1e-5)
    assert rejected == {"strong": True, "mid": False, "wide": False, "null": False}
    # mid: the uncorrected 95% t-interval excludes 0; at the level Holm tests it at, it does not
    assert p["mid"] < 0.05 and float(paired["mid"]["seed_ci_high"]) > 0
    # wide: every seed is better, so the hierarchical bootstrap's interval excludes 0; three seeds that spread
    # from −0.5 to −0.1 do not make a seed-level finding
    assert paired["wide"]["ci_excludes_0"] == "True" and float(paired["wide"]["ci_high"]) < 0
    assert paired["wide"]["significant"] == "False" and float(paired["wide"]["seed_ci_high"]) > 0
    # one seed: no seed-level CI, no ★, not in the family
    single = paired["single"]
    assert single["n_seeds"] == "1" and single["seed_ci_low"] == "" and single["seed_p"] == ""
    assert single["significant"] == "False"
    md = (tmp_path / "o" / "LEADERBOARD.md").read_text()
    lines = [ln for ln in md.split("## Leaderboard")[0].splitlines() if ln.startswith("| ")]
    col = [c.strip() for c in lines[0].split("|")].index("Method")
    table = {ln.split("|")[col].strip(): ln for ln in lines[1:]}
    assert "★ better" in table["strong"] and "★" not in table["wide"] and "★" not in table["mid"]
    assert "| n/a |" in table["single"]
    assert "Seed-level CI (Holm, k=4)" in md and "α = 0.05/4 = 0.0125" in md
    median = float(np.median([(stats.t.ppf(1 - 0.05 / 8, 2) + stats.t.ppf(0.8, 2)) * x for x in se.values()]))
    got = re.search(r"over the 4 comparisons of this metric\): ([0-9.]+) \(median over 4 comparisons", md).group(1)
    assert float(got) == pytest.approx(median, abs=0.5 * 10 ** -len(got.split(".")[1]) + 1e-12)


def test_a_tuning_grid_pairs_each_lr_with_the_baseline_at_that_lr(tmp_path):
    """Baseline and method at two lrs: each method cell is compared with the baseline at its own lr (not with every
    baseline cell), and every line of the paired table names the baseline row it was paired with."""
    res = tmp_path / "tune"
    for lr, offset in ((1e-4, 0.1), (1e-3, -0.2)):
        _write_synthetic(res, "fedit", 0, _held_out(0.0, 0), lr=lr)
        _write_synthetic(res, "flora", 0, _held_out(offset, 0), lr=lr)
    build_report([str(res)], str(tmp_path / "o"))
    rows = [p for p in _paired(tmp_path / "o" / "paired.csv") if p["metric"] == "test_loss" and p["method"] == "flora"]
    assert sorted((r["lr"], r["baseline_lr"]) for r in rows) == [("0.0001", "0.0001"), ("0.001", "0.001")]
    for r in rows:   # fedit's records are identical at both lrs, so each difference is the cell's own offset
        assert float(r["diff"]) == pytest.approx(0.1 if r["lr"] == "0.0001" else -0.2, abs=0.01)
    md = (tmp_path / "o" / "LEADERBOARD.md").read_text().split("## Leaderboard")[0]
    assert "flora @ lr 0.001 vs fedit @ lr 0.001" in md and "flora @ lr 0.001 vs fedit @ lr 0.0001" not in md
    assert "fedit @ lr 0.001 vs fedit @ lr 0.0001" in md   # the baseline's own lrs still compare,
    assert "fedit @ lr 0.0001 vs fedit @ lr 0.001" not in md   # once per pair (the mirror adds nothing but a Holm term)


def test_t_distribution_matches_scipy():
    from scipy import stats

    from reports.stats import t_quantile, t_two_sided_p

    for df in (1, 2, 3, 4, 5, 8, 19, 30, 99):
        for t in (0.0, 0.3, 1.0, 2.5, 7.0, 40.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9, abs=1e-13)
        for q in (0.8, 0.975, 0.99, 0.99875, 0.9999):
            assert t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9)


# ------------------------------------------------------------------------------------------- trivial baselines

def _sample_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_multiple_choice_baselines_from_the_documents(study, built, tmp_path):
    """majority-label (the most frequent gold index among a seed's documents) and chance (1/choices) are computed
    from the per-sample files, under every scored setting, and pair with the model rows by document."""
    out, _ = built
    recs = _records(study)
    rows, paired = _csv(out / "leaderboard.csv"), _paired(out / "paired.csv")
    scored = {(r["ranks"], r["partition"], r["eval_dtype"]) for r in rows if r["piqa"] and r["kind"] == "run"}
    for name in ("majority-label", "chance"):
        assert {(r["ranks"], r["partition"], r["eval_dtype"]) for r in rows if r["method"] == name} == scored
    majority, model = [], []
    for seed in (0, 1):
        lines = _sample_lines(recs[f"fedit-r4-2-2-s{seed}"]["eval"]["tasks"]["piqa"]["samples"])
        targets = [ln["target"] for ln in lines]
        top = max(sorted(set(targets)), key=targets.count)
        majority.append(np.mean([t == top for t in targets]))
        model.append(np.mean([ln["metrics"]["none"]["acc"] for ln in lines]))
    where = dict(ranks="4,2,2", partition="dirichlet(alpha=1)", eval_dtype="float32")
    assert float(_row(rows, method="majority-label", **where)["piqa"]) == pytest.approx(np.mean(majority))
    assert float(_row(rows, method="chance", **where)["piqa"]) == pytest.approx(0.5)
    p = _row(paired, method="majority-label", metric="piqa", **where)
    assert [float(x) for x in p["seed_diffs"].split(";")] == pytest.approx(np.subtract(majority, model).tolist())
    assert p["kind"] == "baseline" and p["reference"] == "True"
    # a trivial baseline can be the baseline of the paired table
    s = build_report([str(study)], str(tmp_path / "o"), baseline="majority-label")
    rev = _paired(tmp_path / "o" / "paired.csv")
    assert s["baseline"] == "majority-label" and {q["baseline"] for q in rev} == {"majority-label"}
    back = _row(rev, method="fedit", metric="piqa", **where)
    assert float(back["diff"]) == pytest.approx(-float(p["diff"]), abs=1e-12)


def _dolly_docs(shared_data: Path, n: int) -> list[dict]:
    """Real Dolly records in the doc shape of the dolly_heldout task (instruction, context, response, prompt)."""
    recs = json.loads((shared_data / "dolly_fedit_10clients" / "local_training_0.json").read_text())[:n]
    return [{"instruction": r["instruction"], "context": r["context"], "response": r["response"],
             "category": r["category"], "prompt": r["instruction"] + (f"\n\n{r['context']}" if r["context"] else "")}
            for r in recs]


def test_generation_baselines_score_the_documents(shared_data, tmp_path):
    """dolly_heldout's trivial generations (copy the instruction, copy the prompt, answer nothing) are scored by the
    task's ROUGE-L on the documents in the per-sample files; they pair with the model rows by document, and the
    generation task leads the tables."""
    from evaluators.runner import _write_samples

    docs = _dolly_docs(shared_data, 12)
    res, rng = tmp_path / "results", np.random.default_rng(7)
    model = {}
    for method in ("fedit", "flexlora"):
        for seed in (0, 1, 2):
            values = rng.uniform(0.0, 0.6, size=len(docs))
            model[method, seed] = values
            path = tmp_path / "runs" / f"{method}-s{seed}" / "eval" / "dolly_heldout.jsonl"
            _write_samples(path, [{"_subtask": "fedlora_dolly_heldout", "doc_id": i, "doc": d, "target": d["response"],
                                   "arguments": {"gen_args_0": {"arg_0": d["prompt"], "arg_1": {"until": []}}},
                                   "resps": [["generated"]], "filtered_resps": ["generated"], "filter": "none",
                                   "metrics": ["rougeL"], "rougeL": float(v)} for i, (d, v) in enumerate(zip(docs, values))],
                           "dolly_heldout", {})
            tasks = {"dolly_heldout": {"metric": "rougeL", "value": float(values.mean()), "n": len(docs),
                                       "samples": str(path)}}
            _write_synthetic(res, method, seed, _held_out(0.1 if method == "flexlora" else 0.0, seed), tasks)
    s = build_report([str(res)], str(tmp_path / "o"))
    assert s["metric"] == "dolly_heldout"
    md = (tmp_path / "o" / "LEADERBOARD.md").read_text()
    header = next(ln for ln in md.split("## Leaderboard")[1].splitlines() if ln.startswith("| Method |")).split(" | ")
    assert header.index("dolly_heldout (rougeL)") < header.index("Test loss")
    rows = _csv(tmp_path / "o" / "leaderboard.csv")
    try:
        from evaluators.tasks.loaders import TRIVIAL_GENERATIONS, rouge_l
    except ImportError:   # the generation task's code is not in this checkout: no rows, and a note says why
        assert not [r for r in rows if r["kind"] == "baseline"]
        assert any("no trivial-baseline rows for 'dolly_heldout'" in n and "TRIVIAL_GENERATIONS" in n for n in s["notes"])
        return
    pytest.importorskip("rouge_score")
    assert {r["method"] for r in rows if r["kind"] == "baseline"} == set(TRIVIAL_GENERATIONS)
    paired = _paired(tmp_path / "o" / "paired.csv")
    for name, generate in TRIVIAL_GENERATIONS.items():
        scores = np.array([rouge_l(generate(d), d["response"]) for d in docs])
        assert float(_row(rows, method=name)["dolly_heldout"]) == pytest.approx(scores.mean(), rel=1e-5)
        p = _row(paired, method=name, metric="dolly_heldout")
        direct = [scores.mean() - model["fedit", seed].mean() for seed in (0, 1, 2)]
        assert [float(x) for x in p["seed_diffs"].split(";")] == pytest.approx(direct, rel=1e-5)
    assert _row(rows, method="empty")["dolly_heldout"] in ("0", "0.0")


def _dolly_run(tmp_path: Path, res: Path, method: str, seed: int, docs: list[dict], values, test: dict) -> None:
    from evaluators.runner import _write_samples

    path = tmp_path / "runs" / f"{method}-s{seed}" / "eval" / "dolly_heldout.jsonl"
    _write_samples(path, [{"_subtask": "fedlora_dolly_heldout", "doc_id": i, "doc": d, "target": d["response"],
                           "arguments": {"gen_args_0": {"arg_0": d["prompt"], "arg_1": {"until": []}}},
                           "resps": [["generated"]], "filtered_resps": ["generated"], "filter": "none",
                           "metrics": ["rougeL"], "rougeL": float(v)} for i, (d, v) in enumerate(zip(docs, values))],
                   "dolly_heldout", {})
    _write_synthetic(res, method, seed, test, {"dolly_heldout": {"metric": "rougeL", "value": float(np.mean(values)),
                                                                 "n": len(docs), "samples": str(path)}})


@pytest.mark.parametrize("lift", [0.5, 0.0])
def test_gate_compares_centralized_with_base_and_every_trivial_baseline(shared_data, tmp_path, lift):
    """The gate: centralized − base and centralized − each trivial baseline per seed, on the main metric, a t-interval
    over the seeds, Holm over those comparisons alone; passed only where every interval excludes 0 above. The base
    model is scored once (seed-free) and stands for every seed. lift 0.5: centralized far above all (passed);
    lift 0.0: centralized scores what base scores, plus seed noise (not passed)."""
    pytest.importorskip("rouge_score")
    from scipy import stats

    from evaluators.tasks.loaders import TRIVIAL_GENERATIONS, rouge_l

    docs = _dolly_docs(shared_data, 12)
    res, rng = tmp_path / "results", np.random.default_rng(11)
    base_values = rng.uniform(0.0, 0.3, size=len(docs))
    _dolly_run(tmp_path, res, "base", 0, docs, base_values, {**_held_out(0.0, 0), "split_by_seed": False})
    central = {}
    for seed in (0, 1, 2):
        central[seed] = np.clip(base_values + lift + rng.normal(0, 0.05, size=len(docs)), 0, 1)
        _dolly_run(tmp_path, res, "centralized", seed, docs, central[seed], _held_out(-0.1, seed))
        _dolly_run(tmp_path, res, "fedit", seed, docs, rng.uniform(0.0, 0.6, size=len(docs)), _held_out(0.0, seed))
    s = build_report([str(res)], str(tmp_path / "o"))
    gate = [g for g in _paired(tmp_path / "o" / "paired.csv", "gate") if g["metric"] == "dolly_heldout"]
    against = {"base": base_values.mean(),
               **{name: np.mean([rouge_l(g(d), d["response"]) for d in docs]) for name, g in TRIVIAL_GENERATIONS.items()}}
    assert s["gate"] == len(against) and {g["baseline"] for g in gate} == set(against)
    assert {g["method"] for g in gate} == {"centralized"}
    p = {}
    for name, value in against.items():
        g = _row(gate, baseline=name)
        d = np.array([central[seed].mean() - value for seed in (0, 1, 2)])
        assert [float(x) for x in g["seed_diffs"].split(";")] == pytest.approx(d.tolist(), rel=1e-5)
        p[name] = float(2 * stats.t.sf(abs(d.mean() / (d.std(ddof=1) / math.sqrt(3))), df=2))
        assert float(g["seed_p"]) == pytest.approx(p[name], rel=1e-5) and g["family_size"] == str(len(against))
    rejected, _, _ = _holm_by_hand(p)
    for name in against:   # the gate is its own Holm family: the paired table's comparisons do not widen it
        assert (_row(gate, baseline=name)["significant"] == "True") == rejected[name]
    md = (tmp_path / "o" / "LEADERBOARD.md").read_text()
    top = md.split("## Which method")[0]
    assert "## Gate: does the reference learn what the metric measures?" in top
    assert f"Seed-level CI (Holm, k={len(against)})" in top
    if lift:
        assert all(rejected.values())
        assert "**Gate: passed** by centralized (reference)" in top and "at 3 seeds" in top
    else:
        assert not rejected["base"]
        assert "**Gate: not passed** by centralized (reference)" in top and "base (reference)" in top.split("not passed")[1]
    html = (tmp_path / "o" / "leaderboard.html").read_text()
    assert html.index('<table id="gate"') < html.index('<table id="paired"') < html.index('<table id="leaderboard"')


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
    assert _row(_csv(tmp_path / "o" / "leaderboard.csv"), method="fedit")["piqa_ci_basis"] == "examples"
    (res / "samples" / rec["run_id"] / src.name).unlink()
    s = build_report([str(res)], str(tmp_path / "o"))
    rows = _csv(tmp_path / "o" / "leaderboard.csv")
    assert [r["method"] for r in rows] == ["fedit"]   # no documents, no trivial baselines
    assert rows[0]["piqa_ci_basis"] == ""
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
    md = (tmp_path / "out" / "LEADERBOARD.md").read_text()
    assert "0 rows from 0 records" in md and "No records yet" in md and "## Which method" not in md
    assert "No records yet" in (tmp_path / "out" / "leaderboard.html").read_text()
    assert (tmp_path / "out" / "leaderboard.csv").read_text().startswith("kind,reference,method,lr,lr_tuned,n_seeds")


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
    refs = sum(1 for r in _csv(out / "leaderboard.csv") if r["reference"] == "True")
    assert board.count('<tr class="reference">') == refs and board.count('<tr class="run">') == s["rows"] - refs
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


@pytest.mark.parametrize("local_offset", [-0.05, 0.05])
def test_gate_places_local_only_between_base_and_centralized(shared_data, tmp_path, local_offset):
    """The gate's second condition: local-only − base and centralized − local-only per seed on the held-out loss
    (local-only has no global model, so no task score), each a seed-level t-interval, Holm over the gate's family
    on that metric. Every run on the same held-out examples (the predefined split): offset −0.05 lies between base
    (0) and centralized (−0.1) on every seed (yes); +0.05 is worse than base (no)."""
    pytest.importorskip("rouge_score")
    docs = _dolly_docs(shared_data, 12)
    res, rng = tmp_path / "results", np.random.default_rng(5)
    base_values = rng.uniform(0.0, 0.3, size=len(docs))
    _dolly_run(tmp_path, res, "base", 0, docs, base_values, {**_held_out(0.0, 0), "split_by_seed": False})
    loss = {}
    for seed in (0, 1, 2):
        for method, offset in (("centralized", -0.10 - 0.005 * seed), ("local-only", local_offset + 0.005 * seed),
                               ("fedit", -0.07)):
            loss[method, seed] = _held_out(offset, 0)   # the same examples at every seed, as the study's split
            loss[method, seed]["split_by_seed"] = False
        _dolly_run(tmp_path, res, "centralized", seed, docs, np.clip(base_values + 0.4, 0, 1), loss["centralized", seed])
        _dolly_run(tmp_path, res, "fedit", seed, docs, rng.uniform(0.0, 0.6, size=len(docs)), loss["fedit", seed])
        _write_synthetic(res, "local-only", seed, loss["local-only", seed])
    build_report([str(res)], str(tmp_path / "o"))
    gate = _paired(tmp_path / "o" / "paired.csv", "gate")
    base = _held_out(0.0, 0)
    for method, baseline, a, b in (("local-only", "base", lambda s: loss["local-only", s], lambda s: base),
                                   ("centralized", "local-only", lambda s: loss["centralized", s],
                                    lambda s: loss["local-only", s])):
        g = _row(gate, method=method, baseline=baseline, metric="test_loss")
        want = [_token_mean(a(s)) - _token_mean(b(s)) for s in (0, 1, 2)]
        assert [float(x) for x in g["seed_diffs"].split(";")] == pytest.approx(want, rel=1e-5, abs=1e-6)
    # the test-loss family of the gate: centralized − base, centralized − local-only, local-only − base
    assert {g["family_size"] for g in gate if g["metric"] == "test_loss"} == {"3"}
    top = (tmp_path / "o" / "LEADERBOARD.md").read_text().split("## Which method")[0]
    assert "**Gate: passed** by centralized (reference)" in top   # the first condition does not depend on local-only
    verdict = "yes" if local_offset < 0 else "no"
    assert f"**Local-only between base and centralized: {verdict}** at 3 seeds on Test loss" in top
    assert ("second condition is not met" in top) == (verdict == "no")



def test_gate_without_base_or_trivial_baseline_on_the_main_metric_is_not_decided(tmp_path):
    """A setting whose centralized row has no base record and no trivial baseline on the main metric (a grid's
    non-default partitions: base is scored once, under its own setting) gets 'not decided' naming what is missing,
    each such reference named by the field it differs in, and the report is written."""
    res = tmp_path / "results"
    for seed in (0, 1, 2):
        for method, offset in (("centralized", -0.1), ("local-only", 0.05), ("fedit", -0.05)):
            rec = _write_synthetic(res, method, seed, _held_out(offset, seed))
            for alpha in (0.1, 1.0):   # the same runs under two partitions: two centralized rows to tell apart
                other = json.loads(json.dumps(rec))
                other["setting"]["partition"] = {"kind": "dirichlet", "alpha": alpha}
                other["run_id"] = f"{rec['run_id']}-a{alpha:g}"
                (res / f"{other['run_id']}.json").write_text(json.dumps(other))
    s = build_report([str(res)], str(tmp_path / "o"), metric="test_loss")
    top = (tmp_path / "o" / "LEADERBOARD.md").read_text().split("## Which method")[0]
    verdicts = [ln for ln in top.splitlines() if ln.startswith("**Gate: not decided**")]
    assert len(verdicts) == 3 and len(set(verdicts)) == 3 and s["gate"] > 0
    assert all("partition: " in v and "no comparison with the base model or a trivial baseline on Test loss" in v
               for v in verdicts)

def test_length_check_cuts_base_to_the_references_median_length(shared_data, tmp_path, capsys):
    """benchmarks.length_check: the length-only baseline is the base model's generation cut to the references'
    median word count, scored by the task's ROUGE-L; each row's Δ per seed is its mean over the same documents
    minus that baseline's."""
    pytest.importorskip("rouge_score")
    import statistics

    from benchmarks import length_check
    from evaluators.runner import _write_samples
    from evaluators.tasks.loaders import rouge_l

    docs = _dolly_docs(shared_data, 12)
    res = tmp_path / "results"
    base_text = [d["response"] + " and so on" * 40 for d in docs]   # the right answer, then far too long
    path = tmp_path / "runs" / "base-s0" / "eval" / "dolly_heldout.jsonl"
    _write_samples(path, [{"_subtask": "fedlora_dolly_heldout", "doc_id": i, "doc": d, "target": d["response"],
                           "arguments": {"gen_args_0": {"arg_0": d["prompt"], "arg_1": {"until": []}}},
                           "resps": [[t]], "filtered_resps": [t], "filter": "none", "metrics": ["rougeL"],
                           "rougeL": rouge_l(t, d["response"])} for i, (d, t) in enumerate(zip(docs, base_text))],
                   "dolly_heldout", {})
    _write_synthetic(res, "base", 0, None, {"dolly_heldout": {"metric": "rougeL", "value": 0.1, "n": len(docs),
                                                              "samples": str(path)}})
    rng = np.random.default_rng(3)
    values = {s: rng.uniform(0.2, 0.6, size=len(docs)) for s in (0, 1, 2)}
    for s in (0, 1, 2):
        _dolly_run(tmp_path, res, "fedit", s, docs, values[s], _held_out(0.0, s))
    assert length_check.main(["--results", str(res)]) == 0
    out = capsys.readouterr().out
    cut = int(statistics.median(len(d["response"].split()) for d in docs))
    baseline = np.mean([rouge_l(" ".join(t.split()[:cut]), d["response"]) for t, d in zip(base_text, docs)])
    assert baseline > np.mean([rouge_l(t, d["response"]) for t, d in zip(base_text, docs)])   # cutting helps here
    assert f"references' median length {cut} words" in out and f"ROUGE-L **{baseline:.4f}**" in out
    d = [values[s].mean() - baseline for s in (0, 1, 2)]
    line = next(l for l in out.splitlines() if l.startswith("| fedit | 3 |"))
    assert f"| {np.mean(d):+.4f} [" in line
    assert length_check.main(["--results", str(tmp_path / "empty")]) == 2


def test_budget_note_states_each_rows_training_and_whether_it_is_matched(study, tmp_path):
    """The notes state each trained method's examples × steps from its records' round logs; the study's
    references train the federation's total client steps (rounds × local steps × clients × batch, from the
    config), so the rows are matched, and a record that trained fewer steps makes the note say so."""
    recs = _records(study)
    fed = next(r for r in recs.values() if r["method"] == "fedit")
    cfg = fed["config"]
    assert cfg["client_fraction"] == 1.0
    expected = cfg["rounds"] * cfg["local_steps"] * len(fed["clients"]) * cfg["batch_size"]
    out = tmp_path / "out"
    build_report([str(study)], str(out))
    note = next(ln for ln in (out / "LEADERBOARD.md").read_text().splitlines() if "training budget" in ln)
    for method in ("centralized", "fedit", "flexlora", "local-only"):
        assert f"{method} {expected:,}" in note, note
    assert "base" not in note.split(":", 1)[1] and note.endswith("matched: every trained row saw the same examples × steps")

    short = _copy(study, tmp_path / "short")
    path = next(p for p in sorted(short.glob("*.json")) if json.loads(p.read_text())["method"] == "centralized")
    data = json.loads(path.read_text())
    data["rounds"][0]["clients"][0]["steps"] -= 1
    path.write_text(json.dumps(data))
    build_report([str(short)], str(tmp_path / "out2"))
    note = next(ln for ln in (tmp_path / "out2" / "LEADERBOARD.md").read_text().splitlines() if "training budget" in ln)
    assert f"centralized {expected - cfg['batch_size']:,}/{expected:,}" in note and note.endswith("NOT matched: the rows trained on different examples × steps")


def test_avg_pools_the_accuracy_tasks_only(tmp_path):
    """Avg is the mean of the tasks scored with the measure most tasks share: a ROUGE-L or exact-match column beside
    accuracies is its own column, never averaged with them."""
    res = tmp_path / "results"
    scores = {"fedit": (0.50, 0.70, 0.02), "flexlora": (0.40, 0.80, 0.30)}
    for method, (arc, piqa, gsm) in scores.items():
        for seed in range(2):
            _write_synthetic(res, method, seed, _held_out(0.0, seed),
                             tasks={"arc_easy": {"metric": "acc", "value": arc}, "piqa": {"metric": "acc", "value": piqa},
                                    "gsm8k": {"metric": "exact_match", "value": gsm}})
    out = tmp_path / "out"
    build_report([str(res)], str(out))
    rows = {r["method"]: r for r in _csv(out / "leaderboard.csv")}
    for method, (arc, piqa, gsm) in scores.items():
        assert float(rows[method]["avg"]) == pytest.approx((arc + piqa) / 2)
        assert float(rows[method]["gsm8k"]) == pytest.approx(gsm)
    assert "Avg (acc, 2 tasks)" in (out / "LEADERBOARD.md").read_text()


def test_report_of_a_folder_without_records_never_wipes_a_leaderboard_with_rows(study, tmp_path, capsys):
    """`bench report` on a folder whose records sit in subfolders (the committed study: results/v2 reported into
    results/) refuses in one line naming those subfolders, and leaves the leaderboard as it was; a folder with no
    leaderboard yet still gets the empty report."""
    import argparse

    parser = argparse.ArgumentParser()
    report_cli.add_arguments(parser)
    results = tmp_path / "results"
    _copy(study, results / "v2")
    assert report_cli.main(parser.parse_args(["--results", str(results / "v2"), "--out", str(results)])) == 0
    board = (results / "LEADERBOARD.md").read_text()
    capsys.readouterr()
    assert report_cli.main(parser.parse_args(["--results", str(results)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    n = len(list((results / "v2").glob("*.json")))
    assert len(err) == 1 and err[0].startswith("error: results: ") and f"{results / 'v2'} ({n} records)" in err[0]
    assert (results / "LEADERBOARD.md").read_text() == board
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert report_cli.main(parser.parse_args(["--results", str(fresh)])) == 0
    assert "No records yet" in (fresh / "LEADERBOARD.md").read_text()


# ------------------------------------------------------------------------------------------- committed samples

def _piqa_run(tmp_path: Path, res: Path, method: str, seed: int, rng) -> None:
    """A run scored on 10 two-choice documents (lm-eval's log-likelihood lines: continuations, an integer gold)."""
    from evaluators.runner import _write_samples

    path = tmp_path / "runs" / f"{method}-s{seed}" / "eval" / "piqa.jsonl"
    gold = [int(g) for g in np.random.default_rng(5).integers(0, 2, size=10)]
    acc = rng.integers(0, 2, size=10).astype(float)
    _write_samples(path, [{"_subtask": "fedlora_piqa", "doc_id": i, "doc": {"goal": f"goal {i}", "sol1": "a", "sol2": "b"},
                           "target": g, "arguments": {f"gen_args_{c}": {"arg_0": f"Question: goal {i}\nAnswer:",
                                                                        "arg_1": f" choice text {c}"} for c in (0, 1)},
                           "resps": [[[-1.0, False]], [[-2.0, False]]], "filtered_resps": [[-1.0, False], [-2.0, False]],
                           "filter": "none", "metrics": ["acc"], "acc": float(a)} for i, (g, a) in enumerate(zip(gold, acc))],
                   "piqa", {})
    rec = json.loads((res / f"{method}-s{seed}.json").read_text())
    rec["eval"]["tasks"]["piqa"] = {"metric": "acc", "value": float(acc.mean()), "n": 10, "samples": str(path)}
    (res / f"{method}-s{seed}.json").write_text(json.dumps(rec))


def test_published_samples_carry_no_data_and_report_byte_for_byte_the_same(shared_data, tmp_path, capsys, monkeypatch):
    """`bench report --publish-samples` writes each record's per-sample files to <results>/samples/<run_id>/ without
    the documents, prompts and references (a data copy must not enter the repository); a clone without the run
    folders reports the same files byte for byte, the trivial baselines' documents read from the data root by doc_id
    and checked against doc_sha256; without a data root the generation baselines are left out with a note; a data
    root whose document differs is refused by name. The length check reads its references the same way."""
    pytest.importorskip("rouge_score")
    import argparse

    from benchmarks import length_check
    from evaluators.tasks.loaders import dolly_heldout_docs
    from reports.samples import doc_sha256

    monkeypatch.delenv("BENCH_DATA_ROOT", raising=False)   # "no data root" below means none at all (CI exports one)
    docs = dolly_heldout_docs(str(shared_data), "test")[:12]   # doc_id = index in the data root, as lm-eval numbers them
    res, rng = tmp_path / "results", np.random.default_rng(17)
    _dolly_run(tmp_path, res, "base", 0, docs, rng.uniform(0.0, 0.3, size=12), {**_held_out(0.0, 0), "split_by_seed": False})
    for seed in (0, 1, 2):
        for method, lo in (("centralized", 0.3), ("fedit", 0.2)):
            _dolly_run(tmp_path, res, method, seed, docs, rng.uniform(lo, lo + 0.3, size=12), _held_out(-lo, seed))
            _piqa_run(tmp_path, res, method, seed, rng)
    full = build_report([str(res)], str(tmp_path / "full"))
    assert length_check.main(["--results", str(res)]) == 0
    checked = capsys.readouterr().out
    parser = argparse.ArgumentParser()
    report_cli.add_arguments(parser)
    argv = ["--results", str(res), "--out", str(tmp_path / "published"), "--publish-samples"]
    assert report_cli.main(parser.parse_args(argv + ["--data-root", str(shared_data)])) == 0
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("samples: ")]
    assert len(said) == 13 and all(ln.startswith("samples: written ") for ln in said)
    lean = sorted((res / "samples").glob("*/*.jsonl"))
    assert len(lean) == 13
    for path in lean:
        text = path.read_text()
        for d in docs:
            assert d["instruction"] not in text and d["response"] not in text   # no copy of the data
        assert "choice text" not in text and "Question: goal" not in text
        for line in map(json.loads, text.splitlines()):
            assert not {"doc", "prompt", "continuations", "filtered_resps"} & set(line) and len(line["doc_sha256"]) == 64
            if line["task"] == "piqa":
                assert line["n_choices"] == 2 and line["target"] in (0, 1)
            else:
                assert "target" not in line and line["doc_sha256"] == doc_sha256(docs[line["doc_id"]])
    assert report_cli.main(parser.parse_args(argv)) == 0   # published again: nothing changes
    assert all(ln.startswith("samples: unchanged ") for ln in capsys.readouterr().out.splitlines()
               if ln.startswith("samples: "))
    shutil.move(tmp_path / "runs", tmp_path / "elsewhere")   # a clone: the run folders stayed on the machine
    assert not full["notes"] or all("lean" not in n for n in full["notes"])
    clone = build_report([str(res)], str(tmp_path / "clone"), data_root=str(shared_data))
    assert clone["rows"] == full["rows"] and clone["comparisons"] == full["comparisons"] > 0
    for name in ("LEADERBOARD.md", "leaderboard.csv", "leaderboard.html", "paired.csv"):
        assert (tmp_path / "clone" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert length_check.main(["--results", str(res), "--data-root", str(shared_data)]) == 0
    assert capsys.readouterr().out == checked
    # no data root: the generation baselines cannot be scored, and the report says how to get them
    bare = build_report([str(res)], str(tmp_path / "bare"))
    methods = {r["method"] for r in _csv(tmp_path / "bare" / "leaderboard.csv")}
    assert {"majority-label", "chance"} <= methods and not {"copy-prompt", "empty"} & methods
    assert any("lean" in n and "BENCH_DATA_ROOT" in n for n in bare["notes"])
    assert length_check.main(["--results", str(res)]) == 2
    assert "BENCH_DATA_ROOT" in capsys.readouterr().err
    # another version of the data: refused, naming the document
    path = res / "samples" / "centralized-s1" / "dolly_heldout.jsonl"   # the lines its seed's baselines read
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[3]["doc_sha256"] = "0" * 64
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(BenchError, match=r"data root: document 3 of task 'dolly_heldout'"):
        build_report([str(res)], str(tmp_path / "other"), data_root=str(shared_data))


def test_per_sample_lines_end_at_newline_only(tmp_path):
    """A document holding U+2028 or U+0085 (MMLU's management subject does) stays one JSON line: evaluators write
    per-sample files with ensure_ascii=False, and str.splitlines() would cut such a line in two (the report then
    read the file as unusable, and a lean copy could not be written)."""
    from bench.data import read_json_records
    from reports.samples import lean_text
    from reports.stats import sample_lines

    lines = [{"task": "mmlu", "subtask": "s", "doc_id": i, "doc": {"question": f"a\u2028b\x85c {i}"}, "target": 1,
              "continuations": [" A", " B"], "metrics": {"none": {"acc": 1.0}}} for i in range(3)]
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    got = sample_lines(path)
    assert got is not None and [k for k, _ in got] == [("s", 0), ("s", 1), ("s", 2)]
    lean = [json.loads(x) for x in lean_text(path.read_text()).split("\n") if x]
    assert [x["doc_id"] for x in lean] == [0, 1, 2] and all("doc" not in x for x in lean)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"x\u2028y {i}"}, ensure_ascii=False) + "\n" for i in range(2)))
    assert [r["instruction"] for r in read_json_records(data)] == ["x\u2028y 0", "x\u2028y 1"]
