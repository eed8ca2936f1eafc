"""The transport registry (bench/transports/): a transport is one registered class. A throwaway one (in-process,
counting what it carries) is registered here and runs a tiny federated run by name through `bench run --engine`,
with the numbers of the in-process run; the engine refuses to start a transport that its host builds."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench import BenchError
from bench.app.cli import main
from bench.app.launch import LAUNCHERS
from bench.transports import TRANSPORTS, get_transport, register_transport, transport_names
from bench.transports.inprocess import InProcessTransport


@pytest.fixture
def counting_transport():
    @register_transport("counting")
    class Counting(InProcessTransport):
        """In-process, counting the messages it carries."""

        description = "in-process, counting its messages"
        calls: Counter = Counter()

        def run(self, tasks, on_reply=None, on_step=None):
            type(self).calls["train"] += len(tasks)
            return super().run(tasks, on_reply, on_step)

        def evaluate(self, asks):
            type(self).calls["evaluate"] += len(asks)
            return super().evaluate(asks)

        def state(self):
            type(self).calls["state"] += 1
            return super().state()

    yield Counting
    del TRANSPORTS["counting"]


def _bench_run(tmp_path: Path, data_root, name: str, engine: str) -> dict:
    rc = main(["run", "--preset", "tiny", "--method", "hetlora", "--engine", engine, "--data-root", str(data_root),
               "--output-dir", str(tmp_path / name), "--results-dir", str(tmp_path / f"{name}-results")])
    assert rc == 0
    return json.loads((tmp_path / f"{name}-results" / f"{name}.json").read_text())


def test_a_registered_transport_runs_a_federated_run_by_name(counting_transport, tmp_path, shared_data, capsys):
    assert "counting" in transport_names() and get_transport("counting") is counting_transport
    rec = _bench_run(tmp_path, shared_data, "counted", "counting")
    # hetlora is personalized: 2 rounds × 3 clients trained, then each client scores its own model
    assert counting_transport.calls == Counter(train=6, evaluate=3, state=2)
    assert rec["engine"] == "counting" and rec["status"] == "complete"
    ref = _bench_run(tmp_path, shared_data, "inprocess", "inprocess")
    assert ref["engine"] == "inprocess"
    assert rec["test"]["loss_sums"] == ref["test"]["loss_sums"]
    assert rec["personalized"] == ref["personalized"]
    def client_losses(record):
        return [[(c["id"], c["loss"]) for c in r["clients"]] for r in record["rounds"]]

    assert len(client_losses(rec)) == 2 and client_losses(rec) == client_losses(ref)


def test_bench_run_help_lists_every_registered_transport(counting_transport, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in ("inprocess", "flower-sim", "flower", "counting"):
        assert f"{name} ({TRANSPORTS[name].description})" in out


def test_the_registry_refuses_a_second_name_and_names_the_known_ones():
    assert {"inprocess", "flower-sim", "flower"} <= set(transport_names())
    with pytest.raises(ValueError, match="registered twice"):
        register_transport("inprocess")(type("Again", (InProcessTransport,), {}))
    with pytest.raises(BenchError, match="engine: unknown 'warp'; choose one of inprocess"):
        get_transport("warp")


def test_every_host_has_a_launcher_and_the_engine_starts_no_hosted_transport(tmp_path, shared_data):
    from bench.config import build_config
    from bench.engine import run_federated

    assert {TRANSPORTS[n].host for n in transport_names()} <= set(LAUNCHERS)
    assert get_transport("inprocess").host is None
    for name in ("flower-sim", "flower"):
        assert get_transport(name).host == "flower" and get_transport(name).name == name
        cfg = build_config(preset="tiny", overrides={"engine": name, "data_root": str(shared_data),
                                                     "output_dir": str(tmp_path / name)})
        with pytest.raises(BenchError, match=f"run it with `bench run --engine {name}`"):
            run_federated(cfg, log=lambda *a: None)
        assert not (tmp_path / name).exists()
