"""Spectral mergers built from per-task subspaces, exact on factors: CART, Iso-CTS, LoRA-LEGO.

Every SVD here is of a factored matrix (thin QRs + a small middle SVD, `lowrank.compact_svd`), with
the ε-rank and sign conventions of the other spectral methods.
"""

from __future__ import annotations

import math

import torch

from loramerge_cli.merging.counts import exact_product
from loramerge_cli.merging.lowrank import EPS_RANK, LowRank, compact_svd, past_ties, polar, sum_lowrank

Tensorish = torch.Tensor | LowRank


def _factored(task: Tensorish) -> LowRank:
    if isinstance(task, LowRank):
        return task
    return LowRank(task, torch.eye(task.shape[1], dtype=task.dtype, device=task.device))


def _scaled(task: LowRank, factor: float) -> LowRank:
    return LowRank(task.left * factor, task.right)


def _top(task: LowRank, k: int) -> LowRank:
    """The best rank-k approximation (the k leading ε-rank components; values tied with the k-th kept too:
    `lowrank.past_ties`)."""
    svd = compact_svd(task)
    k = past_ties(svd.S, min(k, svd.S.numel()))
    return LowRank(svd.U[:, :k] * svd.S[:k], svd.V[:, :k].T)


def cart(tasks: list[Tensorish], rank_fraction: float, scale: float) -> LowRank:
    """CART (Choi et al.): θ̄ + c·Σ_t lowrank_k(X_t − θ̄), θ̄ = mean_t X_t, k = ⌈ρ·min(m, n)⌉."""
    factored = [_factored(task) for task in tasks]
    m, n = factored[0].shape
    k = math.ceil(exact_product(rank_fraction, min(m, n)))
    mean = _scaled(sum_lowrank(factored), 1.0 / len(factored))
    centred = [_top(sum_lowrank([task, _scaled(mean, -1.0)]), k) for task in factored]
    return sum_lowrank([mean, _scaled(sum_lowrank(centred), scale)])


def iso_cts(tasks: list[Tensorish], common_fraction: float) -> LowRank:
    """Iso-CTS (Marczak et al.): the k leading singular directions of Σ_t X_t (the common subspace,
    k = min(⌈ρ·p⌉, ε-rank), p = min(m, n)), plus per task the s = ⌊(p − k)/T⌋ leading directions of
    its update with the common left subspace projected out (singular values above 1e-6·σ_max of the
    sum; what the projection leaves of a covered task is rounding noise); neither cut splits tied singular
    values (`lowrank.past_ties`); both bases orthogonalised by
    polar factors (over their ε-rank: with LoRA the subspaces overlap, see `lowrank.polar`); every
    direction gets the mean ε-rank singular value of Σ_t X_t."""
    factored = [_factored(task) for task in tasks]
    m, n = factored[0].shape
    p = min(m, n)
    total = compact_svd(sum_lowrank(factored))
    if total.S.numel() == 0:
        return LowRank(total.U, total.V.T)
    k = past_ties(total.S, min(math.ceil(exact_product(common_fraction, p)), total.S.numel()))
    U_common, V_common = total.U[:, :k], total.V[:, :k]
    share = (p - k) // len(factored)
    lefts, rights = [U_common], [V_common]
    for task in factored:
        residual = LowRank(task.left - U_common @ (U_common.T @ task.left), task.right)
        svd = compact_svd(residual)
        s = past_ties(svd.S, min(share, int((svd.S > EPS_RANK * total.S[0]).sum())))  # noise: no direction
        lefts.append(svd.U[:, :s])
        rights.append(svd.V[:, :s])
    U_hat, V_hat = torch.cat(lefts, dim=1), torch.cat(rights, dim=1)
    return LowRank(polar(U_hat) * total.S.mean(), polar(V_hat).T)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row divided by its Euclidean norm; a zero row stays zero (no floor: tiny rows are rows too)."""
    norms = x.norm(dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 1 where the denominator is 0 (what it scales is then 0)."""
    return numerator / denominator if bool(denominator > 0) else torch.ones_like(denominator)


def lora_lego(tasks: list[LowRank], clusters: int | None, iterations: int, seed: int) -> LowRank:
    """LoRA-LEGO (Zhao et al.): cluster the rank-1 units (b_i, a_i) of every task by k-means on
    [a/‖a‖; b/‖b‖] (K = `clusters`, default the largest task rank; Lloyd iterations from K distinct
    units drawn by a seeded permutation; an emptied cluster keeps its centroid; ties go to the lower
    cluster index); each cluster's mean unit, each factor rescaled by (mean ∞-norm of its members)
    / (∞-norm of the mean), contributes b̄ āᵀ; the sum is scaled by √K_default / √K."""
    lefts = torch.cat([task.left for task in tasks], dim=1).T  # units × m: b_i
    rights = torch.cat([task.right for task in tasks], dim=0)  # units × n: a_i
    units = rights.shape[0]
    default = max(task.right.shape[0] for task in tasks)
    K = min(clusters or default, units)
    features = torch.cat([_unit_rows(rights), _unit_rows(lefts)], dim=1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    centroids = features[torch.randperm(units, generator=generator)[:K].to(features.device)].clone()
    labels = torch.zeros(units, dtype=torch.long, device=features.device)
    for _ in range(iterations):
        labels = torch.cdist(features, centroids).argmin(dim=1)
        for cluster in range(K):
            members = labels == cluster
            if members.any():
                centroids[cluster] = features[members].mean(dim=0)
    b_bars, a_bars = [], []
    for cluster in range(K):
        members = labels == cluster
        if not members.any():
            continue
        b_bar, a_bar = lefts[members].mean(dim=0), rights[members].mean(dim=0)
        b_bar = b_bar * _ratio(lefts[members].abs().amax(dim=1).mean(), b_bar.abs().max())
        a_bar = a_bar * _ratio(rights[members].abs().amax(dim=1).mean(), a_bar.abs().max())
        b_bars.append(b_bar)
        a_bars.append(a_bar)
    factor = math.sqrt(default) / math.sqrt(K)
    return LowRank(torch.stack(b_bars, dim=1) * factor, torch.stack(a_bars))
