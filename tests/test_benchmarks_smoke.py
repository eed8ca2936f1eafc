"""Smoke test of benchmarks/aggregation.py at tiny shapes: the outputs exist and are complete, and the
factored FlexLoRA singular values agree with the dense SVD. No timing assertions (CI machines vary)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import aggregation


def test_aggregation_benchmark_quick_smoke(tmp_path):
    out = str(tmp_path / "perf")
    before = torch.get_num_threads()
    # threads=1: tiny shapes gain nothing from threads, and on a shared CPU they make this 100× slower
    result = aggregation.run(out, quick=True, threads=1, shapes=[(48, 32), (32, 80)], client_counts=(10, 13),
                             clients_curve=(2, 5), clients_curve_d=40, d_curve=(24, 40), log=lambda msg: None)
    assert torch.get_num_threads() == before  # restored
    with open(os.path.join(out, "aggregation.json")) as f:
        on_disk = json.load(f)
    assert on_disk["schema"] == result["schema"] == "fedlora-bench/perf/aggregation/1"
    assert set(on_disk["methods"]) == {"fedavg-lora", "fedit", "flora", "flexlora"}
    assert len(on_disk["cases"]) == 4
    for case in on_disk["cases"]:
        for key in ("fedavg-lora", "fedit", "flora", "flexlora", "flora_merge", "dense_delta", "dense_svd_baseline"):
            assert case["ms"][key]["median_ms"] >= 0 and case["ms"][key]["repeats"] >= 1
        assert case["rank_sum"] == sum(aggregation.ranks_for(case["clients"]))
        assert case["sv_check"]["passed"], case["sv_check"]
        assert case["sv_check"]["max_rel_err"] <= 1e-5
    # Σr = 160 (or 192) ≥ min(d) here: the factored path still agrees with the dense SVD
    assert on_disk["cases"][0]["sv_check"]["q"] == 32
    assert on_disk["sv_check_passed"] is True
    assert [c["clients"] for c in on_disk["scaling_clients"]] == [2, 5]
    assert [c["d"] for c in on_disk["scaling_d"]] == [24, 40]
    for key in ("cpu", "torch", "torch_threads", "python"):
        assert on_disk["machine"][key] not in (None, "")
    md = open(os.path.join(out, "aggregation.md")).read()
    assert "FlexLoRA" in md and "48×32" in md and "| 13 |" in md


def test_topr_svd_benchmark_smoke(tmp_path):
    """The top-R SVD section (`bench perf --only svd`) at small shapes: both paths against the dense SVD, the
    path top_svd chooses (exact for 10 clients, Krylov for 40), the accuracy check; no timing assertions."""
    out = str(tmp_path / "perf")
    r = aggregation.run_topr(out, shapes=[(1536, 1024)], client_counts=(10, 60), repeats=1, threads=1, log=lambda m: None)
    on_disk = json.load(open(os.path.join(out, "topr_svd.json")))
    assert on_disk["schema"] == r["schema"] == "fedlora-bench/perf/topr/1" and on_disk["passed"] is True
    assert [c["chosen"] for c in on_disk["cases"]] == ["exact", "krylov"]
    for c in on_disk["cases"]:
        assert c["r_max"] == 64 and c["rank_sum"] == sum(aggregation.ranks_for(c["clients"]))
        assert max(c["max_rel_err"].values()) <= 1e-6
        for key in ("dense", "exact", "krylov", "flexlora", "energy"):
            assert c["ms"][key]["median_ms"] > 0
    assert on_disk["cases"][1]["krylov"]["path"] == "krylov" and on_disk["cases"][1]["krylov"]["steps"] >= 1
    assert "Top R_max singular values equal" in open(os.path.join(out, "topr_svd.md")).read()


def test_eval_floor_counts_tokens_from_first_principles():
    """benchmarks/eval_floor.py's token counts on hand-made lm-eval requests, one character = one token."""
    from benchmarks.eval_floor import fewest, token_counts

    chars = list  # the encoder: "abc" -> ["a", "b", "c"]
    # one document, two multi-token choices; the context's trailing space moves into the continuation, as lm-eval's
    # encode_pair does ("abc" + " xy"): 2 x (3 + 3) tokens as separate prompts, 3 + 3 + 3 with the context once
    ll = [("t", 0, "loglikelihood", ("abc ", "xy")), ("t", 0, "loglikelihood", ("abc ", "zw"))]
    c = token_counts(ll, chars)
    assert (c["documents"], c["requests"], c["per_request"], c["per_context"], c["kind"]) == (1, 2, 12, 9, "log-likelihood")
    assert fewest(c) == 9
    # through a KV cache of whole blocks: the context once, then each choice from the last whole block (none at 32)
    assert (c["context_cached_block1"], c["context_cached_block32"]) == (3 + 3 + 3, 3 + 6 + 6)
    # WinoGrande-style: a context per choice, one continuation; each distinct context counts once
    wino = [("w", 0, "loglikelihood", (ctx, " end")) for ctx in ("ab A", "ab B")]
    assert token_counts(wino, chars)["per_context"] == 2 * (4 + 4)
    # two documents of one subject with one-token answers and a 4-token common prefix: blocks of 2 cache all 4
    # (2 tokens left each), blocks of 128 none (6 each); a subject of one document caches nothing
    one = [("s", d, "loglikelihood", (ctx, k)) for d, ctx in enumerate(["aaaaXY", "aaaaZW"]) for k in "AB"]
    one += [("u", 0, "loglikelihood", ("bbbbbb", "A"))]
    c = token_counts(one, chars)
    assert c["kind"] == "one-token" and c["per_context"] == 6 + 2 + 6 + 2 + 6 + 1
    assert (c["prefix_cached_block128"], c["prefix_cached_block32"], c["prefix_cached_block1"]) == (18, 18, 10)
    # the whole context cached still leaves its last token to compute
    same = [("s", d, "loglikelihood", ("aaaa", k)) for d in range(2) for k in "AB"]
    assert token_counts(same, chars)["prefix_cached_block1"] == 2
    gen = [("g", d, "generate_until", (p, {})) for d, p in enumerate(["abc", "de"])]
    assert token_counts(gen, chars) == {"documents": 2, "kind": "generation", "prompt_tokens": 5}


def test_flexlora_vs_dense_benchmark_smoke(tmp_path):
    """The alternated FlexLoRA-vs-dense measurement at its quick shape (1024², 60 clients: the same Krylov path
    as K = 100 at 4096²): records complete, accuracy checks passed, the phases and the design floor recorded.
    No timing assertions."""
    out = str(tmp_path / "vs")
    before = torch.get_num_threads()
    r = aggregation.run_vs_dense(out, quick=True, repeats=1, log=lambda msg: None)
    assert torch.get_num_threads() == before
    on_disk = json.load(open(os.path.join(out, "flexlora_vs_dense.json")))
    assert on_disk["schema"] == r["schema"] == "fedlora-bench/perf/flexlora-vs-dense/1"
    assert on_disk["case"]["rank_sum"] == 960 and on_disk["case"]["r_max"] == 64
    assert on_disk["machine"]["torch_threads"] == 1 and "commit" in on_disk["machine"]
    assert len(on_disk["runs"]["dense"]) == len(on_disk["runs"]["flexlora"]) == 1
    ck = on_disk["check"]
    assert ck["passed"] and ck["ordered"] >= 64, ck
    assert ck["sv_max_rel_err"] <= 1e-6 and ck["energy_rel_err"] <= 1e-6 and ck["reconstruction_rel_err"] <= 1e-6
    assert on_disk["speedup_cpu"] > 0 and on_disk["speedup_wall"] > 0
    fl = on_disk["gram_floor"]
    assert fl["float32_gflops_cpu"] > 0 and fl["half_grams_gflop"] == (1024 + 1024) * 960 ** 2 / 1e9
    assert set(on_disk["phases_cpu_ms"]) == {"stack", "svd_factors_top"}
    d = on_disk["design_floor"]
    assert d["finish_width"] == 80 and d["total_cpu_ms"] == pytest.approx(
        d["state_write_cpu_ms"] + d["grams_cpu_ms"] + d["float64_finish_cpu_ms"])
    md = open(os.path.join(out, "flexlora_vs_dense.md")).read()
    assert "Goal ≥ 100×" in md and "This design's floor" in md


def test_flexlora_vs_dense_at_a_narrow_shape_records_the_dense_path(tmp_path, capsys):
    """`--vs-dense --shape 192x160 --clients 20`: Σr = 320 ≥ the layer's width, so FlexLoRA takes the SVD of the
    formed product; the record names that path, its accuracy checks pass, and no Krylov floor is claimed. A
    malformed --shape is refused in one line before any work."""
    out = str(tmp_path / "narrow")
    assert aggregation.main(["--vs-dense", "--shape", "192x160", "--clients", "20", "--repeats", "1", "--out", out]) == 0
    rec = json.load(open(os.path.join(out, "flexlora_vs_dense.json")))
    assert (rec["case"]["d_out"], rec["case"]["d_in"], rec["case"]["clients"], rec["case"]["rank_sum"]) == (192, 160, 20, 320)
    assert rec["case"]["path"] == "dense" and rec["check"]["passed"] and rec["design_floor"] is None
    md = open(os.path.join(out, "flexlora_vs_dense.md")).read()
    assert "Path: **dense**" in md and "This design's floor" not in md
    with pytest.raises(SystemExit) as e:
        aggregation.main(["--vs-dense", "--shape", "576by576", "--out", out])
    assert e.value.code == 2 and "--shape: expected D_OUTxD_IN" in capsys.readouterr().err
