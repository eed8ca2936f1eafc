"""FlexLoRA (Bai et al., NeurIPS 2024): average the full-size products, redistribute by SVD.

ΔW = Σ_k p_k s_k B_k A_k; the global model is base + ΔW; client k receives the rank-r_k truncated SVD
of ΔW (divided by its s_k), the best rank-r_k approximation (Eckart–Young). The SVD goes through the
stacked factors (methods.factors.factored_svd), never through the d_out × d_in matrix: the public
code's dense torch.svd per layer per round is what makes it slow at 7B scale.
"""
from __future__ import annotations

from . import register_method
from .base import Aggregate, AggregationMethod, GlobalState, client_weights, module_names
from .factors import stack, svd_factors


@register_method("flexlora")
class FlexLoRA(AggregationMethod):
    def aggregate(self, updates, state):
        weights = client_weights(updates)
        adapter = {}
        for name in module_names(updates):
            a_s, b_s = stack(updates, weights, name)
            adapter[name] = svd_factors(b_s, a_s)  # ordered by singular value: a slice is a truncation
        return Aggregate(GlobalState(adapter, state.round + 1), metrics={"noise": 0.0})
