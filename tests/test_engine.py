"""End-to-end federated runs through the real engine: a tiny random Llama (seconds) for every method,
and the real default model (SmolLM2-135M-Instruct) on real Dolly data for a few steps."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bench.config import build_config
from bench.engine import run_federated

METHODS = ["fedavg-lora", "fedit", "flora", "flexlora"]


def _run(tmp_path, shared_data, method, **over):
    cfg = build_config(preset=over.pop("preset", "tiny"), overrides={
        "method": method, "data_root": str(shared_data), "output_dir": str(tmp_path / "runs" / method),
        "results_dir": str(tmp_path / "results"), **over})
    return cfg, run_federated(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("tiny")
    return {m: _run(tmp, shared_data, m, save_client_adapters=True) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_tiny_run_writes_complete_record_and_artifacts(tiny_runs, method):
    cfg, rec = tiny_runs[method]
    run_dir = __import__("pathlib").Path(rec["run_dir"])
    assert rec["status"] == "complete" and rec["method"] == method and rec["schema_version"] == 2
    assert rec["config"]["method"] == method and len(rec["config_hash"]) == 64
    prov = rec["provenance"]
    assert prov["packages"]["torch"] and prov["git_commit"] and len(prov["model_hash"]) == 64
    assert all(len(md5) == 32 for md5 in prov["data"].values())
    assert [c["num_examples"] for c in rec["clients"]] == [12, 12, 12]
    assert [c["rank"] for c in rec["clients"]] == [4, 2, 2]
    assert len(rec["rounds"]) == cfg.rounds and math.isfinite(rec["test_loss"])
    assert rec["communication"]["bytes_up"] > 0
    # the record is the JSON on disk, and the run dir points at it
    on_disk = json.loads(open(json.loads((run_dir / "run.json").read_text())["record"]).read())
    assert on_disk["run_id"] == rec["run_id"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["round"] for l in lines] == list(range(1, cfg.rounds + 1))
    # the resolved config reloads into the same experiment
    again = build_config(config_file=str(run_dir / "config.yaml"))
    assert again.config_hash() == cfg.config_hash()


@pytest.mark.parametrize("method", METHODS)
def test_tiny_global_model_changed_from_base_and_reloads(tiny_runs, method):
    from transformers import AutoModelForCausalLM

    from bench.models import resolve_model

    _, rec = tiny_runs[method]
    base = load_file(resolve_model("tiny-random-llama")[0] + "/model.safetensors")
    glob = load_file(rec["run_dir"] + "/global_model/model.safetensors")
    assert set(base) == set(glob)  # a plain HF model: no lora keys left behind
    changed = {k for k in base if not torch.equal(base[k], glob[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    model = AutoModelForCausalLM.from_pretrained(rec["run_dir"] + "/global_model")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("method", ["fedit", "flora"])  # the global adapter alone; merges alone
def test_dropped_global_model_is_written_again_identically(tiny_runs, tmp_path, shared_data, method):
    """keep_global_model false: the run deletes global_model/ once scored, with the same record figures, and
    export.global_model_dir writes it again from the checkpoint, tensor for tensor the kept run's model."""
    from pathlib import Path

    from bench import BenchError
    from bench.export import global_model_dir

    _, kept = tiny_runs[method]
    _, rec = _run(tmp_path, shared_data, method, save_client_adapters=True, keep_global_model=False)
    run_dir = Path(rec["run_dir"])
    assert not (run_dir / "global_model").exists() and rec["test"]["loss"] == kept["test"]["loss"]
    again = load_file(str(global_model_dir(run_dir) / "model.safetensors"))
    want = load_file(kept["run_dir"] + "/global_model/model.safetensors")
    assert again.keys() == want.keys() and all(torch.equal(again[k], want[k]) for k in want)
    (run_dir / "run.json").unlink()  # not a finished run: nothing to write it from
    import shutil

    shutil.rmtree(run_dir / "global_model")
    with pytest.raises(BenchError, match="holds no finished run"):
        global_model_dir(run_dir)


def test_noise_recorded_only_for_factor_averaging(tiny_runs):
    from methods import METHODS as REGISTRY

    for m in METHODS:
        noise = [r["noise"] for r in tiny_runs[m][1]["rounds"]]
        assert tiny_runs[m][1]["method_info"]["averages_factors"] == REGISTRY[m].averages_factors
        if REGISTRY[m].averages_factors:
            assert all(n > 0 for n in noise)  # heterogeneous clients: mean(B)mean(A) ≠ mean(BA)
            assert all(r["noise_per_module"] for r in tiny_runs[m][1]["rounds"])
        else:
            assert noise == [0.0] * len(noise)


def test_fedit_and_fedavg_lora_agree_under_the_same_config(tiny_runs):
    # same math; FedIT only differs by its recipe defaults, which the preset overrides here
    a = load_file(tiny_runs["fedit"][1]["run_dir"] + "/global_model/model.safetensors")
    b = load_file(tiny_runs["fedavg-lora"][1]["run_dir"] + "/global_model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_client_adapters_load_in_peft(tiny_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bench.models import resolve_model

    _, rec = tiny_runs["flexlora"]
    folder = f"{rec['run_dir']}/clients/round_2/client_0"
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-llama")[0])
    model = PeftModel.from_pretrained(base, folder)
    lora = model.base_model.model.model.layers[0].self_attn.q_proj
    saved = load_file(folder + "/adapter_model.safetensors")
    assert torch.equal(lora.lora_A["default"].weight, saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    assert lora.lora_A["default"].weight.shape[0] == 4 and lora.scaling["default"] == pytest.approx(8 / 4)


def test_flora_global_equals_base_plus_stacked_client_updates(tmp_path, shared_data):
    """One round of FLoRA: global − base must equal Σ p_k s_k B_k A_k of the saved client adapters."""
    from bench.models import resolve_model

    cfg, rec = _run(tmp_path, shared_data, "flora", rounds=1, save_client_adapters=True)
    base = load_file(resolve_model("tiny-random-llama")[0] + "/model.safetensors")
    glob = load_file(rec["run_dir"] + "/global_model/model.safetensors")
    n = [c["num_examples"] for c in rec["clients"]]
    p = [x / sum(n) for x in n]
    name = "model.layers.1.self_attn.v_proj"
    expect = torch.zeros_like(base[name + ".weight"], dtype=torch.float64)
    for k, client in enumerate(rec["clients"]):
        ad = load_file(f"{rec['run_dir']}/clients/round_1/client_{k}/adapter_model.safetensors")
        a = ad[f"base_model.model.{name}.lora_A.weight"].double()
        b = ad[f"base_model.model.{name}.lora_B.weight"].double()
        expect += p[k] * cfg.scaling(client["rank"]) * b @ a
    got = glob[name + ".weight"].double() - base[name + ".weight"].double()
    assert torch.allclose(got, expect, atol=1e-6) and expect.abs().max() > 1e-5


def test_client_sampling_is_seeded_and_fraction_respected(tmp_path, shared_data):
    _, rec = _run(tmp_path, shared_data, "fedavg-lora", num_clients=3, client_fraction=0.67, rounds=2)
    sampled = [r["sampled"] for r in rec["rounds"]]
    assert all(len(s) == 2 for s in sampled)
    _, rec2 = _run(tmp_path / "again", shared_data, "fedavg-lora", num_clients=3, client_fraction=0.67, rounds=2)
    assert [r["sampled"] for r in rec2["rounds"]] == sampled
    assert rec2["test_loss"] == rec["test_loss"]  # same seed, same numbers


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_real_default_model_few_steps(tmp_path, shared_data, method):
    """SmolLM2-135M-Instruct on real Dolly shards: training lowers nothing to NaN, the merged global
    model reloads from its folder and generates text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, rec = _run(tmp_path, shared_data, method, preset="quick", num_clients=2, ranks="8,4", rounds=2,
                    local_steps=1, batch_size=2, micro_batch_size=2, cutoff_len=64, max_examples_per_client=8,
                    test_limit=8, eval_tasks=[])
    assert rec["setting"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert all(math.isfinite(c["loss"]) and c["loss"] < 8 for r in rec["rounds"] for c in r["clients"])
    assert 0 < rec["test_loss"] < 6
    folder = rec["run_dir"] + "/global_model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0


def runtime_for(cfg, dtype=torch.float32):
    """A real ClientRuntime over every client of cfg (what the in-process engine builds)."""
    from bench.client import ClientRuntime, ModelSpec
    from bench.engine import client_examples, load_tokenizer, preflight

    plan = preflight(cfg)
    tok = load_tokenizer(plan.model_path)
    return ClientRuntime(cfg, ModelSpec(plan.model_path, torch.device("cpu"), dtype), plan.ranks,
                         client_examples(cfg, plan, tok, range(cfg.num_clients))), plan


def test_clients_of_a_round_start_from_one_shared_initialisation(tmp_path, shared_data):
    """Round 1 of FedAvg: every client starts from the same A (slices of one max-rank draw), as a
    server's global init would be; a client's A after training differs from its start only by training."""
    from bench.config import build_config

    cfg = build_config(preset="tiny", overrides={"method": "fedavg-lora", "data_root": str(shared_data)})
    rt, _ = runtime_for(cfg)

    def start(rank, seed):
        rt._load(rt._slot(rank), rank, None, seed)
        return rt._factors(f"r{rank}")

    big, small, other = start(4, 123), start(2, 123), start(2, 124)
    for name in big:
        assert torch.equal(small[name][0], big[name][0][:2])
        assert not torch.equal(other[name][0], small[name][0])
        assert not big[name][1].any()  # B starts at zero: the product is unchanged


def test_labelled_positions_shortcut_matches_full_logits_loss_and_gradients(shared_data, monkeypatch):
    """token_loss applies the output layer to labelled positions only; it must equal the plain path."""
    from bench import client
    from bench import data as D
    from bench.config import build_config

    cfg = build_config(preset="tiny", overrides={"method": "flora", "data_root": str(shared_data), "lora_dropout": 0.0})
    cm, plan = runtime_for(cfg)
    adapter = cm._slot(4)
    cm._load(adapter, 4, None, 1)
    with torch.no_grad():
        for layer in cm.layers.values():
            layer.lora_B[adapter].weight.normal_(0, 0.05)
    examples = [D.tokenize(plan.dataset.train[i], cm.tokenizer, "alpaca", 64, False) for i in plan.shards[0][:4]]
    batch = D.collate(examples, cm.tokenizer.pad_token_id)

    def loss_and_grads():
        cm.model.zero_grad()
        loss, n = client.token_loss(cm.model, batch, cm.device)
        loss.backward()
        return loss.item(), n, {k: p.grad.clone() for k, p in cm.model.named_parameters() if p.requires_grad}

    fast = loss_and_grads()
    assert "llama" in client.PLAIN_LM_HEAD
    monkeypatch.setattr(client, "PLAIN_LM_HEAD", set())
    full = loss_and_grads()
    assert fast[1] == full[1] > 0
    assert fast[0] == pytest.approx(full[0], rel=1e-5)
    assert all(torch.allclose(fast[2][k], full[2][k], rtol=1e-4, atol=1e-6) for k in full[2])
