"""Study v2's setting: FedIT's Dolly split with a fixed held-out draw, prompts that keep their instruction, and
greedy generations scored by ROUGE-L (task dolly_heldout) — checked on the real data root and the real model."""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import RunConfig
from bench.data import carve_heldout, heldout_records, load_dataset, tokenize
from conftest import REPO
from evaluators.tasks import loaders


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from bench.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("default")[0])


def _key(r: dict) -> tuple:
    return r["instruction"], r["input"], r["output"]


def test_heldout_draw_is_fixed_disjoint_and_out_of_every_client(shared_data):
    test = heldout_records("dolly-heldout", shared_data, "test")
    val = heldout_records("dolly-heldout", shared_data, "validation")
    assert (len(test), len(val)) == (500, 200)
    assert heldout_records("dolly-heldout", shared_data, "test") == test  # the same draw every time
    data = {seed: load_dataset(RunConfig(dataset="dolly-heldout", data_root=str(shared_data), seed=seed)) for seed in (0, 3)}
    assert data[0].test == data[3].test == test and data[0].validation == val  # independent of the run's seed
    pool = 14931  # FedIT's ten client files (SOURCES.md)
    assert len(data[0].train) == pool - 700
    assert sorted(i for s in data[0].predefined for i in s) == list(range(pool - 700))
    train_keys = {_key(r) for r in data[0].train}
    held = [_key(r) for r in test + val]
    # Dolly repeats a few (instruction, context, response) triples; a held-out record may equal a training one only
    # where the pool itself holds duplicates
    from collections import Counter
    counts = Counter(_key(r) for r in data[0].train + test + val)
    assert all(counts[k] > 1 for k in held if k in train_keys)
    assert len(set(map(_key, test)) & set(map(_key, val))) <= sum(1 for k in counts if counts[k] > 1)


def test_carve_heldout_reindexes_the_client_shards():
    rows = [{"i": i} for i in range(40)]
    shards = [list(range(0, 10)), list(range(10, 25)), list(range(25, 40))]
    train, new_shards, test, val = carve_heldout(rows, shards, {"test": 7, "validation": 5})
    assert len(test) == 7 and len(val) == 5 and len(train) == 28
    held = {r["i"] for r in test + val}
    for old, new in zip(shards, new_shards):  # every client keeps exactly its own records that were not held out
        assert [train[j]["i"] for j in new] == [i for i in old if i not in held]


def test_every_prompt_keeps_its_instruction_at_the_presets_cap(shared_data, tokenizer):
    """Over-long prompts lose the end of their context, never the instruction (all 700 held-out records and a
    sample of training records, at the instruct preset's cutoff 512 and a tight 128)."""
    data = load_dataset(RunConfig(dataset="dolly-heldout", data_root=str(shared_data)))
    rows = data.test + data.validation + random.Random(0).sample(data.train, 300)
    for cutoff in (512, 128):
        cut = 0
        for r in rows:
            ex = tokenize(r, tokenizer, "chat", cutoff, False)
            assert len(ex["input_ids"]) <= cutoff
            assert any(l != -100 for l in ex["labels"])  # every example keeps response tokens
            prompt = tokenizer.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l == -100])
            if len(tokenizer(r["instruction"], add_special_tokens=False)["input_ids"]) < cutoff // 2:
                assert r["instruction"] in prompt
            if r["input"] and r["input"] not in prompt:
                cut += 1
                assert prompt.rstrip().endswith("assistant")  # the template's tail survives
        assert cut > 0  # the tight cap did cut contexts (the check above ran on real cuts)


def _lcs(a: list[str], b: list[str]) -> int:
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_rouge_l_is_the_lcs_f1():
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "zeta", "eta", "theta"]  # stemming leaves these unchanged
    for _ in range(200):
        pred = [rng.choice(words) for _ in range(rng.randint(0, 12))]
        ref = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        lcs = _lcs(pred, ref)
        f1 = 0.0 if lcs == 0 else 2 * (lcs / len(pred)) * (lcs / len(ref)) / (lcs / len(pred) + lcs / len(ref))
        assert loaders.rouge_l(" ".join(pred), " ".join(ref)) == pytest.approx(f1, abs=1e-12)
    assert loaders.rouge_l("Running dogs.", "the dog runs") == pytest.approx(loaders.rouge_l("run dog", "the dog run"))


def test_dolly_heldout_task_loads_without_metric_warnings(shared_data, caplog):
    from evaluators.runner import load_tasks

    with caplog.at_level("WARNING"):
        loaded = load_tasks({"name": "dolly_heldout", "mode": "offline", "data_root": str(shared_data), "num_fewshot": 0})
    task = loaded["tasks"]["fedlora_dolly_heldout"]
    docs = list(task.eval_docs)
    assert len(docs) == 500
    assert [d["response"] for d in docs] == [r["output"] for r in heldout_records("dolly-heldout", shared_data, "test")]
    assert not [r for r in caplog.records if "aggregation" in r.getMessage() or "higher_is_better" in r.getMessage()]
    doc = docs[0]
    assert loaders.dolly_process_results(doc, [" " + doc["response"] + " "]) == {"rougeL": 1.0, "exact_match": 1.0}
    copy = loaders.TRIVIAL_GENERATIONS["copy-instruction"](doc)
    assert loaders.dolly_process_results(doc, [copy])["rougeL"] == loaders.rouge_l(doc["instruction"], doc["response"])


@pytest.mark.slow
def test_instruct_preset_end_to_end_on_the_default_model(tmp_path, offline_data_env):
    """`bench run --preset instruct` on the real model at a tiny budget: chat prompts, the held-out loss on
    response tokens, and dolly_heldout scored by ROUGE-L through lm-eval, in the record with its samples."""
    cmd = [sys.executable, "-m", "bench", "run", "--preset", "instruct", "--method", "fedit", "--client-fraction", "0.2",
           "--rounds", "1", "--local-steps", "1", "--test-limit", "4", "--eval-limit", "2", "--eval-backend", "hf",
           "--results-dir", str(tmp_path / "results"), "--output-dir", str(tmp_path / "run")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert record["config"]["prompt_template"] == "chat" and record["config"]["dataset"] == "dolly-heldout"
    assert record["test"]["examples"] == 4 and record["test"]["loss"] > 0
    task = record["eval"]["tasks"]["dolly_heldout"]
    assert task["metric"] == "rougeL" and task["n"] == 2 and 0.0 <= task["value"] <= 1.0
    lines = [json.loads(l) for l in Path(task["samples"]).read_text().splitlines()]
    assert len(lines) == 2
    for s in lines:
        assert s["prompt"].startswith("<|im_start|>")  # the chat template was applied
        gen = s["filtered_resps"]["none"][0] if isinstance(s["filtered_resps"]["none"], list) else s["filtered_resps"]["none"]
        assert s["metrics"]["none"]["rougeL"] == pytest.approx(loaders.rouge_l(gen.strip(), s["doc"]["response"]))
    assert re.search(r"dolly_heldout\s+rougeL", out.stdout + out.stderr)
