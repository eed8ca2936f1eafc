"""Transports carry task messages to clients and replies back (bench/messages.py), and hold nothing the
server computes. `Transport` is the contract the engine relies on. The in-process one (the default) runs
every client on this process's ClientRuntime, one after another; bench/flower/ carries the same
messages over Flower's simulation and deployment engines (GridTransport)."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod

from .client import ClientRuntime, ModelSpec
from .messages import EvalReply, EvaluateMessage, Reply, TaskMessage


class Transport(ABC):
    """What the engine needs of a transport. A client that cannot answer yields an error reply or a
    server.Refused(reason) in its place, never an exception: the server records it and goes on."""

    name: str = ""                    # the record's `engine`
    setup_s: dict[str, float] = {}    # seconds this process spent starting the clients (the record's timings)

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


class InProcessTransport(Transport):
    """Every client on this process's one ClientRuntime."""

    name = "inprocess"

    def __init__(self, runtime: ClientRuntime, batched: bool = False):
        self.runtime = runtime
        self.batched = batched  # a round's clients in one forward/backward per micro-step (bench/batched.py)
        self.setup_s = {}

    @classmethod
    def start(cls, cfg, plan, spec: ModelSpec, tokenizer, heldout, batched: bool = False) -> InProcessTransport:
        """Every client of the plan (its dataset, shards and ranks) in this process: their training examples
        tokenized, one runtime loaded; heldout: the sets they score their own models on."""
        from .data import client_examples

        t = time.time()
        examples = client_examples(cfg, plan, tokenizer, range(cfg.num_clients))
        tokenize_s, t = time.time() - t, time.time()
        transport = cls(ClientRuntime(cfg, spec, plan.ranks, examples, heldout), batched)
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
