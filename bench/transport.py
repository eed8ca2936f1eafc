"""Transports carry task messages to clients and replies back. The in-process one (the default) runs
every client on this process's ClientRuntime, one after another; bench/flower/ carries the same
messages over Flower's simulation and deployment engines."""
from __future__ import annotations

import time

from .client import ClientRuntime, ModelSpec
from .messages import EvalReply, EvaluateMessage, Reply, TaskMessage


class InProcessTransport:
    """The transport contract (a Flower transport implements the same members):
    name; run(tasks, on_reply, on_step) -> {client id: Reply or server.Refused}; evaluate(asks) -> {client id:
    EvalReply or server.Refused}; state() -> the clients' state to checkpoint with the run, or None when the
    clients keep their own; restore(tensors, meta, merges); setup_s: seconds spent tokenizing and loading."""

    name = "inprocess"

    def __init__(self, runtime: ClientRuntime, batched: bool = False):
        self.runtime = runtime
        self.batched = batched  # a round's clients in one forward/backward per micro-step (bench/batched.py)
        self.setup_s: dict[str, float] = {}

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
        """Each client's own model scored on the held-out sets asked for, by client id."""
        return {ask.task.client_id: self.runtime.evaluate(ask) for ask in asks}

    # the clients' own state (personal factors, the base round) travels with the run's checkpoint
    def state(self):
        return self.runtime.state_tensors()

    def restore(self, tensors, meta, merges) -> None:
        self.runtime.apply_merges(merges)
        self.runtime.load_state_tensors(tensors, meta)
