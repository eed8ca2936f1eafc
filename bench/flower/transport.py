"""GridTransport: the engine's transport (bench/transports/base.py's Transport) over a Flower Grid, registered as
flower-sim (SimulationTransport) and flower (DeploymentTransport).

    discover   QUERY every connected node once: it answers its partition id and its shard's
               fingerprint (in the simulation it also loads the model and tokenizes its shard, so rounds
               measure training, as in-process); the server keeps partition id -> node id and refuses a node whose data
               differs from the server's partition
    run        one TRAIN message per task, to the node of that client, each with its own arrays; replies
               are pulled as they come; a reply is turned into a Reply, or refused (Refused(reason)) when
               it is an error message, comes from another node, is over the size limit for its task, or
               does not decode; a client whose node left or did not answer within round_timeout is
               Refused too. The engine's ReplyFilter then checks every Reply against its task (shapes,
               modules, rank, NaN/Inf, norm) and the server records each refusal; nothing here raises
               on a bad reply.
    evaluate   one EVALUATE message per client (personalized methods, after the last round): the node scores
               its own model on the held-out sets it holds and answers per-example losses (EvalReply)
    state      None: Flower nodes keep their own state (context.state), nothing to checkpoint here
    restore    nothing to do: a node that lost its base answers "base out of sync" and is resent

Bytes: the server records the tensor bytes of every task and reply (bytes_down/bytes_up); beside them
each client's row gets wire_bytes_down/wire_bytes_up, what Flower serialises for the two Messages
(wire.wire_bytes).
"""
from __future__ import annotations

import time

from .. import BenchError
from ..guard import ReplyFilter
from ..messages import EvalReply, EvaluateMessage, Reply, TaskMessage
from ..server import Refused
from ..transports import Transport, register_transport
from . import wire
from .options import FlowerOptions


class PayloadTooLarge(ValueError):
    pass


# flwr.common.constant.ErrorCode, as the reasons a round records
ERROR_CODES = {1: "could not load the ClientApp", 2: "ClientApp raised", 3: "message lost (expired or never delivered)",
               4: "reply lost (expired)", 5: "node lost (no heartbeat)", 6: "a mod refused the message", 7: "invalid app",
               8: "ClientApp crashed"}


class GridTransport(Transport):
    """The messages over a Flower Grid; registered as the simulation's and the deployment's transports below."""

    host = "flower"     # Flower's ServerApp builds it on its Grid (bench/app/flower_server_app.py)
    warm_up = False     # nodes load the model and tokenize their shard when first asked (QUERY)

    def __init__(self, grid, cfg, plan, *, session: str, opts: FlowerOptions | None = None, log=print,
                 discover: bool = True):
        self.grid, self.cfg, self.plan, self.session = grid, cfg, plan, session
        self.opts = opts or FlowerOptions()
        self.log = log
        self.run_json = wire.config_to_json(cfg)
        self.checker = ReplyFilter(None, plan.module_shapes)  # structure only: what observers may safely read
        self.digests = {k: wire.shard_digest([plan.dataset.train[i] for i in shard]) for k, shard in enumerate(plan.shards)}
        self.nodes: dict[int, int] = {}      # partition id -> node id
        self.silent: set[int] = set()        # nodes that did not answer a QUERY in time (not asked again)
        self.info: dict[int, dict] = {}      # partition id -> what its node said at discovery
        if discover:
            self.discover(set(range(cfg.num_clients)), self.opts.nodes_timeout, strict=True)

    # ---- nodes ------------------------------------------------------------------------------------
    def _hello_message(self, node: int):
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        # warm-up (model load, tokenisation) only where the process lives on (warm_up): the simulation's actors
        return Message(RecordDict({wire.CONFIG: ConfigRecord({"protocol": wire.PROTOCOL, "run": self.run_json,
                                                              "session": self.session,
                                                              "warm": self.warm_up})}),
                       dst_node_id=node, message_type=MessageType.QUERY)

    def discover(self, need: set[int], timeout: float, strict: bool) -> None:
        """Map each needed partition to a node that answered. strict (the start of a run): a node that
        reports an error or holds other data, two nodes with one partition, or a partition without a
        node after `timeout` raise BenchError; otherwise they are logged and the partition stays unmapped."""
        deadline = time.time() + timeout
        pending: dict[str, int] = {}   # message id -> node id
        asked: set[int] = set()
        t0 = time.time()
        while True:
            live = set(self.grid.get_node_ids())
            for k, n in list(self.nodes.items()):
                if n not in live:
                    self.log(f"[flower] node {n} (partition {k}) left the federation")
                    del self.nodes[k]
            todo = need - set(self.nodes)
            if not todo:
                break
            new = sorted(live - set(self.nodes.values()) - self.silent - asked)
            if new:
                asked.update(new)
                ids = self.grid.push_messages([self._hello_message(n) for n in new])
                pending.update({i: n for i, n in zip(ids, new) if i})
            if pending:
                for rep in self.grid.pull_messages(list(pending)):
                    node = pending.pop(rep.metadata.reply_to_message_id, None)
                    if node is not None:
                        self._hello_reply(node, rep, strict)
            if not need - set(self.nodes):
                break
            if time.time() > deadline:
                missing = sorted(need - set(self.nodes))
                self.silent.update(pending.values())
                msg = (f"nodes: no node answered for partition(s) {', '.join(map(str, missing))} within {timeout:g} s "
                       f"({len(live)} node(s) connected); start one SuperNode per client with --node-config "
                       f"\"partition-id=K num-partitions={self.cfg.num_clients}\", or raise --nodes-timeout")
                if strict:
                    raise BenchError(msg)
                self.log(f"[flower] {msg}")
                return
            time.sleep(self.opts.poll_interval)
        self.silent.update(pending.values())  # listed but silent (e.g. killed, not yet expired): not asked again
        if strict:
            self.log(f"[flower] {len(self.nodes)} node(s) ready in {time.time() - t0:.1f} s: " + ", ".join(
                f"partition {k} -> node {n} (load {self.info[k].get('load_s', 0):.1f} s, {self.info[k].get('threads')} threads)"
                for k, n in sorted(self.nodes.items())))

    def _hello_reply(self, node: int, rep, strict: bool) -> None:
        def refuse(why: str):
            if strict:
                raise BenchError(f"nodes: {why}")
            self.log(f"[flower] ignoring node {node}: {why}")
            self.silent.add(node)

        if rep.has_error():
            return refuse(f"node {node} failed to answer ({rep.error.code}: {rep.error.reason[:300]})")
        try:
            info = dict(rep.content[wire.CONFIG])
        except Exception:  # noqa: BLE001
            return refuse(f"node {node} sent a malformed answer")
        k = info.get("partition")
        if info.get("error"):
            return refuse(f"node {node} (partition {k}): {info['error']}")
        if not isinstance(k, int) or not 0 <= k < self.cfg.num_clients:
            return refuse(f"node {node} reports partition {k!r}, outside 0..{self.cfg.num_clients - 1}")
        if info.get("shard_sha256") != self.digests[k]:
            return refuse(f"node {node} (partition {k}) holds other training data than the server's partition {k} "
                          "(different data files, data root or partition settings); give it the same data")
        if k in self.nodes and self.nodes[k] != node:
            return refuse(f"nodes {self.nodes[k]} and {node} both hold partition {k}; give each SuperNode its own partition-id")
        self.nodes[k], self.info[k] = node, info

    # ---- messages ---------------------------------------------------------------------------------
    def messages(self, tasks: list[TaskMessage]) -> tuple[dict, list[tuple]]:
        """({client id: Refused} for clients without a node, [(task, node id, Message, wire bytes down)])."""
        from flwr.app import MessageType

        return self._addressed(tasks, MessageType.TRAIN, lambda t: wire.task_content(t, self.run_json, self.session))

    def _addressed(self, items, message_type, content) -> tuple[dict, list[tuple]]:
        from flwr.app import Message

        early, out = {}, []
        for item in items:
            t = item.task if isinstance(item, EvaluateMessage) else item
            node = self.nodes.get(t.client_id)
            if node is None:
                early[t.client_id] = Refused(f"no connected node holds partition {t.client_id}")
                continue
            m = Message(content(item), dst_node_id=node, message_type=message_type, group_id=str(t.round))
            out.append((item, node, m, wire.wire_bytes(m)))
        return early, out

    def reply(self, task: TaskMessage, node: int, rep, bytes_down: int) -> Reply | Refused:
        """A reply message as the engine sees it: a Reply, or Refused(reason) (logged)."""
        k = task.client_id
        if rep.has_error():
            what = ERROR_CODES.get(rep.error.code, f"error {rep.error.code}")
            why = f"node {node} (partition {k}) {what}: {rep.error.reason[:300]}"
        elif rep.metadata.src_node_id != node:
            why = f"reply from node {rep.metadata.src_node_id}, the task went to node {node}"
        else:
            limit = wire.expected_reply_bytes(task, self.plan.module_shapes, audit=self.cfg.save_client_adapters)
            try:
                size = wire.array_bytes(rep.content[wire.ARRAYS]) if wire.ARRAYS in rep.content else 0
                if size > limit:
                    raise PayloadTooLarge(f"payload of {size} bytes over the limit of {limit} bytes for a rank-{task.rank} "
                                          f"reply uploading {task.task.upload!r}")
                reply = wire.reply_of(rep.content, limit)
            except PayloadTooLarge as exc:
                why = f"reply too large: {exc}"
            except ValueError as exc:
                why = f"malformed reply: {exc}"
            else:
                reply.metrics.update({"wire_bytes_down": bytes_down, "wire_bytes_up": wire.wire_bytes(rep)})
                return reply
        self.log(f"[flower]   round {task.round} client {k}: refused ({why})")
        return Refused(why)

    def eval_reply(self, ask: EvaluateMessage, node: int, rep, bytes_down: int) -> EvalReply | Refused:
        """An EVALUATE reply as the server sees it: an EvalReply, or Refused(reason) (logged)."""
        k = ask.task.client_id
        if rep.has_error():
            why = f"node {node} (partition {k}) {ERROR_CODES.get(rep.error.code, f'error {rep.error.code}')}: {rep.error.reason[:300]}"
        elif rep.metadata.src_node_id != node:
            why = f"reply from node {rep.metadata.src_node_id}, the task went to node {node}"
        else:
            try:
                return wire.eval_reply_of(rep.content, wire.expected_eval_config_bytes(len(self.plan.client_tests[k])
                                                                                       if self.plan.client_tests else 0,
                                                                                       self.pooled_examples))
            except ValueError as exc:
                why = f"malformed evaluation reply: {exc}"
        self.log(f"[flower]   evaluation, client {k}: refused ({why})")
        return Refused(why)

    @property
    def pooled_examples(self) -> int:
        test = self.plan.dataset.validation if self.cfg.heldout_split == "validation" else self.plan.dataset.test
        return min(len(test), self.cfg.test_limit) if self.cfg.test_limit else len(test)

    # ---- the transport contract --------------------------------------------------------------------
    def run(self, tasks: list[TaskMessage], on_reply=None, on_step=None) -> dict[int, Reply | Refused]:
        """on_step: not available here (the nodes train out of reach; a round is checked for signals as it ends)."""
        self._find_lost(tasks)
        results, sent = self.messages(tasks)

        def decode(t, node, rep, down):
            r = self.reply(t, node, rep, down)
            # observers read the factors and metrics: only replies that fit their task reach them
            if on_reply is not None and isinstance(r, Reply) and (r.error or self.checker.check(t, r) is None):
                on_reply(t, r)
            return r

        return self._exchange(results, sent, decode)

    def evaluate(self, asks: list[EvaluateMessage]) -> dict[int, EvalReply | Refused]:
        """One EVALUATE message per client, to its node; each node scores its own model on held-out sets it holds."""
        from flwr.app import MessageType

        self._find_lost([a.task for a in asks])
        results, sent = self._addressed(asks, MessageType.EVALUATE,
                                        lambda a: wire.evaluate_content(a, self.run_json, self.session))
        return self._exchange(results, sent, self.eval_reply)

    def _find_lost(self, tasks: list[TaskMessage]) -> None:
        live = set(self.grid.get_node_ids())
        lost = {t.client_id for t in tasks if self.nodes.get(t.client_id) not in live}
        if lost:  # a node left (or restarted with a new id): look for one, briefly
            self.discover(lost, min(60.0, self.opts.nodes_timeout), strict=False)

    def _exchange(self, results: dict, sent: list[tuple], decode) -> dict:
        """Push the addressed messages, pull the replies as they come (decode(item, node, reply, bytes down) each),
        refuse what does not come back: a node that left, no reply within round_timeout."""
        def who(item):
            t = item.task if isinstance(item, EvaluateMessage) else item
            return t.client_id, t.round

        ids = list(self.grid.push_messages([m for _, _, m, _ in sent]))
        pending = {}
        for (item, node, _, down), mid in zip(sent, ids + [None] * (len(sent) - len(ids))):
            if mid:
                pending[mid] = (item, node, down)
            else:
                results[who(item)[0]] = Refused(f"the SuperLink did not accept the task for node {node}")
        deadline = time.time() + self.opts.round_timeout
        checked = time.time()
        while pending and time.time() < deadline:
            for rep in self.grid.pull_messages(list(pending)):
                entry = pending.pop(rep.metadata.reply_to_message_id, None)
                if entry is None:
                    continue
                item, node, down = entry
                results[who(item)[0]] = decode(item, node, rep, down)
            if pending and time.time() - checked > 5:
                checked, live = time.time(), set(self.grid.get_node_ids())
                for mid, (item, node, _) in list(pending.items()):
                    if node not in live:
                        del pending[mid]
                        k, rnd = who(item)
                        results[k] = Refused(f"node {node} (partition {k}) left the federation mid-round")
                        self.log(f"[flower]   round {rnd} client {k}: {results[k].reason}")
            if pending:
                time.sleep(self.opts.poll_interval)
        for item, node, _ in pending.values():
            k, rnd = who(item)
            results[k] = Refused(f"no reply within {self.opts.round_timeout:g} s from node {node} "
                                 f"(partition {k}); node lost or too slow")
            self.log(f"[flower]   round {rnd} client {k}: {results[k].reason}")
        return results

    def state(self):
        return None

    def restore(self, tensors, meta, merges) -> None:
        """Nodes keep their own base; one that lost it answers "base out of sync" and the engine resends."""


@register_transport("flower-sim")
class SimulationTransport(GridTransport):
    """Flower's simulation engine in this process: virtual SuperNodes in Ray actors that live for the run."""

    description = "Flower's simulation engine"

    warm_up = True


@register_transport("flower")
class DeploymentTransport(GridTransport):
    """A run submitted to a SuperLink, one SuperNode per client."""

    description = "a SuperLink, --superlink"
