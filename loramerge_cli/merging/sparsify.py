"""Sparsifiers beyond magnitude trimming (see docs/differences.md for the reference conventions).

- Breadcrumbs (Davari & Belilovsky 2024): per task row, drop the γ·D largest |x| (outliers) and keep
  the next κ·D; everything else is zeroed.
- DELLA MagPrune (Deep et al. 2024): per task row, rank the entries by |x| (0 = smallest; ties: lower
  flat index first); entry i is kept with probability q_i = κ − ε/2 + ε·rank_i/(D−1) and, if kept,
  divided by q_i, so that E[out] = x. The uniform draws come from the DARE generator of (seed, task,
  module), so a merge is reproducible and independent of order.
"""

from __future__ import annotations

import math
from decimal import Decimal

import torch

from loramerge_cli.merging import elementwise
from loramerge_cli.merging.counts import exact_product


def outlier_count(size: int, gamma: float, rule: str = "round") -> int:
    """Entries removed as outliers: ⌊D·γ + 0.5⌋ with γ read as a decimal ("round"), or int(D·γ) in floating point
    ("floor", mergekit's); 0 when γ = 0."""
    if gamma <= 0.0:
        return 0
    if rule == "floor":
        return int(size * gamma)
    return math.floor(exact_product(gamma, size) + Decimal("0.5"))


def breadcrumbs_trim(X: torch.Tensor, density, gamma: float, present: torch.Tensor | None = None,
                     rule: str = "round") -> torch.Tensor:
    """Keep, per row, the entries ranked γ·D … γ·D + κ·D − 1 by |x| descending (ties: lower index first)."""
    densities = elementwise.row_densities(density, X.shape[0])
    out = torch.zeros_like(X)
    for row, row_density in enumerate(densities):
        magnitude = X[row].abs()
        if present is not None:
            magnitude = torch.where(present[row], magnitude, magnitude.new_tensor(-1.0))
            size = int(present[row].sum())
        else:
            size = X.shape[1]
        if size == 0:
            continue
        top = min(size, outlier_count(size, gamma, rule))
        last = min(size, top + elementwise.keep_count(size, row_density, rule))
        if last == top:
            continue
        keep = elementwise.top_k_mask(magnitude, last)
        if top > 0:
            keep &= ~elementwise.top_k_mask(magnitude, top)
        out[row] = X[row] * keep
    return out


def magnitude_ranks(magnitude: torch.Tensor) -> torch.Tensor:
    """rank_i: position of entry i when sorted by |x| ascending, the lower flat index first on ties. Magnitudes
    (≥ 0) are sorted by their bit patterns as integers: the same order, 1.9× faster than a float sort."""
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(magnitude.dtype)
    keys = magnitude.contiguous().view(bits) if bits is not None else magnitude
    order = torch.sort(keys, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


def della_probabilities(ranks: torch.Tensor, size: int, density: float, epsilon: float) -> torch.Tensor:
    """q_i = κ − ε/2 + ε·rank_i/(D−1) of ranks among `size` entries (κ when D = 1), in the ranks' dtype."""
    if size == 1:
        return torch.full_like(ranks, density)
    return density - epsilon / 2 + epsilon * ranks / (size - 1)


def della_keep_probabilities(magnitude: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """q_i of every entry of one row of magnitudes."""
    return della_probabilities(magnitude_ranks(magnitude).to(magnitude.dtype), magnitude.numel(), density, epsilon)


def della_draws(size: int, seed: int, device) -> torch.Tensor:
    """The row's uniform draws (float32, from the DARE generator's seed of its task and module)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(size, generator=generator, dtype=torch.float32).to(device)


def della_prune(X: torch.Tensor, density, epsilon: float, row_seeds: list[int]) -> torch.Tensor:
    """MagPrune each row: keep entry i with probability q_i (draw < q_i), rescale kept entries by 1/q_i."""
    densities = elementwise.row_densities(density, X.shape[0])
    out = torch.zeros_like(X)
    for row, (row_density, seed) in enumerate(zip(densities, row_seeds)):
        probabilities = della_keep_probabilities(X[row].abs(), row_density, epsilon)
        keep = della_draws(X.shape[1], seed, X.device).to(X.dtype) < probabilities
        out[row] = torch.where(keep, X[row] / probabilities, 0.0)
    return out
