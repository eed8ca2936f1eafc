"""Precision and the audit trail.

In bfloat16 a round's update on a small model is below the weights' rounding step: merged into bf16
weights it mostly vanishes. The engine keeps float32 masters for the weights that receive merges and
exports the global model from the server's float64 deltas; these tests make the update small enough
that a bf16 merge would lose most of it (checked), then require the exported model to hold every
round's update within 1%, re-derived from the run's files alone.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.audit import replay
from bench.config import build_config
from bench.engine import run_federated
from bench.models import resolve_model
from methods import METHODS

TARGETS = ("q_proj.weight", "v_proj.weight")


def _bf16_run(tmp: Path, shared_data, method: str, **over) -> dict:
    ranks = "4,2,2" if METHODS[method].heterogeneous_ranks else "4,4,4"
    cfg = build_config(preset="tiny", overrides={
        "method": method, "data_root": str(shared_data), "dtype": "bfloat16", "lr": 1e-5, "ranks": ranks,
        "save_client_adapters": True, "output_dir": str(tmp / method), "results_dir": str(tmp / "results"), **over})
    return run_federated(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("bf16")
    return {m: _bf16_run(tmp, shared_data, m) for m in sorted(METHODS)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_export_holds_every_rounds_update(bf16_runs, method):
    rec = bf16_runs[method]
    assert rec["dtypes"] == {"training": "bfloat16", "compute": "bfloat16", "master": "float32", "export": "float32",
                             "eval": None, "compute_reason": "storage dtype bfloat16: compute in the storage dtype"}
    report = replay(rec["run_dir"])
    assert all(r["init_rel_err"] <= 1e-6 and r["merge_rel_err"] <= 1e-6 for r in report["rounds"]), report
    ex = report["export_rel_err"]
    assert ex["global_dtype"] == "float32" if ex["modules"] else True
    assert ex["relative"] <= 0.01, ex
    if ex["modules"]:
        # the test is only meaningful if the update is below bf16's step: merged into bf16 weights
        # (what the engine did before its float32 masters) most of it would be rounded away
        base = load_file(resolve_model("tiny-random-llama")[0] + "/model.safetensors")
        glob = load_file(rec["run_dir"] + "/global_model/model.safetensors")
        lost = total = 0.0
        for key in glob:
            if key.endswith(TARGETS):
                d = glob[key].double() - base[key].double()
                naive = (base[key].bfloat16() + d.bfloat16()).double() - base[key].bfloat16().double()
                lost += float((naive - d).norm()) ** 2
                total += float(d.norm()) ** 2
        assert total > 0 and (lost / total) ** 0.5 > 0.5


def test_flora_round2_clients_train_on_the_merged_base(bf16_runs):
    rec = bf16_runs["flora"]
    r2 = rec["rounds"][1]
    assert all(c["base_round"] == 1 for c in r2["clients"])  # every round-2 client applied round 1's merge
    # what they received: exactly round 1's merge (the stack of round 1's uploads)
    folder = Path(rec["run_dir"]) / "clients" / "round_2" / "client_0"
    received = load_file(str(folder / "received.safetensors"))
    assert {k.split("/")[1] for k in received} == {"1"}


def test_runtime_master_keeps_the_merge_and_the_view_is_its_bf16(shared_data):
    """The client side: a merge below bf16's step lands in the float32 master; the training weight is
    the master's nearest bf16 value, not the stale bf16 base."""
    from bench.client import ClientRuntime, ModelSpec

    cfg = build_config(preset="tiny", overrides={"data_root": str(shared_data), "dtype": "bfloat16"})
    path = resolve_model("tiny-random-llama")[0]
    rt = ClientRuntime(cfg, ModelSpec(path, torch.device("cpu"), torch.bfloat16), [2], {0: []})
    w0 = {n: m.clone() for n, m in rt.master.items()}
    g = torch.Generator().manual_seed(0)
    merges = {}
    for rnd in (1, 2, 3):
        merges[rnd] = {n: (torch.randn(2, w.shape[1], generator=g) * 1e-3, torch.randn(w.shape[0], 2, generator=g) * 1e-3)
                       for n, w in w0.items()}
    rt.apply_merges(merges)
    assert rt.base_round == 3
    for name, layer in rt.layers.items():
        want = w0[name].double() + sum(b.double() @ a.double() for a, b in (m[name] for m in merges.values()))
        assert torch.allclose(rt.master[name].double(), want, rtol=0, atol=1e-8)
        assert torch.equal(layer.base_layer.weight, rt.master[name].to(torch.bfloat16))
    rt.apply_merges({2: merges[2]})  # already in: applied once only
    assert torch.allclose(rt.master[name].double(), want, rtol=0, atol=1e-8)
    from bench.client import BaseOutOfSync
    with pytest.raises(BaseOutOfSync):
        rt.apply_merges({5: merges[1]})  # a gap: the server must resend from round 4


def test_audit_rederives_fedavg_and_flexlora_starting_points_independently(tmp_path, shared_data):
    """From the files alone, with dense algebra independent of methods/: the round-2 clients' starting
    factors are FedAvg's padded averages / FlexLoRA's best rank-r_k approximation of round 1's uploads."""
    from bench.audit import _read_received, _read_upload

    for method in ("fedavg-lora", "flexlora"):
        cfg = build_config(preset="tiny", overrides={
            "method": method, "data_root": str(shared_data), "ranks": "4,2,2", "save_client_adapters": True,
            "keep_round_states": True, "output_dir": str(tmp_path / method), "results_dir": str(tmp_path / "results")})
        rec = run_federated(cfg, log=lambda *a: None)
        run = Path(rec["run_dir"])
        r1 = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()][0]
        ups = {c["id"]: _read_upload(run / "clients" / "round_1" / f"client_{c['id']}") for c in r1["clients"]}
        n = {c["id"]: c["examples"] for c in r1["clients"]}
        p = {k: v / sum(n.values()) for k, v in n.items()}
        s = {c["id"]: c["scaling"] for c in r1["clients"]}
        assert all(abs(p[c["id"]] - c["p"]) < 1e-12 for c in r1["clients"])
        for c in rec["rounds"][1]["clients"]:
            k, r = c["id"], c["rank"]
            init, _ = _read_received(run / "clients" / "round_2" / f"client_{k}")
            for name, (a, b) in init.items():
                if method == "fedavg-lora":
                    a_bar = sum(p[j] * torch.nn.functional.pad(ups[j][name][0].double(), (0, 0, 0, 4 - ups[j][name][0].shape[0])) for j in ups)
                    b_bar = sum(p[j] * s[j] * torch.nn.functional.pad(ups[j][name][1].double(), (0, 4 - ups[j][name][1].shape[1])) for j in ups)
                    assert torch.allclose(a.double(), a_bar[:r], atol=1e-6)
                    assert torch.allclose(b.double(), b_bar[:, :r] / s[k], atol=1e-6)
                else:
                    dense = sum(p[j] * s[j] * ups[j][name][1].double() @ ups[j][name][0].double() for j in ups)
                    u, sv, vh = torch.linalg.svd(dense)
                    best = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
                    got = s[k] * b.double() @ a.double()
                    assert torch.allclose(got, best, atol=1e-6 * float(sv[0]))
        # the kept round states are readable server states, the last one equal to the checkpoint's
        from bench.checkpoint import read_state
        last, _, _ = read_state(run / "rounds" / "round_2")
        ck, _, _ = read_state(run / "checkpoint")
        assert all(torch.equal(last.state.adapter[n][0], ck.state.adapter[n][0]) for n in ck.state.adapter)
