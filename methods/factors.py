"""Shared factor algebra: stacking, zero-padding, norms and SVD of a product without forming it."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import ClientUpdate


def stack(updates: list[ClientUpdate], weights: list[float], name: str) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking: A_s = [A_1; …; A_K], B_s = [p_1 s_1 B_1, …, p_K s_K B_K], so that
    B_s @ A_s = Σ_k p_k s_k B_k A_k exactly, whatever the ranks."""
    a_s = torch.cat([u.factors[name][0] for u in updates], dim=0)
    # B_s is built as the transpose of a row-major m × d_out block: the Gram matrix B_sᵀB_s that
    # factored_svd takes first is then a product in the fast memory layout
    b_s = torch.cat([(p * u.scaling) * u.factors[name][1].mT for u, p in zip(updates, weights)], dim=0).mT
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


def _basis(x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """(P, T, R) with Q = P @ T orthonormal and x = Q R (T None: Q = P). See orthonormal_basis.

    CholeskyQR2: R₁ from the Cholesky factor of xᵀx, P = x R₁⁻¹ (nearly orthonormal), then R₂ from PᵀP,
    T = R₂⁻¹ and R = R₂ R₁. The triangular inverses are m×m and the products with x are plain matrix
    products, the fastest kernels there are. Keeping Q as P @ T lets a caller that only needs Q @ M form
    P @ (T @ M): one n×m product less (T is within 1/8 of orthogonal, so nothing is lost by the order).
    The tall matrices are handled through their transposes (xt = xᵀ, m×n), in which the Gram products
    run in the faster layout when xt is row-major, as stack() and Aᵀ of a row-major A provide.
    """
    n, m = x.shape
    if n >= m and m > 0:
        xt = x.mT
        eye = torch.eye(m, dtype=x.dtype, device=x.device)
        l1, info = torch.linalg.cholesky_ex(xt @ xt.mT)
        if int(info) == 0:
            pt = torch.linalg.solve_triangular(l1, eye, upper=False) @ xt  # (x R₁⁻¹)ᵀ = R₁⁻ᵀ xᵀ, R₁ = L₁ᵀ
            g2 = pt @ pt.mT
            if float(torch.linalg.matrix_norm(g2 - eye, ord="fro")) <= 0.125:
                l2, info = torch.linalg.cholesky_ex(g2)
                if int(info) == 0:
                    return pt.mT, torch.linalg.solve_triangular(l2.mT, eye, upper=True), l2.mT @ l1.mT
    q, r = torch.linalg.qr(x, mode="reduced")
    return q, None, r


def orthonormal_basis(x: Tensor) -> tuple[Tensor, Tensor]:
    """x = Q R (x: n×m): Q with orthonormal columns, R upper triangular; reduced, as torch.linalg.qr.

    CholeskyQR2 when x is well enough conditioned, Householder QR otherwise. CholeskyQR2 is two passes of
    (Gram matrix, Cholesky, triangular inverse, product), all matrix-matrix work, well under half of
    Householder's time for the 4096×160 stacks of a FlexLoRA round; it is as accurate as Householder when
    κ(x)² u ≪ 1 (Yamamoto et al., 2015), and the test for that is free: the first pass's PᵀP must be within
    1/8 of I (its error is ≈ κ² u). Real stacks are often ill-conditioned (clients train rows of one shared
    initial A, FlexLoRA hands every client a slice of the same factors), and a rank-deficient one makes the
    Cholesky fail: both take the Householder path (as do wide x, n < m), so the answer never depends on which
    path ran.
    """
    p, t, r = _basis(x)
    return (p if t is None else p @ t), r


def factored_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of B @ A (B: d_out×m, A: m×d_in) through the factors.

    Orthonormal bases of B and of Aᵀ (orthonormal_basis), then the SVD of the small core R_b R_aᵀ:
    O((d_out + d_in) m² + m³) instead of O(d_out d_in min(d_out, d_in)). Returns U (d_out×q), S (q),
    V (d_in×q) with B A = U diag(S) Vᵀ, q = min(m, d_out, d_in), singular values in descending order.
    """
    return _factored_svd(b, a, root_scaled=False)


def svd_factors(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(A', B') with B' A' = B A, B' = U √S, A' = √S Vᵀ, ordered by singular value, so that the first
    r rows/columns are the best rank-r approximation (Eckart–Young)."""
    u_root, _, v_root = _factored_svd(b, a, root_scaled=True)
    return v_root.T, u_root


def _factored_svd(b: Tensor, a: Tensor, root_scaled: bool) -> tuple[Tensor, Tensor, Tensor]:
    # root_scaled: return U √S and V √S, the √S applied to the small core factors, not to the tall results
    p_b, t_b, r_b = _basis(b)
    p_a, t_a, r_a = _basis(a.T)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    v_c = vh_c.T
    if root_scaled:
        root = s.sqrt()
        u_c, v_c = u_c * root, v_c * root
    return (p_b @ (u_c if t_b is None else t_b @ u_c)), s, (p_a @ (v_c if t_a is None else t_a @ v_c))
