"""Transports carry task messages to clients and replies back. The in-process one (the default) runs
every client on this process's ClientRuntime, one after another; bench/flower/ carries the same
messages over Flower's simulation and deployment engines."""
from __future__ import annotations

from .client import ClientRuntime
from .messages import Reply, TaskMessage


class InProcessTransport:
    """The transport contract (a Flower transport implements the same four members):
    name; run(tasks, on_reply) -> {client id: Reply or server.Refused}; state() -> the clients' state to
    checkpoint with the run, or None when the clients keep their own; restore(tensors, meta, merges)."""

    name = "inprocess"

    def __init__(self, runtime: ClientRuntime, batched: bool = False):
        self.runtime = runtime
        self.batched = batched  # a round's clients in one forward/backward per micro-step (bench/batched.py)

    def run(self, tasks: list[TaskMessage], on_reply=None) -> dict[int, Reply]:
        """Each task's reply, by client id; on_reply(msg, reply) as each one arrives."""
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

    # the clients' own state (personal factors, the base round) travels with the run's checkpoint
    def state(self):
        return self.runtime.state_tensors()

    def restore(self, tensors, meta, merges) -> None:
        self.runtime.apply_merges(merges)
        self.runtime.load_state_tensors(tensors, meta)
