"""benchmarks.eval_full: a full-benchmark measurement in parts that a later session continues, and its summary."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks import eval_full

pytestmark = pytest.mark.slow


def _small_mmlu(root: Path, shared: Path, rows: dict[str, int]) -> None:
    for subject, n in rows.items():
        for split in ("test", "dev"):
            src = shared / "mmlu" / split / f"{subject}_{split}.csv"
            dst = root / "mmlu" / split / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(src, newline="", encoding="utf-8") as f:
                kept = list(csv.reader(f))[: 1 + (n if split == "test" else 5)]
            with open(dst, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(kept)


def test_parts_run_across_sessions_and_add_up(tmp_path, shared_data, capsys):
    root, results = tmp_path / "data", tmp_path / "results"
    _small_mmlu(root, Path(shared_data), {"abstract_algebra": 3, "anatomy": 4})
    common = ["run", "--task", "mmlu", "--model", "tiny-random-llama", "--data-root", str(root),
              "--runs", str(tmp_path / "runs"), "--results", str(results)]
    # session 1: a budget that holds the first part's estimate (3 docs x 2 s) but not both parts' (14 s)
    assert eval_full.main(common + ["--budget-min", str(10 / 60)]) == 0
    folder = results / "mmlu-hf-float32"
    first = eval_full.records(folder)
    assert list(first) == [("mmlu_abstract_algebra",)]
    printed = capsys.readouterr()
    assert "stop: mmlu_anatomy" in printed.out
    # the records stamp the tree's git state, and the run says so before any work when that state is dirty
    assert ("warning: git:" in printed.err) == first[("mmlu_abstract_algebra",)]["provenance"]["git_dirty"]
    # session 2: only the part without a record runs
    assert eval_full.main(common) == 0
    both = eval_full.records(folder)
    assert list(both) == [("mmlu_abstract_algebra",), ("mmlu_anatomy",)]
    assert both[("mmlu_abstract_algebra",)]["run_id"] == first[("mmlu_abstract_algebra",)]["run_id"]
    for rec in both.values():
        assert rec["config"]["dtype"] == "float32" and rec["config"]["backend"] == "hf"
        assert rec["provenance"]["load_avg_1m_start"] is not None and rec["timings"]["eval_s"] > 0
    summary = (results / "SUMMARY.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| mmlu-hf-float32"))
    wall = sum(r["timings"]["eval_s"] for r in both.values())
    p = sum(t["value"] * t["n"] for r in both.values() for t in r["eval"]["tasks"].values()) / 7
    assert "| 2/57 | 7 |" in row and f"({wall:,.0f} s)" in row and f"{p:.4f} ±" in row
    # agreement: a seeded subset of every part scored again (the same backend here: every answer must be the same,
    # each document found in the group's per-sample files by its lm-eval doc id)
    assert eval_full.main(["agree", "--group", "mmlu-hf-float32", "--against", "hf", "--limit", "2",
                           "--model", "tiny-random-llama", "--data-root", str(root), "--runs", str(tmp_path / "runs"),
                           "--results", str(results)]) == 0
    agreed = json.loads((folder / "agreement-hf.json").read_text())
    tasks = {t: a for part in agreed["parts"].values() for t, a in part["tasks"].items()}
    assert sorted(tasks) == ["mmlu_abstract_algebra", "mmlu_anatomy"]
    for a in tasks.values():
        assert a["n"] == 2 and a["missing_in_group"] == 0 and a["same_answer"] == 2 and a["same_prompt"] == 2
        assert a["loglik_abs_change_max"] <= 1e-4 and a["reference_score"] == a["group_score"]
    assert "| mmlu_anatomy | 2 | 2/2 | 2/2 |" in (folder / "agreement-hf.md").read_text()   # same prompts, answers
    # a slow task on a smaller subset than the rest (--task-limit), named in the table's caption
    assert eval_full.main(["agree", "--group", "mmlu-hf-float32", "--against", "hf", "--limit", "2",
                           "--task-limit", "mmlu_anatomy=1", "--model", "tiny-random-llama", "--data-root", str(root),
                           "--runs", str(tmp_path / "runs"), "--results", str(results)]) == 0
    agreed = json.loads((folder / "agreement-hf.json").read_text())
    n = {t: a["n"] for part in agreed["parts"].values() for t, a in part["tasks"].items()}
    assert n == {"mmlu_abstract_algebra": 2, "mmlu_anatomy": 1} and agreed["task_limits"] == {"mmlu_anatomy": 1}
    assert "(2 documents; mmlu_anatomy: 1, seed 0;" in (folder / "agreement-hf.md").read_text()
    capsys.readouterr()
    assert eval_full.main(["agree", "--group", "mmlu-hf-float32", "--task-limit", "gsm8k=0", "--data-root", str(root),
                           "--results", str(results)]) == 2
    assert "error: task-limit: 'gsm8k=0' is not TASK=N" in capsys.readouterr().err
    assert eval_full.main(["agree", "--group", "mmlu-hf-float32", "--task-limit", "gsm8k=5", "--data-root", str(root),
                           "--results", str(results)]) == 2   # a task the group does not hold: refused, not ignored
    assert "error: task-limit: gsm8k not in mmlu-hf-float32" in capsys.readouterr().err
    assert eval_full.main(["agree", "--group", "nothing-hf-float32", "--data-root", str(root),
                           "--results", str(results)]) == 2
    assert "error: group: no records in" in capsys.readouterr().err


def test_suite_group_stands_beside_the_float32_floor(tmp_path):
    """SUMMARY.md's floor table: each task's wall time over the floor benchmarks.eval_floor counted for it, the
    tasks with a floor summed, and the whole record over the suite's floor; a task with no floor says so."""
    folder = tmp_path / "suite-vllm-float32"
    folder.mkdir()
    tasks = {"mmlu": (100, 30.0), "gsm8k": (10, 12.0), "humaneval": (5, 4.0)}
    rec = {"run_id": "base-s0-20261206T000000", "config": {"tasks": list(tasks)}, "timings": {"eval_s": 50.0},
           "provenance": {"load_avg_1m_start": 0.5, "load_avg_1m_end": 1.0},
           "eval": {"tasks": {t: {"metric": "acc", "value": 0.25, "n": n, "seconds": s} for t, (n, s) in tasks.items()}}}
    (folder / "base-s0-20261206T000000.json").write_text(json.dumps(rec))
    (folder / "agreement-hf.json").write_text("{}")   # beside the records, never read as one
    floor = tmp_path / "floor.json"
    floor.write_text(json.dumps({"matmul_gflops_fp32": 100.0, "cpu_count": 2, "git_commit": "f" * 40, "when": "T",
                                 "floor_s": 25.0, "per_task": {"mmlu": {"floor_s": 15.0}, "gsm8k": {"floor_s": 10.0}}}))
    lines = eval_full.floor_lines(tmp_path, floor)
    assert "| mmlu | 100 | 30 | 15.0 | 2.00x |" in lines and "| gsm8k | 10 | 12 | 10.0 | 1.20x |" in lines
    assert "| humaneval | 5 | 4 |  | no floor counted |" in lines
    assert "| **tasks with a floor** | | **42** | **25.0** | **1.68x** |" in lines
    assert any("Whole record: 50 s" in ln and "**2.00x**" in ln for ln in lines)
    assert eval_full.floor_lines(tmp_path, tmp_path / "absent.json") == []
