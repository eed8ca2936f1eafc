"""`bench run`'s one dispatch: the transport registered under cfg.engine (bench/transports/) says who starts the
run. One the engine starts (`host` None: inprocess, or any registered transport with its own `start`) runs here,
through run_federated; a hosted one runs through its host's launcher, which builds the transport and hands it to
the engine (Flower's ServerApp: bench/app/flower_launch.py)."""
from __future__ import annotations

from bench.transports import get_transport

from . import flower_launch


def run_here(cfg, args, evaluator, log=print) -> dict:
    """A run this process drives; the engine starts the transport's clients."""
    from bench.engine import run_federated

    flower_launch.refuse_flags(cfg, args)
    return run_federated(cfg, resume=args.resume, evaluator=evaluator, log=log)


LAUNCHERS = {None: run_here, "flower": flower_launch.run_engine}  # a transport's host -> its launcher


def launch(cfg, args, evaluator, log=print) -> dict | None:
    """Run (or resume, args.resume) cfg on its engine; the results record (None: nothing ran, e.g. a Flower app
    folder was only written)."""
    return LAUNCHERS[get_transport(cfg.engine).host](cfg, args, evaluator, log)
