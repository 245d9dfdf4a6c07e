"""Elementwise kernels of the task-arithmetic family (docs/algorithms.md, Methods): trim, elect, disjoint mean, DARE.

Each takes a (T × D) matrix, one row per task (the flattened tensors of the scope), and an optional
(T × D) boolean `present` marking which entries belong to the scope for that task (adapter scope with
a weight table: a pruned (task, module) contributes no entries).
"""

from __future__ import annotations

import hashlib

import torch


def keep_count(size: int, density: float) -> int:
    """k = max(1, ⌊D·κ + 0.5⌋), the number of entries trimming keeps out of D."""
    return max(1, int(size * density + 0.5)) if size > 0 else 0


def trim(X: torch.Tensor, density: float, present: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the k largest |x| of each row (ties: lower flat index first); zero the rest."""
    if density >= 1.0:
        return X if present is None else X * present
    out = torch.zeros_like(X)
    for row in range(X.shape[0]):
        values = X[row]
        magnitude = values.abs()
        if present is not None:
            magnitude = torch.where(present[row], magnitude, magnitude.new_tensor(-1.0))
            size = int(present[row].sum())
        else:
            size = values.numel()
        k = keep_count(size, density)
        if k == 0:
            continue
        out[row] = values * _top_k_mask(magnitude, k)
    return out


def _top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries, the lowest indices winning ties at the threshold."""
    threshold = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    keep = magnitude >= threshold
    surplus = int(keep.sum()) - k
    if surplus == 0:  # no tie at the threshold (the usual case): skip the cumulative sum
        return keep
    at_threshold = magnitude == threshold
    needed = int(at_threshold.sum()) - surplus
    return (magnitude > threshold) | (at_threshold & (torch.cumsum(at_threshold, 0) <= needed))


def elect_signs(X: torch.Tensor) -> torch.Tensor:
    """σ_i = sign(Σ_t X_t,i); zeros take the sign of Σ_i σ_i over the scope, and +1 if that is 0 too."""
    signs = torch.sign(X.sum(dim=0))
    majority = torch.sign(signs.sum())
    fallback = majority if majority != 0 else signs.new_tensor(1.0)
    return torch.where(signs == 0, fallback, signs)


def disjoint_mean(X: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks whose nonzero entry agrees with the elected sign (0 where none does)."""
    agree = X * signs > 0  # nonzero and of the elected sign
    total = torch.where(agree, X, 0.0).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def ties(X: torch.Tensor, density: float, present: torch.Tensor | None = None) -> torch.Tensor:
    """TIES: trim, elect by mass, disjoint mean."""
    trimmed = trim(X, density, present)
    return disjoint_mean(trimmed, elect_signs(trimmed))


def magnitude_prune(X: torch.Tensor, density: float, present: torch.Tensor | None = None) -> torch.Tensor:
    """Trim each task, then sum (no sign election)."""
    return trim(X, density, present).sum(dim=0)


def dare_seed(seed: int, task: str, module: str) -> int:
    """First 8 bytes (big-endian) of sha256(f"{seed}|{task}|{module}"): independent of order."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{task}|{module}".encode()).digest()[:8], "big")


def dare(x: torch.Tensor, drop_rate: float, seed: int, task: str, module: str) -> torch.Tensor:
    """Drop each entry with probability p, rescale the kept ones by 1/(1−p).

    The mask comes from a CPU generator keyed by (seed, task, module), then moves to x's device.
    """
    if drop_rate == 0.0:
        return x
    generator = torch.Generator(device="cpu").manual_seed(dare_seed(seed, task, module))
    keep = torch.rand(x.shape, generator=generator, dtype=torch.float32) >= drop_rate
    return x * keep.to(x.device) / (1.0 - drop_rate)
