"""The backend registry: `@register_backend("name")` on a `Backend` subclass (evaluators/backends/base.py).

Importing this package registers the built-in backends: every module in this folder that defines one (a new
backend is one new file; `bench eval --backend` offers every registered name).
"""
from __future__ import annotations

import importlib
import pkgutil

from bench import BenchError

from .base import Backend

BACKENDS: dict[str, Backend] = {}


def register_backend(name: str):
    def deco(cls: type[Backend]) -> type[Backend]:
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} is registered twice")
        cls.name = name
        BACKENDS[name] = cls()
        return cls

    return deco


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise BenchError(f"backend: unknown backend {name!r}; use {', '.join(BACKENDS)}") from None


for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["BACKENDS", "Backend", "register_backend", "get_backend"]
