"""The messages between the server and a client, and their wire form.

TRAIN: TaskMessage (server → client) and Reply (client → server), once per sampled client per round.
EVALUATE: EvaluateMessage and EvalReply, once per client after the last round, when the clients' own
models are the ones to score (personalized methods): the client scores its model on held-out sets it
holds itself and answers per-example losses (Flower's configure_evaluate / aggregate_evaluate).

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


# the held-out sets a client scores its own model on: the run's pooled held-out set, and its own split
EVAL_SETS = ("pooled", "own")


@dataclass
class EvaluateMessage:
    """Server → client: score the client's own model — what it would start round `task.round` from (the
    method's task for it, its kept factors in place, on its base with the task's merges) — on `sets`."""

    task: TaskMessage
    sets: tuple[str, ...] = EVAL_SETS


@dataclass
class EvalReply:
    """Client → server: per held-out set, each example's summed token loss and its labelled-token count
    (an empty set: empty lists). `error` set: the client could not score (losses empty)."""

    round: int
    client_id: int
    losses: dict[str, tuple[list[float], list[int]]] = field(default_factory=dict)
    error: str | None = None


def mean_loss(sums: list[float], counts: list[int]) -> float:
    """A held-out set's loss: the mean per labelled token, from each example's summed loss and token count."""
    return sum(sums) / max(sum(counts), 1)


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


# ---- factors as named tensors ------------------------------------------------------------------------
# Every file and wire message holds factors as named tensors "<prefix>/<module>/<A|B>": the wire form below,
# checkpoints (bench/checkpoint.py), the clients' own state (bench/client.py), the audit trail.

def factors_to_tensors(factors: Factors | None, prefix: str) -> dict[str, torch.Tensor]:
    """"<prefix>/<module>/<A|B>" -> the factor itself (no copy, no cast); a None factor is left out."""
    return {f"{prefix}/{name}/{which}": t for name, pair in (factors or {}).items()
            for which, t in zip(FACTOR_NAMES, pair) if t is not None}


def tensors_to_factors(tensors: dict[str, torch.Tensor], prefix: str) -> Factors:
    """The factors under `prefix` (other keys ignored); a factor without a tensor is None. ValueError for a key
    under it that does not end in /A or /B."""
    return factor_groups(tensors, prefix, grouped=False).get("", {})


def factor_groups(tensors: dict[str, torch.Tensor], prefix: str, grouped: bool = True) -> dict[str, Factors]:
    """Keys "<prefix>/<group>/<module>/<A|B>" as {group: factors} (a round, a client; grouped=False: no group
    level, everything under ""), in the order the keys come."""
    out: dict[str, dict[str, list]] = {}
    head = prefix + "/"
    for key, t in tensors.items():
        if not key.startswith(head):
            continue
        group, rest = key[len(head):].split("/", 1) if grouped else ("", key[len(head):])
        name, _, which = rest.rpartition("/")
        if which not in FACTOR_NAMES or not name:
            raise ValueError(f"array {key!r}: factor must be A or B")
        out.setdefault(group, {}).setdefault(name, [None, None])[FACTOR_NAMES.index(which)] = t
    return {g: {n: (p[0], p[1]) for n, p in mods.items()} for g, mods in out.items()}


# ---- wire form ------------------------------------------------------------------------------------
# arrays: "<kind>/<round or ->/<module>/<A|B>" -> float32 tensor; config: flat numbers and strings.

def _put(arrays: dict, kind: str, tag: str, factors: Factors | None) -> None:
    for key, t in factors_to_tensors(factors, f"{kind}/{tag}").items():
        arrays[key] = t.detach().to("cpu", torch.float32).contiguous()


def pack_task(msg: TaskMessage) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    arrays: dict[str, torch.Tensor] = {}
    if msg.task.init is not None:
        _put(arrays, "init", "-", msg.task.init)
    for rnd, merge in msg.merges.items():
        _put(arrays, "merge", str(rnd), merge)
    _put(arrays, "core", "-", _core_pairs(msg.task.core))
    t = msg.task
    config = {"round": msg.round, "client_id": msg.client_id, "rank": msg.rank, "scaling": float(msg.scaling),
              "init_seed": msg.init_seed, "train_seed": msg.train_seed, "method": msg.method,
              "task": json.dumps({"fresh": t.init is None, "core": t.core is not None, "train": t.train, "keep": t.keep, "upload": t.upload,
                                  "info": t.info, "options": t.options, "method_options": msg.method_options})}
    return arrays, config


def unpack_task(arrays: dict[str, torch.Tensor], config: dict[str, Any]) -> TaskMessage:
    spec = json.loads(config["task"])
    init = None if spec["fresh"] else factor_groups(arrays, "init").get("-", {})
    merges = {int(r): f for r, f in factor_groups(arrays, "merge").items()}
    core = {n: a for n, (a, _) in factor_groups(arrays, "core").get("-", {}).items()} if spec.get("core") else None
    task = ClientTask(init=init, train=spec["train"], keep=spec["keep"], upload=spec["upload"], info=spec["info"],
                      options=spec["options"], core=core)
    return TaskMessage(int(config["round"]), int(config["client_id"]), int(config["rank"]), float(config["scaling"]),
                       task, dict(sorted(merges.items())), int(config["init_seed"]), int(config["train_seed"]),
                       str(config["method"]), spec["method_options"])


def pack_reply(reply: Reply) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    arrays: dict[str, torch.Tensor] = {}
    _put(arrays, "up", "-", reply.factors)
    _put(arrays, "trained", "-", reply.trained)
    config = {"round": reply.round, "client_id": reply.client_id, "rank": reply.rank,
              "num_examples": reply.num_examples, "base_round": reply.base_round,
              "metrics": json.dumps(reply.metrics), "error": reply.error or ""}
    return arrays, config


def unpack_reply(arrays: dict[str, torch.Tensor], config: dict[str, Any]) -> Reply:
    """A reply from an untrusted client: structural problems raise ValueError naming the field."""
    try:
        factors = factor_groups(arrays, "up").get("-", {})
        trained = factor_groups(arrays, "trained").get("-")
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


def pack_evaluate(msg: EvaluateMessage) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    arrays, config = pack_task(msg.task)
    return arrays, {**config, "sets": json.dumps(list(msg.sets))}


def unpack_evaluate(arrays: dict[str, torch.Tensor], config: dict[str, Any]) -> EvaluateMessage:
    sets = json.loads(config["sets"])
    unknown = [x for x in sets if x not in EVAL_SETS]
    if unknown:
        raise ValueError(f"sets: unknown held-out set {unknown[0]!r}; known: {', '.join(EVAL_SETS)}")
    return EvaluateMessage(unpack_task(arrays, config), tuple(sets))


def pack_eval_reply(reply: EvalReply) -> dict[str, Any]:
    """Its wire form is config only: the losses as JSON (a float's repr reads back bit for bit)."""
    return {"round": reply.round, "client_id": reply.client_id, "error": reply.error or "",
            "losses": json.dumps({k: [list(s), list(n)] for k, (s, n) in reply.losses.items()})}


def unpack_eval_reply(config: dict[str, Any]) -> EvalReply:
    """An evaluation reply from an untrusted client: structural problems raise ValueError naming the field."""
    try:
        raw = json.loads(config.get("losses") or "{}")
        if not isinstance(raw, dict):
            raise ValueError("losses: not a JSON object")
        losses = {}
        for name, pair in raw.items():
            if name not in EVAL_SETS or not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"losses: {name!r} is not a held-out set with [sums, counts]")
            sums, counts = pair
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in sums) or \
                    not all(isinstance(n, int) and not isinstance(n, bool) for n in counts) or len(sums) != len(counts):
                raise ValueError(f"losses: {name!r} needs equally long lists of numbers (sums) and integers (counts)")
            losses[name] = ([float(x) for x in sums], list(counts))
        return EvalReply(int(config["round"]), int(config["client_id"]), losses, str(config.get("error") or "") or None)
    except KeyError as exc:
        raise ValueError(f"evaluation reply: missing field {exc.args[0]!r}") from None
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"evaluation reply: malformed ({exc})") from None
