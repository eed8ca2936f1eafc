"""The in-process transport: every client of the run on this process's one ClientRuntime."""
from __future__ import annotations

import time

from methods import get_method

from ..client import ClientRuntime, ModelSpec
from ..messages import EvalReply, EvaluateMessage, Reply, TaskMessage
from . import register_transport
from .base import Transport


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
        from ..data import client_examples

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
            from ..batched import train_round

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
    from ..batched import refusal, use_batching

    if not use_batching(cfg.client_batching, device):
        return False
    from .. import privacy

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
