"""Flower's simulation engine (Ray, virtual SuperNodes) against the in-process engine, bit for bit.

- `bench run --engine flower-sim` (FLoRA, ranks 2,4,8, 2 rounds): the same server state, global model,
  per-client losses and tensor bytes as in-process; the record says engine "flower-sim"
- one simulation running FlexLoRA and FedAvg-LoRA through the engine's loop, one job after the other on the
  same virtual nodes: both equal to in-process
- RoLoRA's schedule=paper (two exchanges a round over the transport, the audit trail keeping both half-exchanges):
  the same rows, states, audit files and test loss as in-process
- the personalized rows (HetLoRA, FedSA-LoRA: no global model, the local-only reference) in one simulation:
  each node scores its own client's model (EVALUATE), and the record's personalized section and score equal
  in-process's

Same arithmetic, same machine: every client runs bench/client.py's ClientRuntime with the same seeds, the
same model file, the same merges in the same order and, by default, the same number of torch threads
(one actor with every CPU), so nothing is left to a tolerance.
"""
from __future__ import annotations

import pytest

from bench.cli import main
from flower_helpers import SMALL, assert_same_run, flower_env, metrics, record, reference_run, require_flwr


@pytest.fixture
def env(offline_data_env, monkeypatch, tmp_path):
    require_flwr()
    for k, v in flower_env(tmp_path / "flwr_home").items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def refs(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "flower-references"
    root.mkdir(exist_ok=True)
    return root


def test_cli_flower_sim_matches_inprocess(env, refs, tmp_path, capsys):
    ref = reference_run(refs, "flora")
    rc = main(["run", *SMALL, "--method", "flora", "--engine", "flower-sim", "--output-dir", str(tmp_path / "run"),
               "--results-dir", str(tmp_path / "results")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 node(s) ready" in out
    assert_same_run(tmp_path / "run", ref)
    assert record(tmp_path / "run")["engine"] == "flower-sim"


def test_rolora_paper_schedule_on_flower_sim_matches_inprocess(env, refs, tmp_path):
    """Each round's two exchanges (B-step, then A-step) travel over the Flower grid: the same per-exchange rows and
    metrics, server state, global model and test loss as in-process, and both engines' audit trails hold the same
    per-exchange uploads and replay as consistent."""
    from safetensors.torch import load_file

    from bench.audit import replay

    opts = ("--method-options", "schedule=paper", "--save-client-adapters")
    ref = reference_run(refs, "rolora", *opts)
    run = tmp_path / "run"
    rc = main(["run", *SMALL, "--method", "rolora", *opts, "--engine", "flower-sim", "--output-dir", str(run),
               "--results-dir", str(tmp_path / "results")])
    assert rc == 0
    assert_same_run(run, ref)
    assert record(run)["engine"] == "flower-sim"
    for got, want in zip(metrics(run), metrics(ref), strict=True):
        assert [x["trained_b"] for x in got["exchanges"]] == [1, 0] and got["exchanges"] == want["exchanges"]
        assert [(c["exchange"], c["id"]) for c in got["clients"]] == [(c["exchange"], c["id"]) for c in want["clients"]]
    sent = sorted(p.relative_to(run) for p in run.glob("clients/round_*/exchange_*/client_*/sent.safetensors"))
    assert len(sent) == 2 * 2 * 3 and sent == sorted(p.relative_to(ref) for p in ref.glob("clients/*/*/*/sent.safetensors"))
    for rel in sent:
        a, b = load_file(str(run / rel)), load_file(str(ref / rel))
        assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a), rel
    for x in replay(run)["rounds"]:
        assert x["init_rel_err"] <= 1e-6 and x["peft_rel_err"] <= 1e-6 and x["p_abs_err"] <= 1e-12, x


def test_two_jobs_in_one_simulation(env, refs, tmp_path):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from bench.app.flower_launch import simulation_backend
    from bench.app.flower_server_app import run_job
    from bench.config import build_config
    from bench.engine import preflight
    from bench.flower.client_app import app as client_app
    from bench.flower.options import FlowerOptions, make_job

    base = {"ranks": "2,4,8", "local_steps": 1, "batch_size": 1, "micro_batch_size": 1, "cutoff_len": 32, "test_limit": 2}
    jobs = {}
    for name, method in (("flexlora", "flexlora"), ("fedavg-lora", "fedavg-lora")):
        cfg = build_config(preset="tiny", overrides={**base, "method": method, "output_dir": str(tmp_path / name),
                                                     "results_dir": str(tmp_path / "results")})
        jobs[name] = (make_job(cfg, "flower-sim", FlowerOptions()), preflight(cfg))
    out = {}
    app = ServerApp()

    @app.main()
    def main_fn(grid, context):
        for name, (job, plan) in jobs.items():  # one after another on the same virtual nodes (a new session each)
            out[name] = run_job(grid, job, plan=plan)

    run_simulation(app, client_app, num_supernodes=3, backend_config=simulation_backend(FlowerOptions(), "cpu"))
    for name in ("flexlora", "fedavg-lora"):
        assert_same_run(tmp_path / name, reference_run(refs, name))
        assert out[name]["engine"] == "flower-sim"


def test_personalized_methods_score_their_clients_own_models_as_in_process(env, refs, tmp_path):
    """Each client's own model lives on its node (FedSA-LoRA's B, local-only's whole adapter never leave it): the
    EVALUATE round has the nodes
    score them on the pooled set and on their own splits, bit for bit the in-process figures."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from bench.config import build_config
    from bench.engine import preflight
    from bench.flower.client_app import app as client_app
    from bench.app.flower_launch import simulation_backend
    from bench.flower.options import FlowerOptions, make_job
    from bench.app.flower_server_app import run_job

    base = {"ranks": "2,4,8", "local_steps": 1, "batch_size": 1, "micro_batch_size": 1, "cutoff_len": 32, "test_limit": 2,
            "client_test_fraction": 0.2}
    rows = {"hetlora": {"method": "hetlora"}, "fedsa-lora": {"method": "fedsa-lora"},
            "local-only": {"method": "fedavg-lora", "reference": "local-only"}}
    jobs = {}
    for name, row in rows.items():
        cfg = build_config(preset="tiny", overrides={**base, **row, "output_dir": str(tmp_path / name),
                                                     "results_dir": str(tmp_path / "results")})
        jobs[name] = (make_job(cfg, "flower-sim", FlowerOptions()), preflight(cfg))
    out = {}
    app = ServerApp()

    @app.main()
    def main_fn(grid, context):
        for name, (job, plan) in jobs.items():
            out[name] = run_job(grid, job, plan=plan)

    run_simulation(app, client_app, num_supernodes=3, backend_config=simulation_backend(FlowerOptions(), "cpu"))
    for name, row in rows.items():
        ref = reference_run(refs, row["method"], "--client-test-fraction", "0.2",
                            *(["--reference", row["reference"]] if "reference" in row else []))
        assert_same_run(tmp_path / name, ref)
        got, want = out[name], record(ref)
        assert got["engine"] == "flower-sim" and want["engine"] == "inprocess"
        assert got["personalized"]["clients"] == 3 and len(got["personalized"]["per_client"]) == 3
        assert got["personalized"] == want["personalized"], name
        assert got["test"] == want["test"], name
