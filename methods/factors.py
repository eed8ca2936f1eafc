"""Shared factor algebra: stacking, zero-padding, norms and SVD of a product without forming it."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import ClientUpdate


def stack(updates: list[ClientUpdate], weights: list[float], name: str, spare: int = 0) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking: A_s = [A_1; …; A_K], B_s = [p_1 s_1 B_1, …, p_K s_K B_K], so that
    B_s @ A_s = Σ_k p_k s_k B_k A_k exactly, whatever the ranks. `spare` zero rows of A_s / columns of B_s
    lead the stack and `spare` more trail it (the product is unchanged): svd_factors_top writes the top triplets
    and the remainder's correction there in place."""
    a0 = updates[0].factors[name][0]
    m = sum(u.factors[name][0].shape[0] for u in updates)
    # B_s is built as the transpose of a row-major m × d_out block: the Gram matrix B_sᵀB_s that
    # factored_svd takes first is then a product in the fast memory layout
    a_s = torch.empty(spare + m + spare, a0.shape[1], dtype=a0.dtype, device=a0.device)
    bt = torch.empty(spare + m + spare, updates[0].factors[name][1].shape[0], dtype=a0.dtype, device=a0.device)
    a_s[:spare], bt[:spare], a_s[spare + m:], bt[spare + m:] = 0, 0, 0, 0
    row = spare
    for u, p in zip(updates, weights):
        a, b = u.factors[name]
        a_s[row:row + a.shape[0]] = a
        torch.mul(b.mT, p * u.scaling, out=bt[row:row + a.shape[0]])
        row += a.shape[0]
    return a_s, bt.mT


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
    # P is the transpose of a row-major Pᵀ: P @ T formed as (Tᵀ Pᵀ)ᵀ runs ~4x faster on a tall P
    return (p if t is None else (t.mT @ p.mT).mT.contiguous()), r


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
    if b.shape[1] >= min(b.shape[0], a.shape[1]):
        # a stack at least as wide as the layer (100 clients at rank 8 on a 576-wide model): the product is the
        # smaller object, and its SVD 2-5x cheaper than QR of two wide factors plus an SVD of the same size
        u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
        v = vh.mT
        if root_scaled:
            root = s.sqrt()
            u, v = u * root, v * root
        return u, s, v
    p_b, t_b, r_b = _basis(b)
    p_a, t_a, r_a = _basis(a.T)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    v_c = vh_c.T
    if root_scaled:
        root = s.sqrt()
        u_c, v_c = u_c * root, v_c * root
    return (p_b @ (u_c if t_b is None else t_b @ u_c)), s, (p_a @ (v_c if t_a is None else t_a @ v_c))


# ---- zero-padded averages and distances between products ------------------------------------------
def padded_sum(terms: list[tuple[float, Tensor]], rank: int, dim: int) -> Tensor:
    """Σ w · pad(t) over (w, t): each t zero-padded along `dim` to `rank` (dim 0: the rows of an A,
    dim 1: the columns of a B), HetLoRA's zero-padding. Bit for bit what padding first then summing gives."""
    _, t0 = terms[0]
    shape = list(t0.shape)
    shape[dim] = rank
    out = torch.zeros(shape, dtype=t0.dtype, device=t0.device)
    for w, t in terms:
        r = t.shape[dim]
        if dim == 0:
            out[:r] += w * t
        else:
            out[:, :r] += w * t
    return out


def padded_average(updates: list[ClientUpdate], weights: list[float], name: str,
                   rank: int | None = None) -> tuple[Tensor, Tensor]:
    """Ā = Σ w_k pad(A_k), B̄ = Σ w_k s_k pad(B_k), zero-padded to `rank` (default: the largest in the round).
    B̄ is effective (scaling folded in, base.py)."""
    rank = rank or max(u.rank for u in updates)
    a_bar = padded_sum([(w, u.factors[name][0]) for u, w in zip(updates, weights)], rank, 0)
    b_bar = padded_sum([(w * u.scaling, u.factors[name][1]) for u, w in zip(updates, weights)], rank, 1)
    return a_bar, b_bar


def product_distance(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> float:
    """‖B1 A1 − B2 A2‖_F through the factors: [B1, −B2] @ [A1; A2] (product_fro_norm's accuracy)."""
    return product_fro_norm(torch.cat([b1, -b2], 1), torch.cat([a1, a2], 0))


def aggregation_noise(approx: dict[str, tuple[Tensor, Tensor]], exact: dict[str, tuple[Tensor, Tensor]]):
    """‖B̄Ā − B_s A_s‖_F / ‖B_s A_s‖_F per module and over all modules (approx, exact: name -> (A, B));
    0 where the exact update is 0."""
    per_module, exact_sq, diff_sq = {}, 0.0, 0.0
    for name, (a_s, b_s) in exact.items():
        a, b = approx[name]
        e_sq = product_fro_norm(b_s, a_s) ** 2
        d_sq = product_distance(b, a, b_s, a_s) ** 2
        per_module[name] = (d_sq ** 0.5) / (e_sq ** 0.5) if e_sq > 0 else 0.0
        exact_sq, diff_sq = exact_sq + e_sq, diff_sq + d_sq
    return ((diff_sq ** 0.5) / (exact_sq ** 0.5) if exact_sq > 0 else 0.0), per_module


def gram_energy(b: Tensor, a: Tensor) -> float:
    """‖B A‖_F² = Σ (BᵀB) ⊙ (AAᵀ): two m×m Gram matrices, O((d_out + d_in) m²), never the d_out × d_in
    product. For a sum of client updates (a stack) the terms do not cancel in practice; for a small
    difference of products use product_fro_norm (orthogonal bases, no squaring of the condition number)."""
    return float(((b.mT @ b) * (a @ a.mT)).sum().clamp_min(0))


# ---- the top singular triplets of a product, at a cost linear in its inner dimension ---------------
KRYLOV_MIN_RATIO = 5  # Krylov when the inner dimension m ≥ this × the block size; below, the exact path is faster
KRYLOV_MIXED = True   # iterate a float64 product's Krylov basis in float32, finish in float64 (see _krylov_top_svd)


def _block(k: int, m: int) -> int:
    return min(k + max(k // 2, 8), m)


def _gram_block(k: int, m: int) -> int:
    """The Gram iteration's block: narrower than _block's. A step costs m²·block there, not (d_out + d_in)·m·block,
    so the Ritz problem and the basis, not the products, dominate. Measured at K = 100 on 4096² (k = 64, 7 random
    update sets): a block of 80 took 4–6 steps and 138–180 ms, 96 took 3–5 and 116–189 ms (median 157 vs 179); at
    K = 50 (m = 800) 5 × 96 outgrew the old basis cap (m/2) on 2 of 3 sets and the fallback took 1.3 s instead of 0.2."""
    return min(k + max(k // 4, 8), m)


def top_path(m: int, d_out: int, d_in: int, k: int) -> str:
    """Which way svd_factors_top takes for a stack of inner dimension m, a d_out × d_in layer and k triplets:
    'dense' (m ≥ min(d_out, d_in): the product is the smaller object, its whole SVD), 'exact' (few clients, or k
    covers the rank: the SVD through the factors' bases) or 'krylov' (the top k on the factors' Grams)."""
    if m >= min(d_out, d_in):
        return "dense"
    return "exact" if k >= m or not krylov_pays(m, k) else "krylov"


def krylov_pays(m: int, k: int) -> bool:
    """Whether top_svd takes the Krylov path for inner dimension m and k triplets (see top_svd)."""
    return k > 0 and m >= KRYLOV_MIN_RATIO * _block(k, m)


def top_svd(b: Tensor, a: Tensor, k: int, *, tol: float = 1e-10, max_steps: int = 8,
            path: str | None = None, info: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k singular triplets of B @ A (B: d_out×m, A: m×d_in): U (d_out×k'), S (k'), V (d_in×k'),
    k' = min(k, m, d_out, d_in), B A ≈ U diag(S) Vᵀ on the top-k' subspace, values in descending order.

    Two paths, the same answer:
    - exact: factored_svd (orthonormal bases of B and Aᵀ, core SVD), O((d_out + d_in) m² + m³). Faster while
      m is small next to k (10 clients: m = 160 for k = 64).
    - Krylov (block Krylov, Musco & Musco 2015, with Rayleigh–Ritz): the product is applied only as
      B (A X) and Aᵀ (Bᵀ Y), O((d_out + d_in) m b) per step with b = 1.5 k, a few steps: linear in m.
      It starts from the rows of A whose rank-1 terms b_j a_j are largest (the stack's own dominant
      directions: they reach 1e-8 in one step fewer than a random start at 100 clients), adds one Krylov
      block MMᵀ·P per step, and stops when the estimated relative error of the top-k values,
      Δ_j ρ/(1 − ρ) with Δ_j the change between steps and ρ = Δ_j/Δ_{j−1}, is below `tol` (Ritz values grow
      monotonically to the singular values and converge geometrically). The left basis P and Z = MᵀP
      give C = PᵀM = Zᵀ exactly, so the final Rayleigh–Ritz needs no extra product. If it has not
      converged within max_steps (or the basis would reach m/2), the exact path answers.
    path: None chooses (Krylov when m ≥ KRYLOV_MIN_RATIO × block), "exact" or "krylov" forces one.
    info: if given, filled with the path taken, and for Krylov the steps and basis size (benchmarks); given
    with "whole": True, the exact path returns every triplet it computed, not only the top k.
    """
    d_out, m = b.shape
    d_in = a.shape[1]
    kk = min(k, m, d_out, d_in)
    use = path or ("krylov" if krylov_pays(m, kk) else "exact")
    info = {} if info is None else info
    if use == "krylov" and kk > 0:
        out = _krylov_top_svd(b, a, kk, _block(kk, m), max(tol, 50 * torch.finfo(b.dtype).eps), max_steps, info)
        if out is not None:
            info["path"] = "krylov"
            return out
        info["fallback"] = True
    info["path"] = "exact"
    u, s, v = factored_svd(b, a)
    if info.get("whole"):  # the caller takes every triplet the exact path computed (svd_for_energy)
        return u, s, v
    return u[:, :kk], s[:kk], v[:, :kk]


def _krylov_top_svd(b: Tensor, a: Tensor, k: int, block: int, tol: float, max_steps: int, info: dict | None = None):
    """Block Krylov for the top-k triplets of B A (see top_svd). A float64 product is iterated in float32
    (twice the matrix-product speed) and finished by a float64 Rayleigh–Ritz on the top k + k/4 Ritz vectors:
    its values are accurate to the subspace angle squared, which float32 rounding does not limit (≈ 1e-12).
    Float32 Ritz values stop resolving changes near 1e-7: the iteration stops when its estimate reaches
    max(tol, 1e-7) from a change it can still resolve (≥ 1e-5), and otherwise runs one step past that point
    (each step shrinks the error by the convergence ratio) before the float64 finish."""
    m = b.shape[1]
    mixed = KRYLOV_MIXED and b.dtype == torch.float64
    if mixed:
        b_w, a_w, tol_w = b.float(), a.float(), max(tol, 1e-7)
    else:
        b_w, a_w, tol_w = b, a, tol
    # start: the rows a_j of the largest rank-1 terms ‖b_j‖‖a_j‖; dependent rows (clients share an
    # initial A) are replaced by seeded random directions so that the block has full rank
    weight = torch.linalg.vector_norm(b, dim=0) * torch.linalg.vector_norm(a, dim=1)
    start = a_w[torch.argsort(weight, descending=True)[:block]].mT
    q, r = torch.linalg.qr(start)
    diag = r.diagonal().abs()
    weak = diag <= 1e-6 * diag.max().clamp_min(torch.finfo(a_w.dtype).tiny)
    if bool(weak.any()):
        gen = torch.Generator(device="cpu").manual_seed(0)
        fill = torch.randn(a.shape[1], int(weak.sum()), generator=gen, dtype=a_w.dtype).to(a.device)
        start = start.clone()
        start[:, weak] = fill
        q, _ = torch.linalg.qr(start)
    y = b_w @ (a_w @ q)                                 # M V0
    p_all = z_all = gram = None
    prev = delta_prev = None
    extra_done = False
    info = {} if info is None else info
    for step in range(max_steps):
        info.update(steps=step + 1, basis=(0 if p_all is None else p_all.shape[1]) + block, mixed=mixed)
        if p_all is not None:                           # block classical Gram–Schmidt, twice
            y = y - p_all @ (p_all.mT @ y)
            y = y - p_all @ (p_all.mT @ y)
            if p_all.shape[1] + block > min(m, b.shape[0], a.shape[1]) // 2:
                return None                             # the basis would span most of the range: exact is cheaper
        p = orthonormal_basis(y)[0]
        z = a_w.mT @ (b_w.mT @ p)                       # Mᵀ P_j: the next block and the Rayleigh–Ritz data
        if z_all is None:
            p_all, z_all, gram = p, z, (z.mT @ z).double()
        else:
            cross = (z_all.mT @ z).double()
            gram = torch.cat([torch.cat([gram, cross], 1), torch.cat([cross.mT, (z.mT @ z).double()], 1)], 0)
            p_all, z_all = torch.cat([p_all, p], 1), torch.cat([z_all, z], 1)
        evals, evecs = torch.linalg.eigh(gram)          # Gram of C Cᵀ, C = PᵀM: Ritz values², left Ritz vectors
        vals = evals.flip(0)[:k].clamp_min(0).sqrt()
        if prev is not None:
            floor = vals[0].clamp_min(torch.finfo(vals.dtype).tiny) * 1e-12
            delta = float(((vals - prev).abs() / vals.clamp_min(floor)).max())
            rho = min(delta / delta_prev, 0.5) if delta_prev else 0.5
            if delta * rho / (1 - rho) <= tol_w:
                if not mixed:
                    return _ritz(p_all, z_all, k)
                # float32 Ritz values resolve changes down to ~1e-7: a change ≥ 1e-5 makes ρ, and the estimate,
                # trustworthy; below that, one more step first, then float64
                if extra_done or delta >= 1e-5:
                    return _refine(b, a, p_all, evecs, vals, k)
                extra_done = True
            delta_prev = delta
        prev = vals
        y = b_w @ (a_w @ z)                             # M Mᵀ P_j
    return None


def _refine(b: Tensor, a: Tensor, p_all: Tensor, evecs: Tensor, vals: Tensor, k: int):
    """Rayleigh–Ritz in B's precision on the span of the top k + k/4 left Ritz vectors of the float32 basis;
    None (the exact path answers) if its values disagree with the float32 ones beyond float32's reach."""
    kp = min(k + max(k // 4, 8), p_all.shape[1])
    u0 = orthonormal_basis((p_all.double() @ evecs[:, -kp:].flip(1)).to(b.dtype))[0]
    z = a.mT @ (b.mT @ u0)                              # Mᵀ U0: one product of kp columns in full precision
    q_z, r_z = orthonormal_basis(z)
    u_c, s, w_ch = torch.linalg.svd(r_z.mT, full_matrices=False)
    if float(((s[:k] - vals[:k]).abs() / s[:k].clamp_min(torch.finfo(s.dtype).tiny)).max()) > 1e-3:
        return None
    return u0 @ u_c[:, :k], s[:k], q_z @ w_ch[:k].mT


def _ritz(p_all: Tensor, z_all: Tensor, k: int):
    """Rayleigh–Ritz on the left basis P with Z = MᵀP: C = PᵀM = Zᵀ = R_zᵀ Q_zᵀ, SVD of the small R_zᵀ."""
    q_z, r_z = orthonormal_basis(z_all)
    u_c, s, w_ch = torch.linalg.svd(r_z.mT, full_matrices=False)
    return p_all @ u_c[:, :k], s[:k], q_z @ w_ch[:k].mT


def svd_for_energy(b: Tensor, a: Tensor, tau: float, first: int = 32) -> tuple[Tensor, Tensor, Tensor, float]:
    """Leading singular triplets (U, S, V) of B @ A that hold at least a fraction `tau` of its energy
    E = ‖B A‖_F² = Σ σ_i², and E. Tries the top `first` through top_svd, doubling while the retained
    energy is short of tau·E; answers with the whole exact SVD (E = Σ σ_i²) where that path is the one
    top_svd would take anyway. On the Krylov path E comes from gram_energy, O((d_out + d_in) m²): the
    one quadratic step, since the energy of all Σr_k directions is what the threshold is relative to."""
    d_out, m = b.shape
    full = min(m, d_out, a.shape[1])
    k, energy = first, None
    while True:
        k = min(k, full)
        if k >= full or not krylov_pays(m, k):
            u, s, v = factored_svd(b, a)
            return u, s, v, float((s.double() ** 2).sum())
        if energy is None:
            energy = gram_energy(b.double(), a.double())
        info = {"whole": True}
        u, s, v = top_svd(b, a, k, info=info)
        if info["path"] == "exact":  # Krylov fell back: the whole exact SVD is here, use it
            return u, s, v, float((s.double() ** 2).sum())
        if float((s.double() ** 2).sum()) >= tau * energy:
            return u, s, v, energy
        k *= 2


def gram(x: Tensor, blocks: int = 8) -> Tensor:
    """x xᵀ (x: n×d, row-major), in x's dtype. The Gram is symmetric: only its upper block triangle is computed,
    one row strip x_i [x_i; …; x_blocks]ᵀ per block (blocks (blocks + 1) / 2 of blocks² products: 9/16 of
    x @ xᵀ at 8 blocks), written straight into the result; the strictly lower blocks are the transposes of
    the upper ones, copied block by block (no full-size temporary)."""
    n = x.shape[0]
    blocks = max(1, min(blocks, n))
    edge = [n * i // blocks for i in range(blocks + 1)]
    g = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for i in range(blocks):
        torch.mm(x[edge[i]:edge[i + 1]], x[edge[i]:].mT, out=g[edge[i]:edge[i + 1], edge[i]:])
    for i in range(blocks - 1):
        g[edge[i + 1]:, edge[i]:edge[i + 1]] = g[edge[i]:edge[i + 1], edge[i + 1]:].mT
    for i in range(blocks):  # a BLAS need not give x_i x_iᵀ exactly symmetric (MKL on AMD does not): mirror its upper half
        d = g[edge[i]:edge[i + 1], edge[i]:edge[i + 1]]
        d.copy_(d.triu() + d.triu(1).mT)   # (a boolean-mask copy took 5x as long)
    return g


def inner(x: Tensor, y: Tensor, rows: int = 200) -> float:
    """Σ x ⊙ y in float64 (x, y: n×d, row-major): each product exact, a strip of `rows` rows converted at a time, so
    that the float64 copies stay in cache."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], rows):
        total += torch.dot(x[i:i + rows].reshape(-1).double(), y[i:i + rows].reshape(-1).double())
    return float(total)


def _g_orth(y: Tensor, gy: Tensor) -> tuple[Tensor, Tensor] | None:
    """(y R⁻¹, gy R⁻¹) with the columns of y R⁻¹ orthonormal in the inner product <u, v> = uᵀ G v, given gy = G y
    (CholeskyQR2: G's product is taken once and carried along); None if y is rank-deficient in it."""
    for _ in range(2):
        l, info = torch.linalg.cholesky_ex((y.mT @ gy).double())
        if int(info) != 0:
            return None
        l = l.to(y.dtype)
        y = torch.linalg.solve_triangular(l, y.mT, upper=False).mT
        gy = torch.linalg.solve_triangular(l, gy.mT, upper=False).mT
    return y, gy


def _gram_krylov(b: Tensor, a: Tensor, bt_w: Tensor, g_b: Tensor, g_a: Tensor, k: int, block: int, tol: float,
                 max_steps: int, info: dict):
    """_krylov_top_svd's block Krylov iteration, run on coefficients: a left vector B y is held as y, a right
    vector Aᵀ x as x (both m-vectors), so that Mᵀ(B y) = Aᵀ(G_b y), M(Aᵀ x) = B(G_a x) and the inner products
    are yᵀ G_b y', xᵀ G_a x'. A step is two m×m×block products (G_b y, G_a x) instead of four
    (d_out + d_in)×m×block ones; G_a = A Aᵀ and G_b = BᵀB are the float32 Grams that ‖ΔW‖² needs anyway. The
    left basis P = B Y has MᵀP = Aᵀ X with X = G_b Y, so projections against it need no product. Finished by
    _refine_coeff's float64 Rayleigh–Ritz. bt_w: Bᵀ in the Grams' precision (row-major), for the refinement's
    starting basis. Returns (U, S, V), or None (not converged)."""
    m = g_a.shape[0]
    # past 3/4 of the rank the exact path is cheaper (a step here costs m²·block and a Ritz problem of the basis' size,
    # not top_svd's (d_out + d_in)·m·block, so the basis may grow further than its m/2 before giving up)
    cap = min(max_steps * block, 3 * min(m, b.shape[0], a.shape[1]) // 4)
    weight = g_b.diagonal() * g_a.diagonal()           # ‖b_j‖² ‖a_j‖²: the rank-1 terms' sizes, squared
    y = g_a[:, torch.argsort(weight, descending=True)[:block]]  # G_a x0, x0: A's rows of the largest terms
    yx = _g_orth(y, g_b @ y)
    if yx is None:  # dependent rows (clients share an initial A): seeded random combinations of them
        gen = torch.Generator(device="cpu").manual_seed(0)
        y = g_a @ torch.randn(m, block, generator=gen, dtype=g_a.dtype).to(g_a.device)
        yx = _g_orth(y, g_b @ y)
    # the bases and ZᵀZ grow in place (no concatenation per step)
    y_buf = torch.empty(m, max(cap, block), dtype=g_a.dtype, device=g_a.device)
    x_buf = torch.empty_like(y_buf)
    gram_z = torch.empty(y_buf.shape[1], y_buf.shape[1], dtype=torch.float64, device=g_a.device)
    n, prev, delta_prev, extra_done = 0, None, None, False
    for step in range(max_steps):
        info.update(steps=step + 1, basis=n + block, mixed=True)
        if n:                                            # block classical Gram–Schmidt in G_b, twice (X = G_b Y)
            if n + block > cap:
                info["stopped"] = "basis cap"
                return None
            for _ in range(2):
                y = y - y_buf[:, :n] @ (x_buf[:, :n].mT @ y)
            yx = _g_orth(y, g_b @ y)
        if yx is None:
            return None
        y, x = yx                                        # Mᵀ P = Aᵀ x
        gx = g_a @ x
        y_buf[:, n:n + block], x_buf[:, n:n + block] = y, x
        gram_z[:n + block, n:n + block] = (x_buf[:, :n + block].mT @ gx).double()
        gram_z[n:n + block, :n] = gram_z[:n, n:n + block].mT
        n += block
        # ZᵀZ = C Cᵀ, C = PᵀM: its eigenvalues are the Ritz values²; the vectors only once converged
        vals = torch.linalg.eigvalsh(gram_z[:n, :n]).flip(0)[:k].clamp_min(0).sqrt()
        if prev is not None:
            floor = vals[0].clamp_min(torch.finfo(vals.dtype).tiny) * 1e-12
            delta = float(((vals - prev).abs() / vals.clamp_min(floor)).max())
            rho = min(delta / delta_prev, 0.5) if delta_prev else 0.5
            if delta * rho / (1 - rho) <= max(tol, 1e-7):
                if extra_done or delta >= 1e-5:           # see _krylov_top_svd: float32 resolves ~1e-7
                    kp = min(k + max(k // 4, 8), n)
                    evecs = torch.linalg.eigh(gram_z[:n, :n])[1][:, -kp:].flip(1)   # left Ritz vectors, top kp
                    return _refine_coeff(b, a, bt_w, (y_buf[:, :n].double() @ evecs).to(y.dtype), vals, k)
                extra_done = True
            delta_prev = delta
        prev = vals
        y = gx                                           # M Mᵀ P = B (G_a x)
    info["stopped"] = "steps"
    return None


def _refine_coeff(b: Tensor, a: Tensor, bt_w: Tensor, y_top: Tensor, vals: Tensor, k: int):
    """_refine for coefficients: Rayleigh–Ritz in B's precision on the span of B y_top. None if its values
    disagree with the float32 ones beyond float32's reach.
    The basis U0 only has to be orthonormal in B's precision and near the top subspace (the values' error is
    second order in its angle): it is B y_top in the working precision (bt_w = Bᵀ, y_top: the iteration's
    coefficients), orthonormalized in B's. Mᵀ U0 = Aᵀ (Bᵀ U0) is then formed in B's precision, both products
    in the row-major layouts (Bᵀ and A as stored) that run at full speed."""
    u0 = orthonormal_basis((y_top.mT @ bt_w).mT.to(b.dtype))[0]
    c = (u0.mT @ b).mT                                  # Bᵀ U0: Mᵀ U0 = Aᵀ c (as (U0ᵀ B)ᵀ: B's layout, faster)
    q_z, r_z = orthonormal_basis((c.mT @ a).mT)
    u_c, s, w_ch = torch.linalg.svd(r_z.mT, full_matrices=False)
    if float(((s[:k] - vals[:k]).abs() / s[:k].clamp_min(torch.finfo(s.dtype).tiny)).max()) > 1e-3:
        return None
    return u0 @ u_c[:, :k], s[:k], q_z @ w_ch[:k].mT


def svd_factors_top(b: Tensor, a: Tensor, k: int, spare: int = 0) -> tuple[Tensor, Tensor, int, float]:
    """(A', B', ordered, E) with B' A' = B A exactly, whose first `ordered` (≥ min(k, rank)) rows/columns are
    the SVD B' = U√S, A' = √S Vᵀ in descending order: every slice [:r], r ≤ ordered, is the best rank-r
    approximation (Eckart–Young); E = ‖B A‖_F².
    Where the exact path is faster, this is svd_factors (everything ordered, E = Σ σ²). Otherwise the top-k
    triplets come from a block Krylov iteration on the factors' Gram matrices G_a = A Aᵀ, G_b = BᵀB (float32,
    upper halves, one pass over the factors: _gram_krylov; where it does not converge, e.g. a block wider than
    the stack's numerical rank, top_svd's), E = Σ G_a ⊙ G_b from the same Grams (float32 Grams: relative error
    ≤ 1e-6), and the rest is the remainder B A − U S Vᵀ kept factored with no product at all: A' = [A_k; A; A_k],
    B' = [B_k, B, −B_k] (rank m + 2k; the compact [B_k, B − U S Xᵀ] with V = Aᵀ X, rank m + k, costs a d × m × k
    product and another pass over B). spare: b's first and last `spare` columns and a's rows are zero (stack(..., spare=k)) and receive
    the top triplets in place: nothing of the factors' size is allocated."""
    n = a.shape[0]
    b_in, a_in = b, a
    b, a = b[:, spare:n - spare], a[spare:n - spare]
    m = b.shape[1]
    full = min(m, b.shape[0], a.shape[1])
    # a stack at least as wide as the layer: the dense SVD of the product (svd_factors) is cheaper than two m×m
    # Grams, and its factors, min(d_out, d_in) wide, are narrower than the stack
    if top_path(m, b.shape[0], a.shape[1], k) != "krylov":
        a2, b2 = svd_factors(b, a)
        return a2, b2, a2.shape[0], float(((torch.linalg.vector_norm(a2, dim=1) * torch.linalg.vector_norm(b2, dim=0))
                                            .double() ** 2).sum())
    kk = min(k, full)
    work = torch.float32 if b.dtype == torch.float64 else b.dtype
    rows = torch.contiguous_format
    a_w, bt_w = a.to(work, memory_format=rows), b.mT.to(work, memory_format=rows)  # row-major, working precision
    g_a, g_b = gram(a_w), gram(bt_w)
    energy = max(inner(g_a, g_b), 0.0)
    info = {}
    out = _gram_krylov(b, a, bt_w, g_b, g_a, kk, _gram_block(kk, m), 1e-10, 8, info)
    del g_a, g_b, a_w, bt_w
    # not converged (the basis cap or the steps ran out): top_svd's Krylov builds the same kind of basis and would
    # not either, the exact path answers at once; a stack of low numerical rank (the G_b-orthonormalization
    # failed): top_svd's Krylov, which fills dependent starts with random directions
    u, s, v = out if out is not None else top_svd(b, a, kk, path="exact" if info.get("stopped") else None)
    root = s.sqrt()
    a_k, b_k = (v * root).mT, u * root
    if spare < kk:
        return torch.cat([a_k, a, a_k], 0), torch.cat([b_k, b, -b_k], 1), kk, energy
    a_out, b_out = a_in[spare - kk:n - spare + kk], b_in[:, spare - kk:n - spare + kk]
    a_out[:kk], b_out[:, :kk], a_out[-kk:], b_out[:, -kk:] = a_k, b_k, a_k, -b_k
    return a_out, b_out, kk, energy
