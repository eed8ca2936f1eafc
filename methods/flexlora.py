"""FlexLoRA (Bai et al., NeurIPS 2024): average the full-size products, redistribute by SVD.

ΔW = Σ_k p_k s_k B_k A_k; the global model is base + ΔW; client k receives the rank-r_k truncated SVD
of ΔW (divided by its s_k), the best rank-r_k approximation (Eckart–Young). The SVD goes through the
stacked factors (methods.factors.factored_svd), never through the d_out × d_in matrix: the public
code's dense torch.svd per layer per round is what makes it slow at 7B scale.

What a client loses to the truncation is FlexLoRA's counterpart of FedAvg's aggregation noise:
‖ΔW − trunc_r(ΔW)‖_F / ‖ΔW‖_F = √(Σ_{i>r} σ_i²) / √(Σ σ_i²), recorded per client per round
(ClientTask.info) from the singular values, which the state's factors carry (σ_i = ‖A_i‖·‖B_:,i‖
for either split, since the singular vectors are orthonormal).

At scale (many clients: Σ r_k large next to the largest rank R), only the top-R triplets are computed,
through the factors at a cost linear in Σ r_k (methods.factors.svd_factors_top / top_svd's Krylov path);
the state is then [top-R SVD | the remainder ΔW − trunc_R(ΔW), factored as [B_s, −B_R][A_s; A_R]], still exactly
ΔW, and its first R rows/columns are what every client slices. `extra` records how many are SVD-ordered and each module's
‖ΔW‖_F² (for the truncation loss). A client larger than any seen so far gets its slice ordered on the fly.
"""
from __future__ import annotations

import torch

from . import register_method
from .base import Aggregate, AggregationMethod, ClientTask, GlobalState, Option, client_weights, module_names, slice_adapter
from .factors import krylov_pays, stack, svd_factors_top

LEADING = 4  # leading singular values recorded per module per round


def singular_values(adapter_pair) -> torch.Tensor:
    a, b = adapter_pair
    return torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=0)


@register_method("flexlora")
class FlexLoRA(AggregationMethod):
    description = "average the full products Σ p_k s_k B_k A_k, hand each client its rank-r_k truncated SVD"
    citation = ("Bai et al., Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client "
                "Resources, NeurIPS 2024; code github.com/alibaba/FederatedScope (FlexLoRA)")
    # The public code's split is the default: A = Vᵀ keeps orthonormal rows, the scale of a fresh LoRA A, so local
    # training moves as fast as from a standard init. The balanced split shrinks both factors to √σ when ΔW is
    # small, and with them both gradients: on the study preset (docs/study.md, homogeneous rank 8, seed 0) its
    # held-out loss after 3 rounds stayed at 1.68 against 1.30 with the official split.
    options = {"split": Option("official", "how the SVD becomes factors: 'official' B = U S, A = Vᵀ (the public "
                                           "FlexLoRA code, default); 'sqrt' B = U√S, A = √S Vᵀ (balanced)")}

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["split"] not in ("sqrt", "official"):
            raise ValueError(f"method_options: flexlora split must be 'sqrt' or 'official', got {self.opts['split']!r}")

    def configure(self, state, client):
        if not state.adapter:
            return ClientTask()
        adapter = state.adapter
        ordered = int(state.extra["ordered"]) if "ordered" in state.extra else None
        rows = next(iter(state.adapter.values()))[0].shape[0]
        if ordered is not None and ordered < min(client.rank, rows):  # a larger client than any seen: order now
            adapter = {}
            for name, (a, b) in state.adapter.items():
                a2, b2, k, _ = svd_factors_top(b, a, client.rank)
                adapter[name] = self._split(a2, b2, k)
        kept = total = 0.0
        for name, (a, b) in adapter.items():
            key = f"energy/{name}"
            # with the energy recorded, only the client's slice is read (the state can be Σr_k + R_max wide)
            sq = singular_values((a[: client.rank], b[:, : client.rank]) if key in state.extra else (a, b)).double() ** 2
            kept += float(sq[: client.rank].sum())
            total += float(state.extra[key]) if key in state.extra else float(sq.sum())
        loss = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
        return ClientTask(init=slice_adapter(adapter, client.rank, client.scaling),
                          info={"truncation_loss": loss})

    def _split(self, a, b, k):
        """svd_factors_top's balanced factors (B = U√S, A = √S Vᵀ) in the configured split, in place (they are
        svd_factors_top's own results)."""
        if self.opts["split"] == "sqrt":
            return a, b
        # B = U S, A = Vᵀ: move √S from A's rows into B's columns
        root = torch.linalg.vector_norm(a[:k], dim=1)
        nz = root > 0
        a[:k] = torch.where(nz[:, None], a[:k] / torch.where(nz, root, 1)[:, None], a[:k])
        b[:, :k] = b[:, :k] * root
        return a, b

    def aggregate(self, updates, state):
        weights = client_weights(updates)
        # the round's largest rank: a larger client sampled later gets its slice ordered in configure (no
        # method-instance state, so a resumed or replayed run hands out the same factors)
        top = max(u.rank for u in updates)
        spare = top if krylov_pays(sum(u.rank for u in updates), top) else 0
        adapter, leading, extra, ordered = {}, {}, {}, None
        for name in module_names(updates):
            # ordered by singular value: a slice [:r] with r ≤ k is a truncation; the top triplets are written
            # into `spare` leading and trailing rows of the stack (no copy of the factors)
            a_s, b_s = stack(updates, weights, name, spare=spare)
            a, b, k, energy = svd_factors_top(b_s, a_s, top, spare=spare)
            a, b = self._split(a, b, k)
            adapter[name] = (a, b)
            leading[name] = [float(x) for x in singular_values((a[:k], b[:, :k]))[:LEADING]]
            extra[f"energy/{name}"] = torch.tensor(energy, dtype=torch.float64)
            ordered = k if ordered is None else min(ordered, k)
        extra["ordered"] = torch.tensor(ordered)
        return Aggregate(GlobalState(adapter, state.round + 1, extra),
                         metrics={"noise": 0.0, "singular_values": leading})
