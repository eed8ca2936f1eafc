"""The Flower wire form and the server's side of untrusted replies, without processes (seconds): real flwr
Messages and records through bench/flower/wire.py, GridTransport.reply and the ClientApp's node state, and
the `bench run` flags of the Flower engines."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench.cli import main
from bench.messages import Reply, TaskMessage
from flower_helpers import require_flwr
from methods import ClientTask

SHAPES = {"model.layers.0.self_attn.q_proj": (8, 6), "model.layers.0.self_attn.v_proj": (4, 6)}  # (d_out, d_in)


@pytest.fixture(autouse=True)
def _flwr():
    require_flwr()


def _factors(rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g)) for n, (d_out, d_in) in SHAPES.items()}


def _task(rank=2, upload="AB", merges=None):
    return TaskMessage(2, 1, rank, 4.0, ClientTask(init=_factors(rank, 1), upload=upload, info={"trunc": 0.5}),
                       merges or {1: _factors(3, 2)}, 11, 12, "flexlora", {})


def _reply(rank=2, **kw):
    metrics = {"first_loss": 1.0, "last_loss": 0.5, "steps": 1, "seconds": 0.1, "loss": 0.7}
    return Reply(2, 1, rank, 12, _factors(rank, 3), {**metrics, **kw.pop("metrics", {})}, base_round=1, **kw)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


def test_task_and_reply_round_trip_bit_for_bit():
    from bench.flower import wire

    task = _task()
    got, run_json, session = wire.task_of(wire.task_content(task, '{"x": 1}', "s1"))
    assert (run_json, session) == ('{"x": 1}', "s1")
    assert _same(got.task.init, task.task.init) and _same(got.merges[1], task.merges[1])
    assert (got.round, got.client_id, got.rank, got.scaling, got.init_seed, got.train_seed, got.method, got.task.info) == \
        (2, 1, 2, 4.0, 11, 12, "flexlora", {"trunc": 0.5})
    reply = _reply()
    back = wire.reply_of(wire.reply_content(reply))
    assert _same(back.factors, reply.factors) and back.metrics == reply.metrics and back.base_round == 1


def test_evaluate_request_and_reply_round_trip_bit_for_bit():
    """EVALUATE: the request carries the client's task and the sets to score; the reply's per-example losses come
    back as the same floats (JSON keeps a float's repr)."""
    from bench.flower import wire
    from bench.messages import EvalReply, EvaluateMessage

    ask = EvaluateMessage(_task(), ("pooled", "own"))
    got, run_json, session = wire.evaluate_of(wire.evaluate_content(ask, '{"x": 1}', "s1"))
    assert (run_json, session, got.sets) == ('{"x": 1}', "s1", ("pooled", "own"))
    assert _same(got.task.task.init, ask.task.task.init) and _same(got.task.merges[1], ask.task.merges[1])
    sums = [float(x) for x in torch.rand(5, dtype=torch.float64) * 40]
    reply = EvalReply(3, 1, {"pooled": (sums, [7, 8, 9, 10, 11]), "own": ([], [])})
    back = wire.eval_reply_of(wire.eval_reply_content(reply), wire.expected_eval_config_bytes(0, 5))
    assert back == reply


@pytest.mark.parametrize("config,reason", [
    ({"losses": json.dumps({"pooled": [[1.0], [1, 2]]})}, "equally long lists"),
    ({"losses": json.dumps({"pooled": [["x"], [1]]})}, "equally long lists"),
    ({"losses": json.dumps({"test": [[1.0], [1]]})}, "not a held-out set"),
    ({"losses": "[1]"}, "not a JSON object"),
    ({"client_id": None}, "malformed"),
    ({"losses": json.dumps({"pooled": [[1.0] * 20000, [1] * 20000]})}, "over the limit"),
])
def test_malformed_evaluation_replies_raise_valueerror(config, reason):
    from flwr.app import ConfigRecord

    from bench.flower import wire
    from bench.messages import EvalReply

    content = wire.eval_reply_content(EvalReply(3, 1, {"pooled": ([1.0], [2])}))
    content[wire.CONFIG] = ConfigRecord({**dict(content[wire.CONFIG]), **{k: v for k, v in config.items() if v is not None}})
    if config.get("client_id", 0) is None:
        del content[wire.CONFIG]["client_id"]
        reason = "missing field 'client_id'"
    with pytest.raises(ValueError, match=reason):
        wire.eval_reply_of(content, wire.expected_eval_config_bytes(1, 1))


def test_size_limit_is_the_task_upload_plus_slack():
    from bench.flower import wire

    for upload in ("AB", "A", "B"):
        task = _task(rank=3, upload=upload)
        exact = 3 * 4 * sum((d_in if "A" in upload else 0) + (d_out if "B" in upload else 0) for d_out, d_in in SHAPES.values())
        assert wire.expected_reply_bytes(task, SHAPES) == exact + len(SHAPES) * len(upload) * wire.NPY_HEADER_BYTES \
            + wire.REPLY_ARRAY_SLACK
    honest = wire.reply_content(_reply(rank=3))
    assert wire.array_bytes(honest[wire.ARRAYS]) <= wire.expected_reply_bytes(_task(rank=3), SHAPES)


@pytest.mark.parametrize("corrupt,reason", [
    (lambda c: c[wire_arrays()].__setitem__("up/-/x/A", _array(torch.zeros(2, 2, dtype=torch.float64))), "dtype float64"),
    (lambda c: c[wire_arrays()].__setitem__("up/-/x/A", _array(torch.zeros(2, 2, 2))), "is not 2-D"),
    (lambda c: c[wire_arrays()].__setitem__("up/-/x/C", _array(torch.zeros(2, 2))), "factor must be A or B"),
    (lambda c: _set_config(c, num_examples=None), "missing field 'num_examples'"),
    (lambda c: _set_config(c, metrics="{not json"), "malformed"),
    (lambda c: _set_config(c, metrics=json.dumps({"steps": 1})), "metric 'first_loss' missing"),
    (lambda c: _set_config(c, protocol=99), "protocol 99"),
])
def test_malformed_replies_raise_valueerror(corrupt, reason):
    from bench.flower import wire

    content = wire.reply_content(_reply())
    corrupt(content)
    with pytest.raises(ValueError, match=reason):
        wire.reply_of(content)


def test_declared_shape_must_match_the_data():
    from flwr.app import Array

    from bench.flower import wire

    content = wire.reply_content(_reply())
    good = content[wire.ARRAYS]["up/-/model.layers.0.self_attn.q_proj/A"]
    content[wire.ARRAYS]["up/-/model.layers.0.self_attn.q_proj/A"] = Array("float32", (1, 6), good.stype, good.data)
    with pytest.raises(ValueError, match=r"declared float32\(1, 6\)"):
        wire.reply_of(content)


def wire_arrays():
    from bench.flower import wire

    return wire.ARRAYS


def _array(t):
    from flwr.app import Array

    return Array(t.numpy())


def _set_config(content, **changes):
    from flwr.app import ConfigRecord

    from bench.flower import wire

    config = dict(content[wire.CONFIG])
    for k, v in changes.items():
        if v is None:
            config.pop(k)
        else:
            config[k] = v
    content[wire.CONFIG] = ConfigRecord(config)


class _Plan:
    module_shapes = SHAPES
    dataset = type("D", (), {"train": [{"a": 1}] * 4})()
    shards = [[0, 1], [2, 3]]


def _transport():
    from bench.config import build_config
    from bench.flower.transport import GridTransport

    cfg = build_config(preset="tiny", overrides={"num_clients": 2, "ranks": "2,2"})
    return GridTransport(None, cfg, _Plan(), session="s", discover=False, log=lambda *_: None)


def _reply_message(task_msg, content=None, error=None, src=7):
    """A reply Message as a node would send it (reply_to the task Message)."""
    from flwr.app import Message

    task_msg.metadata.__dict__["_message_id"] = "m1"
    rep = Message(error, reply_to=task_msg) if error is not None else Message(content, reply_to=task_msg)
    rep.metadata.__dict__["_src_node_id"] = src
    return rep


def test_transport_refuses_error_oversize_and_malformed_replies_with_reasons(monkeypatch):
    from flwr.app import Error
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as inside a ServerApp process
        monkeypatch.setattr(TaskIdentity, attr, value)

    from bench.flower import wire
    from bench.server import Refused

    tr = _transport()
    tr.nodes = {1: 7}
    task = _task(rank=2)
    _, sent = tr.messages([task])
    (t, node, msg, down), = sent
    assert node == 7 and down > 0

    ok = tr.reply(t, node, _reply_message(msg, wire.reply_content(_reply(rank=2))), down)
    assert isinstance(ok, Reply) and ok.metrics["wire_bytes_down"] == down and ok.metrics["wire_bytes_up"] > 0

    crash = tr.reply(t, node, _reply_message(msg, error=Error(2, "<class 'RuntimeError'>:<'boom'>")), down)
    assert isinstance(crash, Refused) and crash.reason.startswith("node 7 (partition 1) ClientApp raised: ") and "boom" in crash.reason
    lost = tr.reply(t, node, _reply_message(msg, error=Error(5, "no heartbeat")), down)
    assert "node lost (no heartbeat)" in lost.reason

    big = _reply(rank=2)
    a, b = big.factors["model.layers.0.self_attn.q_proj"]
    big.factors["model.layers.0.self_attn.q_proj"] = (a.repeat(2000, 1), b)
    refused = tr.reply(t, node, _reply_message(msg, wire.reply_content(big)), down)
    assert refused.reason.startswith("reply too large: payload of")

    bad = wire.reply_content(_reply(rank=2))
    _set_config(bad, num_examples=None)
    assert tr.reply(t, node, _reply_message(msg, bad), down).reason == "malformed reply: reply: missing field 'num_examples'"

    other = tr.reply(t, node, _reply_message(msg, wire.reply_content(_reply(rank=2)), src=8), down)
    assert other.reason == "reply from node 8, the task went to node 7"

    unmapped = _task(rank=2)
    unmapped.client_id = 0
    early, sent = tr.messages([unmapped])
    assert early[0].reason == "no connected node holds partition 0" and sent == []


def test_node_state_keeps_merges_and_personal_factors_by_round():
    from flwr.app import RecordDict

    from bench.flower.client_app import NodeState

    state = RecordDict()
    st = NodeState(state, "run-a")
    st.add_merges({1: _factors(2, 1)}, 1)
    st.add_merges({1: _factors(2, 9), 2: _factors(2, 2)}, 2)  # round 1 again: kept as first received
    st.set_personal(2, {"rank": 2, "factors": {n: (a, None) for n, (a, b) in _factors(2, 5).items()}})
    st.set_personal(3, {"rank": 2, "factors": _factors(2, 6)})
    st.set_personal(4, {"rank": 2, "factors": _factors(2, 7)})
    st.save()
    again = NodeState(state, "run-a")
    merges = again.merges()
    assert sorted(merges) == [1, 2] and _same(merges[1], _factors(2, 1)) and again.base_round == 2
    assert again.meta["personal_rounds"] == [3, 4]
    assert _same(again.personal_before(4)["factors"], _factors(2, 6))  # round 4 redone: starts from round 3's
    assert again.personal_before(3) is None
    fresh = NodeState(state, "run-b")  # another bench run: nothing carried over
    assert fresh.base_round == 0 and fresh.merges() == {}


def test_client_answers_errors_instead_of_raising():
    from flwr.app import ConfigRecord, Context, RecordDict

    from bench.config import build_config
    from bench.flower import client_app, wire

    cfg = build_config(preset="tiny")
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 7}, state=RecordDict(), run_config={})
    task = _task()
    reply = client_app.train_reply(wire.task_content(task, wire.config_to_json(cfg), "s"), ctx)
    assert reply.error and "partition-id 7 is outside 0..2" in reply.error
    reply = client_app.train_reply(wire.task_content(task, '{"num_clients": "many"}', "s"), ctx)
    assert reply.error and "num_clients" in reply.error
    content = RecordDict({wire.CONFIG: ConfigRecord({"protocol": wire.PROTOCOL, "run": "{bad", "session": "s"})})
    info = client_app.hello_info(content, Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={}))
    assert info["partition"] == -1 and "not JSON" in info["error"]


def test_flower_flags_are_checked_before_any_work(tmp_path, capsys):
    args = ["run", "--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--results-dir", str(tmp_path / "res")]
    assert main([*args, "--superlink", "127.0.0.1:9093"]) == 2
    assert "--superlink is a Flower flag but the engine is 'inprocess'" in capsys.readouterr().err
    assert main([*args, "--engine", "flower"]) == 2
    assert "--engine flower needs --superlink" in capsys.readouterr().err
    assert main([*args, "--engine", "flower-sim", "--superlink", "127.0.0.1:1"]) == 2
    assert "are for --engine flower" in capsys.readouterr().err
    assert main([*args, "--engine", "flower", "--superlink", "127.0.0.1:1", "--root-certificates", str(tmp_path / "nope.pem")]) == 2
    assert "root_certificates:" in capsys.readouterr().err
    assert main([*args, "--engine", "warp"]) == 2
    assert "engine: unknown 'warp'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_app_folder_is_a_valid_flower_app(offline_data_env, tmp_path, capsys):
    import tomllib

    from flwr.common.config import validate_config
    from flwr.supercore.object_ref import validate

    app = tmp_path / "app"
    rc = main(["run", "--preset", "tiny", "--engine", "flower", "--flower-app-dir", str(app), "--output-dir",
               str(tmp_path / "run"), "--results-dir", str(tmp_path / "res")])
    assert rc == 0 and f"flwr run {app} <connection> --stream" in capsys.readouterr().out
    doc = tomllib.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(doc, check_module=True, project_dir=app)
    assert ok, errors
    job = json.loads(doc["tool"]["flwr"]["app"]["config"]["bench-job"])
    assert job["engine"] == "flower" and json.loads(job["config"])["output_dir"] == str((tmp_path / "run").resolve())
    assert validate("bench.app.flower_server_app:app")[0] and validate("bench.flower.client_app:app")[0]
    assert not (tmp_path / "run").exists()  # nothing ran
    assert math.isfinite(job["options"]["round_timeout"])


def test_compacted_node_state_restores_the_same_base(offline_data_env):
    """Once the merges outgrow the dense target weights the node stores the merged weights instead; a fresh
    process restores from them (and the merges after them) exactly the base a long-lived one holds."""
    from flwr.app import RecordDict

    from bench.config import build_config
    from bench.flower.client_app import NodeState, _Node

    cfg = build_config(preset="tiny")
    live, fresh = _Node(cfg).runtime, _Node(cfg).runtime
    g = torch.Generator().manual_seed(0)
    merges = {r: {n: (torch.randn(3, l.base_layer.weight.shape[1], generator=g) * 0.01,
                      torch.randn(l.base_layer.weight.shape[0], 3, generator=g) * 0.01) for n, l in live.layers.items()}
              for r in (1, 2, 3)}
    state = RecordDict()
    st = NodeState(state, "s")
    live.apply_merges({1: merges[1], 2: merges[2]})
    st.add_merges({1: merges[1], 2: merges[2]}, 2)
    assert not st.compact(live, dense_bytes=10 ** 12)
    assert st.compact(live, dense_bytes=0)  # merges bigger than the weights: weights kept instead
    assert st.merges() == {} and st.meta["weights_round"] == 2
    live.apply_merges({3: merges[3]})
    st.add_merges({3: merges[3]}, 3)
    st.save()
    NodeState(state, "s").restore_base(fresh)
    assert fresh.base_round == 3
    want, got = live.base_weights(), fresh.base_weights()
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_core_task_and_audited_reply_round_trip_and_fit_the_limit():
    """A core task (Fed-SB: train and upload R) crosses the wire with its core bit for bit; a reply sending the
    rank × rank core plus the trained adapter for the audit trail fits the limit of a run that saves adapters."""
    from bench.flower import wire

    g = torch.Generator().manual_seed(5)
    core = {n: torch.randn(3, 3, generator=g) for n in SHAPES}
    task = TaskMessage(2, 1, 3, 4.0, ClientTask(init=_factors(3, 1), train="R", upload="R", core=core), {}, 11, 12,
                       "fed-sb", {})
    got, _, _ = wire.task_of(wire.task_content(task, "{}", "s1"))
    assert got.task.train == "R" and all(torch.equal(got.task.core[n], core[n]) for n in SHAPES)
    reply = _reply(rank=3, trained=_factors(3, 4))
    reply.factors = {n: (c, None) for n, c in core.items()}
    content = wire.reply_content(reply)
    back = wire.reply_of(content)
    assert _same(back.trained, reply.trained) and all(torch.equal(back.factors[n][0], core[n]) for n in SHAPES)
    size = wire.array_bytes(content[wire.ARRAYS])
    assert size <= wire.expected_reply_bytes(task, SHAPES, audit=True)
    assert wire.expected_reply_bytes(task, SHAPES) == 3 * 3 * 4 * len(SHAPES) + len(SHAPES) * wire.NPY_HEADER_BYTES \
        + wire.REPLY_ARRAY_SLACK
