"""Flower deployment engine, real processes on 127.0.0.1: one SuperLink with TLS and SuperNode
authentication, three registered SuperNodes (one per client), runs submitted with
`bench run --engine flower --superlink ... --root-certificates ...` (which calls `flwr run`).

- equivalence: FLoRA, FlexLoRA and RoLoRA's schedule=paper (two exchanges a round) with ranks 2,4,8, 2 rounds: the same server state, global model, per-client
  losses and tensor bytes as the in-process engine, bit for bit; the record says engine "flower" and each
  client row carries the bytes Flower serialised (wire_bytes_up/down)
- hostile replies (a ClientApp that corrupts bench's real replies, tests/flower_hostile_app.py): wrong
  shapes, an unknown module, NaN, Inf, a rank above the one given and a payload over the size limit are
  each refused with their reason while the honest client's update is aggregated; the run completes
  (malformed replies and a crashing ClientApp: tests/test_flower_wire.py)
- a SuperNode SIGKILLed mid-round: the round completes with the other replies, the lost client is recorded
- the ServerApp SIGKILLed after round 1: `bench run --resume` finishes the run, bit-identical to in-process
- a ServerApp that stops with an error makes `bench run` fail with the run's status (flwr run itself exits 0)
- an unregistered SuperNode is refused by the SuperLink; an insecure client cannot submit to the TLS SuperLink

Every process is started in its own process group and stopped by PID (tests/flower_helpers.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli import main
from flower_helpers import SMALL, Deployment, assert_same_run, metrics, record, reference_run, require_flwr

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_flwr()
    d = Deployment(tmp_path_factory.mktemp("flower-deploy"))
    try:
        yield d.up()
    finally:
        d.down()


@pytest.fixture
def nodes(cluster, offline_data_env):
    """The deployment with all three SuperNodes running (a test before may have killed one)."""
    cluster.ensure_nodes()
    cluster.wait_nodes(cluster.n)
    return cluster


@pytest.fixture
def refs(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "flower-references"
    root.mkdir(exist_ok=True)
    return root


def _out(tmp: Path) -> list[str]:
    return ["--output-dir", str(tmp / "run"), "--results-dir", str(tmp / "results")]


@pytest.mark.parametrize("method, options", [("flora", ()), ("flexlora", ()),
                                             ("rolora", ("--method-options", "schedule=paper"))],
                         ids=["flora", "flexlora", "rolora-paper"])
def test_deployment_matches_inprocess(method, options, nodes, refs, tmp_path):
    ref = reference_run(refs, method, *options)
    rc = main(["run", *SMALL, "--method", method, *options, *nodes.run_args(), *_out(tmp_path)])
    assert rc == 0
    assert_same_run(tmp_path / "run", ref)
    rec = record(tmp_path / "run")
    assert rec["engine"] == "flower" and record(ref)["engine"] == "inprocess"
    assert rec["config_hash"] == record(ref)["config_hash"]


# (round, client) -> (what the hostile app sends, the reason the server records); client 0 stays honest
HOSTILE = {(1, 1): ("shape", "shape (4, 65), expected (4, 64)"), (1, 2): ("module", "unknown module 'model.layers.99.self_attn.q_proj'"),
           (2, 1): ("nan", "non-finite values"), (2, 2): ("inf", "non-finite values"),
           (3, 1): ("rank", "rank 5 outside 1..4"), (3, 2): ("big", "reply too large: payload of")}


def test_hostile_replies_are_refused(nodes, tmp_path, capsys):
    from bench.config import build_config
    from bench.app.flower_launch import deploy
    from bench.flower.options import FlowerOptions

    overrides = {"method": "flora", "ranks": "2,4,8", "local_steps": 1, "batch_size": 1, "micro_batch_size": 1,
                 "cutoff_len": 32, "test_limit": 2, "rounds": 3, "output_dir": str(tmp_path / "run"),
                 "results_dir": str(tmp_path / "results")}
    cfg = build_config(preset="tiny", overrides=overrides)
    opts = FlowerOptions(superlink=nodes.address, root_certificates=str(nodes.certs / "ca.crt"))
    plan = ",".join(f"{r}:{k}:{kind}" for (r, k), (kind, _) in HOSTILE.items())
    deploy(cfg, opts, clientapp="flower_hostile_app:app", extra_config={"hostile": plan},
           extra_files=[HERE / "flower_hostile_app.py"])
    out = capsys.readouterr().out
    rows = metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        by_id = {c["id"]: c for c in row["clients"]}
        assert "excluded" not in by_id[0] and row["excluded"] == [1, 2], row
        for k in (1, 2):
            kind, reason = HOSTILE[(row["round"], k)]
            assert reason in by_id[k]["excluded"], (kind, by_id[k]["excluded"])
            assert f"round {row['round']} client {k}: EXCLUDED (" in out  # logged with its reason
    assert record(tmp_path / "run")["engine"] == "flower"


def _start_bench(tmp: Path, env: dict, *args: str) -> subprocess.Popen:
    log = open(tmp / "bench.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "bench", "run", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the run ended early (exit {proc.returncode}): {log.read_text()[-3000:] if log else ''}")
        assert time.time() < deadline, f"timed out waiting for {what}: {log.read_text()[-3000:] if log else ''}"
        time.sleep(0.5)


def _checkpoint_round(run: Path) -> int:
    import json

    meta = run / "checkpoint" / "meta.json"
    try:
        return json.loads(meta.read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def test_supernode_killed_mid_round(nodes, tmp_path):
    run = tmp_path / "run"
    proc = _start_bench(tmp_path, {**nodes.env, "BENCH_DATA_ROOT": os.environ["BENCH_DATA_ROOT"]},
                        *SMALL, "--method", "flexlora", *nodes.run_args(), "--round-timeout", "90", *_out(tmp_path))
    try:
        _wait(lambda: _checkpoint_round(run) == 1, 400, "round 1", proc, tmp_path / "bench.log")
        # round 2 is under way once node 2 has received its second train message: kill it there
        _wait(lambda: nodes.log("node2", 10 ** 7).count("Receiving: train message") >= 2, 120, "node 2 in round 2", proc,
              tmp_path / "bench.log")
        nodes.stop("node2", signal.SIGKILL)  # the SuperNode, its SuperExec and the ClientApp training
        assert proc.wait(timeout=400) == 0, (tmp_path / "bench.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rows = metrics(run)
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["excluded"] == []
    lost = {c["id"]: c for c in rows[1]["clients"]}[2]
    # the SuperLink reports the node lost after two missed heartbeats; the round's timeout (90 s) is the backstop
    assert any(s in lost["excluded"] for s in ("node lost", "no reply within 90 s", "left the federation")), lost
    assert rows[1]["excluded"] == [2]
    assert _checkpoint_round(run) == 2 and (run / "global_model" / "model.safetensors").is_file()
    assert not list(run.glob(".*tmp*")), "half-written files left behind"
    assert record(run)["engine"] == "flower"


def test_serverapp_killed_then_resumed(nodes, refs, tmp_path):
    import psutil

    ref = reference_run(refs, "flora")
    run = tmp_path / "run"
    proc = _start_bench(tmp_path, {**nodes.env, "BENCH_DATA_ROOT": os.environ["BENCH_DATA_ROOT"]},
                        *SMALL, "--method", "flora", *nodes.run_args(), *_out(tmp_path))
    try:
        _wait(lambda: _checkpoint_round(run) == 1, 400, "round 1", proc, tmp_path / "bench.log")
        link = psutil.Process(nodes.procs["superlink"].pid)
        apps = [p for p in link.children(recursive=True) if "flwr-serverapp" in " ".join(p.cmdline())]
        assert len(apps) == 1, apps
        apps[0].kill()  # SIGKILL the ServerApp process, mid-run (a grandchild of the SuperLink: it stays a zombie)
        _wait(lambda: not apps[0].is_running() or apps[0].status() == psutil.STATUS_ZOMBIE, 30, "the ServerApp to die")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # and the `bench run` that submitted it (flwr run --stream)
        proc.wait()
    assert len(metrics(run)) == 1
    rc = main(["run", "--resume", str(run), *nodes.run_args()[2:]])  # engine and paths come from run/config.yaml
    assert rc == 0
    assert_same_run(run, ref)


def test_serverapp_error_is_reported_not_hidden(nodes, tmp_path, capsys):
    """`flwr run` exits 0 when the ServerApp raised: bench asks the SuperLink how the run ended. Here every node
    is set up for 3 partitions and the run has 4 clients: the nodes say so at discovery, the ServerApp stops."""
    rc = main(["run", *SMALL, "--ranks", "2,4,8,8", "--num-clients", "4", "--method", "flora", *nodes.run_args(),
               "--nodes-timeout", "120", *_out(tmp_path)])
    cap = capsys.readouterr()
    assert rc == 2
    assert "the run has 4 clients" in cap.out  # the ServerApp's own error line, streamed
    assert "ended with status finished:failed" in cap.err, cap.err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_unregistered_supernode_is_refused(cluster):
    n = cluster.n
    p = cluster.start_node(0, key=f"node{n}", name="intruder")  # a key the SuperLink never registered
    try:
        rc = p.wait(timeout=120)
    finally:
        cluster.stop("intruder")
    assert rc != 0
    assert "Failed to activate SuperNode" in cluster.log("intruder")
    assert "No SuperNode found with the given public key" in cluster.log("superlink", 10 ** 7)
    assert len(cluster.online()) <= n


def test_insecure_submission_to_tls_superlink_fails_clearly(cluster, offline_data_env, tmp_path, capsys):
    rc = main(["run", *SMALL, "--method", "flora", "--engine", "flower", "--superlink", cluster.address, *_out(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "could not start the run" in err, err
    assert not (tmp_path / "run" / "checkpoint").exists()
