"""Spectral kernels (docs/algorithms.md, Methods): Task Singular Vectors and isotropization, exact on factors."""

from __future__ import annotations

import torch

from loramerge_cli.merging.lowrank import LowRank, compact_svd, past_ties, polar


def tsv(tasks: list[torch.Tensor | LowRank]) -> LowRank:
    """Task Singular Vectors: per-task SVDs, stacked, orthogonalised by polar factors.

    k_t = ε-rank(X_t) when Σ_t ε-rank ≤ min(m, n), else min(max(1, ⌊min(m, n)/T⌋), ε-rank(X_t)) (every task
    keeps a direction, even in a space of fewer dimensions than tasks), raised past singular values tied with
    the last one kept (`lowrank.past_ties`). Result: polar(Û) diag(ŝ) polar(V̂)ᵀ over
    the ε-rank triplets (`lowrank.polar`: unique when the tasks' directions overlap), returned as factors.
    """
    m, n = tasks[0].shape
    svds = [compact_svd(task) for task in tasks]
    ranks = [svd.S.numel() for svd in svds]
    if sum(ranks) > min(m, n):
        share = max(1, min(m, n) // len(tasks))
        ranks = [past_ties(svd.S, min(share, rank)) for svd, rank in zip(svds, ranks)]
    U_hat = torch.cat([svd.U[:, :k] for svd, k in zip(svds, ranks)], dim=1)
    S_hat = torch.cat([svd.S[:k] for svd, k in zip(svds, ranks)])
    V_hat = torch.cat([svd.V[:, :k] for svd, k in zip(svds, ranks)], dim=1)
    if U_hat.shape[1] == 0:
        return LowRank(U_hat, V_hat.T)
    return LowRank(polar(U_hat) * S_hat, polar(V_hat).T)


def isotropize(X: torch.Tensor | LowRank) -> LowRank:
    """Keep the ε-rank singular directions and give them all the mean singular value."""
    svd = compact_svd(X)
    if svd.S.numel() == 0:
        return LowRank(svd.U, svd.V.T)
    return LowRank(svd.U * svd.S.mean(), svd.V.T)
