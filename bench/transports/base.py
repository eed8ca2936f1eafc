"""The transport contract: what the engine relies on of every transport (registered by name in __init__.py)."""
from __future__ import annotations

from abc import ABC, abstractmethod

from ..client import ModelSpec
from ..messages import EvaluateMessage, TaskMessage


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
        heldout: the sets they score their own models on. A hosted transport (host set) is built by its host, and
        the engine refuses to start it."""
        raise NotImplementedError(f"transport {cls.name}: neither start() nor a host")

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
