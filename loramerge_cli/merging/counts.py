"""Counts from fractions (entries kept, components, units pruned), exact in the decimal the fraction is written as.
Imports no torch: the search plans with it before any model loads."""

from __future__ import annotations

from decimal import Decimal


def exact_product(fraction: float, size: int) -> Decimal:
    """fraction · size exactly, the fraction read as the decimal it is written as (0.29 · 50 = 14.5, where
    floating point gives 14.499…)."""
    return Decimal(repr(float(fraction))) * size
