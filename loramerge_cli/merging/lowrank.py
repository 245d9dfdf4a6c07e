"""Low-rank algebra on factors: compact SVDs from thin QRs, sign conventions, polar factors, truncation.

Nothing here forms an m×n product unless it is handed a dense matrix (docs/algorithms.md, Spaces).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS_RANK = 1e-6  # ε-rank: singular values > EPS_RANK · σ_max count (docs/algorithms.md, Notation)


@dataclass
class LowRank:
    """X = left @ right with left (m×k) and right (k×n); k may exceed the rank."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.left.shape[0]), int(self.right.shape[1])

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def scaled(self, factor: float) -> LowRank:
        return LowRank(self.left * factor, self.right)


@dataclass
class CompactSVD:
    """X = U diag(S) Vᵀ keeping the ε-rank components, signs canonical (see `canonical_signs`)."""

    U: torch.Tensor  # m×q
    S: torch.Tensor  # q
    V: torch.Tensor  # n×q


def sum_lowrank(terms: list[LowRank]) -> LowRank:
    """Σ terms, exactly, by concatenating the factors."""
    return LowRank(torch.cat([t.left for t in terms], dim=1), torch.cat([t.right for t in terms], dim=0))


def canonical_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (u_i, v_i) so that the largest-magnitude entry of u_i is positive.

    Ties go to the lowest index (torch.argmax returns the first maximum).
    """
    if U.shape[1] == 0:
        return U, V
    rows = U.abs().argmax(dim=0)
    signs = torch.sign(U[rows, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, V * signs


def epsilon_rank(S: torch.Tensor) -> int:
    """Number of singular values above EPS_RANK · σ_max (0 for a zero matrix)."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    return int((S > EPS_RANK * S[0]).sum())


def past_ties(S: torch.Tensor, k: int) -> int:
    """How many of the leading singular values `S` (descending) a cut after the k-th keeps: k, raised past
    every next value equal to the k-th to within EPS_RANK (relative to the k-th: no chain along a slowly
    decaying spectrum). A cut through tied values would keep
    whichever of their directions the SVD happened to return, so the result would depend on how the factors
    were written. (In the unscaled knots space they tie often: a direction of ΔW_t that no other task's
    update shares has singular value 1 in V_t.)"""
    if not 0 < k < S.numel():
        return k
    floor = S[k - 1] * (1 - EPS_RANK)
    while k < S.numel() and S[k] >= floor:
        k += 1
    return k


def from_svd(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> CompactSVD:
    rank = epsilon_rank(S)
    U, V = canonical_signs(U[:, :rank], V[:, :rank])
    return CompactSVD(U, S[:rank], V)


def thin_svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(X, full_matrices=False), taken of Xᵀ when X is wide: LAPACK is 2.6–3.6× slower on
    a wide matrix than on its transpose (measured on 512 × 4096 and 512 × 14336)."""
    if X.shape[-2] < X.shape[-1]:
        V, S, Uh = torch.linalg.svd(X.mT, full_matrices=False)
        return Uh.mT, S, V.mT
    return torch.linalg.svd(X, full_matrices=False)


def svd_dense(X: torch.Tensor) -> CompactSVD:
    """Compact SVD of a dense matrix, ε-rank components, canonical signs."""
    U, S, Vh = thin_svd(X)
    return from_svd(U, S, Vh.T)


def svd_lowrank_exact(X: LowRank) -> CompactSVD:
    """Exact compact SVD of left @ right from thin QRs of the factors and an SVD of the k×k middle."""
    Q_left, R_left = torch.linalg.qr(X.left)
    Q_right, R_right = torch.linalg.qr(X.right.T)
    P, S, Ht = torch.linalg.svd(R_left @ R_right.T, full_matrices=False)
    return from_svd(Q_left @ P, S, Q_right @ Ht.T)


def compact_svd(X: torch.Tensor | LowRank) -> CompactSVD:
    """Compact SVD of a dense or factored matrix (factored: never forms the product)."""
    if isinstance(X, LowRank):
        return svd_lowrank_exact(X)
    return svd_dense(X)


def polar(M: torch.Tensor) -> torch.Tensor:
    """Polar factor P_q Q_qᵀ of M = P Σ Qᵀ over its ε-rank q singular triplets: for independent columns the
    nearest matrix with orthonormal columns (P Qᵀ); for dependent ones (tasks whose LoRA factors overlap or are
    shared) the nearest partial isometry, unique where P Qᵀ would hold whatever directions LAPACK returns."""
    P, S, Qh = thin_svd(M)
    q = epsilon_rank(S)
    return P[:, :q] @ Qh[:q]


def truncate_dense(
    X: torch.Tensor, out_rank: int | None, energy: float, max_rank: int, seed: int = 1
) -> tuple[LowRank, float, bool]:
    """Factorise a dense update by truncated SVD.

    Rank = `out_rank` if given, else the smallest rank keeping `energy` of Σσ² capped at `max_rank`.
    Returns the factors, the relative Frobenius error and whether the cap bound. Small matrices use an
    exact SVD; large ones a rank-(R + 16) randomized range finder with 2 power iterations, from whose
    singular values the energy rule picks the rank (they never exceed the true ones, so the rank kept
    is never too small). The error is measured exactly either way.
    """
    m, n = X.shape
    full = min(m, n)
    total = float(torch.linalg.matrix_norm(X) ** 2)
    if total == 0.0:
        return LowRank(X.new_zeros(m, 0), X.new_zeros(0, n)), 0.0, False
    wanted = min(out_rank, full) if out_rank is not None else min(max_rank, full)
    if full <= 512 or wanted * 4 >= full:
        U, S, Vh = thin_svd(X)
    else:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        U, S, Vh = _randomized_svd(X, min(wanted + 16, full), generator)
    capped = False
    if out_rank is not None:
        rank = min(out_rank, S.numel())
    else:
        kept = torch.cumsum(S.double() ** 2, 0) / total
        reached = (kept >= energy).nonzero()
        # Not reached with every singular value kept is rounding (Σσ² a hair below ‖X‖²), not a cap.
        rank = int(reached[0]) + 1 if reached.numel() else S.numel()
        capped = rank > max_rank
        rank = min(rank, max_rank)
    U, Vt = canonical_signs(U[:, :rank], Vh[:rank].T)
    factors = LowRank(U * S[:rank], Vt.T)
    # The factors are an orthogonal projection of X, so ‖X − P X‖² = ‖X‖² − Σ_{i≤k} σ_i²; measure the
    # difference explicitly only where that subtraction would cancel.
    residual = max(0.0, total - float((S[:rank].double() ** 2).sum()))
    if residual < 1e-6 * total:
        residual = float(torch.linalg.matrix_norm(X - factors.dense()) ** 2)
    error = (residual / total) ** 0.5
    return factors, error, capped


def _randomized_svd(X: torch.Tensor, width: int, generator: torch.Generator, power_iterations: int = 2):
    """Halko et al. randomized SVD: a range finder with orthonormalised power iterations, deterministic
    per seed (explicit generator). The sketch runs in float32 (it only has to find the subspace); the
    basis is then re-orthonormalised and X projected onto it in X's dtype, so U diag(S) Vᵀ is an exact
    orthogonal projection of X and ‖X‖² − Σ S² its exact squared error."""
    sketch_dtype = torch.float32 if X.dtype == torch.float64 else X.dtype
    X_sketch = X.to(sketch_dtype)
    omega = torch.randn(X.shape[1], width, generator=generator, dtype=sketch_dtype).to(X.device)
    Q, _ = torch.linalg.qr(X_sketch @ omega)
    for _ in range(power_iterations):
        Q, _ = torch.linalg.qr(X_sketch.T @ Q)
        Q, _ = torch.linalg.qr(X_sketch @ Q)
    del X_sketch
    Q, _ = torch.linalg.qr(Q.to(X.dtype))
    U_small, S, Vh = thin_svd(Q.T @ X)
    return Q @ U_small, S, Vh
