"""Full-space elementwise merges (TIES family, DARE) straight from the LoRA factors, in row chunks.

The generic path stacks every task's dense m×n update into one (T × m·n) matrix and keeps several
temporaries of that size (2.8 GB for six 4096×4096 Llama updates). Here a task's update is formed
chunk by chunk from B̃_t[rows] @ A_t, so memory stays at one m×n result and T small chunks, whatever
T is:

1. per task (only if needed), one chunked pass for the trimming threshold (the k-th largest |x|, and
   how many ties at it to keep in flat order) and the L1 rescale factor. A strided sample of entries
   brackets the threshold, so the pass keeps only the few entries inside the bracket and selects
   among them (a missed bracket falls back to a selection over all entries: always exact);
2. per chunk of rows: the T tasks' entries are rebuilt exactly as in step 1, trimmed with those
   thresholds, elected and merged. Entries whose elected sign is 0 wait for the scope's majority sign
   (known after the last chunk) and are filled in at the end.

DELLA's MagPrune keeps an entry with a probability set by its rank among its task's magnitudes: one pass
per task sorts them once and keeps, per entry, its rank where the draw keeps it and −1 where not (4 bytes
an entry: a 1.4 GB peak instead of 4.8 GB on a Llama-3-8B attention block with eight adapters), and step 2
divides the kept entries by their probability.

Every entry is computed by the same operations as in `elementwise`, so the two paths agree to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramerge_cli.merging import elementwise, sparsify
from loramerge_cli.merging.elementwise import TiesOptions
from loramerge_cli.merging.lowrank import LowRank

CHUNK_ENTRIES = 1 << 16  # entries per task and chunk (512 kB in float64: the chunks stay in cache)


@dataclass(frozen=True)
class FullSpaceJob:
    """One module's full-space elementwise merge. `kind`: "sum" (dare), "magnitude" or "ties"."""

    kind: str
    densities: list[float] | None = None  # per task; None: no trimming
    keep_rule: str = "round"
    options: TiesOptions = TiesOptions()
    drop_rate: float = 0.0
    dare_rescale: str = "inverse"
    outliers: float | None = None  # Breadcrumbs' γ: the largest γ·D entries are dropped too
    magprune: float | None = None  # DELLA's ε: the densities are MagPrune's mean keep probabilities, not trims
    seeds: tuple[int, ...] = ()  # MagPrune's draws: one seed per task (sparsify.della_draws)


def _rows(total: int, width: int):
    step = max(1, CHUNK_ENTRIES // max(1, width))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _kept(task: LowRank, keep: torch.Tensor | None, start: int, stop: int, out=None) -> torch.Tensor:
    """Rows start:stop of the task's update with DARE's dropped entries zeroed, not yet rescaled
    (rescaling by a positive factor does not change which entries trimming keeps)."""
    values = torch.mm(task.left[start:stop], task.right, out=out)
    return values if keep is None else values.mul_(keep[start:stop])


def _rescaled(values: torch.Tensor, factor: float | None, job: FullSpaceJob) -> torch.Tensor:
    if job.drop_rate == 0.0:
        return values
    return values * factor if job.dare_rescale == "l1" else values / (1.0 - job.drop_rate)


def _bracket(task: LowRank, keep: torch.Tensor | None, k: int) -> tuple[float, float]:
    """An interval of |x| that very likely holds the k-th largest, from a strided grid of ≤ 256×256
    entries: ±(8σ + 64) sample ranks around the estimate. Only a guess: `_statistics` checks it."""
    m, n = task.shape
    rows, columns = torch.arange(0, m, max(1, m // 256)), torch.arange(0, n, max(1, n // 256))
    sample = task.left[rows] @ task.right[:, columns]
    if keep is not None:
        sample = sample * keep[rows][:, columns]
    sample = torch.sort(sample.abs().reshape(-1)).values
    size = sample.numel()
    below = (1.0 - k / (m * n)) * size  # sample entries expected below the threshold
    margin = 8.0 * (size * 0.25) ** 0.5 + 64
    low = sample[max(0, int(below - margin))]
    high = sample[min(size - 1, int(below + margin))]
    return float(low), float(high)


def _statistics(task, keep, counts: list[int | None], job: FullSpaceJob):
    """Per count k of `counts`, the (threshold, ties to keep) of the k largest |x| of one task (None for
    None: no selection, everything kept; (inf, 0) for 0: nothing kept), and the L1 rescale factor, in one
    chunked pass that keeps only the entries inside each sampled bracket (exact: a missed bracket falls
    back to a full selection)."""
    m, n = task.shape
    wanted = [k for k in counts if k]
    brackets = {k: _bracket(task, keep, k) for k in wanted}
    above, candidates = dict.fromkeys(wanted, 0), {k: [] for k in wanted}
    before, after = 0.0, 0.0
    for start, stop in _rows(m, n):
        values = _kept(task, keep, start, stop)
        if keep is not None and job.dare_rescale == "l1":
            before += float((task.left[start:stop] @ task.right).abs().sum())
            after += float(values.abs().sum())
        if wanted:
            magnitude = values.abs_()
            for k, (low, high) in brackets.items():
                above[k] += int((magnitude > high).sum())
                candidates[k].append(magnitude[(magnitude >= low) & (magnitude <= high)])
    factor = before / after if before >= 1e-8 and after >= 1e-8 else 1.0
    trims = []
    for k in counts:
        if k is None or k == 0:
            trims.append(None if k is None else (float("inf"), 0))
            continue
        trim = _threshold_in_bracket(above[k], torch.cat(candidates[k]), k)
        if trim is None:  # the bracket missed: select over everything
            magnitude = torch.cat([_kept(task, keep, start, stop).abs().reshape(-1) for start, stop in _rows(m, n)])
            trim = elementwise.top_k_threshold(magnitude, k)
        trims.append(trim)
    return trims, factor


def _magprune_ranks(task: LowRank, density: float, epsilon: float, seed: int) -> torch.Tensor:
    """MagPrune's choice for one task, in one pass: each entry's magnitude rank where it is kept, −1 where
    dropped (int32 where D allows: 4 bytes an entry instead of the generic path's stacked float64 rows)."""
    m, n = task.shape
    magnitude = task.left.new_empty(m, n)
    for start, stop in _rows(m, n):
        _kept(task, None, start, stop, out=magnitude[start:stop]).abs_()
    ranks = sparsify.magnitude_ranks(magnitude.reshape(-1))
    del magnitude
    size = m * n
    draws = sparsify.della_draws(size, seed, ranks.device)
    kept = torch.empty(size, dtype=torch.int32 if size < 2**31 else torch.int64, device=ranks.device)
    for start in range(0, size, CHUNK_ENTRIES):
        chunk = ranks[start:start + CHUNK_ENTRIES]
        probabilities = sparsify.della_probabilities(chunk.to(task.left.dtype), size, density, epsilon)
        kept[start:start + CHUNK_ENTRIES] = torch.where(
            draws[start:start + CHUNK_ENTRIES].to(task.left.dtype) < probabilities, chunk, -1)
    return kept


def _magprune(values: torch.Tensor, kept: torch.Tensor, size: int, density: float, epsilon: float) -> torch.Tensor:
    """A chunk of one task's entries after MagPrune: kept ones divided by their keep probability, the rest 0."""
    probabilities = sparsify.della_probabilities(kept.to(values.dtype), size, density, epsilon)
    return torch.where(kept >= 0, values / probabilities, 0.0)


def _selection_counts(size: int, density: float, outliers: float | None, rule: str) -> tuple[int | None, int | None]:
    """(kept, outliers): how many of the largest |x| trimming keeps before the outliers go (None: all), and how
    many of the largest are then dropped as outliers (None: none; Breadcrumbs' γ)."""
    top = min(size, sparsify.outlier_count(size, outliers, rule)) if outliers else 0
    if density >= 1.0 and not top:
        return None, None
    last = min(size, top + elementwise.keep_count(size, density, rule))
    return (None if last == size else last), (top or None)


def _threshold_in_bracket(above: int, inside: torch.Tensor, k: int) -> tuple[float, int | None] | None:
    """(τ, ties to keep) of the k largest, from the count above the bracket and the magnitudes inside
    it; None if the k-th largest is not inside."""
    if not above < k <= above + inside.numel():
        return None
    threshold = float(torch.kthvalue(inside, inside.numel() - (k - above) + 1).values)
    strictly = above + int((inside > threshold).sum())
    at = int((inside == threshold).sum())
    return threshold, None if strictly + at == k else k - strictly


class _Merger:
    """Elects and merges (T × c) blocks of trimmed, rescaled entries, and settles the mass vote's ties
    once the whole scope's majority sign is known."""

    def __init__(self, job: FullSpaceJob, weights: list[float], dtype):
        self.job, self.weights = job, torch.tensor(weights, dtype=dtype)
        self.signs_total, self.undecided = 0.0, []  # flat indices, their values if the fallback is −1

    def __call__(self, X: torch.Tensor, offset: int) -> torch.Tensor:
        """Merged columns of X, the entries at flat indices offset, offset + 1, …"""
        if self.job.kind != "ties":
            return X.sum(dim=0)
        options = self.job.options
        voters = None if options.elect_on == "weighted" else X / self.weights[:, None]
        signs = elementwise.raw_signs(X if voters is None else voters, options.consensus)
        self.signs_total += float(signs.sum())
        zero = (signs == 0).nonzero().reshape(-1)
        if zero.numel():
            signs[zero] = 1.0
        merged = elementwise.disjoint_merge(X, signs, options.normalize, self.weights, voters)
        if zero.numel():
            columns = X[:, zero]
            minus = elementwise.disjoint_merge(columns, columns.new_tensor(-1.0).expand(zero.numel()),
                                               options.normalize, self.weights,
                                               None if voters is None else voters[:, zero])
            self.undecided.append((zero + offset, minus))
        return merged

    def settle(self, out: torch.Tensor) -> torch.Tensor:
        mass_vote = self.job.options.consensus == "mass"
        if self.undecided and mass_vote and elementwise.fallback_sign(self.signs_total) < 0:
            flat = out.view(-1)
            for positions, minus in self.undecided:
                flat[positions] = minus
        return out


def merge_full_space(tasks: list[LowRank], keeps: list[torch.Tensor | None], weights: list[float],
                     job: FullSpaceJob) -> torch.Tensor:
    """The merged dense m×n update of one module (before λ). `keeps`: DARE keep masks or None.
    Thresholds (and L1 factors) first, one chunked pass per task, then one merging pass."""
    m, n = tasks[0].shape
    factors: list[float | None] = [None] * len(tasks)
    trims: list[list] = [[None, None]] * len(tasks)  # per task: (kept, outliers) thresholds, None: no selection
    magprune = [] if job.magprune is None else [_magprune_ranks(task, density, job.magprune, seed)
                                                 for task, density, seed in zip(tasks, job.densities, job.seeds)]
    for index, (task, keep) in enumerate(zip(tasks, keeps)):
        density = job.densities[index] if job.densities is not None and not magprune else 1.0
        counts = _selection_counts(m * n, density, job.outliers, job.keep_rule)
        if counts != (None, None) or (keep is not None and job.dare_rescale == "l1"):
            trims[index], factors[index] = _statistics(task, keep, list(counts), job)
    merger = _Merger(job, weights, tasks[0].left.dtype)
    out = tasks[0].left.new_empty(m, n)
    seen = [[0, 0] for _ in tasks]
    for start, stop in _rows(m, n):
        X = tasks[0].left.new_empty(len(tasks), stop - start, n)
        for index, (task, keep) in enumerate(zip(tasks, keeps)):
            values = _kept(task, keep, start, stop, out=X[index])
            if magprune:
                X[index] = _magprune(values, magprune[index][start * n:stop * n].view(stop - start, n), m * n,
                                     job.densities[index], job.magprune)
            kept, outliers = trims[index]
            if kept is not None or outliers is not None:
                magnitude, mask = values.abs(), None
                if kept is not None:
                    mask, seen[index][0] = elementwise.threshold_mask(magnitude, *kept, seen[index][0])
                if outliers is not None:
                    top, seen[index][1] = elementwise.threshold_mask(magnitude, *outliers, seen[index][1])
                    mask = ~top if mask is None else mask.logical_and_(~top)
                values.mul_(mask)
            if job.drop_rate:
                X[index] = _rescaled(values, factors[index], job)
        out[start:stop] = merger(X.reshape(len(tasks), -1), start * n).reshape(stop - start, n)
    return merger.settle(out)
