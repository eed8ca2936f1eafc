"""FLoRA (Wang et al., NeurIPS 2024): stacking-based, noise-free aggregation.

A_s = [A_1; …; A_K], B_s = [p_1 s_1 B_1, …, p_K s_K B_K]  ⇒  B_s A_s = Σ_k p_k s_k B_k A_k exactly,
for any ranks. The product is merged into the base weights every round, and every client starts the
next round with a fresh adapter at its own rank.
"""
from __future__ import annotations

from . import register_method
from .base import Aggregate, AggregationMethod, ClientTask, GlobalState, client_weights, module_names
from .factors import stack


@register_method("flora")
class FLoRA(AggregationMethod):
    description = "stack the clients' factors (exact Σ p_k s_k B_k A_k), merge into the base, fresh adapters each round"
    citation = ("Wang et al., FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank "
                "Adaptations, NeurIPS 2024; code github.com/ATP-1010/FederatedLLM")
    merges_into_base = True

    def configure(self, state, client):
        return ClientTask()  # fresh adapter every round: the previous rounds live in the base weights

    def aggregate(self, updates, state):
        weights = client_weights(updates)
        merge = {name: stack(updates, weights, name) for name in module_names(updates)}
        return Aggregate(GlobalState({}, state.round + 1), merge=merge, metrics={"noise": 0.0})
