"""Fed-SB (Singhal et al., 2025): LoRA-SB in federation. Each client's adapter is s · B R A with B and A fixed and
shared; clients train only the r×r core R, and the server averages it:
    R̄ = Σ p_k s_k R_k   ⇒   B R̄ A = Σ p_k s_k B R_k A          exactly (the product is linear in R),
and the upload is r² numbers per module, whatever the number of clients. Global model: base + B R̄ A.

B, A and the first core come from a truncated SVD, as LoRA-SB's initialization (B = U_r, A = V_rᵀ, R from Σ_r):
LoRA-SB takes the SVD of an estimate of the first full fine-tuning update (its gradient on a batch); here the estimate
is the first round's federated LoRA update. Round 1 is a plain LoRA round (clients train A and B from peft's init
and upload both); the server forms ΔW = Σ p_k s_k B_k A_k exactly (stacked) and keeps its top r triplets:
    ΔW ≈ U_r S_r V_rᵀ,   B = U_r,   A = V_rᵀ,   R̄ = S_r        (`noise`: the energy beyond r, √(Σ_{i>r} σ²/Σ σ²)).
From round 2 every round is exact (`noise` 0). A client's core starts at R̄ / s_k; peft's lora_A slot becomes
x ↦ R (A x) with A frozen and R an r×r nn.Linear (bench/client.py), so the client trains exactly R and nothing else,
and DP-SGD's per-example clipping and noise apply to R as to any trained factor.

Choices, and why: the gradient-SVD initialization is replaced by the first round's update (the engine's clients
have no full-weight gradient step; the first round plays its part at the cost of one r·(d_in + d_out) upload).
Heterogeneous ranks: R is the largest rank of round 1's clients; a client of rank r_k trains the top-left r_k × r_k
block of the core with A[:r_k], B[:, :r_k], and R̄ = Σ p_k s_k pad(R_k) is still exactly the average of the
clients' models (B pad(R_k) A = B[:, :r_k] R_k A[:r_k]). A client of a rank above R gets zero rows of A and columns
of B there: those entries of its core get no gradient and stay zero. The server state keeps A and R̄ in `extra`,
and (R̄ A, B) as the adapter, so that the export and every reader of the global adapter see base + B R̄ A.
"""
from __future__ import annotations

import torch

from . import register_method
from .base import Aggregate, AggregationMethod, ClientTask, GlobalState, client_weights, module_names
from .factors import factored_svd, stack


def fit(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """t cut or zero-padded to n along dim (0: rows, 1: columns); a copy."""
    if t.shape[dim] >= n:
        return (t[:n] if dim == 0 else t[:, :n]).clone()
    shape = list(t.shape)
    shape[dim] = n
    out = t.new_zeros(shape)
    if dim == 0:
        out[: t.shape[0]] = t
    else:
        out[:, : t.shape[1]] = t
    return out


@register_method("fed-sb")
class FedSB(AggregationMethod):
    description = ("clients train only an r×r core R between fixed B and A (LoRA-SB); averaging R is exact and the "
                   "upload is r² per module; B, A from the SVD of round 1's update")
    citation = ("Singhal et al., Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in "
                "(Private) Federated LoRA Fine-Tuning, 2025 (arXiv 2502.15436); code github.com/CERT-Lab/fed-sb "
                "(not checked here)")
    # its clients train R in a module between A and B, which the batched forward (stacked A and B) does not model
    batchable = False

    def configure(self, state, client):
        if not state.extra:  # round 1: a plain LoRA round, from peft's init
            return ClientTask()
        r = client.rank
        init = {name: (fit(state.extra[f"A/{name}"], r, 0), fit(b, r, 1)) for name, (_, b) in state.adapter.items()}
        core = {name: fit(fit(state.extra[f"R/{name}"], r, 0), r, 1) / client.scaling for name in state.adapter}
        return ClientTask(init=init, train="R", upload="R", core=core)

    def aggregate(self, updates, state):
        weights = client_weights(updates)
        adapter, extra, lost, total = {}, {}, 0.0, 0.0
        for name in module_names(updates):
            if not state.extra:
                rank = max(u.rank for u in updates)
                a_s, b_s = stack(updates, weights, name)
                u, s, v = factored_svd(b_s.double(), a_s.double())
                k = min(rank, s.shape[0])
                a0 = torch.zeros(rank, a_s.shape[1], dtype=torch.float64, device=a_s.device)
                b0 = torch.zeros(b_s.shape[0], rank, dtype=torch.float64, device=b_s.device)
                core = torch.zeros(rank, rank, dtype=torch.float64, device=a_s.device)
                a0[:k], b0[:, :k], core[:k, :k] = v[:, :k].mT, u[:, :k], torch.diag(s[:k])
                lost, total = lost + float((s[k:] ** 2).sum()), total + float((s ** 2).sum())
            else:
                a0, b0 = state.extra[f"A/{name}"], state.adapter[name][1]
                top = a0.shape[0]
                core = sum(p * u.scaling * fit(fit(u.factors[name][0].to(a0.dtype), top, 0), top, 1)
                           for u, p in zip(updates, weights))
            adapter[name] = (core @ a0, b0)
            extra[f"A/{name}"], extra[f"R/{name}"] = a0, core
        noise = (lost / total) ** 0.5 if total > 0 else 0.0
        return Aggregate(GlobalState(adapter, state.round + 1, extra), metrics={"noise": noise})
