"""Every method's audit trail, held out: each saved client folder, loaded by peft itself
(PeftModel.from_pretrained on the base), is the model that client trained — s · B A with the scaling and factors
its own peft layers held when its local training ended, at the rank it sent (HetLoRA's pruned ranks included) —
and `bench audit` re-derives every round of the run from its files, PEFT configs included.

What the client trained is read from the client runtime's own peft layers right after training (independently of
the audit trail's writer); what the folder holds is read through peft's loading, not through our reader."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from bench.client import ClientRuntime
from bench.config import build_config
from bench.engine import run_federated
from methods import METHODS, get_method



def run_capturing(cfg) -> tuple[dict, dict]:
    """(record, {(round, client): {module: s · B A as trained, float64}}) of a run, read from each client's peft
    layers right after its local training."""
    real_train = ClientRuntime.train
    seen: dict = {}

    def train(self, msg):
        reply = real_train(self, msg)
        if not reply.error:
            slot = f"r{msg.rank}"
            seen[(msg.round, msg.client_id)] = {
                name: layer.scaling[slot] * layer.lora_B[slot].weight.detach().double()[:, : reply.rank]
                @ layer.lora_A[slot].weight.detach().double()[: reply.rank]
                for name, layer in self.layers.items()}
        return reply

    ClientRuntime.train = train
    try:
        rec = run_federated(cfg, log=lambda *a: None)
    finally:
        ClientRuntime.train = real_train
    return rec, seen


@pytest.fixture(scope="module")
def audited(tmp_path_factory, shared_data):
    """name -> (record, {(round, client): {module: s · B A as trained, float64}}) for all registered methods."""
    out = {}
    tmp = tmp_path_factory.mktemp("audit-peft")
    for name in sorted(METHODS):
        over = {"method": name, "data_root": str(shared_data), "output_dir": str(tmp / "runs" / name),
                "results_dir": str(tmp / "results"), "save_client_adapters": True}
        preset = "tiny"
        if name == "hetlora":   # its documented pruning settings: clients prune within the run
            preset = "hetlora-pruning"
        else:
            over.update(rounds=2, local_steps=1)
        out[name] = run_capturing(build_config(preset=preset, overrides=over))
    return out


@pytest.fixture(scope="module")
def base_model():
    from transformers import AutoModelForCausalLM

    from bench.models import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-llama")[0], dtype=torch.float64)


def test_there_are_thirteen_methods():
    assert len(METHODS) == 13


def assert_folders_load_as_trained(name, rec, trained, base_model):
    """Every saved client folder, loaded by PeftModel.from_pretrained, is s · B A as the client trained it."""
    from peft import PeftModel

    run_dir = Path(rec["run_dir"])
    checked = 0
    for (rnd, k), want in trained.items():
        folder = run_dir / "clients" / f"round_{rnd}" / f"client_{k}"
        model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder))
        got = {}
        for mod_name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                key = mod_name.split("base_model.model.", 1)[1]
                got[key] = mod.scaling["default"] * mod.lora_B["default"].weight.double() @ mod.lora_A["default"].weight.double()
        assert set(got) == set(want), (name, rnd, k)
        for mod_name, w in want.items():
            scale = float(torch.linalg.vector_norm(w))
            err = float(torch.linalg.vector_norm(got[mod_name] - w))
            assert err <= 1e-6 * max(scale, 1e-30), (name, rnd, k, mod_name, err, scale)
        checked += 1
    assert checked == sum(len(r["clients"]) for r in rec["rounds"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_saved_client_folder_loads_in_peft_as_the_model_the_client_trained(audited, base_model, name):
    rec, trained = audited[name]
    assert_folders_load_as_trained(name, rec, trained, base_model)


def test_fed_sb_under_dp_saves_folders_that_load_as_trained_and_audit(tmp_path, shared_data, base_model):
    """Fed-SB with DP-SGD (its cores trained through Opacus): every saved folder loads in peft as s · B R A as trained,
    each round-2 folder's A is R @ A_received with R the core sent, and `bench audit` replays every round."""
    from safetensors.torch import load_file

    from bench.audit import replay

    cfg = build_config(preset="tiny", overrides={
        "method": "fed-sb", "dp_epsilon": 8.0, "dp_delta": 1e-5, "rounds": 2, "local_steps": 1,
        "data_root": str(shared_data), "output_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "results"),
        "save_client_adapters": True})
    rec, trained = run_capturing(cfg)
    assert rec["privacy"]["epsilon_max"] <= 8.0
    assert_folders_load_as_trained("fed-sb", rec, trained, base_model)
    for c in rec["rounds"][1]["clients"]:
        folder = Path(rec["run_dir"]) / "clients" / "round_2" / f"client_{c['id']}"
        saved, init = load_file(str(folder / "adapter_model.safetensors")), load_file(str(folder / "received.safetensors"))
        sent = load_file(str(folder / "sent.safetensors"))
        for key, t in saved.items():
            module, which = key[len("base_model.model."):].rsplit(".lora_", 1)
            start = init[f"init/-/{module}/{which[0]}"]
            if which[0] == "B":
                assert torch.equal(t, start), key
            else:
                core = sent[f"up/-/{module}/A"]
                assert core.shape == (c["rank"], c["rank"]) and not torch.equal(core, init[f"core/-/{module}/A"])
                want = core.double() @ start.double()
                assert float((t.double() - want).abs().max()) <= 1e-6 * float(want.abs().max()), key
    for r in replay(rec["run_dir"])["rounds"]:
        assert r["init_rel_err"] <= 1e-5 and r["merge_rel_err"] <= 1e-5 and r["peft_rel_err"] <= 1e-5, r


def test_hetlora_pruned_folders_are_included_and_keep_the_trained_scaling(audited):
    rec, _ = audited["hetlora"]
    pruned = [(r["round"], c) for r in rec["rounds"] for c in r["clients"] if "rank_sent" in c]
    assert pruned, "no client pruned: the test would not cover a pruned rank"
    for rnd, c in pruned:
        spec = json.loads((Path(rec["run_dir"]) / "clients" / f"round_{rnd}" / f"client_{c['id']}"
                           / "adapter_config.json").read_text())
        assert spec["r"] == c["rank_sent"] < c["rank"]
        assert abs(spec["lora_alpha"] / spec["r"] - c["scaling"]) <= 1e-12 * c["scaling"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bench_audit_replays_every_round_from_the_files(audited, name):
    from bench.audit import replay

    rec, _ = audited[name]
    report = replay(rec["run_dir"])
    assert len(report["rounds"]) == len(rec["rounds"])
    for r in report["rounds"]:
        assert r["init_rel_err"] <= 1e-5 and r["merge_rel_err"] <= 1e-5 and r["peft_rel_err"] <= 1e-5, (name, r)
        assert r["p_abs_err"] <= 1e-12
    assert report["export_rel_err"]["relative"] <= 1e-2


def test_audit_refuses_a_folder_whose_peft_scaling_is_not_the_trained_one(audited, tmp_path):
    """The finding this guards: a pruned adapter saved with the original rank's lora_alpha."""
    import shutil

    from bench.audit import replay

    rec, _ = audited["hetlora"]
    copy_dir = tmp_path / "run"
    shutil.copytree(rec["run_dir"], copy_dir)
    (rnd, c) = next((r["round"], c) for r in rec["rounds"] for c in r["clients"] if "rank_sent" in c)
    cfg_file = copy_dir / "clients" / f"round_{rnd}" / f"client_{c['id']}" / "adapter_config.json"
    spec = json.loads(cfg_file.read_text())
    spec["lora_alpha"] = c["scaling"] * c["rank"]          # the original rank's alpha: peft applies the wrong s
    cfg_file.write_text(json.dumps(spec))
    worst = max(r["peft_rel_err"] for r in replay(copy_dir)["rounds"])
    assert worst > 0.1


def test_fedsa_lora_every_round_keeps_each_clients_b(audited):
    """FedSA-LoRA's B never reaches the server, but every round's folder holds the client's B (and sent.safetensors
    holds A only), so each round's own models can be audited."""
    from safetensors.torch import load_file

    rec, _ = audited["fedsa-lora"]
    for r in rec["rounds"]:
        for c in r["clients"]:
            folder = Path(rec["run_dir"]) / "clients" / f"round_{r['round']}" / f"client_{c['id']}"
            sent = load_file(str(folder / "sent.safetensors"))
            saved = load_file(str(folder / "adapter_model.safetensors"))
            assert sent and all(k.endswith("/A") for k in sent)
            bs = [t for k, t in saved.items() if "lora_B" in k]
            assert bs and all(float(t.abs().max()) > 0 for t in bs)


@pytest.mark.parametrize("name", ["fedsvd", "fed-sb"])
def test_new_methods_send_what_they_promise(audited, name):
    """Bytes per client per round on the tiny model (2 layers; q_proj 64×64, v_proj 32×64; float32): FedSVD uploads
    B only after round 1 (A once); Fed-SB uploads r² per module from round 2 (round 1: the LoRA-SB initialization)."""
    rec, _ = audited[name]
    b_per_rank, a_per_rank = 2 * (64 + 32) * 4, 2 * (64 + 64) * 4
    for r in rec["rounds"]:
        for c in r["clients"]:
            if name == "fedsvd":
                assert c["bytes_up"] == c["rank"] * (b_per_rank + (a_per_rank if r["round"] == 1 else 0))
            elif r["round"] == 1:
                assert c["bytes_up"] == c["rank"] * (a_per_rank + b_per_rank)
            else:
                assert c["bytes_up"] == 4 * c["rank"] ** 2 * 4       # 4 modules × r_k² floats
        assert r["noise"] == 0.0 or (name == "fed-sb" and r["round"] == 1)


def test_every_record_states_its_round_convention(audited):
    for name, (rec, _) in audited.items():
        assert rec["method_info"]["round_convention"] == get_method(name, rec["config"]["method_options"]).round_convention
    rec, _ = audited["rolora"]
    assert [r["iteration"] for r in rec["rounds"]] == [1, 1]
    assert audited["hetlora"][0]["config"]["method_options"] == {"lam": 50.0, "gamma": 0.5}


@pytest.mark.parametrize("name", ["fedsvd", "fed-sb"])
def test_cli_runs_the_new_methods_on_the_tiny_preset_and_audits(tmp_path, shared_data, name):
    """`python -m bench run --method <m> --preset tiny --save-client-adapters`, then `bench audit` on its folder."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BENCH_DATA_ROOT": str(shared_data), "PYTHONPATH": str(repo)}
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "bench", "run", "--method", name, "--preset", "tiny",
                          "--save-client-adapters", "--output-dir", str(out), "--results-dir", str(tmp_path / "results")],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    audit = subprocess.run([sys.executable, "-m", "bench", "audit", str(out)], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=600)
    assert audit.returncode == 0 and "audit: consistent" in audit.stdout, audit.stdout[-1500:] + audit.stderr[-1500:]


@pytest.mark.parametrize("name", ["fedsvd", "fed-sb"])
def test_the_new_methods_train_only_what_they_say(audited, name):
    """From the files: FedSVD's saved A is the A it received, bit for bit (only B trained); Fed-SB's saved B is the B
    it received, bit for bit, and its saved A is R @ A_received with R the core it sent (only R trained)."""
    from safetensors.torch import load_file

    rec, _ = audited[name]
    checked = 0
    for r in rec["rounds"][1:]:
        for c in r["clients"]:
            folder = Path(rec["run_dir"]) / "clients" / f"round_{r['round']}" / f"client_{c['id']}"
            got, init = load_file(str(folder / "adapter_model.safetensors")), load_file(str(folder / "received.safetensors"))
            sent = load_file(str(folder / "sent.safetensors"))
            for key, t in got.items():
                module, which = key[len("base_model.model."):].rsplit(".lora_", 1)
                start = init[f"init/-/{module}/{which[0]}"]
                if name == "fedsvd" and which[0] == "A":
                    assert torch.equal(t, start), key
                elif name == "fed-sb":
                    if which[0] == "B":
                        assert torch.equal(t, start), key
                    else:
                        core = sent[f"up/-/{module}/A"]
                        assert core.shape == (c["rank"], c["rank"])
                        want = core.double() @ start.double()
                        assert float((t.double() - want).abs().max()) <= 1e-6 * float(want.abs().max()), key
                checked += 1
    assert checked
