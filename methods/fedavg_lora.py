"""FedAvg on the LoRA factors (McMahan et al. 2017 applied to A and B separately).

Ā = Σ p_k A_k,  B̄ = Σ p_k s_k B_k  (B kept effective, see base.py), after zero-padding every client
to the largest rank in the round (HetLoRA-style); a client of rank r_k restarts from the first r_k
rows/columns. B̄ Ā ≠ Σ p_k s_k B_k A_k in general: that gap is the aggregation noise we record.
"""
from __future__ import annotations

import torch

from . import register_method
from .base import Aggregate, AggregationMethod, ClientUpdate, GlobalState, client_weights, module_names
from .factors import pad_rank, product_fro_norm, stack


def average_factors(updates: list[ClientUpdate], state: GlobalState) -> Aggregate:
    weights = client_weights(updates)
    max_rank = max(u.rank for u in updates)
    adapter, noise, exact_sq, diff_sq = {}, {}, 0.0, 0.0
    for name in module_names(updates):
        a_bar = b_bar = None
        for u, p in zip(updates, weights):  # every client counts (FLoRA's public FedIT code keeps only the first)
            a_k, b_k = pad_rank(*u.factors[name], max_rank)
            a_bar = p * a_k if a_bar is None else a_bar + p * a_k
            b_bar = p * u.scaling * b_k if b_bar is None else b_bar + p * u.scaling * b_k
        adapter[name] = (a_bar, b_bar)
        # noise: ‖B̄Ā − B_s A_s‖ / ‖B_s A_s‖ through the factors, [B̄, −B_s] @ [Ā; A_s]
        a_s, b_s = stack(updates, weights, name)
        e_sq = product_fro_norm(b_s, a_s) ** 2
        d_sq = product_fro_norm(torch.cat([b_bar, -b_s], 1), torch.cat([a_bar, a_s], 0)) ** 2
        noise[name] = (d_sq ** 0.5) / (e_sq ** 0.5) if e_sq > 0 else 0.0
        exact_sq, diff_sq = exact_sq + e_sq, diff_sq + d_sq
    overall = (diff_sq ** 0.5) / (exact_sq ** 0.5) if exact_sq > 0 else 0.0
    return Aggregate(GlobalState(adapter, state.round + 1), metrics={"noise": overall, "noise_per_module": noise})


@register_method("fedavg-lora")
class FedAvgLoRA(AggregationMethod):
    description = "FedAvg of A and B separately (zero-padded to the largest rank); records the aggregation noise"
    citation = ("McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, "
                "AISTATS 2017, applied to LoRA's factors")
    averages_factors = True

    def aggregate(self, updates, state):
        return average_factors(updates, state)
