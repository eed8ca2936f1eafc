"""BenchStrategy: the bench server (bench/server.py behind bench/guard.py's ReplyFilter) as a Flower
Message-API Strategy, for use with Flower's own loop (`strategy.start(grid, ArrayRecord(), num_rounds)`).

    configure_train   server.sample + server.configure: one TRAIN Message per sampled client, to that
                      client's node, each with its own arrays (FlexLoRA's rank-r_k slices, FLoRA's fresh
                      start plus the merges the node lacks, FedAvg's slice)
    aggregate_train   the replies through GridTransport.reply (size limit, decoding) into
                      server.aggregate (ReplyFilter checks, then the method); returns the global adapter
                      (effective factors, scaling folded into B) and the round's numeric metrics

`bench run --engine flower-sim | flower` does not use Flower's loop: its ServerApp calls the engine's
run_federated with a GridTransport, so checkpoints, metrics.jsonl, the export and the results record are
the in-process engine's code (bench/flower/server_app.py). This class builds on the same transport
(discovery, messages, reply decoding), so the two paths send identical messages; tests compare them.
What Flower's loop lacks and the engine has: checkpoints and resume, and the resend of every merge to a
node that lost its base (such a node is recorded as excluded here).
"""
from __future__ import annotations

from ..messages import factors_to_tensors
from ..server import Refused
from . import wire
from .transport import GridTransport


def _strategy_base():
    from flwr.serverapp.strategy import Strategy

    return Strategy


class BenchStrategy(_strategy_base()):
    def __init__(self, server, transport: GridTransport, log=print):
        self.server, self.transport, self.log = server, transport, log
        self._tasks, self._early, self._sent = [], {}, []
        self.results = []  # the RoundResult of every round

    def configure_train(self, server_round, arrays, config, grid):
        self._tasks = self.server.configure(server_round, self.server.sample(server_round))
        self._early, self._sent = self.transport.messages(self._tasks)
        return [m for _, _, m, _ in self._sent]

    def aggregate_train(self, server_round, replies):
        from flwr.app import MetricRecord

        by_id = {rep.metadata.reply_to_message_id: rep for rep in replies}
        results = dict(self._early)
        for task, node, msg, down in self._sent:
            rep = by_id.get(msg.metadata.message_id)
            results[task.client_id] = (self.transport.reply(task, node, rep, down) if rep is not None
                                       else Refused(f"no reply from node {node} within the strategy's timeout"))
        result = self.server.aggregate(server_round, self._tasks, results)
        self.results.append(result)
        for e in result.excluded:
            self.log(f"[bench]   round {server_round} client {e['id']}: EXCLUDED ({e['reason']})")
        metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics.update({"clients": len(result.updates), "excluded": len(result.excluded)})
        if not result.updates:
            return None, MetricRecord(metrics)
        return wire.encode_arrays(global_tensors(self.server)), MetricRecord(metrics)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []  # the global model is scored once, at the end, by the engine's evaluators

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        self.log(f"[bench] BenchStrategy: method {self.server.method.name}, {self.server.num_clients} clients, "
                 f"fraction {self.server.client_fraction}")


def global_tensors(server) -> dict:
    """The global adapter (effective: global model = base + merges + B @ A), float32, by name."""
    return {k: t.detach().float().cpu().contiguous() for k, t in factors_to_tensors(server.s.state.adapter, "adapter").items()}
