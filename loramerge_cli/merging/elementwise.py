"""Elementwise kernels of the task-arithmetic family (docs/algorithms.md, Methods): trim, elect, disjoint merge, DARE.

Each takes a (T × D) matrix, one row per task (the flattened tensors of the scope), and an optional
(T × D) boolean `present` marking which entries belong to the scope for that task (adapter scope with
a weight table: a pruned (task, module) contributes no entries).

Options shared by the TIES family (defaults: loramerge's rules; the other values reproduce PEFT and
mergekit, see docs/differences.md):
- `keep_rule`: "round" keeps max(1, ⌊D·κ + 0.5⌋) entries, "floor" keeps ⌊D·κ⌋ (PEFT, mergekit);
- `consensus`: the sign is elected by "mass" (Σ_t x; a tie takes the scope's majority sign) or by
  "count" (Σ_t sign x; a tie takes +1);
- `normalize`: the agreeing entries are averaged ("count"), divided by the sum of the agreeing tasks'
  weights ("weight", mergekit) or summed ("none");
- `elect_on`: "weighted" tensors (loramerge, mergekit) or "unweighted" ones (PEFT).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from decimal import Decimal

import torch

from loramerge_cli.merging.counts import exact_product


@dataclass(frozen=True)
class TiesOptions:
    """How TIES elects and aggregates (see the module docstring)."""

    consensus: str = "mass"
    normalize: str = "count"
    elect_on: str = "weighted"


def keep_count(size: int, density: float, rule: str = "round") -> int:
    """Entries trimming keeps out of `size`: max(1, ⌊D·κ + 0.5⌋) with κ read as a decimal ("round"), or int(D·κ)
    in floating point as PEFT and mergekit compute it ("floor")."""
    if size <= 0:
        return 0
    if density >= 1.0:
        return size
    if rule == "floor":
        return int(size * density)
    return max(1, math.floor(exact_product(density, size) + Decimal("0.5")))


def row_densities(density, rows: int) -> list[float]:
    """One density per row: a float applies to every task, a list gives each task its own."""
    if isinstance(density, (list, tuple)):
        if len(density) != rows:
            raise ValueError(f"{len(density)} densities for {rows} tasks")
        return [float(value) for value in density]
    return [float(density)] * rows


def trim(X: torch.Tensor, density, present: torch.Tensor | None = None, rule: str = "round") -> torch.Tensor:
    """Keep the k largest |x| of each row (ties: lower flat index first); zero the rest."""
    densities = row_densities(density, X.shape[0])
    if all(value >= 1.0 for value in densities):
        return X if present is None else X * present
    out = torch.zeros_like(X)
    for row, row_density in enumerate(densities):
        values = X[row]
        magnitude = values.abs()
        if present is not None:
            magnitude = torch.where(present[row], magnitude, magnitude.new_tensor(-1.0))
            size = int(present[row].sum())
        else:
            size = values.numel()
        k = keep_count(size, row_density, rule)
        if k == 0:
            continue
        out[row] = values * top_k_mask(magnitude, k)
    return out


def top_k_threshold(magnitude: torch.Tensor, k: int) -> tuple[float, int | None]:
    """(τ, needed): the k largest entries are those > τ plus the first `needed` entries equal to τ in
    flat order (needed None: all of them). k must be in [1, numel]."""
    threshold = torch.kthvalue(magnitude.reshape(-1), magnitude.numel() - k + 1).values
    above = int((magnitude > threshold).sum())
    at = int((magnitude == threshold).sum())
    needed = k - above
    return float(threshold), (None if needed == at else needed)


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries, the lowest indices winning ties at the threshold."""
    threshold, needed = top_k_threshold(magnitude, k)
    keep, _ = threshold_mask(magnitude, threshold, needed, 0)
    return keep


def threshold_mask(magnitude: torch.Tensor, threshold: float, needed: int | None, seen: int):
    """The entries > τ, and the ties at τ while fewer than `needed` (counting `seen` before this
    chunk) were taken. Returns the mask and the updated count of ties seen."""
    if needed is None:
        return magnitude >= threshold, seen
    at = magnitude == threshold
    order = torch.cumsum(at.reshape(-1), 0).reshape(at.shape) + seen
    return (magnitude > threshold) | (at & (order <= needed)), seen + int(at.sum())


def raw_signs(X: torch.Tensor, consensus: str = "mass") -> torch.Tensor:
    """sign(Σ_t x) ("mass") or sign(Σ_t sign x) ("count"); 0 where that is 0."""
    return torch.sign(X.sum(dim=0) if consensus == "mass" else torch.sign(X).sum(dim=0))


def fallback_sign(signs_total: float) -> float:
    """The sign zeros take: that of Σ_i σ_i over the scope, +1 if that is 0 too."""
    return -1.0 if signs_total < 0 else 1.0


def elect_signs(X: torch.Tensor, consensus: str = "mass") -> torch.Tensor:
    """σ_i = sign of the consensus. Ties of the mass vote take the sign of Σ_i σ_i over the scope (+1 if
    that is 0); ties of the count vote (even splits, frequent) take +1, as PEFT, mergekit and NSC do."""
    signs = raw_signs(X, consensus)
    fallback = fallback_sign(float(signs.sum())) if consensus == "mass" else 1.0
    return torch.where(signs == 0, signs.new_tensor(fallback), signs)


def disjoint_merge(
    X: torch.Tensor, signs: torch.Tensor, normalize: str = "count", weights: torch.Tensor | None = None,
    voters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine the entries agreeing with the elected sign (nonzero and of that sign; in `voters` if
    given, else in X): mean ("count"), divided by the sum of the agreeing tasks' weights ("weight"; 1
    where that is 0), or sum ("none"). 0 where none agrees.

    Written with clamps and signs rather than boolean masks: several times faster on CPU."""
    if voters is None:
        magnitudes = (X * signs).clamp_(min=0.0)  # |x| where x agrees, 0 elsewhere
        agree = torch.sign(magnitudes)
        total = magnitudes.sum(dim=0) * signs
    else:
        agree = torch.sign((voters * signs).clamp_(min=0.0))
        total = (X * agree).sum(dim=0)
    if normalize == "none":
        return total
    if normalize == "weight":
        divisor = weights.to(X.dtype) @ agree
        return total / torch.where(divisor == 0, divisor.new_tensor(1.0), divisor)
    return total / agree.sum(dim=0).clamp_(min=1.0)


def elect_and_merge(
    trimmed: torch.Tensor, options: TiesOptions = TiesOptions(), weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Elect (on the weighted rows, or on rows divided by their weights) and merge disjointly."""
    if options.elect_on == "weighted":
        return disjoint_merge(trimmed, elect_signs(trimmed, options.consensus), options.normalize, weights)
    voters = trimmed / weights.to(trimmed.dtype)[:, None]
    return disjoint_merge(trimmed, elect_signs(voters, options.consensus), options.normalize, weights, voters)


def ties(
    X: torch.Tensor, density, present: torch.Tensor | None = None, rule: str = "round",
    options: TiesOptions = TiesOptions(), weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES: trim, elect, disjoint merge (by default: elect by mass, disjoint mean)."""
    return elect_and_merge(trim(X, density, present, rule), options, weights)


def magnitude_prune(X: torch.Tensor, density, present: torch.Tensor | None = None, rule: str = "round"):
    """Trim each task, then sum (no sign election)."""
    return trim(X, density, present, rule).sum(dim=0)


def dare_seed(seed: int, task: str, module: str) -> int:
    """First 8 bytes (big-endian) of sha256(f"{seed}|{task}|{module}"): independent of order."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{task}|{module}".encode()).digest()[:8], "big")


def dare_keep_mask(shape, drop_rate: float, seed: int, task: str, module: str) -> torch.Tensor:
    """The entries DARE keeps: a float32 draw from a CPU generator keyed by (seed, task, module) ≥ p."""
    generator = torch.Generator(device="cpu").manual_seed(dare_seed(seed, task, module))
    return torch.rand(shape, generator=generator, dtype=torch.float32) >= drop_rate


def dare(x: torch.Tensor, drop_rate: float, seed: int, task: str, module: str, rescale: str = "inverse"):
    """Drop each entry with probability p; rescale the kept ones by 1/(1−p) ("inverse"), or so that the
    L1 norm is unchanged ("l1", mergekit: ‖x‖₁/‖x⊙m‖₁, no rescale if either is below 1e-8).

    The mask comes from a CPU generator keyed by (seed, task, module), then moves to x's device.
    """
    if drop_rate == 0.0:
        return x
    keep = dare_keep_mask(x.shape, drop_rate, seed, task, module).to(x.device)
    return apply_dare(x, keep, drop_rate, rescale)


def apply_dare(x: torch.Tensor, keep: torch.Tensor, drop_rate: float, rescale: str = "inverse") -> torch.Tensor:
    """x ⊙ keep, rescaled (see `dare`)."""
    kept = x * keep
    if rescale == "l1":
        before, after = float(x.abs().sum()), float(kept.abs().sum())
        return kept * (before / after) if before >= 1e-8 and after >= 1e-8 else kept
    return kept / (1.0 - drop_rate)
