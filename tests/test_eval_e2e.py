"""End to end with the real default model (SmolLM2-135M-Instruct) and the real data root, hf backend.

One evaluate() call scores every task at a small seeded --limit (the model loads once); the CLI tests run
`bench eval --model` and `bench eval --run` for real and check the records they write.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from benchmarks.eval_dtype import compare, samples_by_doc
from evaluators import TASK_GROUPS, evaluate, runner
from conftest import require_data_root

pytestmark = pytest.mark.slow

LIMITS = {"mmlu": 6, "gsm8k": 2, "humaneval": 2}
DEFAULT_LIMIT = 6
MD5 = {  # shared/data/SOURCES.md
    "boolq": "f4ad0c5d910b9836f0e58c5ed831afd9", "piqa": "da8ed93e6be330cb8f8a9606213ad46d",
    "siqa": "a8bd33eedd7ec86c27aa8e06bc594888", "winogrande": "5e2389dc0ed9a89b7159ad13d6d2e29a",
    "arc_easy": "e3c56d0d1e3affddde431572c4ee37c4", "arc_challenge": "778e4d8e1ca647e6bfa068a75a363ca9",
    "openbookqa": "dca06531013f045d79787d7490873aa3", "gsm8k": "6493e22fc90d491ae8da0b88ffcfebae",
}
SIZES = {"boolq": 3270, "piqa": 1838, "siqa": 1954, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
         "openbookqa": 500, "gsm8k": 1319, "humaneval": 164}


def _data_root() -> str:
    return str(require_data_root())


@pytest.fixture(scope="module")
def model_path() -> str:
    from bench.models import resolve_model

    return resolve_model("default")[0]


@pytest.fixture(scope="module")
def section(model_path, tmp_path_factory):
    """All tasks, each with its own small limit: one evaluate() per distinct limit (the model loads per call)."""
    out = tmp_path_factory.mktemp("eval")
    os.environ["FEDLORA_EVAL_OFFLINE"] = "1"  # CI has no hub; make the offline path explicit anywhere
    capped = "FEDLORA_HUMANEVAL_MAX_GEN_TOKS" not in os.environ
    if capped:  # lm-eval's 1024 tokens per problem is minutes on a CPU for a model that never stops
        os.environ["FEDLORA_HUMANEVAL_MAX_GEN_TOKS"] = "128"
    try:
        commonsense = evaluate(model_path, ["commonsense", "mmlu"], backend="hf", limit=DEFAULT_LIMIT,
                               data_root=_data_root(), out_dir=str(out), seed=0)
        gen = evaluate(model_path, ["gsm8k", "humaneval"], backend="hf", limit=2, data_root=_data_root(),
                       out_dir=str(out), seed=0, allow_code_execution=True)
    finally:
        os.environ.pop("FEDLORA_EVAL_OFFLINE", None)
        if capped:
            os.environ.pop("FEDLORA_HUMANEVAL_MAX_GEN_TOKS", None)
    merged = dict(commonsense)
    merged["tasks"] = {**commonsense["tasks"], **gen["tasks"]}
    merged["missing"] = {**commonsense["missing"], **gen["missing"]}
    merged["_gen"] = gen
    return merged


def test_section_shape(section):
    assert section["backend"] == "hf" and section["lm_eval_version"] == __import__("importlib.metadata").metadata.version("lm_eval")
    assert section["throughput"]["samples_per_s"] > 0 and section["throughput"]["tokens_per_s"] > 0
    assert section["_gen"]["throughput"]["tokens_per_s"] > 0
    expected = [t for t in TASK_GROUPS["commonsense"] if t != "hellaswag"] + ["mmlu", "gsm8k", "humaneval"]
    assert sorted(section["tasks"]) == sorted(expected)
    # HellaSwag is not in the data root and the hub is unreachable here: reported, never scored as zero
    assert list(section["missing"]) == ["hellaswag"]
    assert "commonsense/hellaswag/test.json" in section["missing"]["hellaswag"]
    assert "hub is unreachable" in section["missing"]["hellaswag"]


@pytest.mark.parametrize("name", ["boolq", "piqa", "siqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
                                  "mmlu", "gsm8k", "humaneval"])
def test_task_entry(section, name):
    t = section["tasks"][name]
    limit = 2 if name in ("gsm8k", "humaneval") else DEFAULT_LIMIT
    assert t["limit"] == limit and t["n"] == limit
    assert 0.0 <= t["value"] <= 1.0
    assert t["stderr"] is None or t["stderr"] >= 0
    assert t["num_fewshot"] == {"mmlu": 5, "gsm8k": 5}.get(name, 0)
    assert t["metric"] == {"gsm8k": "exact_match,strict-match", "humaneval": "pass@1"}.get(name, "acc")
    assert t["metrics"][t["metric"]] == pytest.approx(t["value"])
    if name in MD5:
        assert t["source"]["md5"] == MD5[name]
    assert "seeded random subset" in t["notes"]
    lines = [json.loads(line) for line in Path(t["samples"]).read_text().splitlines()]
    assert len(lines) == t["n"]
    # the per-sample file reproduces the score
    flt = t["metric"].split(",")[1] if "," in t["metric"] else next(iter(lines[0]["metrics"]))
    key = t["metric"].split(",")[0]
    assert sum(rec["metrics"][flt][key] for rec in lines) / len(lines) == pytest.approx(t["value"])
    # --limit is a seeded random subset, not the first N
    if name in SIZES:
        assert sorted(rec["doc_id"] for rec in lines) == runner.seeded_subset(SIZES[name], limit, 0, name)


def test_task_specific_contents(section):
    tasks = section["tasks"]
    for name in ("piqa", "arc_easy", "arc_challenge", "openbookqa"):
        assert set(tasks[name]["metrics"]) == {"acc", "acc_norm"}
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(tasks["gsm8k"]["metrics"])
    assert len(tasks["mmlu"]["metrics"]["subjects"]) >= 1
    assert "no passage" in tasks["boolq"]["notes"]
    he = [json.loads(line) for line in Path(tasks["humaneval"]["samples"]).read_text().splitlines()]
    assert all("sandbox" in rec and rec["sandbox"]["status"] for rec in he)
    assert "isolation" in tasks["humaneval"]["notes"] and "max_gen_toks" in tasks["humaneval"]["notes"]
    mmlu = [json.loads(line) for line in Path(tasks["mmlu"]["samples"]).read_text().splitlines()]
    assert all(rec["prompt"].count("\nAnswer:") == 6 for rec in mmlu)  # 5 shots + the question
    assert all(rec["continuations"] == [" A", " B", " C", " D"] for rec in mmlu)


def _cli(argv: list[str]) -> int:
    from evaluators import cli

    p = argparse.ArgumentParser(prog="bench eval")
    cli.add_arguments(p)
    return cli.main(p.parse_args(argv))


def test_bfloat16_scores_the_same_documents_close_to_float32(section, model_path, tmp_path):
    """--dtype bfloat16 (2.5x faster on this CPU, docs/evaluation.md) really scores in bf16: the same documents
    and prompts as float32, log-likelihoods that differ (so the weights were cast) but only by bf16 rounding,
    mostly the same answers; its request cache is a separate file, never mixed with float32 answers."""
    assert section["dtype"] == "float32"
    bf16 = evaluate(model_path, ["piqa", "arc_easy"], backend="hf", limit=DEFAULT_LIMIT, data_root=_data_root(),
                    out_dir=str(tmp_path), seed=0, dtype="bfloat16")
    assert bf16["dtype"] == "bfloat16" and "-bfloat16-" in Path(bf16["request_cache"]["path"]).name
    assert "-float32-" in Path(section["request_cache"]["path"]).name
    scored = {name: section["tasks"][name] for name in ("piqa", "arc_easy")}
    docs = 0
    for name in scored:
        ref, got = samples_by_doc(section, name), samples_by_doc(bf16, name)
        assert got.keys() == ref.keys()
        for doc_id, rec in got.items():
            assert rec["prompt"] == ref[doc_id]["prompt"] and rec["continuations"] == ref[doc_id]["continuations"]
        docs += len(got)
    assert docs == 2 * DEFAULT_LIMIT
    agreement = compare({"tasks": scored}, bf16)  # the figures benchmarks/eval_dtype.py reports
    max_delta = max(a["loglik_rel_change_max"] for a in agreement.values())
    assert 0 < max_delta < 0.1, max_delta  # bf16 keeps 8 bits of mantissa: ~1% per log-likelihood
    assert sum(a["same_answer"] for a in agreement.values()) >= docs - 2


def test_cli_model_writes_a_reference_record(tmp_path, capsys):
    from bench.io import read_record
    from bench.models import resolve_model, weights_hash

    rc = _cli(["--model", "default", "--tasks", "arc_easy,hellaswag", "--limit", "3", "--backend", "hf",
               "--data-root", _data_root(), "--results-dir", str(tmp_path / "results"),
               "--output-dir", str(tmp_path / "runs" / "ref")])
    assert rc == 0, capsys.readouterr().err
    (path,) = list((tmp_path / "results").glob("*.json"))
    rec = read_record(path)
    assert rec["kind"] == "reference" and rec["method"] == "base" and rec["schema_version"] == 2
    assert rec["run_id"] == path.stem and rec["setting"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert rec["provenance"]["model_hash"] == weights_hash(resolve_model("default")[0])
    assert rec["provenance"]["packages"]["lm_eval"] == rec["eval"]["lm_eval_version"]
    assert rec["timings"]["eval_s"] > 0
    assert rec["eval"]["tasks"]["arc_easy"]["n"] == 3
    assert Path(rec["eval"]["tasks"]["arc_easy"]["samples"]) == tmp_path / "runs" / "ref" / "eval" / "arc_easy.jsonl"
    assert "hellaswag" in rec["eval"]["missing"]


def test_cli_run_fills_the_records_eval_section(tmp_path, capsys, model_path):
    from bench.io import read_record

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "global_model").symlink_to(model_path)
    record_path = tmp_path / "results" / "r1.json"
    record_path.parent.mkdir()
    original = {"schema_version": 1, "kind": "run", "run_id": "r1", "method": "fedavg-lora",
                "setting": {"model": "x"}, "seed": 0, "timings": {"total_s": 1.0}, "run_dir": str(run_dir)}
    record_path.write_text(json.dumps(original))
    (run_dir / "run.json").write_text(json.dumps({"record": str(record_path)}))
    rc = _cli(["--run", str(run_dir), "--tasks", "winogrande", "--limit", "3", "--backend", "hf",
               "--data-root", _data_root()])
    assert rc == 0, capsys.readouterr().err
    rec = read_record(record_path)
    assert {k: rec[k] for k in original if k != "timings"} == {k: v for k, v in original.items() if k != "timings"}
    assert rec["timings"]["total_s"] == 1.0 and rec["timings"]["eval_s"] > 0
    from bench.provenance import CODE
    assert rec["eval"]["code"] == {"git_commit": CODE["git_commit"], "git_dirty": CODE["git_dirty"]}
    t = rec["eval"]["tasks"]["winogrande"]
    assert t["n"] == 3 and Path(t["samples"]) == (run_dir / "eval" / "winogrande.jsonl").resolve()
    assert Path(t["samples"]).is_file()


def test_cli_run_adds_tasks_to_the_eval_section_scored_the_same_way(tmp_path, capsys, model_path):
    """A second `bench eval --run` with other tasks keeps the tasks already scored by the same backend and dtype
    (each with the commit it was scored at) and adds the new ones; eval_s accumulates. Scored in another dtype,
    the section is replaced whole, and the command says so."""
    from bench.io import read_record

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "global_model").symlink_to(model_path)
    record_path = tmp_path / "results" / "r1.json"
    record_path.parent.mkdir()
    record_path.write_text(json.dumps({"schema_version": 1, "kind": "run", "run_id": "r1", "method": "fedavg-lora",
                                       "setting": {"model": "x"}, "seed": 0, "timings": {"total_s": 1.0},
                                       "run_dir": str(run_dir)}))
    (run_dir / "run.json").write_text(json.dumps({"record": str(record_path)}))
    common = ["--run", str(run_dir), "--limit", "3", "--backend", "hf", "--data-root", _data_root()]
    assert _cli(common + ["--tasks", "winogrande"]) == 0, capsys.readouterr().err
    first = read_record(record_path)
    assert _cli(common + ["--tasks", "arc_easy"]) == 0, capsys.readouterr().err
    assert "kept the tasks already scored the same way: winogrande" in capsys.readouterr().out
    rec = read_record(record_path)
    assert list(rec["eval"]["tasks"]) == ["winogrande", "arc_easy"]
    assert rec["eval"]["tasks"]["winogrande"] == first["eval"]["tasks"]["winogrande"]
    assert rec["eval"]["tasks"]["arc_easy"]["n"] == 3 and "git_commit" in rec["eval"]["tasks"]["arc_easy"]["code"]
    assert rec["timings"]["eval_s"] > first["timings"]["eval_s"]
    assert _cli(common + ["--tasks", "arc_easy", "--dtype", "bfloat16"]) == 0, capsys.readouterr().err
    assert "replaced the record's eval section (winogrande, arc_easy: backend hf, dtype float32)" in capsys.readouterr().out
    rec = read_record(record_path)
    assert list(rec["eval"]["tasks"]) == ["arc_easy"] and rec["eval"]["dtype"] == "bfloat16"
