"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024;
the Shepherd code), the baseline of the FLoRA paper: FedAvg of the LoRA factors weighted by the clients'
example counts. Its math is fedavg-lora's; it differs only in its recipe, the defaults of Shepherd's
`main.py` (github.com/JayZhang42/FederatedGPT-Shepherd, fl_finetune's keyword defaults):
client_selection_frac=0.1, lora_r=16, lora_alpha=16, lora_dropout=0.05, lora_target_modules=["q_proj"],
local_learning_rate=3e-4, prompt_template_name="alpaca". A preset or a flag overrides any of them.
"""
from __future__ import annotations

from . import register_method
from .base import AggregationMethod
from .fedavg_lora import average_factors


@register_method("fedit")
class FedIT(AggregationMethod):
    description = "FedAvg of A and B separately, with FedIT/Shepherd's recipe defaults"
    citation = ("Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, ICASSP 2024; "
                "code github.com/JayZhang42/FederatedGPT-Shepherd")
    averages_factors = True
    recipe = {
        "client_fraction": 0.1,         # main.py client_selection_frac
        "rank": 16,                     # main.py lora_r
        "lora_alpha": 16.0,             # main.py lora_alpha
        "lora_dropout": 0.05,           # main.py lora_dropout
        "target_modules": ["q_proj"],   # main.py lora_target_modules
        "lr": 3e-4,                     # main.py local_learning_rate
        "prompt_template": "alpaca",    # main.py prompt_template_name
    }

    def aggregate(self, updates, state):
        return average_factors(updates, state)
