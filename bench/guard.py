"""ReplyFilter: holds a server and delegates to it, after refusing replies that break their task.

The shape of Flower's differential-privacy wrappers: the wrapped server never sees a refused reply, only
a Refused(reason, reply) in its place, which it records (and the audit trail saves). Every check is
against what the server itself sent, so a remote client cannot widen what it is allowed to send.
"""
from __future__ import annotations

import math

import torch

from methods.factors import product_fro_norm

from .messages import Reply, TaskMessage
from .server import Refused, RoundResult, Server


class ReplyFilter:
    def __init__(self, server: Server, module_shapes: dict[str, tuple[int, int]], max_update_norm: float | None = None):
        self.server = server
        self.module_shapes = module_shapes  # module -> (d_out, d_in)
        self.max_update_norm = max_update_norm

    def __getattr__(self, name):  # everything but aggregate is the wrapped server's
        return getattr(self.server, name)

    def aggregate(self, rnd: int, tasks: list[TaskMessage], replies: dict) -> RoundResult:
        by_id = {m.client_id: m for m in tasks}
        checked = {}
        for k, reply in replies.items():
            if isinstance(reply, Reply) and not reply.error and k in by_id:
                reason = self.check(by_id[k], reply)
                reply = Refused(reason, reply) if reason else reply
            checked[k] = reply
        return self.server.aggregate(rnd, tasks, checked)

    def check(self, msg: TaskMessage, reply: Reply) -> str | None:
        """Why this reply is refused, or None."""
        if reply.round != msg.round or reply.client_id != msg.client_id:
            return f"reply for round {reply.round} client {reply.client_id}, expected round {msg.round} client {msg.client_id}"
        if not 1 <= reply.rank <= msg.rank:
            return f"rank {reply.rank} outside 1..{msg.rank} (the rank it was given)"
        if reply.num_examples < 1:
            return f"num_examples {reply.num_examples} < 1"
        if not msg.task.upload and not any(t is not None for pair in reply.factors.values() for t in pair):
            return None  # a task that uploads nothing (local-only): its wire form carries no module at all
        names = set(reply.factors)
        unknown = sorted(names - set(self.module_shapes))
        if unknown:
            return f"unknown module {unknown[0]!r}"
        missing = sorted(set(self.module_shapes) - names)
        if missing:
            return f"module {missing[0]!r} missing"
        sq = 0.0
        core = msg.task.upload == "R"  # the core R (rank × rank) travels in A's slot
        for name, (a, b) in reply.factors.items():
            d_out, d_in = self.module_shapes[name]
            for which, t, shape in (("A", a, (reply.rank, reply.rank if core else d_in)), ("B", b, (d_out, reply.rank))):
                if (t is not None) != (which in msg.task.upload or (core and which == "A")):
                    return f"{name}.{which}: {'sent' if t is not None else 'missing'}, but the task uploads {msg.task.upload!r}"
                if t is None:
                    continue
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    return f"{name}.{which}: not a floating-point tensor"
                if tuple(t.shape) != shape:
                    return f"{name}.{which}: shape {tuple(t.shape)}, expected {shape}"
                if not torch.isfinite(t).all():
                    return f"non-finite values in {name}.{which}"
            if self.max_update_norm is not None and core:   # the client's update is s · B R A with its task's A, B
                a0, b0 = msg.task.init[name]
                sq += (msg.scaling * product_fro_norm(b0.double() @ a.double(), a0.double())) ** 2
            elif self.max_update_norm is not None and a is not None and b is not None:
                sq += (msg.scaling * product_fro_norm(b.double(), a.double())) ** 2
        if self.max_update_norm is not None and math.sqrt(sq) > self.max_update_norm:
            return f"update norm {math.sqrt(sq):.3g} > max_update_norm {self.max_update_norm:g}"
        return None
