"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", the
Shepherd recipe), the baseline of the FLoRA paper: FedAvg of the LoRA factors weighted by the
clients' example counts, with that recipe's defaults (client sampling, q/v targets, alpaca prompts).
"""
from __future__ import annotations

from . import register_method
from .base import AggregationMethod
from .fedavg_lora import average_factors


@register_method("fedit")
class FedIT(AggregationMethod):
    recipe = {
        "target_modules": ["q_proj", "v_proj"],
        "client_fraction": 0.5,
        "prompt_template": "alpaca",
    }

    def aggregate(self, updates, state):
        return average_factors(updates, state)
