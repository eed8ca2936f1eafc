"""One record definition: bench/record.py's SCHEMA is what build_record writes, what `problem` (the reports'
validator) checks and what ARCHITECTURE.md's example shows.

The committed records (results/ and benchmarks/results/, written by `bench run` and `bench eval`) are rebuilt through build_record and
`updated` from their own fields and compared whole: the builder writes them key for key, in order.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.record import KINDS, SCHEMA, SECTIONS, build_record, problem, updated

REPO = Path(__file__).resolve().parents[1]
RECORDS = sorted(p for folder in ("results", "benchmarks/results") for p in (REPO / folder).rglob("*.json")
                 if (lambda r: isinstance(r, dict) and r.get("schema_version") == 2 and "kind" in r)(json.loads(p.read_text())))


def _documented_sections() -> list[str]:
    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = text.split("## Results record", 1)[1].split("```json\n", 1)[1].split("\n```", 1)[0]
    return re.findall(r'^  "(\w+)":', block, flags=re.M)


def _rebuilt(rec: dict) -> dict:
    """The record through the builder, from its own fields (communication and test_loss are derived there)."""
    fields = {k: rec[k] for k in ("kind", "run_id", "method", "setting", "seed", "config", "config_hash", "provenance",
                                  "dtypes", "timings", "run_dir", "engine", "clients", "rounds", "test", "eval",
                                  "method_info")}
    out = build_record(**fields, personalized=rec.get("personalized"), privacy=rec.get("privacy"))
    return updated(out, eval_clients=rec["eval_clients"]) if "eval_clients" in rec else out


def _minimal(kind: str) -> dict:
    run = kind == "run"
    rounds = [{"round": 1, "clients": [{"id": 0, "bytes_up": 10, "bytes_down": 20}]}] if run else []
    return build_record(
        kind=kind, run_id="x-s0", method="fedit" if run else "base", seed=0, config={"lr": 1e-4}, config_hash="h",
        setting={"model": "m", "dataset": "d" if run else None, "partition": {"kind": "iid"} if run else None,
                 "ranks": [4] if run else None, "rounds": 1 if run else 0},
        provenance={}, dtypes={"export": "float32", "eval": None}, timings={"total_s": 1.23456}, run_dir="runs/x",
        engine="inprocess" if run else None, rounds=rounds,
        test={"loss": 2.0, "loss_sums": [4.0], "tokens": [2]}, eval={"tasks": {"piqa": {"metric": "acc", "value": 0.5}}})


def test_the_docs_list_the_schema_in_order():
    assert _documented_sections() == [s.name for s in SCHEMA]


def test_build_record_writes_the_schema_in_order():
    rec = _minimal("run")
    assert list(rec) == [s.name for s in SCHEMA if not s.optional]
    assert rec["communication"] == {"bytes_up": 10, "bytes_down": 20} and rec["test_loss"] == 2.0
    assert rec["timings"] == {"total_s": 1.235}
    full = build_record(**{k: v for k, v in _rebuilt_args(rec).items()}, personalized={"per_client": []},
                        privacy={"epsilon_max": 1.0})
    assert list(full) == [s.name for s in SCHEMA if s.name != "eval_clients"]


def _rebuilt_args(rec: dict) -> dict:
    return {k: rec[k] for k in ("kind", "run_id", "method", "setting", "seed", "config", "config_hash", "provenance",
                                "dtypes", "timings", "run_dir", "engine", "rounds", "test")}


@pytest.mark.parametrize("kind", KINDS)
def test_the_validator_follows_the_schema(kind):
    rec = _minimal(kind)
    assert problem(rec) is None
    for s in SCHEMA:
        if s.name in ("schema_version", "kind"):
            continue
        missing = {k: v for k, v in rec.items() if k != s.name}
        why = problem(missing)
        if kind in s.required:
            assert why == f"missing required field '{s.name}'{s.what}", s.name
        else:
            assert why is None, (s.name, why)
        wrong = {**rec, s.name: True}  # a boolean is no section's type
        assert problem(wrong) in (f"field '{s.name}' must be " + {"object": "an object", "list": "a list",
                                                                  "string": "a string", "integer": "an integer",
                                                                  "number": "a number or null"}[s.type],
                                  f"missing required field '{s.name}'{s.what}"), s.name


def test_updated_is_a_new_record_in_schema_order():
    rec = _minimal("run")
    before = json.dumps(rec)
    new = updated(rec, eval={"tasks": {}}, timings={**rec["timings"], "eval_s": 2.0})
    assert rec["eval"]["tasks"]
    assert json.dumps(rec) == before  # the record passed in is unchanged
    assert list(new) == list(rec) and new["eval"] == {"tasks": {}} and new["timings"]["eval_s"] == 2.0
    assert list(updated(new, eval_clients={"round": 1})) == [*rec, "eval_clients"]
    with pytest.raises(ValueError, match="not in the schema"):
        updated(rec, evals={})


def test_every_section_has_a_known_type():
    assert set(SECTIONS) == {s.name for s in SCHEMA} and len(SECTIONS) == len(SCHEMA)
    assert {s.type for s in SCHEMA} <= {"object", "list", "string", "integer", "number"}
    assert all(set(s.required) <= set(KINDS) for s in SCHEMA)


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_records_are_what_the_builder_writes(path):
    rec = json.loads(path.read_text())
    assert problem(rec) is None
    assert json.dumps(_rebuilt(rec)) == json.dumps(rec)


def test_there_are_committed_records_of_both_kinds():
    kinds = {json.loads(p.read_text())["kind"] for p in RECORDS}
    assert len(RECORDS) > 100 and kinds == {"run", "reference"}
