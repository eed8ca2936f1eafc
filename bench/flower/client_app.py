"""The ClientApp: a Flower node is one bench client, trained by bench/client.py's ClientRuntime.

Which client: `partition-id` from the node config (the simulation fills it in; a SuperNode gets
`--node-config "partition-id=K num-partitions=N"`). Its data: the run's config (JSON, carried by every
message) through the engine's own preflight and tokenisation, so the node trains on exactly the
examples the in-process engine would; the server checks the shard's fingerprint at discovery.

State between messages. A deployed SuperNode starts a new `flwr-clientapp` process for every message,
so nothing in memory survives; what must survive lives in `context.state`, which the SuperNode keeps
for the run:
    bench.node      ConfigRecord: the session (bench run id), the last merge round the node holds, and
                    the rounds of its kept personal factors
    bench.merges    ArrayRecord: every base merge the node has received, as factors (merge/<r>/<m>/<A|B>)
    bench.personal  ArrayRecord: the factors the method asks it to keep (ClientTask.keep), by round
    bench.base      ArrayRecord: once the merges outgrow them, the merged float32 weights of the target
                    modules (base/<m>) at a round, replacing the merges up to that round
The model is reloaded from disk and the merges replayed in round order (each B @ A formed in float64
and added once, as bench/client.py does in-process), so a fresh process holds bit for bit the base a
long-lived one would, and the server only ever sends the merges a node has not seen: the bytes down are
the in-process engine's. The state is bounded by the dense target weights: when the merges' bytes pass
them, the node stores its merged weights instead (exactly the in-process masters) and drops those merges. A node that lost its state (a new SuperNode, a new Flower run after a server
restart) answers "base out of sync" and the engine resends every merge once (bench/engine.py).

In the simulation a Ray actor is long-lived and serves several nodes: the loaded runtime is cached per
process (one run at a time) and shared by the nodes it serves, exactly as the in-process engine shares
one base among its clients; each node's own state still comes from its context.

After the last round a personalized run sends each node an EVALUATE message: the node brings its base and its
kept factors up to date as for a TRAIN message and scores its client's own model on the run's pooled held-out set
and on its own split (ClientRuntime.evaluate), answering per-example losses (EvalReply).

Every failure becomes an error reply (Reply.error, EvalReply.error), never an exception out of the app: a config that
does not parse, a task for another partition, missing data, a crash while training.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from ..messages import Reply, factor_groups, factors_to_tensors
from . import wire

STATE_NODE, STATE_MERGES, STATE_PERSONAL = "bench.node", "bench.merges", "bench.personal"
STATE_BASE = "bench.base"

_CACHE: dict = {}  # (session, config JSON, data root) -> _Node; one entry (one run per process)


class _Node:
    """What a process needs to serve this run's nodes: the partition (the server's own: the same config, data and
    split; a shard that came out differently is refused at discovery by its fingerprint, never trained on), the
    resolved model and (built on first use: a QUERY in deployment does not load the model) the tokenizer and one
    ClientRuntime shared by the nodes it serves. No model skeleton (the server checked the target modules), no
    evaluator (scoring the global model is the server's job)."""

    def __init__(self, cfg):
        from .. import data as data_mod, models

        self.cfg = cfg
        self.dataset, self.shards, self.client_tests = data_mod.federated_split(cfg)
        self.model_path, _ = models.resolve_model(cfg.model)
        self._runtime = None

    @property
    def runtime(self):
        if self._runtime is None:
            from ..client import ClientRuntime
            from ..data import HeldOut, load_tokenizer

            self.tok = load_tokenizer(self.model_path)
            self._runtime = ClientRuntime.for_run(self.cfg, self.model_path, self.cfg.client_ranks(), {},
                                                  HeldOut(self.cfg, self.dataset, self.client_tests, self.tok))
        return self._runtime

    def add_client(self, k: int) -> None:
        from ..data import client_examples

        if k not in self.runtime.examples:
            self.runtime.examples.update(client_examples(self.cfg, self, self.tok, [k]))

    def shard_digest(self, k: int) -> str:
        return wire.shard_digest([self.dataset.train[i] for i in self.shards[k]])


def _node(cfg, run_json: str, session: str, warm: bool = True) -> tuple[_Node, float]:
    """The process's node data for this run (built on first use; warm: with the model loaded), and the
    seconds this call spent building it."""
    t = time.time()
    key = (session, run_json, cfg.data_root)
    if key not in _CACHE:
        _CACHE.clear()  # one run per process: drop the previous run's model first
        _CACHE[key] = _Node(cfg)
    node = _CACHE[key]
    if warm:
        node.runtime  # noqa: B018 - builds it
    return node, time.time() - t


def _node_config(context, cfg):
    """(the run config as this node sees it, its partition id); ValueError naming the fix."""
    nc = context.node_config
    if "data-root" in nc:
        cfg = dataclasses.replace(cfg, data_root=str(nc["data-root"]))
    if "threads" in nc:
        torch.set_num_threads(int(nc["threads"]))
    k = nc.get("partition-id")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError("this node has no integer partition-id in its node config; start it with "
                         "--node-config \"partition-id=K num-partitions=N\"")
    n = nc.get("num-partitions")
    if n is not None and n != cfg.num_clients:
        raise ValueError(f"this node is configured for num-partitions={n}, the run has {cfg.num_clients} clients")
    if not 0 <= k < cfg.num_clients:
        raise ValueError(f"partition-id {k} is outside 0..{cfg.num_clients - 1} (the run has {cfg.num_clients} clients)")
    return cfg, k


class NodeState:
    """The node's own state in context.state (see the module docstring); reset when the session changes."""

    def __init__(self, state, session: str):
        from flwr.app import ArrayRecord, ConfigRecord

        self.state = state
        meta = dict(state[STATE_NODE]) if STATE_NODE in state else {}
        if meta.get("session") != session:
            meta = {"session": session, "base_round": 0, "weights_round": 0, "personal_rounds": [], "personal_ranks": []}
            state[STATE_MERGES] = ArrayRecord()
            state[STATE_PERSONAL] = ArrayRecord()
            state[STATE_BASE] = ArrayRecord()
            state[STATE_NODE] = ConfigRecord(meta)
        self.meta = meta

    @property
    def base_round(self) -> int:
        return int(self.meta["base_round"])

    def restore_base(self, rt) -> None:
        """Bring the runtime's base up to what this node holds: its stored weights (if newer than the
        runtime's base), then its merges in round order (a gap is left to the task: the server resends)."""
        from ..client import BaseOutOfSync

        w_round = int(self.meta.get("weights_round", 0))
        if w_round > rt.base_round:
            weights = {k.split("/", 1)[1]: t for k, t in wire.decode_arrays(self.state[STATE_BASE]).items()}
            rt.set_base_weights(weights, w_round)
        try:
            rt.apply_merges({r: f for r, f in self.merges().items() if r > rt.base_round})
        except BaseOutOfSync:
            pass

    def compact(self, rt, dense_bytes: int) -> bool:
        """Store the runtime's merged weights instead of the merges once these take more bytes (True if so)."""
        if wire.array_bytes(self.state[STATE_MERGES]) <= dense_bytes or rt.base_round < self.base_round:
            return False
        self.state[STATE_BASE] = wire.encode_arrays({f"base/{n}": w for n, w in rt.base_weights().items()})
        self.meta["weights_round"] = rt.base_round
        self.meta["base_round"] = max(self.base_round, rt.base_round)
        kept = {r: f for r, f in self.merges().items() if r > rt.base_round}
        arrays: dict = {}
        for r, f in kept.items():
            arrays.update(factors_to_tensors(f, f"merge/{r}"))
        self.state[STATE_MERGES] = wire.encode_arrays(arrays)
        return True

    def merges(self) -> dict[int, dict]:
        return {int(r): f for r, f in factor_groups(wire.decode_arrays(self.state[STATE_MERGES]), "merge").items()}

    def add_merges(self, merges: dict[int, dict], base_round: int) -> None:
        held = {k.split("/", 2)[1] for k in self.state[STATE_MERGES].keys()}
        in_weights = int(self.meta.get("weights_round", 0))
        arrays: dict = {}
        for rnd, factors in merges.items():
            if str(rnd) not in held and rnd > in_weights:
                arrays.update(factors_to_tensors(factors, f"merge/{rnd}"))
        if arrays:
            rec = self.state[STATE_MERGES]
            for name, arr in wire.encode_arrays(arrays).items():
                rec[name] = arr
        self.meta["base_round"] = max(self.base_round, base_round)

    def personal_before(self, rnd: int) -> dict | None:
        """The newest kept factors trained before round rnd (a round redone after a server restart starts
        from the same factors as the first time)."""
        rounds = [r for r in self.meta["personal_rounds"] if r < rnd]
        if not rounds:
            return None
        r = max(rounds)
        rank = self.meta["personal_ranks"][self.meta["personal_rounds"].index(r)]
        factors = factor_groups(wire.decode_arrays(self.state[STATE_PERSONAL]), "personal").get(str(r), {})
        return {"rank": rank, "factors": factors}

    def set_personal(self, rnd: int, kept: dict) -> None:
        """Keep this round's factors and the newest earlier ones; drop the rest."""
        from flwr.app import ArrayRecord

        keep = sorted({r for r in self.meta["personal_rounds"] if r < rnd})[-1:] + [rnd]
        old = factor_groups(wire.decode_arrays(self.state[STATE_PERSONAL]), "personal")
        ranks = dict(zip(self.meta["personal_rounds"], self.meta["personal_ranks"]))
        ranks[rnd] = kept["rank"]
        arrays: dict = {}
        for r in keep:
            factors = kept["factors"] if r == rnd else old.get(str(r), {})
            arrays.update(factors_to_tensors(factors, f"personal/{r}"))
        self.state[STATE_PERSONAL] = wire.encode_arrays(arrays) if arrays else ArrayRecord()
        self.meta["personal_rounds"], self.meta["personal_ranks"] = keep, [ranks[r] for r in keep]

    def save(self) -> None:
        from flwr.app import ConfigRecord

        self.state[STATE_NODE] = ConfigRecord(self.meta)


def _client_runtime(task, run_json: str, session: str, context):
    """(node, load seconds, node state) for a task message to this node: the runtime's base and the client's kept
    factors brought to what this node holds (context.state); ValueError for a task meant for another partition."""
    cfg, k = _node_config(context, wire.config_from_json(run_json))
    if task.client_id != k:
        raise ValueError(f"this node holds partition {k}, the task is for client {task.client_id}")
    node, load_s = _node(cfg, run_json, session)
    rt = node.runtime
    state = NodeState(context.state, session)
    state.restore_base(rt)  # the node's own base first: what it received in earlier messages
    rt.set_personal(k, state.personal_before(task.round))
    return node, load_s, state


def eval_reply(content, context):
    """Handle one EVALUATE message: the client's own model on the held-out sets asked for (an error reply for
    anything that goes wrong)."""
    from ..messages import EvalReply

    ask, run_json, session = wire.evaluate_of(content)
    try:
        node, _, _ = _client_runtime(ask.task, run_json, session, context)
        return node.runtime.evaluate(ask)
    except Exception as exc:  # noqa: BLE001 - a node answers, it does not crash
        return EvalReply(ask.task.round, ask.task.client_id, error=f"{type(exc).__name__}: {exc}")


def train_reply(content, context) -> Reply:
    """Handle one TRAIN message: a Reply (an error reply for anything that goes wrong)."""
    t0 = time.time()
    task, run_json, session = wire.task_of(content)
    try:
        node, load_s, state = _client_runtime(task, run_json, session, context)
        k = task.client_id
        node.add_client(k)
        rt = node.runtime
        reply = rt.train(task)
        if not reply.error:
            state.add_merges(task.merges, rt.base_round)
            state.compact(rt, rt.base_bytes())
            if task.task.keep and k in rt.personal:
                state.set_personal(task.round, rt.personal[k])
            state.save()
        reply.metrics.update({"node_s": round(time.time() - t0, 3), "load_s": round(load_s, 3)})
        return reply
    except Exception as exc:  # noqa: BLE001 - a node answers, it does not crash
        return Reply(task.round, task.client_id, task.rank, 0, {}, error=f"{type(exc).__name__}: {exc}")


def hello_info(content, context) -> dict:
    """Handle a QUERY: say who this node is (partition, the fingerprint of its shard, its base round); with
    `warm` (the simulation, whose processes live on) also load the model and tokenize the shard now, so
    that round 1 measures training. A deployed node's process ends with the message: no warm-up there."""
    t0 = time.time()
    info = {"pid": os.getpid(), "threads": torch.get_num_threads(), "error": ""}
    k = context.node_config.get("partition-id")
    info["partition"] = k if isinstance(k, int) and not isinstance(k, bool) else -1
    try:
        config = dict(content[wire.CONFIG])
        if config.get("protocol") != wire.PROTOCOL:
            raise ValueError(f"protocol {config.get('protocol')!r}, this node speaks {wire.PROTOCOL}; "
                             "install the same fedlora-bench version on the server and the nodes")
        run_json, session = str(config["run"]), str(config["session"])
        cfg, k = _node_config(context, wire.config_from_json(run_json))
        warm = bool(config.get("warm", True))
        node, load_s = _node(cfg, run_json, session, warm=warm)
        if warm:
            node.add_client(k)
        state = NodeState(context.state, session)
        state.save()
        info.update({"partition": k, "shard_sha256": node.shard_digest(k), "base_round": state.base_round,
                     "load_s": round(load_s, 3), "threads": torch.get_num_threads()})
    except Exception as exc:  # noqa: BLE001
        info["error"] = f"{type(exc).__name__}: {exc}"[: wire.ERROR_TEXT_LIMIT]
    info["seconds"] = round(time.time() - t0, 3)
    return info


def _make_app():
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def hello(msg: Message, context) -> Message:
        info = hello_info(msg.content, context)
        return Message(RecordDict({wire.CONFIG: ConfigRecord({**info, "protocol": wire.PROTOCOL})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context) -> Message:
        try:
            reply = train_reply(msg.content, context)
        except ValueError as exc:  # the task itself did not parse: answer with what the config says
            cfg = dict(msg.content[wire.CONFIG]) if wire.CONFIG in msg.content else {}
            reply = Reply(_int(cfg.get("round")), _int(cfg.get("client_id")), _int(cfg.get("rank")), 0, {},
                          error=f"malformed task: {exc}")
        return Message(wire.reply_content(reply), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        from ..messages import EvalReply

        try:
            reply = eval_reply(msg.content, context)
        except ValueError as exc:  # the request itself did not parse
            cfg = dict(msg.content[wire.CONFIG]) if wire.CONFIG in msg.content else {}
            reply = EvalReply(_int(cfg.get("round")), _int(cfg.get("client_id")), error=f"malformed request: {exc}")
        return Message(wire.eval_reply_content(reply), reply_to=msg)

    return app


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else -1


app = _make_app()
