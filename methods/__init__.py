"""The method registry: `@register_method("name")` on an AggregationMethod subclass.

Importing this package registers the built-in methods: every module in this folder that defines one
(a new method is one new file; nothing else needs a line).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (Aggregate, AggregationMethod, ClientSpec, ClientTask, ClientUpdate, Factors, GlobalState, Option,
                   client_weights)

METHODS: dict[str, type[AggregationMethod]] = {}


def register_method(name: str):
    def deco(cls: type[AggregationMethod]) -> type[AggregationMethod]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str, options: dict | None = None) -> AggregationMethod:
    """An instance of the registered method, with its options (ValueError naming a bad option)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise KeyError(f"method: unknown method {name!r}; registered: {', '.join(sorted(METHODS))}") from None
    return cls(**(options or {}))


_SHARED = {"base", "factors"}  # the contract and the shared algebra, not methods
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SHARED and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "register_method", "get_method", "Aggregate", "AggregationMethod", "ClientSpec", "ClientTask",
           "ClientUpdate", "Factors", "GlobalState", "Option", "client_weights"]
