"""reports/: leaderboard + plots from results records (constructed records and records written by real
tiny `bench run`s). Fast except the real-run fixture (three tiny runs, ~20 s each on 2 CPU cores)."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from reports import build_report  # noqa: E402
from reports import cli as report_cli  # noqa: E402
from reports.plots import dirichlet_alpha, rank_cv  # noqa: E402
from reports.stats import SeedValue, bootstrap_tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

# ------------------------------------------------------------------------------------------- record factory

RANK_SETTINGS = {"homo[8,8,8,8]": [8, 8, 8, 8], "hetero[16,8,4,4]": [16, 8, 4, 4],
                 "hetero[32,8,2,2]": [32, 8, 2, 2]}
BASE = {"kind": "run", "schema_version": 1}


def make_record(method: str, seed: int, *, ranks="hetero[16,8,4,4]", partition="dirichlet(alpha=0.5)",
                tasks=None, rounds=3, kind="run", run_dir=None) -> dict:
    setting = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "dataset": "dolly", "partition": partition,
               "ranks": ranks, "rank_distribution": "explicit", "num_clients": 4, "rounds": rounds,
               "client_fraction": 1.0, "preset": "quick"}
    rng = np.random.default_rng(zlib.crc32(f"{method}|{seed}|{ranks}|{partition}".encode()))
    bonus = {"flora": 0.04, "flexlora": 0.03, "fedit": 0.0, "fedavg-lora": 0.01, "base": -0.08}[method]
    hetero = {"homo[8,8,8,8]": 0.0, "hetero[16,8,4,4]": 0.01, "hetero[32,8,2,2]": 0.03}[ranks]
    tasks = tasks if tasks is not None else ["arc-easy", "piqa"]
    task_entries = {}
    for t in tasks:
        v = 0.55 + bonus - (hetero if method in ("fedavg-lora", "fedit") else 0) + rng.normal(0, 0.01)
        task_entries[t] = {"metric": "acc", "value": round(float(v), 4), "stderr": 0.02, "n": 50, "limit": 50,
                           "num_fewshot": 0}
        if run_dir is not None:
            rd = Path(run_dir) / "eval"
            rd.mkdir(parents=True, exist_ok=True)
            hits = (rng.random(50) < v).astype(int)
            task_entries[t]["value"] = float(hits.mean())
            (rd / f"{t}.jsonl").write_text("".join(json.dumps({"doc_id": i, "acc": int(h)}) + "\n"
                                                  for i, h in enumerate(hits)))
            task_entries[t]["samples"] = str(rd / f"{t}.jsonl")
    rec = {
        "schema_version": 1, "kind": kind, "method": method, "setting": setting, "seed": seed,
        "eval": {"backend": "hf", "tasks": task_entries, "missing": {}},
        "test_loss": 2.1 - bonus + rng.normal(0, 0.02),
    }
    if kind == "reference":
        rec["setting"] = {"model": setting["model"]}
        rec["run_id"] = f"base-s{seed}"
        return rec
    avg_noise = method in ("fedavg-lora", "fedit")
    rec.update({
        "run_id": f"{method}-{ranks}-{partition}-s{seed}",
        "config_hash": "h-" + method,
        "clients": [{"id": i, "rank": r, "num_examples": 100} for i, r in enumerate(RANK_SETTINGS[ranks])],
        "rounds": [{"round": k, "clients": [], "noise": (0.3 + 0.05 * k + hetero * 5 + rng.normal(0, 0.02))
                    if avg_noise else 0.0} for k in range(1, rounds + 1)],
        "communication": {"bytes_up": 3_000_000 + (2_000_000 if method == "flora" else 0),
                          "bytes_down": 3_000_000 * (4 if method == "flora" else 1)},
        "timings": {"total_s": 300.0 + seed, "train_s": 250.0},
    })
    return rec


def write(folder: Path, name: str, obj) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1))
    return p


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A results folder with several methods × seeds × settings, a reference row, and broken records."""
    root = tmp_path_factory.mktemp("synthetic")
    res = root / "results"
    for method in ("fedavg-lora", "fedit", "flora", "flexlora"):
        for seed in (0, 1, 2):
            for ranks in RANK_SETTINGS:
                run_dir = root / "runs" / f"{method}-{ranks}-s{seed}" if method == "flora" else None
                write(res, f"{method}-{ranks}-s{seed}.json", make_record(method, seed, ranks=ranks, run_dir=run_dir))
            for part in ("iid", "dirichlet(alpha=0.1)", "dirichlet(alpha=1.0)"):
                write(res, f"{method}-{part}-s{seed}.json", make_record(method, seed, partition=part))
    write(res, "base.json", make_record("base", 0, kind="reference"))
    # broken ones
    write(res, "malformed.json", '{"schema_version": 1, "kind": "run", ')
    newer = make_record("flora", 7)
    newer["schema_version"] = 99
    write(res, "future.json", newer)
    missing = make_record("flora", 8)
    del missing["communication"]
    write(res, "nocomm.json", missing)
    partial = make_record("flora", 9)
    partial["rounds"] = partial["rounds"][:1]
    write(res, "partial.json", partial)
    return res


# ------------------------------------------------------------------------------------------- unit pieces

def test_helpers():
    assert rank_cv([8, 8, 8]) == 0
    assert rank_cv([16, 8, 4, 4]) > rank_cv([8, 8, 4, 4]) > 0
    assert dirichlet_alpha("dirichlet(alpha=0.5)") == 0.5
    assert dirichlet_alpha("dirichlet(alpha=1)") == 1.0
    assert dirichlet_alpha("iid") == float("inf")
    assert dirichlet_alpha("shards(2)") is None


def test_bootstrap_is_seeded_and_covers_the_mean():
    per_task = {"a": [SeedValue(0.5, 0.02), SeedValue(0.6, 0.02), SeedValue(0.55, 0.02)]}
    idx = {"a": [0, 1, 2]}
    e1, avg1 = bootstrap_tasks(["k"], per_task, 3, idx)
    e2, avg2 = bootstrap_tasks(["k"], per_task, 3, idx)
    assert e1 == e2 and avg1 == avg2
    assert e1["a"].lo < 0.55 < e1["a"].hi and e1["a"].n == 3
    assert avg1.mean == pytest.approx(0.55)
    # samples widen nothing they should not: with 0/1 samples the CI is within [0, 1]
    samples = SeedValue(0.5, None, np.array([0.0, 1.0] * 25))
    e3, _ = bootstrap_tasks(["s"], {"a": [samples]}, 1, {"a": [0]})
    assert 0.0 <= e3["a"].lo < 0.5 < e3["a"].hi <= 1.0


# ------------------------------------------------------------------------------------------- leaderboard

def test_leaderboard_from_constructed_records(synthetic, tmp_path):
    out = tmp_path / "out"
    s = build_report([str(synthetic)], str(out))
    # 4 methods × (3 rank + 3 partition settings; hetero[16,8,4,4]/alpha=0.5 shared) + reference = 4*6 + 1
    assert s["rows"] == 25
    assert s["records"] == 4 * 6 * 3 + 1
    assert {Path(f).name for f in s["files"]} == {"LEADERBOARD.md", "leaderboard.csv", "leaderboard.html"}
    md = (out / "LEADERBOARD.md").read_text()
    assert "| Method |" in md and "arc-easy (acc)" in md and "base (reference)" in md
    assert "±" in md and "MiB" in md
    rows = list(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text())))
    assert len(rows) == 25
    ref = [r for r in rows if r["kind"] == "reference"]
    assert len(ref) == 1 and ref[0]["method"] == "base"
    flora = [r for r in rows if r["method"] == "flora" and r["ranks"] == "hetero[32,8,2,2]"]
    assert len(flora) == 1 and flora[0]["n_seeds"] == "3" and flora[0]["seeds"] == "0;1;2"
    assert flora[0]["ci_basis"] == "seeds+samples"        # flora records carry per-sample files
    lo, mean, hi = (float(flora[0][k]) for k in ("avg_ci_low", "avg", "avg_ci_high"))
    assert lo < mean < hi
    fedit = [r for r in rows if r["method"] == "fedit" and r["ranks"] == "homo[8,8,8,8]"][0]
    assert fedit["ci_basis"] == "seeds+stderr"
    assert float(fedit["bytes_total"]) == 6_000_000


def test_bad_records_are_skipped_and_named(synthetic, tmp_path):
    s = build_report([str(synthetic)], str(tmp_path / "out"))
    reasons = {Path(x["file"]).name: x["reason"] for x in s["skipped"]}
    assert set(reasons) == {"malformed.json", "future.json", "nocomm.json", "partial.json"}
    assert "not valid JSON" in reasons["malformed.json"]
    assert "schema_version 99" in reasons["future.json"]
    assert "communication" in reasons["nocomm.json"]
    assert "partial" in reasons["partial.json"] and "1 of 3 rounds" in reasons["partial.json"]
    md = (tmp_path / "out" / "LEADERBOARD.md").read_text()
    assert "`malformed.json`" in md and "schema_version 99" in md


def test_cli_report(synthetic, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    report_cli.add_arguments(parser)
    args = parser.parse_args(["--results", str(synthetic), "--out", str(tmp_path / "o")])
    assert report_cli.main(args) == 0
    captured = capsys.readouterr()
    assert "25 rows" in captured.out and "malformed.json" in captured.err
    assert (tmp_path / "o" / "LEADERBOARD.md").is_file()
    assert report_cli.main(parser.parse_args(["--results", str(tmp_path / "nope")])) == 2


@pytest.fixture(scope="module")
def built(synthetic, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("built") / "out"
    return out, build_report([str(synthetic)], str(out), plots=True)


def test_same_input_identical_bytes(synthetic, built, tmp_path):
    a, _ = built
    b = tmp_path / "b"
    build_report([str(synthetic)], str(b), plots=True)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 3 + 8
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # rebuilding the tables into the same folder changes nothing
    before = {rel: (b / rel).read_bytes() for rel in files_b}
    build_report([str(synthetic)], str(b))
    assert {rel: (b / rel).read_bytes() for rel in files_b} == before


# ------------------------------------------------------------------------------------------- plots

def _check_png(path: Path):
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rgb = img[..., :3]
    assert (rgb < 0.9).any(axis=-1).mean() > 0.01, f"{path} is (almost) blank"


def _check_svg(path: Path):
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    assert len(list(root.iter())) > 50
    assert "<dc:date>" not in path.read_text()


def test_plots(built):
    out, s = built
    plots = {Path(f).name for f in s["files"] if "/plots/" in f}
    for stem in ("score_vs_rank_heterogeneity", "score_vs_data_heterogeneity", "noise_vs_round",
                 "score_vs_communication"):
        assert any(n.startswith(stem) and n.endswith(".png") for n in plots), stem
        assert any(n.startswith(stem) and n.endswith(".svg") for n in plots), stem
    for n in plots:
        (_check_png if n.endswith(".png") else _check_svg)(out / "plots" / n)


def test_plot_without_data_is_not_written(tmp_path):
    res = tmp_path / "results"
    for seed in (0, 1):
        for ranks in ("homo[8,8,8,8]", "hetero[16,8,4,4]"):
            write(res, f"flora-{ranks}-s{seed}.json", make_record("flora", seed, ranks=ranks))
    out = tmp_path / "out"
    # a stale noise plot from an earlier build is removed, not left behind
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "noise_vs_round.png").write_bytes(b"old")
    s = build_report([str(res)], str(out), plots=True)
    assert not (out / "plots" / "noise_vs_round.png").exists()
    assert any(p["plot"] == "noise_vs_round" for p in s["plots_skipped"])
    assert (out / "plots" / "score_vs_rank_heterogeneity.png").is_file()


def test_empty_results_folder(tmp_path):
    (tmp_path / "results").mkdir()
    s = build_report([str(tmp_path / "results")], str(tmp_path / "out"), plots=True)
    assert s["rows"] == 0 and len(s["plots_skipped"]) == 4
    assert not (tmp_path / "out" / "plots").exists() or not any((tmp_path / "out" / "plots").iterdir())
    assert "No complete records" in (tmp_path / "out" / "LEADERBOARD.md").read_text()


# ------------------------------------------------------------------------------------------- HTML in Chromium

def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(synthetic, tmp_path):
    out = tmp_path / "out"
    build_report([str(synthetic)], str(out))
    page = (out / "leaderboard.html").resolve().as_uri()
    dom = _chromium(["--dump-dom", page], tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table id="leaderboard">' in dom.stdout
    assert dom.stdout.count('<tr class="run">') == 24 and dom.stdout.count('<tr class="reference">') == 1
    assert "flexlora" in dom.stdout
    shot = tmp_path / "shot.png"
    r = _chromium([f"--screenshot={shot}", "--window-size=1400,900", page], tmp_path / "profile2")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    dark = (img < 0.5).any(axis=-1).mean()
    assert dark > 0.005, "screenshot is blank"
    assert len(np.unique(img.reshape(-1, 3).round(2), axis=0)) > 10
    # the inline sorter: a click on the "Avg" header sorts rows by it, ascending (empty cells last)
    text = (out / "leaderboard.html").read_text()
    heads = re.findall(r'<th scope="col">(.*?)</th>', text)
    col = heads.index("Avg")
    clicked = out / "clicked.html"
    clicked.write_text(text.replace("</body>", "<script>document.getElementById('leaderboard').tHead.rows[0]"
                                               f".cells[{col}].click();</script>\n</body>"))
    dom = _chromium(["--dump-dom", clicked.resolve().as_uri()], tmp_path / "profile3")
    body = dom.stdout.split("<tbody>")[1]
    keys = [re.findall(r'data-sort="([^"]*)"', tr)[col] for tr in body.split("</tr>")[:-1]]
    vals = [float(k) for k in keys if k]
    assert len(vals) == 25 and vals == sorted(vals)
    assert 'class="asc"' in dom.stdout


# ------------------------------------------------------------------------------------------- real tiny runs

def _tiny_data_root(root: Path) -> Path:
    """An offline dolly-shaped data root (the preset's dataset), so no hub access is needed."""
    d = root / "data" / "dolly_fedit_10clients"
    d.mkdir(parents=True)
    cats = ["open_qa", "brainstorming", "classification", "summarization"]

    def rec(i, j):
        return {"instruction": f"Question {i}-{j}: what is {i} plus {j}?", "context": "" if j % 2 else f"{i} and {j}.",
                "response": f"The answer is {i + j}.", "category": cats[(i + j) % 4]}
    for i in range(10):
        (d / f"local_training_{i}.json").write_text(json.dumps([rec(i, j) for j in range(8)]))
    (d / "global_test.json").write_text(json.dumps([rec(100, j) for j in range(8)]))
    return root / "data"


def _engine_ready() -> str | None:
    """None when `bench run --preset tiny` can run here, else why not."""
    if not (REPO / "bench" / "presets" / "tiny.yaml").is_file():
        return "bench/presets/tiny.yaml is not there yet"
    r = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        return f"`python -m bench.cli run --help` fails: {(r.stderr or r.stdout).strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def real_results(tmp_path_factory) -> Path:
    """Records written by real tiny runs: flora seed 0, fedavg-lora seeds 0 and 1."""
    why = _engine_ready()
    if why:
        pytest.skip(f"engine not ready: {why}")
    root = tmp_path_factory.mktemp("real")
    data = _tiny_data_root(root)
    env = {**os.environ, "BENCH_DATA_ROOT": str(data), "PYTHONPATH": str(REPO)}
    for method, seed in (("flora", 0), ("fedavg-lora", 0), ("fedavg-lora", 1)):
        cmd = [sys.executable, "-m", "bench.cli", "run", "--preset", "tiny", "--method", method,
               "--seed", str(seed), "--data-root", str(data), "--no-eval",
               "--output-dir", str(root / "runs" / f"{method}-s{seed}"), "--results-dir", str(root / "results")]
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}"
    return root / "results"


def test_report_from_real_tiny_runs(real_results, tmp_path):
    out = tmp_path / "out"
    s = build_report([str(real_results)], str(out), plots=True)
    assert s["skipped"] == [], s["skipped"]
    assert s["records"] == 3 and s["rows"] == 2
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text()))}
    assert set(rows) == {"flora", "fedavg-lora"}
    assert rows["fedavg-lora"]["n_seeds"] == "2" and rows["flora"]["n_seeds"] == "1"
    assert rows["fedavg-lora"]["model"] == "tiny-random-llama" and rows["fedavg-lora"]["dataset"] == "dolly"
    for r in rows.values():
        assert float(r["test_loss"]) > 0 and float(r["bytes_total"]) > 0 and float(r["wall_s"]) > 0
    assert float(rows["fedavg-lora"]["test_loss_ci_low"]) <= float(rows["fedavg-lora"]["test_loss"])
    names = {Path(f).name for f in s["files"]}
    # --no-eval: no eval score, so the plots show test loss; fedavg-lora has aggregation noise per round
    assert {"noise_vs_round.png", "noise_vs_round.svg", "score_vs_communication.png"} <= names
    # one rank setting and one partition: nothing to ablate, so no such figures, and the summary says why
    assert not any(n.startswith(("score_vs_rank", "score_vs_data")) for n in names)
    assert {p["plot"] for p in s["plots_skipped"]} >= {"score_vs_rank_heterogeneity", "score_vs_data_heterogeneity"}
    _check_png(out / "plots" / "noise_vs_round.png")
    _check_svg(out / "plots" / "noise_vs_round.svg")
    # deterministic on real records too
    again = tmp_path / "again"
    build_report([str(real_results)], str(again), plots=True)
    for f in s["files"]:
        rel = Path(f).relative_to(out)
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_real_and_constructed_records_merge(real_results, synthetic, tmp_path):
    """--results repeated: two folders merge into one leaderboard; the broken records are still named."""
    s = build_report([str(real_results), str(synthetic)], str(tmp_path / "out"))
    assert s["rows"] == 27 and len(s["skipped"]) == 4


def test_duplicate_seed_keeps_one_record(tmp_path):
    res = tmp_path / "results"
    rec = make_record("fedit", 0)
    write(res, "a.json", rec)
    later = dict(rec, run_id=rec["run_id"] + "-rerun")
    write(res, "b.json", later)
    s = build_report([str(res)], str(tmp_path / "out"))
    assert s["records"] == 1 and s["rows"] == 1
    assert [Path(x["file"]).name for x in s["skipped"]] == ["a.json"]
    assert "duplicate of b.json" in s["skipped"][0]["reason"]


def test_per_sample_values_read_from_a_real_evaluator_output(tmp_path, shared_data):
    """The bootstrap over samples reads the per-sample JSONL that evaluators actually writes."""
    from bench.models import resolve_model
    from evaluators import evaluate
    from reports.stats import load_sample_values

    section = evaluate(resolve_model("tiny-random-llama")[0], ["winogrande"], backend="hf", limit=4,
                       data_root=str(shared_data), out_dir=str(tmp_path))
    task = section["tasks"]["winogrande"]
    vals = load_sample_values(Path(task["samples"]), task["metric"])
    assert vals is not None and len(vals) == 4 and set(vals) <= {0.0, 1.0}
    assert vals.mean() == pytest.approx(task["value"])


def test_per_sample_files_found_beside_committed_records(tmp_path, shared_data):
    """A record moved off the machine that made it finds its samples under <results>/samples/<run_id>/."""
    import json
    import shutil

    from bench.models import resolve_model
    from evaluators import evaluate
    from reports import build_report

    section = evaluate(resolve_model("tiny-random-llama")[0], ["winogrande"], backend="hf", limit=4,
                       data_root=str(shared_data), out_dir=str(tmp_path / "elsewhere"))
    results = tmp_path / "results"
    (results / "samples" / "ref-1").mkdir(parents=True)
    shutil.move(section["tasks"]["winogrande"]["samples"], results / "samples" / "ref-1" / "winogrande.jsonl")
    record = {"schema_version": 1, "kind": "reference", "status": "complete", "run_id": "ref-1", "method": "base",
              "setting": {"model": "tiny-random-llama"}, "seed": 0, "eval": section, "timings": {"total_s": 1.0}}
    (results / "ref-1.json").write_text(json.dumps(record))
    build_report([str(results)], str(tmp_path / "out"))
    import csv

    rows = list(csv.DictReader(open(tmp_path / "out" / "leaderboard.csv")))
    assert [r["ci_basis"] for r in rows] == ["samples"]  # not the stderr fallback
