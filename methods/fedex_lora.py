"""FedEx-LoRA (Singhal et al., ACL 2025): FedAvg of A and B, plus the residual folded into the base (exact).

    Ā = Σ p_k pad(A_k),   B̄ = Σ p_k s_k pad(B_k)                       (zero-padded, as fedavg-lora)
    residual = Σ p_k s_k B_k A_k − B̄ Ā        added to the frozen base weights this round
    ⇒ base' + B̄ Ā = base + Σ p_k s_k B_k A_k   exactly, whatever the ranks
and every client restarts from (Ā[:r_k], B̄[:, :r_k] / s_k) on the updated base.

The residual travels as a merge in factored form, [B_s, −B̄] @ [A_s; Ā] (rank ≤ Σ r_k + r_max), and the
engine counts those bytes as what each client downloads. The paper sends the dense d_out × d_in residual;
the round's metrics record both per client (float32): `residual_bytes_factored` (what this run sends) and
`residual_bytes_dense` (the paper's). The factored form is smaller while Σ r_k + r_max < d_out d_in /
(d_out + d_in) (≈ 2048 for a 4096² module); beyond that a deployment would send the dense matrix.
Heterogeneous ranks (the paper's clients share one rank): zero-padding; the global model stays exact,
and a client of rank r_k < r_max starts from the truncation of the global adapter (as in fedavg-lora).
`fedavg_noise` records what FedAvg alone would lose, ‖B̄Ā − Σ p_k s_k B_k A_k‖ / ‖Σ p_k s_k B_k A_k‖.
"""
from __future__ import annotations

import torch

from . import register_method
from .base import Aggregate, AggregationMethod, GlobalState, client_weights, module_names
from .factors import aggregation_noise, padded_average, stack

BYTES = 4  # float32 on the wire


@register_method("fedex-lora")
class FedExLoRA(AggregationMethod):
    description = "FedAvg of A and B, and the residual Σ p_k s_k B_k A_k − B̄Ā folded into the base weights (exact)"
    citation = ("Singhal et al., FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Large "
                "Language Models, ACL 2025 (arXiv 2410.09432); code github.com/RaghavSinghal10/fedex-lora")
    merges_into_base = True
    # the public code's GLUE command: --num_clients=3 --lora_r=4 --rounds 50 --lr 1e-3 --local_epochs 3 (AdamW)
    recipe = {"rank": 4, "lr": 1e-3, "local_epochs": 3.0}

    def aggregate(self, updates, state):
        weights = client_weights(updates)
        adapter, exact, merge = {}, {}, {}
        factored = dense = 0
        for name in module_names(updates):
            a_bar, b_bar = padded_average(updates, weights, name)
            a_s, b_s = stack(updates, weights, name)
            adapter[name], exact[name] = (a_bar, b_bar), (a_s, b_s)
            merge[name] = (torch.cat([a_s, a_bar], 0), torch.cat([b_s, -b_bar], 1))  # B_s A_s − B̄ Ā
            factored += (merge[name][0].numel() + merge[name][1].numel()) * BYTES
            dense += b_s.shape[0] * a_s.shape[1] * BYTES
        fedavg_noise, _ = aggregation_noise(adapter, exact)
        return Aggregate(GlobalState(adapter, state.round + 1), merge=merge,
                         metrics={"noise": 0.0, "fedavg_noise": fedavg_noise,
                                  "residual_bytes_factored": factored, "residual_bytes_dense": dense})
