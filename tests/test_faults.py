"""Numerical faults in real runs (tiny model, real Dolly data, through bench.cli.main): a client whose
update is NaN/Inf or over max_update_norm is excluded, logged and recorded, the round is aggregated
over the others with renormalised weights (checked against methods/ by hand), and when every client
fails the run stops with the last good checkpoint intact. Faults are injected with the engine's
BENCH_TEST_POISON test hook (docs/reliability.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.cli import main

DATA = Path(os.environ.get("BENCH_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data")
FAST = ["--preset", "tiny", "--local-steps", "1", "--batch-size", "1", "--micro-batch-size", "1", "--cutoff-len", "32",
        "--test-limit", "2"]


@pytest.fixture(autouse=True)
def _env(offline_data_env, monkeypatch):
    monkeypatch.delenv("BENCH_TEST_KILL_AT", raising=False)


def _run(tmp: Path, capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["run", *FAST, "--output-dir", str(tmp / "run"), "--results-dir", str(tmp / "results"), *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _client_update(run: Path, rnd: int, row: dict, scaling: float):
    from methods import ClientUpdate

    t = load_file(str(run / "clients" / f"round_{rnd}" / f"client_{row['id']}" / "adapter_model.safetensors"))
    names = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in t})
    factors = {n: (t[f"base_model.model.{n}.lora_A.weight"], t[f"base_model.model.{n}.lora_B.weight"]) for n in names}
    return ClientUpdate(row["id"], row["rank"], scaling, row["examples"], factors)


@pytest.mark.parametrize("method,poison,extra,reason", [
    ("flora", "1:1:nan", [], "non-finite values in model.layers.0.self_attn.q_proj"),
    ("fedavg-lora", "1:0:big", ["--max-update-norm", "1000"], "> max_update_norm 1000"),
])
def test_faulty_client_excluded_and_round_renormalised(method, poison, extra, reason, tmp_path, capsys, monkeypatch):
    from methods import GlobalState, get_method
    from methods.base import client_weights

    monkeypatch.setenv("BENCH_TEST_POISON", poison)
    bad = int(poison.split(":")[1])
    rc, out, err = _run(tmp_path, capsys, "--method", method, "--rounds", "1", "--save-client-adapters", *extra)
    assert rc == 0, err[-3000:]
    run = tmp_path / "run"
    (row,) = _metrics(run)
    # recorded: in metrics.jsonl, in the results record, and logged
    assert row["excluded"] == [bad]
    excluded_row = next(c for c in row["clients"] if c["id"] == bad)
    assert reason in excluded_row["excluded"]
    assert f"round 1 client {bad}: EXCLUDED ({excluded_row['excluded']})" in out
    record = json.loads((tmp_path / "results" / "run.json").read_text())
    assert record["rounds"][0]["excluded"] == [bad] and record["status"] == "complete"
    # never aggregated, but kept for audit: its upload and task, with the reason it was excluded
    task = json.loads((run / "clients" / "round_1" / f"client_{bad}" / "task.json").read_text())
    assert reason in task["excluded"] and "p" not in task
    # by hand: the method over the remaining clients, whose weights n_k / Σ n sum to 1 without the bad one
    alpha = 8.0  # tiny preset lora_alpha; scaling = alpha / rank
    kept = [c for c in row["clients"] if "excluded" not in c]
    updates = [_client_update(run, 1, c, alpha / c["rank"]) for c in kept]
    assert len(updates) == 2 and abs(sum(client_weights(updates)) - 1.0) < 1e-12
    agg = get_method(method).aggregate(updates, GlobalState())
    ck = load_file(str(run / "checkpoint" / "server.safetensors"))
    for name, (a, b) in agg.state.adapter.items():
        assert torch.equal(ck[f"adapter/{name}/A"], a.contiguous()) and torch.equal(ck[f"adapter/{name}/B"], b.contiguous())
    if method == "flora":  # the server keeps round 1's merge in factored form, bit for bit
        assert agg.merge
        for name, (a, b) in agg.merge.items():
            assert torch.equal(ck[f"merge/1/{name}/A"], a) and torch.equal(ck[f"merge/1/{name}/B"], b)
            # and the merge is Σ p_k s_k B_k A_k with p renormalised over the two remaining clients
            p = client_weights(updates)
            expect = sum(pk * u.scaling * (u.factors[name][1].double() @ u.factors[name][0].double()) for pk, u in zip(p, updates))
            assert torch.allclose(b.double() @ a.double(), expect, rtol=1e-5, atol=1e-8)
            n_all = sum(c["examples"] for c in row["clients"])
            unnormalised = sum(u.num_examples / n_all * u.scaling * (u.factors[name][1].double() @ u.factors[name][0].double())
                               for u in updates)
            assert not torch.allclose(b.double() @ a.double(), unnormalised, rtol=1e-3)
    assert all(torch.isfinite(t).all() for t in ck.values())
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "global_model" / "model.safetensors")).values())


def test_every_client_failing_stops_with_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    from bench.models import file_sha256

    monkeypatch.setenv("BENCH_TEST_POISON", "2:*:inf")
    rc, out, err = _run(tmp_path, capsys, "--method", "flexlora", "--rounds", "3")
    run = tmp_path / "run"
    assert rc == 2, err[-3000:]
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert errors == [f"error: clients: every client of round 2 was excluded (client 0: non-finite values in "
                      f"model.layers.0.self_attn.q_proj.A); "
                      f"the last good checkpoint (round 1) is intact in {run / 'checkpoint'}; lower lr or raise max_update_norm"]
    assert out.count("EXCLUDED (non-finite values") == 3
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["round"] == 1 and all(file_sha256(run / "checkpoint" / f) == h for f, h in meta["sha256"].items())
    assert [r["round"] for r in _metrics(run)] == [1]
    assert not (tmp_path / "results").exists() and not (run / "global_model").exists()
    # the fault gone (e.g. lr lowered in real life; here the hook unset), the run resumes from round 1
    monkeypatch.delenv("BENCH_TEST_POISON")
    capsys.readouterr()
    assert main(["run", "--resume", str(run)]) == 0, capsys.readouterr().err[-3000:]
    assert [r["round"] for r in _metrics(run)] == [1, 2, 3]
    assert "resumed" in capsys.readouterr().out


def test_every_client_failing_in_round_one_says_there_is_no_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BENCH_TEST_POISON", "1:*:nan")
    rc, out, err = _run(tmp_path, capsys, "--method", "fedit", "--rounds", "2")
    assert rc == 2
    assert "error: clients: every client of round 1 was excluded" in err
    assert "no round had completed, so there is no checkpoint" in err
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "results").exists()
