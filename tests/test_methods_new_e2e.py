"""HetLoRA, FFA-LoRA, FedSA-LoRA, FedEx-LoRA, FLoRIST, LoRA-FAIR and RoLoRA end to end through the real engine
(bench.engine.run_federated) on the tiny preset: a 2-layer random Llama on real Dolly shards, ranks 4,2,2. What each
method promises that only a real run can show: who sends what (bytes, never a personal B), a frozen factor that
stays frozen across the wire, exact merges, self-pruning reaching the server, FedSA-LoRA's personal state surviving
a crash."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.config import build_config
from bench.engine import run_federated

NEW = ["hetlora", "ffa-lora", "fedsa-lora", "fedex-lora", "florist", "lora-fair", "rolora"]
# bytes per rank on the tiny model (2 layers; q_proj 64×64, v_proj 32×64; float32): all A's, all B's
A_PER_RANK = 2 * (64 + 64) * 4
B_PER_RANK = 2 * (64 + 32) * 4
MODULE_SUM = {"q_proj": (64 + 64) * 4, "v_proj": (32 + 64) * 4}   # d_out + d_in, bytes, per rank


def _run(tmp_path, shared_data, method, **over):
    cfg = build_config(preset="tiny", overrides={
        "method": method, "data_root": str(shared_data), "output_dir": str(tmp_path / "runs" / method),
        "results_dir": str(tmp_path / "results"), **over})
    return cfg, run_federated(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("new-methods")
    return {m: _run(tmp, shared_data, m, rounds=3, local_steps=1, save_client_adapters=(m == "fedex-lora"))
            for m in NEW}


def _base():
    from bench.models import resolve_model

    return load_file(resolve_model("tiny-random-llama")[0] + "/model.safetensors")


@pytest.mark.parametrize("method", NEW)
def test_every_new_method_runs_end_to_end(runs, method):
    cfg, rec = runs[method]
    assert rec["status"] == "complete" and rec["method"] == method and len(rec["rounds"]) == 3
    assert math.isfinite(rec["test_loss"]) and rec["communication"]["bytes_up"] > 0
    assert all(math.isfinite(c["loss"]) for r in rec["rounds"] for c in r["clients"])
    assert not any(r["excluded"] for r in rec["rounds"])  # no reply broke its task (ReplyFilter)
    glob = load_file(rec["run_dir"] + "/global_model/model.safetensors")
    base = _base()
    changed = {k for k in base if not torch.equal(base[k], glob[k])}
    if method == "fedsa-lora":  # the server holds no B: its exported "global model" is the base
        assert not changed and rec["method_info"]["personalized"]
        # no global model to score: the run's test row is the mean of the clients' own models, not the base
        assert rec["test"]["model"].startswith("mean over clients") and rec["test"]["loss"] == rec["personalized"]["pooled"]["loss"]
    else:
        assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_ffa_lora_sends_a_once_and_it_stays_frozen(runs):
    _, rec = runs["ffa-lora"]
    for r in rec["rounds"]:
        assert r["noise"] == 0.0 and r["a_mismatch"] == 0.0
        for c in r["clients"]:   # round 1 A and B, then B only
            assert c["bytes_up"] == c["rank"] * (B_PER_RANK + (A_PER_RANK if r["round"] == 1 else 0))


def test_fedsa_lora_never_sends_b_and_keeps_it_on_the_client(runs):
    _, rec = runs["fedsa-lora"]
    for r in rec["rounds"]:
        assert all(c["bytes_up"] == c["rank"] * A_PER_RANK for c in r["clients"])   # A only
        assert all(c["bytes_down"] == (0 if r["round"] == 1 else c["rank"] * A_PER_RANK) for c in r["clients"])
    ck = Path(rec["run_dir"]) / "checkpoint"
    server = load_file(str(ck / "server.safetensors"))
    clients = load_file(str(ck / "clients.safetensors"))
    assert server and all(k.endswith("/A") for k in server)                     # the server: Ā, no B
    personal = {k: t for k, t in clients.items() if k.startswith("personal/")}  # (last/: the engine's own models)
    assert personal and all(k.endswith("/B") for k in personal)                 # the client keeps B, only B
    assert {k.split("/")[1] for k in personal} == {"0", "1", "2"}
    assert all(float(t.abs().max()) > 0 for t in personal.values())            # trained, kept


def test_fedsa_lora_personal_state_resumes_bit_identically(tmp_path, shared_data):
    """A crash after round 2's metrics (before its checkpoint): the resumed run redoes round 2 from round 1's
    checkpoint, personal B's included, and ends bit-identical to an uninterrupted run."""
    from bench.observers import Observer, subscribe

    over = dict(rounds=3, local_steps=1, client_fraction=0.67)
    _, whole = _run(tmp_path / "whole", shared_data, "fedsa-lora", **over)

    class Crash(Exception):
        pass

    class CrashAt(Observer):
        def point(self, name):
            if name == "round2:metrics":
                raise Crash(name)

    cfg, _ = build_config(preset="tiny", overrides={
        "method": "fedsa-lora", "data_root": str(shared_data), "output_dir": str(tmp_path / "cut" / "run"),
        "results_dir": str(tmp_path / "cut" / "results"), **over}), None
    unsubscribe = subscribe(CrashAt)
    try:
        with pytest.raises(Crash):
            run_federated(cfg, log=lambda *a: None)
    finally:
        unsubscribe()
    resumed = run_federated(cfg, resume=str(tmp_path / "cut" / "run"), log=lambda *a: None)
    for fname in ("server.safetensors", "clients.safetensors"):
        a = load_file(str(Path(whole["run_dir"]) / "checkpoint" / fname))
        b = load_file(str(Path(resumed["run_dir"]) / "checkpoint" / fname))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), fname
    losses = lambda rec: [[c["loss"] for c in r["clients"]] for r in rec["rounds"]]
    assert losses(whole) == losses(resumed) and whole["test_loss"] == resumed["test_loss"]


def test_fedex_lora_global_is_exactly_base_plus_the_weighted_client_updates(runs):
    """After the last round, global − (base + the merges of rounds 1, 2) = Σ p_k s_k B_k A_k of round 3's
    uploads (formed densely from the saved client adapters): the residual makes the aggregation exact."""
    cfg, rec = runs["fedex-lora"]
    run_dir = Path(rec["run_dir"])
    base, glob = _base(), load_file(str(run_dir / "global_model" / "model.safetensors"))
    server = load_file(str(run_dir / "checkpoint" / "server.safetensors"))
    name = "model.layers.1.self_attn.v_proj"
    base2 = base[name + ".weight"].double().clone()
    for rnd in (1, 2):
        base2 += server[f"merge/{rnd}/{name}/B"].double() @ server[f"merge/{rnd}/{name}/A"].double()
    clients = rec["rounds"][2]["clients"]
    n = [c["examples"] for c in clients]
    update = torch.zeros_like(base2)
    for k, c in enumerate(clients):
        ad = load_file(str(run_dir / "clients" / "round_3" / f"client_{c['id']}" / "adapter_model.safetensors"))
        a = ad[f"base_model.model.{name}.lora_A.weight"].double()
        b = ad[f"base_model.model.{name}.lora_B.weight"].double()
        update += n[k] / sum(n) * cfg.scaling(c["rank"]) * b @ a
    got = glob[name + ".weight"].double()
    assert torch.allclose(got - base2, update, atol=1e-6) and update.abs().max() > 1e-5
    assert all(r["noise"] == 0.0 and r["residual_bytes_dense"] > 0 for r in rec["rounds"])


def test_florist_records_its_global_rank_and_energy(runs):
    _, rec = runs["florist"]
    for r in rec["rounds"]:
        assert set(r["rank_per_module"]) == set(r["retained_energy"]) and len(r["rank_per_module"]) == 4
        assert all(e >= 0.9 - 1e-9 for e in r["retained_energy"].values())
        assert all(1 <= k <= 8 for k in r["rank_per_module"].values())          # ≤ Σ r_k = 8
        # every client downloads the merge only: Σ_modules k (d_in + d_out) floats (rounds ≥ 2)
        if r["round"] > 1:
            prev = rec["rounds"][r["round"] - 2]["rank_per_module"]
            size = sum(k * MODULE_SUM[name.rsplit(".", 1)[1]] for name, k in prev.items())
            assert all(c["bytes_down"] == size for c in r["clients"])


def test_rolora_alternates_and_the_frozen_factor_stays_frozen(runs):
    _, rec = runs["rolora"]
    assert [r["trained_b"] for r in rec["rounds"]] == [1, 0, 1]
    assert all(r["noise"] == 0.0 and r["frozen_mismatch"] == 0.0 for r in rec["rounds"])
    r2 = rec["rounds"][1]
    assert all(c["bytes_up"] == c["rank"] * A_PER_RANK for c in r2["clients"])      # A only


def test_lora_fair_raises_the_similarity(runs):
    _, rec = runs["lora-fair"]
    assert all(r["cos_after"] >= r["cos_before"] - 1e-9 for r in rec["rounds"])


def test_hetlora_pruned_client_continues_at_its_lower_rank(tmp_path, shared_data):
    """A strong tail regularizer makes the clients' tails shrink: they prune (rank_sent), the server
    configures them at the new rank next round, and the pruned factors are what they send."""
    _, rec = _run(tmp_path, shared_data, "hetlora", rounds=3, lr=0.05, method_options={"lam": 50.0, "gamma": 0.5})
    pruned = [(r["round"], c["id"], c["rank"], c["rank_sent"]) for r in rec["rounds"] for c in r["clients"]
              if "rank_sent" in c]
    assert pruned, "no client pruned"
    for rnd, k, rank, sent in pruned:
        assert sent < rank and sent >= 1
        later = [c for r in rec["rounds"][rnd:] for c in r["clients"] if c["id"] == k]
        assert not later or later[0]["rank"] == sent
        row = next(c for c in rec["rounds"][rnd - 1]["clients"] if c["id"] == k)
        assert row["bytes_up"] == sent * (A_PER_RANK + B_PER_RANK)


def test_rolora_paper_schedule_runs_both_half_steps_in_each_round(tmp_path, shared_data):
    """schedule=paper through the engine: each round's row holds two exchanges (B-step, then A-step), every client
    training in both and sending only the factor it trained; both factors of the global adapter change within every
    round; and the run is schedule=alternate at twice the rounds, state for state, bit for bit."""
    from bench.checkpoint import checkpoint_dir, read_state

    _, rec = _run(tmp_path, shared_data, "rolora", rounds=2, local_steps=1, keep_round_states=True,
                  method_options={"schedule": "paper"})
    assert "one iteration" in rec["method_info"]["round_convention"] and len(rec["rounds"]) == 2
    for r in rec["rounds"]:
        assert [x["trained_b"] for x in r["exchanges"]] == [1, 0] and r["iteration"] == r["round"]
        assert all(x["noise"] == 0.0 and x["frozen_mismatch"] == 0.0 for x in r["exchanges"])
        assert sorted((c["exchange"], c["id"]) for c in r["clients"]) == [(e, k) for e in (1, 2) for k in range(3)]
        for c in r["clients"]:
            if c["exchange"] == 2:
                assert c["bytes_up"] == c["rank"] * A_PER_RANK                                  # A only
            elif r["round"] > 1:
                assert c["bytes_up"] == c["rank"] * B_PER_RANK                                  # B only
    states = [read_state(Path(rec["run_dir"]) / "rounds" / f"round_{r}")[0].state for r in (1, 2)]
    assert [s.round for s in states] == [2, 4]
    for n, (a2, b2) in states[1].adapter.items():
        a1, b1 = states[0].adapter[n]
        assert not torch.equal(a1, a2) and not torch.equal(b1, b2) and b1.abs().sum() > 0
    _, alt = _run(tmp_path / "alternate", shared_data, "rolora", rounds=4, local_steps=1)
    paper_state = read_state(checkpoint_dir(Path(rec["run_dir"])))[0].state
    alt_state = read_state(checkpoint_dir(Path(alt["run_dir"])))[0].state
    assert paper_state.round == alt_state.round == 4
    for n, pair in alt_state.adapter.items():
        assert all(torch.equal(x, y) for x, y in zip(pair, paper_state.adapter[n]))
    assert rec["test_loss"] == alt["test_loss"]


def test_rolora_paper_schedule_audit_trail_keeps_both_half_exchanges(tmp_path, shared_data):
    """With --save-client-adapters every client has a folder per exchange (round_<r>/exchange_<e>/client_<k>): the
    B-step's folder sent B only, the A-step's A only, each task.json names its exchange's server round and p, and
    `bench audit` replays both aggregations of every round from the files."""
    from bench.audit import replay

    _, rec = _run(tmp_path, shared_data, "rolora", rounds=2, local_steps=1, save_client_adapters=True,
                  method_options={"schedule": "paper"})
    run_dir = Path(rec["run_dir"])
    for r in rec["rounds"]:
        for c in r["clients"]:
            folder = run_dir / "clients" / f"round_{r['round']}" / f"exchange_{c['exchange']}" / f"client_{c['id']}"
            task = json.loads((folder / "task.json").read_text())
            assert task["round"] == 2 * (r["round"] - 1) + c["exchange"] and task["p"] == c["p"]
            sent = {k.rsplit("/", 1)[1] for k in load_file(str(folder / "sent.safetensors"))}
            assert sent == ({"A"} if c["exchange"] == 2 else {"B"} if r["round"] > 1 else {"A", "B"}), (r["round"], c)
            assert (folder / "adapter_config.json").is_file()
    from evaluators.serve import client_adapters

    assert client_adapters(run_dir, None) == (2, {f"client_{k}": str(run_dir / "clients" / "round_2" / "exchange_2" / f"client_{k}")
                                                  for k in range(3)})
    report = replay(run_dir)
    assert [x["round"] for x in report["rounds"]] == [1, 2]
    for x in report["rounds"]:
        assert x["clients"] == 6 and x["p_abs_err"] <= 1e-12
        assert x["init_rel_err"] <= 1e-6 and x["merge_rel_err"] == 0.0 and x["peft_rel_err"] <= 1e-6, x