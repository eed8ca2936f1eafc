"""A batched round (bench/batched.py) equals the sequential round: the real engine on a tiny random Llama, twice
(client_batching off / on), heterogeneous ranks, unequal data (clients with fewer steps drop out of later
micro-steps), LoRA dropout on (each client's masks from its own stream), two rounds (the second starts from
the aggregate, and from the merged base for FLoRA). Equal to float tolerance: every client's losses of every
round, and the server's final state tensor for tensor."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.config import build_config
from bench.engine import run_federated

# methods that merge into the base (flora), keep personal factors (fedsa-lora), train one factor (ffa-lora),
# add a penalty and prune (hetlora), redistribute an SVD (flexlora)
METHODS = ["flora", "fedsa-lora", "ffa-lora", "hetlora", "flexlora"]


def _data(tmp_path: Path) -> str:
    """A small local dataset whose Dirichlet shards differ in size (the tiny preset caps Dolly's at 12 each)."""
    import json

    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"instruction": f"Add {i} and {i % 7}.", "input": "" if i % 3 else f"Numbers: {i}",
                                "output": f"The sum is {i + i % 7}.", "label": "abc"[i % 3]}) + "\n")
    return str(path)


def _run(tmp_path: Path, shared_data, method: str, batching: str, **over):
    cfg = build_config(preset="tiny", overrides={
        "method": method, "data_root": str(shared_data), "dataset": _data(tmp_path), "dirichlet_alpha": 0.5,
        "max_examples_per_client": None, "test_fraction": 0.2, "output_dir": str(tmp_path / batching / "run"),
        "results_dir": str(tmp_path / batching / "results"), "client_batching": batching, "ranks": [4, 2, 3],
        "local_steps": None, "local_epochs": 1.0, "lora_dropout": 0.1, "keep_global_model": False, **over})
    logs = []
    rec = run_federated(cfg, log=logs.append)
    return rec, load_file(str(Path(rec["run_dir"]) / "checkpoint" / "server.safetensors")), logs


@pytest.mark.parametrize("method", METHODS)
def test_batched_round_equals_sequential_round(tmp_path, shared_data, method):
    seq, seq_state, _ = _run(tmp_path, shared_data, method, "off")
    bat, bat_state, logs = _run(tmp_path, shared_data, method, "on")
    assert any("client_batching: on" in str(line) for line in logs)
    steps = [c["steps"] for r in seq["rounds"] for c in r["clients"]]
    assert len(set(steps)) > 1, "unequal data: some clients take fewer steps"
    for rs, rb in zip(seq["rounds"], bat["rounds"], strict=True):
        for cs, cb in zip(rs["clients"], rb["clients"], strict=True):
            assert (cs["id"], cs["rank"], cs["steps"], cs["tokens"]) == (cb["id"], cb["rank"], cb["steps"], cb["tokens"])
            assert cb["batched_clients"] == len(rb["clients"])
            for key in ("first_loss", "last_loss", "loss"):
                assert cb[key] == pytest.approx(cs[key], rel=1e-5, abs=1e-6), (rs["round"], cs["id"], key)
    assert seq_state.keys() == bat_state.keys()
    # FlexLoRA's factors are singular vectors (sensitive to rounding by 1/gap): its state is compared by the
    # products B A it holds; every other method's tensor for tensor
    products = method == "flexlora"
    for key, t in seq_state.items():
        if products and key.endswith("/A"):
            b_key = key[:-2] + "/B"
            want, got = seq_state[b_key].double() @ t.double(), bat_state[b_key].double() @ bat_state[key].double()
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), key
        elif products and key.endswith("/B"):
            continue
        elif t.is_floating_point():
            # float32 sums in another order (the batch's shapes, 2 BLAS threads) differ by ~1e-7 relative; AdamW
            # divides by √v, so where a gradient is near zero that difference reaches the update almost whole:
            # measured up to 6.3e-5 of the tensor's scale (FFA-LoRA, 2 threads, AMD EPYC), 0 at 1 thread
            scale = float(t.abs().max()) if t.numel() else 0.0
            assert torch.allclose(bat_state[key], t, rtol=1e-4, atol=2e-4 * max(scale, 1e-3)), key
        else:
            assert torch.equal(bat_state[key], t), key
    assert seq["test_loss"] == pytest.approx(bat["test_loss"], rel=1e-5)


def test_batched_adamw_equals_torch_adamw_per_client():
    """The vectorized per-client AdamW is torch.optim.AdamW for each client, and a client flagged inactive (its
    steps done) or not training a factor stays bit for bit."""
    from bench.batched import _AdamW

    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 4, 5, generator=g)
    grads = [torch.randn(3, 4, 5, generator=g) for _ in range(4)]
    stacked = p0.clone().requires_grad_(True)
    opt = _AdamW([stacked], [torch.tensor([True, True, False])], lr=1e-2)
    refs = [p0[c].clone().requires_grad_(True) for c in range(2)]
    ref_opts = [torch.optim.AdamW([r], lr=1e-2, weight_decay=0.0) for r in refs]
    for step, gr in enumerate(grads):
        active = torch.tensor([True, step < 2, True])  # host flags, as train_batched passes them  # client 1 has 2 steps, client 2 does not train
        stacked.grad = gr.clone()
        opt.step(active)
        for c in range(2):
            if bool(active[c]):
                refs[c].grad = gr[c].clone()
                ref_opts[c].step()
    for c in range(2):
        assert torch.allclose(stacked[c].detach(), refs[c].detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(stacked[2].detach(), p0[2])


def test_unbatchable_method_is_trained_one_by_one_with_a_note():
    from bench.batched import refusal
    from bench.transports.inprocess import _client_batching
    from methods import get_method

    assert all(refusal(get_method(m)) is None for m in METHODS)
    cls = type(get_method("fedit"))
    monkey = type("Unbatchable", (cls,), {"batchable": False})
    assert "unbatchable" in refusal(monkey())
    import bench.transports.inprocess as transport

    cfg = build_config(preset="tiny", overrides={"method": "fedit", "client_batching": "on"})
    notes = []
    orig = transport.get_method
    try:
        transport.get_method = lambda *a, **k: monkey()
        assert _client_batching(cfg, torch.device("cpu"), notes.append) is False
    finally:
        transport.get_method = orig
    assert len(notes) == 1 and "one by one" in notes[0]
    assert _client_batching(cfg, torch.device("cpu"), notes.append) is True


def test_client_batching_modes_and_bad_value():
    from bench import BenchError
    from bench.batched import use_batching

    assert use_batching("on", torch.device("cpu")) and not use_batching("off", torch.device("cuda"))
    assert use_batching("auto", torch.device("cuda")) and not use_batching("auto", torch.device("cpu"))
    with pytest.raises(BenchError, match="client_batching"):
        build_config(preset="tiny", overrides={"client_batching": "yes"})


def test_clients_perf_section_runs_on_cpu_and_reports_exactness():
    """`bench perf --only clients`'s code path on a tiny Llama on the CPU: its exactness check passes, both paths
    train the same tokens, the markdown has both rows (speed is measured there, never asserted here)."""
    from transformers import LlamaConfig

    from benchmarks import clients_perf

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    r = clients_perf.measure_clients(device="cpu", dtype=torch.float32, config=cfg, client_counts=(3,), seq=(8, 24),
                                     sizes=(2, 9), batch_size=2, dropout=0.05, max_tokens=64, log=lambda *a: None)
    assert r["exactness"]["passed"] and r["exactness"]["same_steps_and_tokens"]
    row = r["rounds"]["3"]
    assert row["batched"]["tokens"] == row["sequential"]["tokens"] and row["batched"]["steps"] == row["sequential"]["steps"]
    text = "\n".join(clients_perf.markdown(r) + clients_perf.summary_rows(r))
    assert "| 3 | sequential |" in text and "| 3 | batched |" in text and "batched = sequential on cpu | pass" in text
