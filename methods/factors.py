"""Shared factor algebra: stacking, zero-padding, norms and SVD of a product without forming it."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import ClientUpdate


def stack(updates: list[ClientUpdate], weights: list[float], name: str) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking: A_s = [A_1; …; A_K], B_s = [p_1 s_1 B_1, …, p_K s_K B_K], so that
    B_s @ A_s = Σ_k p_k s_k B_k A_k exactly, whatever the ranks."""
    a_s = torch.cat([u.factors[name][0] for u in updates], dim=0)
    b_s = torch.cat([p * u.scaling * u.factors[name][1] for u, p in zip(updates, weights)], dim=1)
    return a_s, b_s


def pad_rank(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad A (r×d_in) and B (d_out×r) to `rank` (HetLoRA-style)."""
    r = a.shape[0]
    if r == rank:
        return a, b
    a_p = torch.zeros(rank, a.shape[1], dtype=a.dtype, device=a.device)
    b_p = torch.zeros(b.shape[0], rank, dtype=b.dtype, device=b.device)
    a_p[:r] = a
    b_p[:, :r] = b
    return a_p, b_p


def product_fro_norm(b: Tensor, a: Tensor) -> float:
    """‖B @ A‖_F without forming the d_out × d_in matrix.

    QR of B and of Aᵀ: B A = Q_b (R_b R_aᵀ) Q_aᵀ with orthonormal Q's, so ‖B A‖_F = ‖R_b R_aᵀ‖_F, an
    m×m matrix. (The shortcut tr((BᵀB)(AAᵀ)) squares the condition number and cancels
    catastrophically when B A is a small difference, e.g. the aggregation noise: floor √eps, not 0.)
    """
    _, r_b = torch.linalg.qr(b, mode="reduced")
    _, r_a = torch.linalg.qr(a.T, mode="reduced")
    return float(torch.linalg.matrix_norm(r_b @ r_a.T))


def factored_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of B @ A (B: d_out×m, A: m×d_in) through the factors.

    QR of B and of Aᵀ, then the SVD of the small core R_b R_aᵀ: O((d_out + d_in) m² + m³) instead
    of O(d_out d_in min(d_out, d_in)). Returns U (d_out×q), S (q), V (d_in×q) with B A = U diag(S) Vᵀ,
    q = min(m, d_out, d_in), singular values in descending order.
    """
    q_b, r_b = torch.linalg.qr(b, mode="reduced")
    q_a, r_a = torch.linalg.qr(a.T, mode="reduced")
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u_c, s, q_a @ vh_c.T


def svd_factors(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(A', B') with B' A' = B A, B' = U √S, A' = √S Vᵀ, ordered by singular value, so that the first
    r rows/columns are the best rank-r approximation (Eckart–Young)."""
    u, s, v = factored_svd(b, a)
    root = s.sqrt()
    return root[:, None] * v.T, u * root[None, :]
