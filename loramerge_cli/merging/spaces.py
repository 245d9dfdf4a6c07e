"""Merge spaces (docs/algorithms.md, Spaces): where a method acts, and how its result goes back to a weight update.

`full`: the dense ΔW_t (kept factored until a method needs entries). `knots`: the V_t blocks of the
joint SVD of [ΔW_0 | … | ΔW_{T−1}]. `core`: M_t = U_Bᵀ B̃_t A_t V_A. All bases come from thin QRs of
the stacked factors and an SVD of a small middle matrix; no dense m × T·n SVD is ever taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from loramerge_cli.merging.lowrank import LowRank, from_svd, compact_svd
from loramerge_cli.merging.registry import SPACES  # noqa: F401  (imported from here)

Tensorish = torch.Tensor | LowRank


@dataclass
class Projected:
    """The retained tasks' tensors in a space, and the map from a merged tensor back to ΔW."""

    tasks: list[Tensorish]
    reconstruct: Callable[[Tensorish], Tensorish]


def project(space: str, factors: list[tuple[torch.Tensor, torch.Tensor]], knots_scaled: bool = False) -> Projected:
    """Project the tasks (B̃_t, A_t), weights already folded into B̃_t, into `space`."""
    if space == "full":
        return Projected([LowRank(B, A) for B, A in factors], lambda merged: merged)
    if space == "knots":
        return _project_knots(factors, knots_scaled)
    if space == "core":
        return _project_core(factors)
    raise ValueError(f"unknown space {space!r}")


def knots_factors(factors: list[tuple[torch.Tensor, torch.Tensor]]):
    """U (m×q), S (q), and each V_t (q×n) as LowRank(H_t, Q_tᵀ), with [B̃_0A_0 | …] = U diag(S) [V_0 | …].

    B_stack = Q_B R_B and A_tᵀ = Q_t R_t (thin QRs); the SVD of the small middle R_B · blockdiag(R_tᵀ)
    = P Σ Hᵀ gives U = Q_B P and V_t = (block t of Hᵀ) Q_tᵀ.
    """
    Q_B, R_B = torch.linalg.qr(torch.cat([B for B, _ in factors], dim=1))
    right_bases, middle_blocks = [], []
    for _, A in factors:
        Q_t, R_t = torch.linalg.qr(A.T)  # A_t = R_tᵀ Q_tᵀ
        right_bases.append(Q_t)
        middle_blocks.append(R_t.T)
    middle = R_B @ torch.block_diag(*middle_blocks)
    P, S, Hh = torch.linalg.svd(middle, full_matrices=False)
    svd = from_svd(Q_B @ P, S, Hh.T)  # canonical signs flip U and the rows of Hh together
    blocks, start = [], 0
    for Q_t in right_bases:
        width = Q_t.shape[1]
        blocks.append(LowRank(svd.V[start : start + width].T, Q_t.T))
        start += width
    return svd.U, svd.S, blocks


def knots_basis(factors: list[tuple[torch.Tensor, torch.Tensor]]):
    """U (m×q), S (q), and the dense V_t blocks (q×n per task)."""
    U, S, blocks = knots_factors(factors)
    return U, S, [block.dense() for block in blocks]


def _project_knots(factors, knots_scaled: bool) -> Projected:
    U, S, blocks = knots_factors(factors)
    if knots_scaled:
        tasks = [LowRank(S[:, None] * V_t.left, V_t.right) for V_t in blocks]
        left = U
    else:
        tasks = blocks
        left = U * S

    def reconstruct(merged: Tensorish) -> LowRank:
        if isinstance(merged, LowRank):
            return LowRank(left @ merged.left, merged.right)
        return LowRank(left, merged)

    return Projected(tasks, reconstruct)


def core_basis(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """U_B (m×r_B): left singular vectors of [B̃_0 | …]; V_A (n×r_A): right ones of [A_0; …]."""
    U_B = compact_svd(torch.cat([B for B, _ in factors], dim=1)).U
    V_A = compact_svd(torch.cat([A for _, A in factors], dim=0)).V
    return U_B, V_A


def _project_core(factors) -> Projected:
    U_B, V_A = core_basis(factors)
    tasks = [(U_B.T @ B) @ (A @ V_A) for B, A in factors]

    def reconstruct(merged: Tensorish) -> LowRank:
        if isinstance(merged, LowRank):
            return LowRank(U_B @ merged.left, merged.right @ V_A.T)
        return LowRank(U_B @ merged, V_A.T)

    return Projected(tasks, reconstruct)
