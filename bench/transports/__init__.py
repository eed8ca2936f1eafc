"""Transports carry task messages to clients and replies back (bench/messages.py), and hold nothing the
server computes. `Transport` (base.py) is the contract the engine relies on; each transport registers its class by
name (`@register_transport("name")`): the name `bench run --engine` takes and the record's `engine`.

Importing this package registers the built-in transports: every module in this folder that defines one (a new
transport is one new file), and Flower's (bench/flower/transport.py: flower-sim, flower), whose package also holds
its client side.

A transport is started in one of two ways. The engine starts it (run_federated given no transport:
`get_transport(cfg.engine).start(...)`): the in-process one (inprocess.py) runs every client on this process's
ClientRuntime. Or a framework hosts the run's server loop and hands the engine the transport it built (`host`
names it; bench/app/launch.py maps it to its launcher): Flower's simulation and deployment engines.
"""
from __future__ import annotations

import importlib
import pkgutil

from .. import BenchError
from .base import Transport

TRANSPORTS: dict[str, type[Transport]] = {}


def register_transport(name: str):
    def deco(cls: type[Transport]) -> type[Transport]:
        if name in TRANSPORTS:
            raise ValueError(f"transport {name!r} is registered twice")
        cls.name = name
        TRANSPORTS[name] = cls
        return cls

    return deco


def transport_names() -> list[str]:
    return list(TRANSPORTS)


def get_transport(name: str) -> type[Transport]:
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise BenchError(f"engine: unknown {name!r}; choose one of {', '.join(TRANSPORTS)}") from None


for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
from ..flower import transport as _flower  # noqa: E402,F401 (registers flower-sim and flower; needs no flwr to import)

__all__ = ["TRANSPORTS", "Transport", "register_transport", "get_transport", "transport_names"]
