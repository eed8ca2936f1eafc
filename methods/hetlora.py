"""HetLoRA (Cho et al., EMNLP 2024): heterogeneous ranks, zero-padding, sparsity-weighted aggregation,
truncation, and rank self-pruning on the clients.

Server, per module:  w_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F   (the "sparsity" weight: a client whose
update is larger counts more, whatever its data size)
                     Ā = Σ w_k pad(A_k),  B̄ = Σ w_k s_k pad(B_k)   (zero-padded to the largest rank)
and client k restarts from the truncation (Ā[:r_k], B̄[:, :r_k] / s_k).
Client k (rank r, decay γ < 1, tail t = rows/columns ⌊γr⌋..r−1) adds to its loss
                     λ Σ_modules ‖B_t A_t‖_F
and after local training prunes itself to rank max(⌊γr⌋, min_rank), sending only the first rows/columns,
when that tail norm ended smaller than it started (the tail matters less and less). The server then
configures it at the new rank from the next round on.

Checked against the paper's Figure 2 (zero-padding, weights ‖ΔW_k‖/Z with ΔW_k = B_k A_k, truncation); not
verified (no public code, full text not reachable here): the regularizer's form, the pruning rule, γ and λ.
The preset `hetlora-pruning` is one where clients do prune. Choices where the paper leaves room, and why:
- weights per module, from that module's own ‖ΔW_k‖_F (the paper's Figure 2 draws one LoRA module);
  `weighting=examples` gives FedAvg's n_k weights instead, for an ablation;
- the tail norm is ‖B_t A_t‖_F, the norm of the tail's contribution to the update (the regularizer as
  written), computed through the r_t × r_t Gram matrices, never as a d_out × d_in matrix;
- "smaller than it started" compares the end of local training with its start (the tail of the global
  slice the client received; 0 in a client's first round, so nobody prunes then);
- defaults γ = 0.99, λ = 0.01, min_rank = 1: this suite's, not the paper's values; γ = 0.99 prunes one rank at a
  time for the ranks of this suite (⌊0.99 r⌋ = r − 1 for r ≤ 100), and at these defaults a few local steps never
  shrink the tail, so nobody prunes (docs/methods.md).
The aggregation noise recorded is against the method's own weights: ‖B̄Ā − Σ w_k s_k B_k A_k‖ / ‖Σ w_k s_k B_k A_k‖.
A client's own model is base + s_k B̄[:, :r_k] Ā[:r_k] at its current (possibly pruned) rank: what it
starts the next round from (personalized).
"""
from __future__ import annotations

import math

import torch

from . import register_method
from .base import (Aggregate, AggregationMethod, ClientTask, GlobalState, Option, client_weights, module_names,
                   slice_adapter)
from .factors import aggregation_noise, padded_average, product_fro_norm, stack


def tail_norm(a: torch.Tensor, b: torch.Tensor, start: int) -> torch.Tensor:
    """‖B[:, start:] A[start:]‖_F via Σ (B_tᵀB_t) ⊙ (A_t A_tᵀ); differentiable, gradient 0 at 0 (clamped)."""
    a_t, b_t = a[start:], b[:, start:]
    sq = ((b_t.mT @ b_t) * (a_t @ a_t.mT)).sum()
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


@register_method("hetlora")
class HetLoRA(AggregationMethod):
    description = ("zero-padded average weighted by each client's update norm, truncation to each client's rank, "
                   "client rank self-pruning")
    citation = ("Cho et al., Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models, "
                "EMNLP 2024 (arXiv 2401.06432); no public code")
    averages_factors = True
    personalized = True
    options = {
        "gamma": Option(0.99, "decay γ: the tail is ranks ⌊γr⌋..r−1 and a pruning client keeps ⌊γr⌋ (the paper's "
                              "decay factor; 0.99 is this suite's default, not the paper's value: unverified)"),
        "lam": Option(0.01, "weight λ of the tail regularizer λ Σ ‖B_t A_t‖_F added to the client's loss"),
        "min_rank": Option(1, "no client prunes below this rank"),
        "weighting": Option("norm", "'norm': w_k ∝ ‖s_k B_k A_k‖_F per module (the paper); 'examples': p_k ∝ n_k"),
    }

    def __init__(self, **options):
        super().__init__(**options)
        if not 0 < self.opts["gamma"] < 1:
            raise ValueError(f"method_options: hetlora gamma must be in (0, 1), got {self.opts['gamma']}")
        if self.opts["lam"] < 0 or self.opts["min_rank"] < 1:
            raise ValueError("method_options: hetlora needs lam ≥ 0 and min_rank ≥ 1")
        if self.opts["weighting"] not in ("norm", "examples"):
            raise ValueError(f"method_options: hetlora weighting must be 'norm' or 'examples', got {self.opts['weighting']!r}")

    def _tail_start(self, rank: int) -> int | None:
        """First tail index, or None when this rank cannot prune."""
        keep = max(math.floor(self.opts["gamma"] * rank), self.opts["min_rank"])
        return keep if keep < rank else None

    def configure(self, state, client):
        return ClientTask(init=slice_adapter(state.adapter, client.rank, client.scaling) if state.adapter else None)

    # ---- client side -----------------------------------------------------------------------------
    def client_penalty(self, factors, task):
        if self.opts["lam"] == 0:
            return None
        total = None
        for a, b in factors.values():
            start = self._tail_start(a.shape[0])
            if start is None:
                return None
            t = tail_norm(a, b, start)
            total = t if total is None else total + t
        return None if total is None else self.opts["lam"] * total

    def client_finish(self, factors, task):
        rank = next(iter(factors.values()))[0].shape[0]
        start = self._tail_start(rank)
        if start is None:
            return factors
        with torch.no_grad():
            end = sum(float(tail_norm(a.double(), b.double(), start)) for a, b in factors.values())
            began = 0.0
            for name, (a0, b0) in (task.init or {}).items():
                if a0 is not None and b0 is not None and b0.shape[1] > start and a0.shape[0] > start:
                    r = min(a0.shape[0], b0.shape[1])
                    began += float(tail_norm(a0[:r].double(), b0[:, :r].double(), start))
        if end < began:  # the tail lost weight during local training: drop it
            return {name: (a[:start].clone(), b[:, :start].clone()) for name, (a, b) in factors.items()}
        return factors

    # ---- server side -----------------------------------------------------------------------------
    def aggregate(self, updates, state):
        p = client_weights(updates)
        names = module_names(updates)
        adapter, exact, mean_w = {}, {}, [0.0] * len(updates)
        for name in names:
            if self.opts["weighting"] == "norm":
                norms = [u.scaling * product_fro_norm(u.factors[name][1].double(), u.factors[name][0].double())
                         for u in updates]
                total = sum(norms)
                w = [x / total for x in norms] if total > 0 else p
            else:
                w = p
            adapter[name] = padded_average(updates, w, name)
            exact[name] = stack(updates, w, name)
            mean_w = [acc + x / len(names) for acc, x in zip(mean_w, w)]
        overall, noise = aggregation_noise(adapter, exact)
        return Aggregate(GlobalState(adapter, state.round + 1),
                         metrics={"noise": overall, "noise_per_module": noise,
                                  "weights": {str(u.client_id): x for u, x in zip(updates, mean_w)},
                                  "ranks": {str(u.client_id): u.rank for u in updates}})
