"""Test hooks, outside the production path: an observer of the run's events (bench/observers.py) that each run
subscribes only when one of their environment variables is set.

BENCH_TEST_KILL_AT=<point>: the process SIGKILLs itself at that exact point, so tests can crash a real
  run deterministically. Points (bench/engine.py, bench/checkpoint.py, bench/export.py and evaluators/runner.py
  announce them):
  round<r>:client<k> (after the first optimizer step of client k in round r), round<r>:aggregate
  (after aggregation, nothing saved), round<r>:metrics (metrics.jsonl written, checkpoint not),
  round<r>:checkpoint-write (new state file half-way: written to the temporary folder, not renamed),
  round<r>:checkpoint-swap (old checkpoint moved aside, new one not yet in place), test-loss,
  final-save (global model written to its temporary folder), eval, record (global model in place,
  results record not yet written); eval-request:<n> (evaluators: right after lm-eval's n-th answer
  is committed to the request cache).
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

from .observers import Observer, subscribe

SIGNALLED: list[str] = []  # signal names the run received (the pause hook waits for one)
VARIABLES = ("BENCH_TEST_KILL_AT", "BENCH_TEST_PAUSE_AT", "BENCH_TEST_POISON")


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
    return any(os.environ.get(v) for v in VARIABLES)


class TestHooks(Observer):
    """Kills or pauses the process at the named point; corrupts the named client's reply after it trained
    (BENCH_TEST_POISON), before any other observer or the server sees it."""

    def __init__(self, poison: str | None):
        self.poison = None
        if poison:
            r, c, *kind = poison.split(":")
            self.poison = (int(r), c, kind[0] if kind else "nan")

    def point(self, name):
        point(name)

    def signal(self, name):
        SIGNALLED.append(name)

    def client_done(self, msg, reply):
        if self.poison is None or reply.error:
            return
        rnd, client, kind = self.poison
        if msg.round == rnd and (client == "*" or int(client) == msg.client_id):
            for name, (a, b) in reply.factors.items():
                if kind == "big":
                    b.mul_(1e6)
                else:
                    a.fill_(float("nan") if kind == "nan" else float("inf"))
                    break


def _from_env() -> TestHooks | None:
    return TestHooks(os.environ.get("BENCH_TEST_POISON")) if active() else None


subscribe(_from_env)
