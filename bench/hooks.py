"""Test hooks, outside the production path: installed only when their environment variable is set.

BENCH_TEST_KILL_AT=<point>: the process SIGKILLs itself at that exact point, so tests can crash a real
  run deterministically. Points (bench/engine.py and bench/checkpoint.py announce them):
  round<r>:client<k> (after the first optimizer step of client k in round r), round<r>:aggregate
  (after aggregation, nothing saved), round<r>:metrics (metrics.jsonl written, checkpoint not),
  round<r>:checkpoint-write (new state file half-way: written to the temporary folder, not renamed),
  round<r>:checkpoint-swap (old checkpoint moved aside, new one not yet in place), test-loss,
  final-save (global model written to its temporary folder), eval, record (global model in place,
  results record not yet written); eval-request:<n> (evaluators: right after lm-eval's n-th answered
  request is in the request cache).
BENCH_TEST_PAUSE_AT=<point>: at that point the process prints "test hook: paused at <point>" to stderr
  and waits (≤ 300 s) for SIGINT/SIGTERM, so a test can deliver a real signal at an exact point.
BENCH_TEST_POISON=<r>:<k>[:nan|inf|big]: after local training, client k of round r (k may be *) sends
  NaN / Inf factors, or factors scaled by 1e6 (for max_update_norm).
"""
from __future__ import annotations

import os
import signal
import sys
import time

SIGNALLED: list[str] = []  # signal names received by the engine's handler (the pause hook waits for one)


def point(name: str) -> None:
    """A named point in a run; inert unless a kill or pause hook names it."""
    if os.environ.get("BENCH_TEST_KILL_AT") == name:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("BENCH_TEST_PAUSE_AT") == name:
        print(f"[bench] test hook: paused at {name}", file=sys.stderr, flush=True)
        deadline = time.time() + 300
        while not SIGNALLED and time.time() < deadline:
            time.sleep(0.02)


def active() -> bool:
    return any(os.environ.get(v) for v in ("BENCH_TEST_KILL_AT", "BENCH_TEST_PAUSE_AT", "BENCH_TEST_POISON"))


class PoisonTransport:
    """Wraps a transport; corrupts the named client's reply after it trained (BENCH_TEST_POISON)."""

    def __init__(self, inner, spec: str):
        self.inner = inner
        r, c, *kind = spec.split(":")
        self.round, self.client, self.kind = int(r), c, (kind[0] if kind else "nan")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, tasks, on_reply=None, on_step=None):
        def poison(msg, reply):
            if msg.round == self.round and (self.client == "*" or int(self.client) == msg.client_id) and not reply.error:
                for name, (a, b) in reply.factors.items():
                    if self.kind == "big":
                        b.mul_(1e6)
                    else:
                        a.fill_(float("nan") if self.kind == "nan" else float("inf"))
                        break
            if on_reply is not None:
                on_reply(msg, reply)

        return self.inner.run(tasks, on_reply=poison, on_step=on_step)


def wrap_transport(transport):
    spec = os.environ.get("BENCH_TEST_POISON")
    return PoisonTransport(transport, spec) if spec else transport
