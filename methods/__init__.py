"""The method registry: `@register_method("name")` on an AggregationMethod subclass.

Importing this package registers the built-in methods (one module each).
"""
from __future__ import annotations

from .base import Aggregate, AggregationMethod, ClientUpdate, Factors, GlobalState, client_weights

METHODS: dict[str, type[AggregationMethod]] = {}


def register_method(name: str):
    def deco(cls: type[AggregationMethod]) -> type[AggregationMethod]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> AggregationMethod:
    try:
        return METHODS[name]()
    except KeyError:
        raise KeyError(f"method: unknown method {name!r}; registered: {', '.join(sorted(METHODS))}") from None


from . import fedavg_lora, fedit, flexlora, flora  # noqa: E402,F401  (registration side effect)

__all__ = ["METHODS", "register_method", "get_method", "Aggregate", "AggregationMethod", "ClientUpdate",
           "Factors", "GlobalState", "client_weights"]
