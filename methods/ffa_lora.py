"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at its shared random initialization, only B trained and averaged.

Every client holds the same A (rows of one shared draw), so averaging B is averaging the products:
    B̄ = Σ p_k s_k pad(B_k)   ⇒   B̄ A = Σ p_k s_k B_k A[:r_k]    exactly, for any ranks,
because zero-padded columns of B meet rows of A that the client did not have. Global model: base + B̄ A.

A is never trained and the server never sends it a new value: in round 1 every client draws it from the
round's shared seed (the engine's fresh init; all clients of a round get slices of one draw), and clients
whose rank reaches beyond the rows the server holds upload A once (bit for bit what they drew), so that
the server can form B̄ A. After that only B travels up. The server checks that every A it receives
equals its own rows (`a_mismatch`, 0 when A stayed frozen).
Heterogeneous ranks: supported, exactly (zero-padding of B, as above).
"""
from __future__ import annotations

import torch

from . import register_method
from .base import Aggregate, AggregationMethod, ClientTask, GlobalState, client_weights, module_names, slice_adapter
from .factors import padded_sum


def grow_rows(known: torch.Tensor | None, updates, name: str) -> tuple[torch.Tensor, float]:
    """The shared frozen A, extended by the rows the clients uploaded, and the largest disagreement between
    an uploaded A and the rows it should equal (0: frozen and shared, as the method requires)."""
    sent = [u.factors[name][0] for u in updates if u.factors[name][0] is not None]
    a = known
    for a_k in sorted(sent, key=lambda t: -t.shape[0]):
        if a is None or a_k.shape[0] > a.shape[0]:
            a = a_k if a is None else torch.cat([a, a_k[a.shape[0]:]], 0)
    mismatch = max((float((a_k - a[: a_k.shape[0]].to(a_k.dtype)).abs().max()) for a_k in sent), default=0.0)
    return a, mismatch


@register_method("ffa-lora")
class FFALoRA(AggregationMethod):
    description = "A frozen at a shared random init, only B trained and averaged: exact aggregation, half the upload"
    citation = ("Sun et al., Improving LoRA in Privacy-preserving Federated Learning, ICLR 2024 "
                "(arXiv 2403.12313); code in github.com/alibaba/FederatedScope (llm branch, federate.freeze_A)")
    recipe = {"rank": 8}  # the paper's main setting; its α and lr are for RoBERTa/LLaMA and not set here

    def configure(self, state, client):
        rows = next(iter(state.adapter.values()))[0].shape[0] if state.adapter else 0
        init = slice_adapter(state.adapter, client.rank, client.scaling) if state.adapter else None
        return ClientTask(init=init, train="B", upload="B" if client.rank <= rows else "AB")

    def aggregate(self, updates, state):
        weights = client_weights(updates)
        adapter, mismatch = {}, 0.0
        for name in module_names(updates):
            a, bad = grow_rows(state.adapter.get(name, (None, None))[0], updates, name)
            b_bar = padded_sum([(p * u.scaling, u.factors[name][1].to(a.dtype)) for u, p in zip(updates, weights)],
                               a.shape[0], 1)
            adapter[name] = (a, b_bar)
            mismatch = max(mismatch, bad)
        return Aggregate(GlobalState(adapter, state.round + 1), metrics={"noise": 0.0, "a_mismatch": mismatch})
