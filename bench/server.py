"""The server step: sample clients, configure each one, check the replies, aggregate. It holds no model.

Its state is plain tensors: the method's global state, every round's base merge (the full-precision
base delta is their sum, exact, in factored form) and, per client, its current rank and the last merge
round its base holds. A transport (bench/transports/, bench/flower/) carries the messages; the
engine (bench/engine.py) drives the rounds and owns the files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from methods import AggregationMethod, ClientSpec, ClientUpdate, Factors, GlobalState, client_weights

from . import BenchError
from .messages import EvalReply, EvaluateMessage, Reply, TaskMessage, factor_bytes, mean_loss, task_bytes
from .seeds import derive_seed


def sample_clients(seed: int, rnd: int, num_clients: int, fraction: float) -> list[int]:
    """The clients of round rnd: a pure function of (seed, round), nothing to checkpoint."""
    rng = np.random.default_rng([seed, rnd])
    m = max(1, round(fraction * num_clients))
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


@dataclass
class ServerState:
    """What a server checkpoint holds."""

    state: GlobalState = field(default_factory=GlobalState)
    merges: dict[int, Factors] = field(default_factory=dict)   # round -> (A, B) added to the base that round
    ranks: dict[int, int] = field(default_factory=dict)        # client id -> its current rank
    synced: dict[int, int] = field(default_factory=dict)       # client id -> last merge round its base holds


@dataclass
class Refused:
    """A client's round that yields no update: lost (reply None) or refused by a filter (reply kept for audit)."""

    reason: str
    reply: Reply | None = None


@dataclass
class RoundResult:
    """One round as the server saw it: per-client rows, exclusions, the method's metrics."""

    round: int
    sampled: list[int]
    clients: list[dict]
    metrics: dict
    excluded: list[dict]
    updates: list[ClientUpdate]


class Server:
    def __init__(self, method: AggregationMethod, *, seed: int, num_clients: int, client_fraction: float,
                 ranks: list[int], scaling):
        """scaling: rank -> s, the config's rule."""
        self.method, self.seed = method, seed
        self.num_clients, self.client_fraction = num_clients, client_fraction
        self.scaling = scaling
        self.s = ServerState(ranks={k: r for k, r in enumerate(ranks)})

    def restore(self, s: ServerState) -> None:
        """Continue from a checkpointed state."""
        self.s = s

    @property
    def round(self) -> int:
        return self.s.state.round

    def sample(self, rnd: int) -> list[int]:
        return sample_clients(self.seed, rnd, self.num_clients, self.client_fraction)

    def configure(self, rnd: int, clients: list[int], resend: bool = False) -> list[TaskMessage]:
        """One task message per client. resend: the client's base is unknown, send every merge."""
        out = []
        for k in clients:
            r_k = self.s.ranks[k]
            spec = ClientSpec(k, r_k, self.scaling(r_k), rnd)
            task = self.method.configure(self.s.state, spec)
            since = 0 if resend else self.s.synced.get(k, 0)
            merges = {r: m for r, m in self.s.merges.items() if r > since}
            out.append(TaskMessage(rnd, k, r_k, spec.scaling, task, merges, derive_seed(self.seed, rnd),
                                   derive_seed(self.seed, rnd, k), self.method.name, dict(self.method.opts)))
        return out

    def aggregate(self, rnd: int, tasks: list[TaskMessage], replies: dict[int, Reply | Refused]) -> RoundResult:
        """replies: client id -> its reply, or Refused (no reply, or a filter's verdict)."""
        updates, rows, excluded = [], [], []
        for msg in tasks:
            k = msg.client_id
            reply = replies.get(k) or Refused("no reply")
            if isinstance(reply, Reply) and reply.error:
                reply = Refused(f"client error: {reply.error}", reply)
            sent = reply.reply if isinstance(reply, Refused) else reply
            row = {**(_numbers(sent.metrics) if sent is not None else {}), **msg.task.info,
                   "id": k, "rank": msg.rank, "scaling": msg.scaling, "bytes_down": task_bytes(msg)}
            if sent is not None:
                row.update({"examples": sent.num_examples, "bytes_up": factor_bytes(sent.factors), "base_round": sent.base_round})
                if sent.rank != msg.rank:
                    row["rank_sent"] = sent.rank
            if isinstance(reply, Refused):
                row["excluded"] = reason = reply.reason
                row.setdefault("bytes_up", 0)
                excluded.append({"id": k, "reason": reason, "reply": sent})
                if sent is not None and sent.error and "out of sync" in sent.error:
                    self.s.synced[k] = sent.base_round  # resend from what the client holds
            else:
                updates.append(ClientUpdate(k, reply.rank, msg.scaling, reply.num_examples, reply.factors))
                self.s.synced[k] = reply.base_round
                self.s.ranks[k] = reply.rank
            rows.append(row)
        if not updates:
            return RoundResult(rnd, [m.client_id for m in tasks], rows, {}, excluded, [])
        agg = self.method.aggregate(updates, self.s.state)
        weights = dict(zip((u.client_id for u in updates), client_weights(updates)))
        for row in rows:
            if row["id"] in weights:
                row["p"] = weights[row["id"]]
        self.s.state = agg.state
        if agg.merge:
            self.s.merges[rnd] = agg.merge
        return RoundResult(rnd, [m.client_id for m in tasks], rows, agg.metrics, excluded, updates)

    # ---- evaluation of the clients' own models (personalized methods) ---------------------------------
    def configure_evaluate(self, rnd: int) -> list[EvaluateMessage]:
        """One EVALUATE message per client: score the model it would start round rnd from (its task for that
        round, every merge it lacks) on the pooled held-out set and on its own split."""
        return [EvaluateMessage(task) for task in self.configure(rnd, list(range(self.num_clients)))]

    def aggregate_evaluate(self, asks: list[EvaluateMessage], replies: dict, pooled: int, own: list[int]) -> dict:
        """The record's personalized section from every client's EvalReply: each client's model on the pooled set
        (its mean per example over clients, so it pairs with a global model's) and on its own split (and their
        mean). pooled / own: how many examples the pooled set and each client's split hold. BenchError naming the
        client when one did not score its model, or scored other examples."""
        per_pooled, per_own = [], []
        for ask in asks:
            k = ask.task.client_id
            reply = replies.get(k)
            why = (getattr(reply, "reason", None) or getattr(reply, "error", None) or
                   (None if isinstance(reply, EvalReply) else "no reply"))
            if why is None:
                got = {name: len(reply.losses.get(name, ([], []))[0]) for name in ask.sets}
                want = {"pooled": pooled, "own": own[k] if own else 0}
                if reply.client_id != k or any(got[n] != want[n] for n in ask.sets):
                    why = f"it scored {got} examples, expected {want}"
            if why:
                raise BenchError(f"personalized: client {k} did not score its own model ({why}); the rounds are "
                                 "checkpointed, resume the run to redo the final steps")
            sums, tokens = reply.losses["pooled"]
            per_pooled.append({"client": k, "loss": mean_loss(sums, tokens), "loss_sums": sums, "tokens": tokens})
            sums, tokens = reply.losses.get("own", ([], []))
            if sums:
                per_own.append({"client": k, "loss": mean_loss(sums, tokens), "examples": len(sums),
                                "loss_sums": sums, "tokens": tokens})
        n = len(per_pooled)
        sums = [sum(c["loss_sums"][i] for c in per_pooled) / n for i in range(pooled)]
        tokens = per_pooled[0]["tokens"] if per_pooled else []
        out = {"clients": n, "pooled": {"loss": mean_loss(sums, tokens), "examples": pooled, "loss_sums": sums,
                                        "tokens": tokens},
               "per_client_pooled": [{"client": c["client"], "loss": c["loss"]} for c in per_pooled]}
        if per_own:  # each client's own model on its own split, and their mean
            out["per_client"] = per_own
            out["loss"] = sum(c["loss"] for c in per_own) / len(per_own)
        return out

    def global_delta(self) -> dict[str, torch.Tensor]:
        """The global model minus the base, per module, float64: merges plus the global adapter."""
        return global_delta(self.s)


def base_delta(s: ServerState) -> dict[str, torch.Tensor]:
    """Σ over rounds of the merges, per module, in float64 (what the base has received)."""
    out: dict[str, torch.Tensor] = {}
    for merge in s.merges.values():
        for name, (a, b) in merge.items():
            d = b.double() @ a.double()
            out[name] = d if name not in out else out[name] + d
    return out


def global_delta(s: ServerState) -> dict[str, torch.Tensor]:
    """A server state's global model minus the base (the engine's export, and its re-export from a checkpoint)."""
    out = base_delta(s)
    for name, (a, b) in s.state.adapter.items():
        if a is None or b is None:
            continue
        d = b.double() @ a.double()
        out[name] = d if name not in out else out[name] + d
    return out



def _numbers(metrics: dict) -> dict:
    """A client's own metrics, as far as they are plain numbers (a remote client is not trusted)."""
    return {str(k): v for k, v in metrics.items()
            if isinstance(k, str) and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))}
