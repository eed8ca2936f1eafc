"""benchmarks.eval_dtype.compare: the agreement figures of the bf16-vs-fp32 benchmark, on per-sample files in
lm-eval's format (log-likelihood tasks: resps = [[[ll, is_greedy]] per choice]; generation: [[text]])."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.eval_dtype import compare


def _section(tmp_path, name: str, tasks: dict[str, tuple[float, list[dict]]]) -> dict:
    out = {"tasks": {}}
    for task, (value, rows) in tasks.items():
        path = tmp_path / f"{name}-{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out["tasks"][task] = {"metric": "acc", "value": value, "n": len(rows), "samples": str(path)}
    return out


def _ll(doc_id: int, lls: list[float]) -> dict:
    return {"doc_id": doc_id, "resps": [[[x, False]] for x in lls]}


def test_compare_counts_same_answers_and_relative_loglik_changes(tmp_path):
    base = _section(tmp_path, "fp32", {
        "piqa": (0.5, [_ll(0, [-10.0, -12.0]), _ll(1, [-0.5, -0.4])]),
        "gsm8k": (0.0, [{"doc_id": 0, "resps": [["42"]]}, {"doc_id": 1, "resps": [["7"]]}])})
    # doc 0 keeps its answer (-10.1 > -11.9); doc 1 flips (-0.5 was lower, now higher); |ll| < 1 uses the absolute
    # change; the docs come in another order, matched by doc_id
    other = _section(tmp_path, "bf16", {
        "piqa": (1.0, [_ll(1, [-0.3, -0.4]), _ll(0, [-10.1, -11.9])]),
        "gsm8k": (0.0, [{"doc_id": 1, "resps": [["8"]]}, {"doc_id": 0, "resps": [["42"]]}])})
    for section, answers in ((base, {0: "42", 1: "7"}), (other, {0: "42", 1: "7"})):  # doc 1: new text, same number
        path = Path(section["tasks"]["gsm8k"]["samples"])
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "filtered_resps": {"strict-match": answers[r["doc_id"]]}}) + "\n"
                                for r in rows))
    got = compare(base, other)
    assert got["piqa"]["same_answer"] == 1 and (got["piqa"]["float32"], got["piqa"]["bfloat16"]) == (0.5, 1.0)
    changes = sorted([0.1 / 10, 0.1 / 12, 0.2, 0.0])
    assert got["piqa"]["loglik_rel_change_max"] == pytest.approx(changes[-1])
    assert got["piqa"]["loglik_rel_change_median"] == pytest.approx((changes[1] + changes[2]) / 2)
    assert got["gsm8k"]["same_answer"] == 1 and got["gsm8k"]["loglik_rel_change_max"] is None
    assert got["gsm8k"]["same_extracted"] == 2 and "same_extracted" not in got["piqa"]
