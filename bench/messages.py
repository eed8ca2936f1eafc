"""The two messages between the server and a client, and their wire form.

Every transport carries exactly these: the in-process one passes the objects, Flower carries their
wire form (named float32 arrays + a flat config of numbers and strings). Nothing else crosses, so a
client and a server can run in different processes or on different machines.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from methods import ClientTask, Factors

FACTOR_NAMES = ("A", "B")


@dataclass
class TaskMessage:
    """Server → client, one per sampled client per round.

    merges: base merges (module -> (A, B), B @ A added to the base) the client has not applied yet, by
            round; a client applies them in round order, in full precision, before it trains.
    init_seed: the round's shared fresh-init seed (every client of a round draws the same A).
    train_seed: this client's seed for its data order and dropout in this round.
    method / method_options: which registered method's client hooks to call.
    """

    round: int
    client_id: int
    rank: int
    scaling: float
    task: ClientTask
    merges: dict[int, Factors] = field(default_factory=dict)
    init_seed: int = 0
    train_seed: int = 0
    method: str = ""
    method_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    """Client → server. `error` set: the client did not train (factors empty); the reason is logged.

    base_round: the last merge round the client's base holds after this round (the server sends it
    only newer merges from then on).
    """

    round: int
    client_id: int
    rank: int
    num_examples: int
    factors: Factors
    metrics: dict[str, Any] = field(default_factory=dict)
    base_round: int = 0
    error: str | None = None
    # the client's adapter as it ends the round (after client_finish: at the rank it sent), both factors, for the
    # audit trail only: filled when the run saves client adapters, never aggregated, not counted in bytes_up
    trained: Factors | None = None


def factor_bytes(factors: Factors | None) -> int:
    if not factors:
        return 0
    return sum(t.numel() * t.element_size() for pair in factors.values() for t in pair if t is not None)


def _core_pairs(core: dict[str, torch.Tensor] | None) -> Factors | None:
    """A task's core as factor pairs, (R, None): its wire and byte-count form (R takes A's slot, ClientTask)."""
    return None if core is None else {n: (r, None) for n, r in core.items()}


def task_bytes(msg: TaskMessage) -> int:
    """What the server sends a client: its starting factors (and core) and the merges it has not applied."""
    return (factor_bytes(msg.task.init) + factor_bytes(_core_pairs(msg.task.core))
            + sum(factor_bytes(m) for m in msg.merges.values()))


# ---- wire form ------------------------------------------------------------------------------------
# arrays: "<kind>/<round or ->/<module>/<A|B>" -> float32 tensor; config: flat numbers and strings.

def put_factors(arrays: dict, kind: str, tag: str, factors: Factors | None) -> None:
    for name, pair in (factors or {}).items():
        for which, t in zip(FACTOR_NAMES, pair):
            if t is not None:
                arrays[f"{kind}/{tag}/{name}/{which}"] = t.detach().to("cpu", torch.float32).contiguous()


def take_factors(arrays: dict, kind: str) -> dict[str, Factors]:
    out: dict[str, dict[str, list]] = {}
    for key, t in arrays.items():
        k, tag, rest = key.split("/", 2)
        if k != kind:
            continue
        name, which = rest.rsplit("/", 1)
        if which not in FACTOR_NAMES:
            raise ValueError(f"array {key!r}: factor must be A or B")
        pair = out.setdefault(tag, {}).setdefault(name, [None, None])
        pair[FACTOR_NAMES.index(which)] = t
    return {tag: {n: (p[0], p[1]) for n, p in mods.items()} for tag, mods in out.items()}


def pack_task(msg: TaskMessage) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    arrays: dict[str, torch.Tensor] = {}
    if msg.task.init is not None:
        put_factors(arrays, "init", "-", msg.task.init)
    for rnd, merge in msg.merges.items():
        put_factors(arrays, "merge", str(rnd), merge)
    put_factors(arrays, "core", "-", _core_pairs(msg.task.core))
    t = msg.task
    config = {"round": msg.round, "client_id": msg.client_id, "rank": msg.rank, "scaling": float(msg.scaling),
              "init_seed": msg.init_seed, "train_seed": msg.train_seed, "method": msg.method,
              "task": json.dumps({"fresh": t.init is None, "core": t.core is not None, "train": t.train, "keep": t.keep, "upload": t.upload,
                                  "info": t.info, "options": t.options, "method_options": msg.method_options})}
    return arrays, config


def unpack_task(arrays: dict[str, torch.Tensor], config: dict[str, Any]) -> TaskMessage:
    spec = json.loads(config["task"])
    init = None if spec["fresh"] else take_factors(arrays, "init").get("-", {})
    merges = {int(r): f for r, f in take_factors(arrays, "merge").items()}
    core = {n: a for n, (a, _) in take_factors(arrays, "core").get("-", {}).items()} if spec.get("core") else None
    task = ClientTask(init=init, train=spec["train"], keep=spec["keep"], upload=spec["upload"], info=spec["info"],
                      options=spec["options"], core=core)
    return TaskMessage(int(config["round"]), int(config["client_id"]), int(config["rank"]), float(config["scaling"]),
                       task, dict(sorted(merges.items())), int(config["init_seed"]), int(config["train_seed"]),
                       str(config["method"]), spec["method_options"])


def pack_reply(reply: Reply) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    arrays: dict[str, torch.Tensor] = {}
    put_factors(arrays, "up", "-", reply.factors)
    put_factors(arrays, "trained", "-", reply.trained)
    config = {"round": reply.round, "client_id": reply.client_id, "rank": reply.rank,
              "num_examples": reply.num_examples, "base_round": reply.base_round,
              "metrics": json.dumps(reply.metrics), "error": reply.error or ""}
    return arrays, config


def unpack_reply(arrays: dict[str, torch.Tensor], config: dict[str, Any]) -> Reply:
    """A reply from an untrusted client: structural problems raise ValueError naming the field."""
    try:
        factors = take_factors(arrays, "up").get("-", {})
        trained = take_factors(arrays, "trained").get("-")
        metrics = json.loads(config.get("metrics") or "{}")
        if not isinstance(metrics, dict):
            raise ValueError("metrics: not a JSON object")
        return Reply(int(config["round"]), int(config["client_id"]), int(config["rank"]), int(config["num_examples"]),
                     factors, metrics, int(config.get("base_round", 0)), str(config.get("error") or "") or None,
                     trained)
    except KeyError as exc:
        raise ValueError(f"reply: missing field {exc.args[0]!r}") from None
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"reply: malformed ({exc})") from None
