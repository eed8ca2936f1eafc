"""The contract between the federated engine and an aggregation method.

Everything here is plain tensors: a module name maps to LoRA factors. No peft, no training loop,
no I/O, so the math can be read on one screen and tested in milliseconds.

Conventions (peft's): a LoRA module adds  s · B @ A  to a frozen weight W (d_out × d_in), with
A: r × d_in, B: d_out × r, and scaling s = α / r (or α / √r with rsLoRA).

The server never stores a client's scaling inside its state: the global adapter is kept *effective*,
i.e. with the scaling folded into B, so that   global model = base + B_glob @ A_glob.   A client of
rank r_k and scaling s_k receives (A_glob[:r_k], B_glob[:, :r_k] / s_k), which makes its own
effective update s_k · B · A equal the rank-r_k slice of the global one. Forgetting that division
(or multiplying twice) is the classic bug; tests/test_methods_math.py pins it down.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

# module name -> (A, B)
Factors = dict[str, tuple[Tensor, Tensor]]


@dataclass
class ClientUpdate:
    """What one client sends up after local training."""

    client_id: int
    rank: int
    scaling: float
    num_examples: int
    factors: Factors  # module -> (A: r×d_in, B: d_out×r), as trained (scaling NOT folded in)


@dataclass
class GlobalState:
    """What the server keeps between rounds.

    adapter: module -> (A, B) with scaling folded into B: the global model is base + B @ A.
             Factors are ordered so that the first r columns/rows are what a rank-r client gets.
    """

    adapter: Factors = field(default_factory=dict)
    round: int = 0


@dataclass
class Aggregate:
    """The result of one round of aggregation.

    state:  the new global state.
    merge:  module -> (A, B) whose product B @ A the engine adds into the frozen base weights *now*
            (FLoRA). Empty for methods that keep the base fixed.
    metrics: JSON-serialisable numbers (e.g. aggregation noise).
    """

    state: GlobalState
    merge: Factors = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class AggregationMethod:
    """Base class, in the spirit of a Flower strategy: configure a client, aggregate the round.

    Subclasses set `name`, may set `recipe` (config defaults that the method's paper uses, applied
    only where the user did not choose), and implement `aggregate`.
    """

    name: ClassVar[str] = ""
    recipe: ClassVar[dict] = {}
    # True: aggregate() returns factors to merge into the base weights each round.
    merges_into_base: ClassVar[bool] = False

    def configure(self, state: GlobalState, rank: int, scaling: float) -> Factors | None:
        """The factors a client of this rank starts its local training from; None = fresh init.

        Default: the first min(rank, R) rows/columns of the effective global adapter (R its rank),
        un-scaled by the client's s_k. When rank > R the engine fills the rest with a fresh peft
        init (random A, zero B): the product is unchanged, and the extra rank can still learn
        (zero rows in A *and* zero columns in B would get zero gradient forever).
        """
        if not state.adapter:
            return None
        out: Factors = {}
        for name, (a, b) in state.adapter.items():
            r = min(rank, a.shape[0])
            out[name] = (a[:r].clone(), b[:, :r] / scaling)
        return out

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState) -> Aggregate:
        raise NotImplementedError


def client_weights(updates: list[ClientUpdate]) -> list[float]:
    """p_k = n_k / Σ n over the clients that took part in this round, in float64 (Σ p_k = 1 within K ulp)."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("num_examples: every client in the round has 0 examples; nothing to aggregate")
    return [u.num_examples / total for u in updates]


def module_names(updates: list[ClientUpdate]) -> list[str]:
    names = list(updates[0].factors)
    for u in updates[1:]:
        if list(u.factors) != names:
            raise ValueError(f"factors: client {u.client_id} sent modules that differ from client {updates[0].client_id}")
    return names
