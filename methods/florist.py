"""FLoRIST (Ramesh & Dass, 2025, arXiv 2506.09199): SVD through the stacked factors, one global rank chosen
by an energy threshold τ, merged into the base.

    A_s = [A_1; …; A_K],  B_s = [p_1 s_1 B_1, …, p_K s_K B_K]            (FLoRA's stack: B_s A_s = ΔW exactly)
    B_s A_s = U diag(σ) Vᵀ  through the factors (never the d_out × d_in ΔW)
    k* = min{k : Σ_{i≤k} σ_i² ≥ τ Σ_i σ_i²}                              (per module, per round)
    merge = (A = V_{k*}ᵀ, B = U_{k*} diag(σ_{≤k*}))   added to the base; fresh adapters next round
so the global model is base + the rank-k* truncation of ΔW, and every client downloads k*(d_in + d_out)
numbers per module instead of FLoRA's whole stack.

From the public code (fed_utils/model_aggregation.py, `florist`): the stack weights the A's by p_k and
concatenates the B's; the SVD goes through the stacked B and A separately (our factored_svd is that
pipeline, with orthonormal bases); the rank is the first index whose cumulative σ² fraction reaches the
threshold; B = U_k S_k, A = V_kᵀ; the result is merged into the base (`merge_and_unload`) and the next
round starts fresh adapters at each client's rank. Its default threshold is 0.9 (FLoRIST-O and FLoRIST-E
are the same rule at different τ, 0.80–0.99 in its README). Not exact: the energy beyond k* is dropped;
the round records it as `noise` = √(1 − retained), with the rank and retained energy per module.
Heterogeneous ranks: yes (stacking).
"""
from __future__ import annotations

import torch

from . import register_method
from .base import Aggregate, AggregationMethod, ClientTask, GlobalState, Option, client_weights, module_names
from .factors import stack, svd_for_energy


@register_method("florist")
class FLoRIST(AggregationMethod):
    description = "SVD of the stacked factors, one global rank per module by energy threshold τ, merged into the base"
    citation = ("Ramesh & Dass, FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated "
                "Fine-Tuning of Large Language Models, 2025 (arXiv 2506.09199, MLSys 2026); code github.com/Anonymous-user-00/FLoRIST")
    merges_into_base = True
    options = {"tau": Option(0.9, "energy threshold τ: the global rank keeps at least this fraction of Σ σ_i² "
                                  "(public code default 0.9)")}
    # the public main.py's defaults: lora_r 16, lora_alpha 32 (heterogeneous runs: α = 2 r_k), lr 3e-4,
    # 3 local epochs, cutoff 512, q/v targets, all clients every round
    recipe = {"rank": 16, "lora_alpha": 32.0, "lr": 3e-4, "local_epochs": 3.0, "cutoff_len": 512,
              "client_fraction": 1.0, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05}

    def __init__(self, **options):
        super().__init__(**options)
        if not 0 < self.opts["tau"] <= 1:
            raise ValueError(f"method_options: florist tau must be in (0, 1], got {self.opts['tau']}")

    def configure(self, state, client):
        return ClientTask()  # fresh adapters: the previous rounds live in the base weights

    def aggregate(self, updates, state):
        weights = client_weights(updates)
        tau = self.opts["tau"]
        merge, ranks, retained = {}, {}, {}
        kept_sq = total_sq = 0.0
        first = max(u.rank for u in updates)
        for name in module_names(updates):
            a_s, b_s = stack(updates, weights, name)
            u, s, v, energy = svd_for_energy(b_s, a_s, tau, first=first)
            cum = torch.cumsum(s.double() ** 2, 0)
            k = int((cum < tau * energy).sum()) + 1 if energy > 0 else 1
            k = min(k, s.numel())
            merge[name] = (v[:, :k].mT.contiguous(), u[:, :k] * s[:k])
            ranks[name] = k
            retained[name] = float(cum[k - 1] / energy) if energy > 0 else 1.0
            kept_sq, total_sq = kept_sq + float(cum[k - 1]), total_sq + energy
        noise = max(1.0 - kept_sq / total_sq, 0.0) ** 0.5 if total_sq > 0 else 0.0
        return Aggregate(GlobalState({}, state.round + 1), merge=merge,
                         metrics={"noise": noise, "rank_per_module": ranks, "retained_energy": retained,
                                  "global_rank_mean": sum(ranks.values()) / len(ranks)})
