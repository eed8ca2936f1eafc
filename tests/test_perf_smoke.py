"""Smoke test of `bench perf` (benchmarks/cli.py + benchmarks/engine_perf.py) on the tiny model: the JSON
and the markdown are written with every field. No timing assertions: speed is measured by
`bench perf`, never asserted in tests (CI machines vary)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench.cli import main as bench_main

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is not an installed package; bench perf imports it from the checkout
    sys.path.insert(0, str(REPO))

from benchmarks import cli as perf_cli, engine_perf  # noqa: E402


def test_perf_memory_overhead_gpu_smoke(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_ROOT", str(shared_data))
    out = tmp_path / "perf"
    rc = bench_main(["perf", "--quick", "--only", "memory,overhead,gpu", "--model", "tiny-random-llama",
                     "--memory-clients", "1,3", "--repeats", "1", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "perf.json").read_text())
    assert r["schema"] == perf_cli.SCHEMA and r["quick"] is True
    assert set(r["sections"]) == {"memory", "overhead", "gpu"}
    for key in ("python", "torch", "cpu", "cpu_count", "torch_threads", "cuda"):
        assert key in r["machine"]

    mem = r["sections"]["memory"]
    assert mem["status"] == "ok", mem
    assert [run["clients"] for run in mem["runs"]] == [1, 3]
    for run in mem["runs"]:
        assert run["peak_rss_mb"] > 0 and run["peak_rss_self_mb"] > 0 and run["ratio_vs_1_client"] > 0
        assert run["factor_bytes_match_engine"] is True
        assert len(run["bytes_up"]) == run["clients"]
        assert run["updates_held_in_round_bytes"] == sum(run["bytes_up"])
    assert mem["runs"][0]["ratio_vs_1_client"] == 1.0
    assert isinstance(mem["meets_goal"], bool) and mem["ratio"] == mem["runs"][-1]["ratio_vs_1_client"]
    b = mem["bytes_per_client"]
    assert b["factors_match_engine_bytes_up"] is True
    assert b["held_between_rounds_tensors"] == 0
    assert b["tokenised_examples_python_bytes"] > b["tokenised_as_int32_tensors_bytes"] > 0
    # the formula, by hand, for the tiny model: 2 layers, q 64×64 and v 32×64 (2 kv heads × head_dim 16)
    assert b["factors_by_rank"]["4"] == 4 * 2 * ((64 + 64) + (64 + 32)) * 4

    ov = r["sections"]["overhead"]
    assert ov["status"] == "ok", ov
    assert ov["same_tokens_and_steps"] is True
    assert ov["steps_per_run"] == 2 * 2 * 2  # clients × rounds × local steps of the quick overhead config
    assert len(ov["engine_runs"]) == len(ov["bare_runs"]) == len(ov["pair_ratios"]) == 1
    for key in ("engine_tokens_per_s_median", "bare_tokens_per_s_median", "engine_train_only_tokens_per_s_median",
                "ratio", "ratio_train_only"):
        assert ov[key] > 0
    assert isinstance(ov["meets_goal"], bool)

    gpu = r["sections"]["gpu"]
    if torch.cuda.is_available():
        assert gpu["status"] == "ok" and gpu["device"]
    else:
        assert gpu == {"status": "skipped", "reason": "no CUDA device: skipped"}

    md = (out / "perf.md").read_text()
    for text in ("| memory: peak RSS, 1 clients |", "| memory: peak RSS, 3 clients |", "overhead: engine loop tokens/s",
                 "## Memory (tiny-random-llama", "## Loop overhead", "## GPU", "Bytes per client"):
        assert text in md, text


def test_perf_gpu_code_path_on_cpu(tmp_path):
    """The CUDA section's measuring code, forced onto the CPU in float32 with the tiny model (no MFU there)."""
    from bench.models import resolve_model

    r = engine_perf.measure_gpu(quick=True, device="cpu", dtype=torch.float32,
                                models={"tiny": resolve_model("tiny-random-llama")[0]}, agg_shapes=((48, 32),),
                                train_sizes=(3, 2, 32))
    assert r["status"] == "ok" and r["device"] == "cpu" and r["peak_bf16_tflops"] is None
    t = r["train"]["tiny"]
    assert "error" not in t, t
    assert t["tokens"] == 3 * 2 * 32 and t["tokens_per_s"] > 0 and t["mfu"] is None
    from methods import METHODS

    assert set(r["aggregation_ms"]["48x32"]) == set(METHODS) | {"dense-svd flexlora (baseline)"}  # every registered method
    assert all(isinstance(v, float) for v in r["aggregation_ms"]["48x32"].values()), r["aggregation_ms"]
    md = perf_cli.to_markdown({"created": "now", "quick": True, "machine": perf_cli._machine(), "seconds": {},
                               "sections": {"gpu": r}})
    assert "## GPU: cpu" in md and "| tiny |" in md
    assert engine_perf.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert engine_perf.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0


def test_gpu_fallback_config_is_the_default_models_architecture():
    """Without the default model's weights (a bare GPU machine), the GPU section builds its architecture from
    smollm2_135m_config(): it must be the real model's shapes, or the tokens/s and MFU would describe another model."""
    import json
    from pathlib import Path

    from bench.models import resolve_model

    real = json.loads((Path(resolve_model("default")[0]) / "config.json").read_text())
    ours = engine_perf.smollm2_135m_config().to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings"):
        assert ours[key] == real[key], key


def test_perf_training_smoke(tmp_path, shared_data, monkeypatch):
    """`bench perf --only training` on the tiny model: every variant measured on the same examples, the ratios and
    the matmul peaks recorded; the bucketed and padded float32 variants train the same objective."""
    monkeypatch.setenv("BENCH_DATA_ROOT", str(shared_data))
    out = tmp_path / "perf"
    rc = bench_main(["perf", "--quick", "--only", "training", "--model", "tiny-random-llama", "--out", str(out)])
    assert rc == 0
    t = json.loads((out / "perf.json").read_text())["sections"]["training"]
    assert t["status"] == "ok", t
    from benchmarks.train_perf import BASELINE, VARIANTS

    assert list(t["variants"]) == list(VARIANTS) and t["variants"][BASELINE]["ratio_cpu"] == 1.0
    assert len({r["tokens"] for runs in t["runs"].values() for r in runs}) == 1   # same examples in every variant
    for v in t["variants"].values():
        assert v["tokens_per_s_median"] > 0 and v["tokens_per_cpu_s_median"] > 0 and v["pct_of_own_dtype_peak"] > 0
    assert t["matmul_peak"]["float32"]["peak"] > 0 and t["matmul_peak"]["bfloat16"]["peak"] > 0
    padded, bucketed = t["variants"][BASELINE]["first_losses"], t["variants"]["length buckets"]["first_losses"]
    assert padded == bucketed
    assert isinstance(t["meets_goal"], bool) and t["git_commit"]
    md = (out / "perf.md").read_text()
    assert "| training (study): bfloat16 + buckets |" in md and "## Local training (tiny-random-llama" in md
