"""ENMP's latent → mask decoding (docs/algorithms.md, ENMP)."""

from __future__ import annotations

import math
import numpy as np

from loramerge_cli.merging.counts import exact_product

Candidate = tuple[tuple[int, ...], float | None]  # a table to score: (pruned flat indices, λ or None)


def max_pruned(ratio: float, unit_count: int, task_count: int) -> int:
    """K_max = ⌊ρ·U·T⌋, exact with ρ read as a decimal (⌊0.29·100⌋ = 29, not 28)."""
    return math.floor(exact_product(ratio, unit_count * task_count))


def feasible_tables(flat_size: int, k_max: int) -> int:
    """Tables the ρ cap allows (at most k_max of flat_size units pruned), the empty one included."""
    return sum(math.comb(flat_size, k) for k in range(k_max + 1))


def decode_mask(z: np.ndarray, k_max: int, threshold: float = 0.0) -> tuple[int, ...]:
    """Flat indices pruned: among the k_max largest z (ties: lower index first), those with z > θ.

    Returned in ascending index order; flat index i = u·T + t.
    """
    z = np.asarray(z, dtype=float)
    order = np.argsort(-z, kind="stable")[:k_max]  # stable: equal values keep the lower index first
    return tuple(sorted(int(i) for i in order if z[i] > threshold))


def decode_scale(gene: float, base_lambda: float) -> float:
    """`--addscale`: λ = λ0 · 2 · sigmoid(g), rounded to 3 significant digits (the memo key)."""
    value = base_lambda * 2.0 / (1.0 + math.exp(-gene))
    return float(f"{value:.3g}")
