"""FedSVD (Lee et al., NeurIPS 2025): clients train only B with A fixed; the server averages B and re-factorizes the
aggregated product by SVD, so that the next round's A is orthonormal and follows the update's principal directions.

Every client holds the same A (the server's, or the round's shared draw in round 1), so, as in FFA-LoRA,
    B̄ = Σ p_k s_k pad(B_k)   ⇒   B̄ A = Σ p_k s_k B_k A[:r_k]            exactly, for any ranks.
Then, each round (every `svd_every` rounds; the public code's --recalculate-svd-period, default 1):
    B̄ A = U S Vᵀ  (thin SVD through the factors, float64),   A' = Vᵀ (orthonormal rows),   B' = U S
so that B' A' = B̄ A: the re-factorization changes the parametrization, never the model (a rank beyond
min(d_out, d_in) keeps its rows, at zero). Global model: base + B' A'.
A client of rank r_k starts from (A'[:r_k], B'[:, :r_k] / s_k): the top r_k singular directions, the best rank-r_k
approximation of the global update (Eckart–Young); with one rank for all (the paper's setting) it is the whole of it.

As the public code (github.com/seanie12/fed-svd: `model=ffa` freezes lora_A, the server averages the B's, then
`reinit_lora` sets lora_A = Uhᵀ[:r] and lora_B = V[:, :r] diag(S[:r]) from torch.linalg.svd(lora_B @ lora_A)).
Round 1's clients upload their (frozen, shared) A once, as in FFA-LoRA, so that the server can form B̄ A; after
that only B travels up, and the new A travels down each round with B. `a_mismatch` checks the A's received;
`orthogonality` is max |A'A'ᵀ − I|.
"""
from __future__ import annotations

import torch

from . import register_method
from .base import Option
from .factors import factored_svd
from .ffa_lora import FFALoRA


@register_method("fedsvd")
class FedSVD(FFALoRA):  # its clients and its B-step are FFA-LoRA's
    description = ("A fixed, only B trained and averaged (exact); the server re-factorizes B̄A by SVD each round: "
                   "A = orthonormal right singular vectors, B = U S")
    citation = ("Lee et al., FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA, NeurIPS 2025 "
                "(arXiv 2505.12805); code github.com/seanie12/fed-svd")
    options = {"svd_every": Option(1, "re-factorize every this many rounds (the public code's --recalculate-svd-period)")}
    # the public code's scripts/run_non_dp.sh and run_dp.sh: lora_rank 8, lora_alpha 8 (its SGD lr 0.5 is not AdamW's)
    recipe = {"rank": 8, "lora_alpha": 8.0}

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["svd_every"] < 1:
            raise ValueError(f"method_options: fedsvd svd_every must be ≥ 1, got {self.opts['svd_every']}")

    def aggregate(self, updates, state):
        """FFA-LoRA's exact step (B̄ over the shared A), then the re-factorization of B̄A."""
        out = super().aggregate(updates, state)
        refactor = (state.round + 1) % self.opts["svd_every"] == 0
        ortho = 0.0
        if refactor:
            for name, (a, b) in out.state.adapter.items():
                u_, s_, v_ = factored_svd(b.double(), a.double())
                rows, q = a.shape[0], s_.shape[0]   # q < rows only when the rank exceeds min(d_out, d_in)
                a, b = a.new_zeros(rows, a.shape[1], dtype=torch.float64), b.new_zeros(b.shape[0], rows, dtype=torch.float64)
                a[:q], b[:, :q] = v_.mT, u_ * s_
                eye = torch.eye(q, dtype=a.dtype, device=a.device)
                ortho = max(ortho, float((a[:q] @ a[:q].mT - eye).abs().max()))
                out.state.adapter[name] = (a, b)
        out.metrics.update(refactorized=int(refactor), orthogonality=ortho)
        return out
