"""Transports carry task messages to clients and replies back (bench/messages.py), and hold nothing the
server computes. `Transport` is the contract the engine relies on; each transport registers its class by name
(`@register_transport("name")`): the name `bench run --engine` takes and the record's `engine`.

A transport is started in one of two ways. The engine starts it (run_federated given no transport:
`get_transport(cfg.engine).start(...)`): the in-process one, here, runs every client on this process's
ClientRuntime. Or a framework hosts the run's server loop and hands the engine the transport it built (`host`
names it; bench/app/launch.py maps it to its launcher): Flower's simulation and deployment engines
(bench/flower/transport.py: flower-sim, flower)."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod

from methods import get_method

from . import BenchError
from .client import ClientRuntime, ModelSpec
from .messages import EvalReply, EvaluateMessage, Reply, TaskMessage


class Transport(ABC):
    """What the engine needs of a transport. A client that cannot answer yields an error reply or a
    server.Refused(reason) in its place, never an exception: the server records it and goes on."""

    name: str = ""                    # its registered name: --engine, the record's `engine`
    description: str = ""             # one line for `bench run --help`
    host: str | None = None           # None: the engine starts it (start); else the framework that builds it
    setup_s: dict[str, float] = {}    # seconds this process spent starting the clients (the record's timings)

    @classmethod
    def start(cls, cfg, plan, spec: ModelSpec, tokenizer, heldout, log=print) -> Transport:
        """The clients of a run the engine drives: those of the plan (its shards and ranks), the model of spec,
        heldout: the sets they score their own models on. A hosted transport is built by its host instead."""
        raise BenchError(f"engine: {cls.name}'s clients are started by {cls.host or 'its host'}, not by the engine; "
                         f"run it with `bench run --engine {cls.name}`")

    @abstractmethod
    def run(self, tasks: list[TaskMessage], on_reply=None, on_step=None) -> dict:
        """TRAIN: each task's Reply (or Refused), by client id; on_reply(msg, reply) as each arrives (replies that
        fit their task); on_step(msg, step) after each optimizer step, where the transport can see them (it may
        raise: the round is cut short and redone on resume)."""

    @abstractmethod
    def evaluate(self, asks: list[EvaluateMessage]) -> dict:
        """EVALUATE: each client's EvalReply (or Refused), by client id: its own model on the held-out sets asked."""

    @abstractmethod
    def state(self) -> tuple[dict, dict] | None:
        """The clients' own state (tensors, meta) to checkpoint with the run; None: the clients keep their own."""

    @abstractmethod
    def restore(self, tensors: dict, meta: dict, merges: dict) -> None:
        """Resume from a checkpoint: the clients' state that state() gave, and every merge of the server so far."""


TRANSPORTS: dict[str, type[Transport]] = {}


def register_transport(name: str):
    def deco(cls: type[Transport]) -> type[Transport]:
        if name in TRANSPORTS:
            raise ValueError(f"transport {name!r} is registered twice")
        cls.name = name
        TRANSPORTS[name] = cls
        return cls

    return deco


def _register_builtin() -> None:
    from .flower import transport  # noqa: F401 (registers flower-sim and flower; needs no flwr to import)


def transport_names() -> list[str]:
    _register_builtin()
    return list(TRANSPORTS)


def get_transport(name: str) -> type[Transport]:
    _register_builtin()
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise BenchError(f"engine: unknown {name!r}; choose one of {', '.join(TRANSPORTS)}") from None


@register_transport("inprocess")
class InProcessTransport(Transport):
    """Every client on this process's one ClientRuntime."""

    description = "clients trained in this process"

    def __init__(self, runtime: ClientRuntime, batched: bool = False):
        self.runtime = runtime
        self.batched = batched  # a round's clients in one forward/backward per micro-step (bench/batched.py)
        self.setup_s = {}

    @classmethod
    def start(cls, cfg, plan, spec: ModelSpec, tokenizer, heldout, log=print) -> InProcessTransport:
        """Every client of the plan in this process: their training examples tokenized, one runtime loaded."""
        from .data import client_examples

        t = time.time()
        examples = client_examples(cfg, plan, tokenizer, range(cfg.num_clients))
        tokenize_s, t = time.time() - t, time.time()
        transport = cls(ClientRuntime(cfg, spec, plan.ranks, examples, heldout), _client_batching(cfg, spec.device, log))
        transport.setup_s = {"tokenize_s": tokenize_s, "load_s": time.time() - t}
        return transport

    def run(self, tasks: list[TaskMessage], on_reply=None, on_step=None) -> dict[int, Reply]:
        """Each task's reply, by client id; on_reply(msg, reply) as each one arrives; on_step(msg, step) after each
        optimizer step (may raise: the round is cut short)."""
        self.runtime.on_step = on_step
        if self.batched and len(tasks) > 1:
            from .batched import train_round

            return train_round(self.runtime, tasks, on_reply)
        replies = {}
        for msg in tasks:
            reply = self.runtime.train(msg)
            if on_reply is not None:
                on_reply(msg, reply)
            replies[msg.client_id] = reply
        return replies

    def evaluate(self, asks: list[EvaluateMessage]) -> dict[int, EvalReply]:
        return {ask.task.client_id: self.runtime.evaluate(ask) for ask in asks}

    def state(self):  # the clients' own state (personal factors, the base round) travels with the run's checkpoint
        return self.runtime.state_tensors()

    def restore(self, tensors, meta, merges) -> None:
        self.runtime.apply_merges(merges)
        self.runtime.load_state_tensors(tensors, meta)


def _client_batching(cfg, device, log) -> bool:
    """Whether a round's clients train in one batch (bench/batched.py): the mode, and whether the method allows."""
    from .batched import refusal, use_batching

    if not use_batching(cfg.client_batching, device):
        return False
    from . import privacy

    if privacy.enabled(cfg):
        why = "DP-SGD clips and noises each client's per-example gradients one client at a time"
    elif cfg.length_buckets and 1 < cfg.micro_batch_size < cfg.batch_size and cfg.lora_dropout > 0:
        why = ("length-bucketed micro-batches draw dropout masks the batched forward does not reproduce (set "
               "--length-buckets false or micro_batch_size = batch_size to batch them)")
    elif cfg.compute_dtype != "float32" and device.type == "cpu":
        why = f"compute_dtype {cfg.compute_dtype} (autocast over float32 masters) is applied by the sequential path only"
    else:
        why = refusal(get_method(cfg.method, cfg.method_options))
    if why:
        log(f"[bench] client_batching: {why}; its clients train one by one")
        return False
    log(f"[bench] client_batching: on ({cfg.client_batching}): a round's clients share one forward/backward per micro-step")
    return True
