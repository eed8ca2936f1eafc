"""LoRA-FAIR (Bian et al., ICCV 2025): FedAvg of A and B, then a server correction ΔB so that
(B̄ + ΔB) Ā ≈ ΔW = Σ p_k s_k B_k A_k, and (Ā, B̄ + ΔB) initializes every client's next round.

    ΔB = argmin_ΔB  S(ΔW, (B̄ + ΔB) Ā) + λ ‖ΔB‖_F            (the paper's Eq. 8)
    S(X, Y) = 1 − ⟨X, Y⟩_F / (‖X‖_F ‖Y‖_F)                     (cosine dissimilarity)
The base weights stay as they are: the global model is base + (B̄ + ΔB) Ā, not exact; what is left,
‖(B̄ + ΔB)Ā − ΔW‖ / ‖ΔW‖, is the round's `noise` (`noise_fedavg` is the same before the correction,
`cos_before` / `cos_after` the similarity the correction raised).

Choices, and why:
- S is the cosine *dis*similarity: the paper names S "cosine similarity" in a minimization; minimizing
  1 − cos aligns the direction of the corrected update with ΔW, and λ‖ΔB‖ keeps B̄' near B̄ (its stated
  purpose: the average stays the clients' initialization). λ = 0.01, the paper's default.
- ‖ΔB‖ is measured in the clients' own units (B without the scaling): the effective ΔB divided by
  s̄ = Σ p_k s_k, so that λ means what it meant in the paper whatever α/r is (equal ranks: s̄ = s).
- The paper solves Eq. 8 with SGD on the server (steps and lr not given); we minimize the same objective
  with L-BFGS (strong Wolfe line search, float64, `iters` iterations from ΔB = 0): deterministic, and it
  reaches the minimum that SGD approaches.
- Everything goes through small matrices: ⟨ΔW, XĀ⟩ = Σ X ⊙ (B_s (A_s Āᵀ)), ‖XĀ‖² = Σ (XᵀX) ⊙ (ĀĀᵀ),
  ‖ΔW‖ from the factors: O(d_out r²) per evaluation, never a d_out × d_in matrix.
- Heterogeneous ranks (the paper's clients share one rank): zero-padding as fedavg-lora; the correction
  works on the padded rank-r_max pair.
What it does, measured (tiny preset, 3 rounds): cos rises from 0.978 to 0.99998 in round 1, and the
Frobenius error ‖(B̄+ΔB)Ā − ΔW‖/‖ΔW‖ rises from 0.21 to 0.33: the cosine is blind to scale, so the
correction fixes the direction of the update, not its size. `similarity=frobenius` minimizes the
Frobenius error itself (same regularizer), for comparison.
"""
from __future__ import annotations

import contextlib

import torch

from . import register_method
from .base import Aggregate, AggregationMethod, GlobalState, Option, client_weights, module_names
from .factors import aggregation_noise, padded_average, product_fro_norm, stack


@contextlib.contextmanager
def one_thread():
    """The correction is a chain of tiny (d_out × r) operations: with OpenMP threads each one pays a fork/join,
    50× slower on a busy 2-core CPU than one thread (measured); the previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def correction(a_bar: torch.Tensor, b_bar: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor, lam: float,
               unit: float, iters: int, similarity: str = "cosine") -> tuple[torch.Tensor, float, float]:
    """ΔB minimizing S(B_s A_s, (B̄ + ΔB) Ā) + lam ‖ΔB‖_F / unit, S = 1 − cos ("cosine") or the squared relative
    Frobenius error ("frobenius"); returns (ΔB, cos before, cos after)."""
    a_bar64, b_bar64 = a_bar.double(), b_bar.double()
    target = b_s.double() @ (a_s.double() @ a_bar64.mT)          # B_s A_s Āᵀ: ⟨ΔW, X Ā⟩ = Σ X ⊙ target
    gram = a_bar64 @ a_bar64.mT                                   # Ā Āᵀ
    norm_w = product_fro_norm(b_s.double(), a_s.double())
    if norm_w == 0 or float(gram.diagonal().sum()) == 0:
        return torch.zeros_like(b_bar), 1.0, 1.0

    def cos(x):
        sq = ((x.mT @ x) * gram).sum().clamp_min(torch.finfo(torch.float64).tiny)
        return (x * target).sum() / (norm_w * sq.sqrt())

    delta = torch.zeros_like(b_bar64, requires_grad=True)
    opt = torch.optim.LBFGS([delta], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15, history_size=20)

    def dissimilarity(x):
        if similarity == "cosine":
            return 1 - cos(x)
        sq = ((x.mT @ x) * gram).sum()                            # ‖XĀ − ΔW‖² / ‖ΔW‖², expanded
        return (sq - 2 * (x * target).sum() + norm_w ** 2) / norm_w ** 2

    def closure():
        opt.zero_grad()
        loss = dissimilarity(b_bar64 + delta) + lam * torch.linalg.vector_norm(delta) / unit
        loss.backward()
        return loss

    with torch.no_grad():
        before = float(cos(b_bar64))
    with one_thread():
        opt.step(closure)
    with torch.no_grad():
        after = float(cos(b_bar64 + delta))
    return delta.detach().to(b_bar.dtype), before, after


@register_method("lora-fair")
class LoRAFAIR(AggregationMethod):
    description = "FedAvg of A and B, then a server correction ΔB with (B̄+ΔB)Ā ≈ Σ p_k s_k B_k A_k, used as next init"
    citation = ("Bian et al., LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization "
                "Refinement, ICCV 2025 (arXiv 2411.14961); code listed at github.com/jmbian/LoRA-FAIR (not checked here)")
    averages_factors = True
    options = {"lam": Option(0.01, "weight λ of ‖ΔB‖ in the correction's objective (the paper's default 0.01)"),
               "iters": Option(100, "L-BFGS iterations for the correction"),
               "similarity": Option("cosine", "S in the objective: 'cosine' (1 − cos, the paper) or 'frobenius' "
                                              "(‖(B̄+ΔB)Ā − ΔW‖² / ‖ΔW‖², an ablation that also fixes the scale)"),
               "preserve_norm": Option(False, "rescale the corrected B̄' so that ‖B̄'Ā‖ = ‖ΔW‖ per module (cosine only: "
                                              "S is scale-free, so S is unchanged; an option beyond the paper)")}
    # the paper's default LoRA rank; its client optimizer (SGD, lr 0.01, batch 128) is not this engine's AdamW
    recipe = {"rank": 16}

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["lam"] < 0 or self.opts["iters"] < 1:
            raise ValueError("method_options: lora-fair needs lam ≥ 0 and iters ≥ 1")
        if self.opts["preserve_norm"] and self.opts["similarity"] != "cosine":
            raise ValueError("method_options: lora-fair preserve_norm needs similarity=cosine (the Frobenius error "
                             "is not scale-free)")
        if self.opts["similarity"] not in ("cosine", "frobenius"):
            raise ValueError(f"method_options: lora-fair similarity must be 'cosine' or 'frobenius', "
                             f"got {self.opts['similarity']!r}")

    def aggregate(self, updates, state):
        weights = client_weights(updates)
        unit = sum(p * u.scaling for u, p in zip(updates, weights))   # s̄: ‖ΔB‖ in the clients' units
        averaged, corrected, exact, cos = {}, {}, {}, {}
        norms = [0.0, 0.0, 0.0]  # Σ over modules of ‖ΔW‖², ‖B̄Ā‖², ‖B̄'Ā‖²
        for name in module_names(updates):
            a_bar, b_bar = padded_average(updates, weights, name)
            a_s, b_s = stack(updates, weights, name)
            delta, before, after = correction(a_bar, b_bar, a_s, b_s, self.opts["lam"], unit, self.opts["iters"],
                                              self.opts["similarity"])
            b_new = b_bar + delta
            target = product_fro_norm(b_s.double(), a_s.double())
            size = product_fro_norm(b_new.double(), a_bar.double())
            if self.opts["preserve_norm"] and size > 0:
                b_new = b_new * (target / size)
            averaged[name], corrected[name], exact[name] = (a_bar, b_bar), (a_bar, b_new), (a_s, b_s)
            cos[name] = (before, after)
            norms = [norms[0] + target ** 2, norms[1] + product_fro_norm(b_bar.double(), a_bar.double()) ** 2,
                     norms[2] + product_fro_norm(b_new.double(), a_bar.double()) ** 2]
        noise, per_module = aggregation_noise(corrected, exact)
        noise_fedavg, _ = aggregation_noise(averaged, exact)
        n = len(cos)
        return Aggregate(GlobalState(corrected, state.round + 1),
                         metrics={"noise": noise, "noise_per_module": per_module, "noise_fedavg": noise_fedavg,
                                  "cos_before": sum(c[0] for c in cos.values()) / n,
                                  "cos_after": sum(c[1] for c in cos.values()) / n,
                                  # ‖B̄'Ā‖ / ‖ΔW‖ and ‖B̄Ā‖ / ‖ΔW‖ over all modules: how much the update shrank
                                  "norm_ratio": (norms[2] / norms[0]) ** 0.5 if norms[0] > 0 else 1.0,
                                  "norm_ratio_fedavg": (norms[1] / norms[0]) ** 0.5 if norms[0] > 0 else 1.0})
