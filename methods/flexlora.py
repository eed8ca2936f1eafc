"""FlexLoRA (Bai et al., NeurIPS 2024): average the full-size products, redistribute by SVD.

ΔW = Σ_k p_k s_k B_k A_k; the global model is base + ΔW; client k receives the rank-r_k truncated SVD
of ΔW (divided by its s_k), the best rank-r_k approximation (Eckart–Young). The SVD goes through the
stacked factors (methods.factors.factored_svd), never through the d_out × d_in matrix: the public
code's dense torch.svd per layer per round is what makes it slow at 7B scale.

What a client loses to the truncation is FlexLoRA's counterpart of FedAvg's aggregation noise:
‖ΔW − trunc_r(ΔW)‖_F / ‖ΔW‖_F = √(Σ_{i>r} σ_i²) / √(Σ σ_i²), recorded per client per round
(ClientTask.info) from the singular values, which the state's factors carry (σ_i = ‖A_i‖·‖B_:,i‖
for either split, since the singular vectors are orthonormal).
"""
from __future__ import annotations

import torch

from . import register_method
from .base import Aggregate, AggregationMethod, ClientTask, GlobalState, Option, client_weights, module_names, slice_adapter
from .factors import stack, svd_factors

LEADING = 4  # leading singular values recorded per module per round


def singular_values(adapter_pair) -> torch.Tensor:
    a, b = adapter_pair
    return torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=0)


@register_method("flexlora")
class FlexLoRA(AggregationMethod):
    description = "average the full products Σ p_k s_k B_k A_k, hand each client its rank-r_k truncated SVD"
    citation = ("Bai et al., Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client "
                "Resources, NeurIPS 2024; code github.com/alibaba/FederatedScope (FlexLoRA)")
    options = {"split": Option("sqrt", "how the SVD becomes factors: 'sqrt' B = U√S, A = √S Vᵀ (balanced, this "
                                       "suite's default); 'official' B = U S, A = Vᵀ (the public FlexLoRA code)")}

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["split"] not in ("sqrt", "official"):
            raise ValueError(f"method_options: flexlora split must be 'sqrt' or 'official', got {self.opts['split']!r}")

    def configure(self, state, client):
        if not state.adapter:
            return ClientTask()
        kept = total = 0.0
        for pair in state.adapter.values():
            sq = singular_values(pair).double() ** 2
            kept, total = kept + float(sq[: client.rank].sum()), total + float(sq.sum())
        loss = ((total - kept) / total) ** 0.5 if total > 0 else 0.0
        return ClientTask(init=slice_adapter(state.adapter, client.rank, client.scaling),
                          info={"truncation_loss": max(loss, 0.0)})

    def aggregate(self, updates, state):
        weights = client_weights(updates)
        adapter, leading = {}, {}
        for name in module_names(updates):
            a_s, b_s = stack(updates, weights, name)
            a, b = svd_factors(b_s, a_s)  # ordered by singular value: a slice is a truncation
            if self.opts["split"] == "official":  # B = U S, A = Vᵀ: move √S from A's rows into B's columns
                root = torch.linalg.vector_norm(a, dim=1)
                nz = root > 0
                a = torch.where(nz[:, None], a / torch.where(nz, root, 1)[:, None], a)
                b = b * root
            adapter[name] = (a, b)
            leading[name] = [float(x) for x in singular_values((a, b))[:LEADING]]
        return Aggregate(GlobalState(adapter, state.round + 1),
                         metrics={"noise": 0.0, "singular_values": leading})
