"""FedAvg on the LoRA factors (McMahan et al. 2017 applied to A and B separately).

Ā = Σ p_k A_k,  B̄ = Σ p_k s_k B_k  (B kept effective, see base.py), after zero-padding every client
to the largest rank in the round (HetLoRA-style); a client of rank r_k restarts from the first r_k
rows/columns. B̄ Ā ≠ Σ p_k s_k B_k A_k in general: that gap is the aggregation noise we record.
"""
from __future__ import annotations

from . import register_method
from .base import Aggregate, AggregationMethod, ClientUpdate, GlobalState, client_weights, module_names
from .factors import aggregation_noise, padded_average, stack


def average_factors(updates: list[ClientUpdate], state: GlobalState) -> Aggregate:
    weights = client_weights(updates)
    names = module_names(updates)
    # every client counts (FLoRA's public FedIT code keeps only the first)
    adapter = {name: padded_average(updates, weights, name) for name in names}
    overall, noise = aggregation_noise(adapter, {name: stack(updates, weights, name) for name in names})
    return Aggregate(GlobalState(adapter, state.round + 1), metrics={"noise": overall, "noise_per_module": noise})


@register_method("fedavg-lora")
class FedAvgLoRA(AggregationMethod):
    description = "FedAvg of A and B separately (zero-padded to the largest rank); records the aggregation noise"
    citation = ("McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, "
                "AISTATS 2017, applied to LoRA's factors")
    averages_factors = True

    def aggregate(self, updates, state):
        return average_factors(updates, state)
