"""Full-space elementwise merges (TIES family, DARE) straight from the LoRA factors, in row chunks.

The generic path stacks every task's dense m×n update into one (T × m·n) matrix and keeps several
temporaries of that size (2.8 GB for six 4096×4096 Llama updates). Here a task's update is formed
chunk by chunk from B̃_t[rows] @ A_t, so memory stays at one m×n result, one m×n scratch buffer and
T small chunks, whatever T is:

1. per task (only if needed): its whole DARE'd update once, for the trimming threshold (k-th largest
   |x|, with the number of ties at the threshold to keep in flat order) and the L1 rescale factor;
2. per chunk of rows: the T tasks' entries are rebuilt exactly as in step 1, trimmed with those
   thresholds, elected and merged. Entries whose elected sign is 0 wait for the scope's majority sign
   (known after the last chunk) and are filled in at the end.

Every entry is computed by the same operations as in `elementwise`, so the two paths agree to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramerge_cli.merging import elementwise
from loramerge_cli.merging.elementwise import TiesOptions
from loramerge_cli.merging.lowrank import LowRank

CHUNK_ENTRIES = 1 << 19  # entries per task and chunk (4 MB in float64)


@dataclass(frozen=True)
class FullSpaceJob:
    """One module's full-space elementwise merge. `kind`: "sum" (dare), "magnitude" or "ties"."""

    kind: str
    densities: list[float] | None = None  # per task; None: no trimming
    keep_rule: str = "round"
    options: TiesOptions = TiesOptions()
    drop_rate: float = 0.0
    dare_rescale: str = "inverse"


def _rows(total: int, width: int):
    step = max(1, CHUNK_ENTRIES // max(1, width))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _chunk(task: LowRank, keep: torch.Tensor | None, factor: float | None, start: int, stop: int, job) -> torch.Tensor:
    """Rows start:stop of the task's (DARE'd) update, computed as the generic path computes them."""
    values = task.left[start:stop] @ task.right
    if keep is None:
        return values
    kept = values * keep[start:stop]
    return kept * factor if job.dare_rescale == "l1" else kept / (1.0 - job.drop_rate)


def merge_full_space(tasks: list[LowRank], keeps: list[torch.Tensor | None], weights: list[float],
                     job: FullSpaceJob) -> torch.Tensor:
    """The merged dense m×n update of one module (before λ). `keeps`: DARE keep masks or None."""
    m, n = tasks[0].shape
    dtype = tasks[0].left.dtype
    factors: list[float | None] = [None] * len(tasks)
    trims: list[tuple[float, int | None] | None] = [None] * len(tasks)
    needs_l1 = job.dare_rescale == "l1"
    for index, (task, keep) in enumerate(zip(tasks, keeps)):
        density = job.densities[index] if job.densities is not None else 1.0
        if keep is None and density >= 1.0:
            continue
        if keep is not None and needs_l1:
            scratch = task.left.new_empty(m, n)
            for start, stop in _rows(m, n):
                scratch[start:stop] = task.left[start:stop] @ task.right
            before = float(scratch.abs().sum())
            scratch *= keep
            after = float(scratch.abs().sum())
            factors[index] = before / after if before >= 1e-8 and after >= 1e-8 else 1.0
        if density < 1.0:
            scratch = task.left.new_empty(m, n)
            for start, stop in _rows(m, n):
                scratch[start:stop] = _chunk(task, keep, factors[index], start, stop, job)
            k = elementwise.keep_count(m * n, density, job.keep_rule)
            trims[index] = elementwise.top_k_threshold(scratch.abs_(), k) if k > 0 else (float("inf"), 0)
            del scratch
    out = tasks[0].left.new_empty(m, n)
    seen = [0] * len(tasks)
    signs_total = 0.0
    undecided: list[tuple[torch.Tensor, torch.Tensor]] = []  # flat indices, their values if the fallback is −1
    weight_vector = torch.tensor(weights, dtype=dtype)
    for start, stop in _rows(m, n):
        rows = []
        for index, (task, keep) in enumerate(zip(tasks, keeps)):
            values = _chunk(task, keep, factors[index], start, stop, job)
            if trims[index] is not None:
                threshold, needed = trims[index]
                mask, seen[index] = elementwise.threshold_mask(values.abs(), threshold, needed, seen[index])
                values = values * mask
            rows.append(values.reshape(-1))
        X = torch.stack(rows)
        if job.kind != "ties":
            out[start:stop] = X.sum(dim=0).reshape(stop - start, n)
            continue
        options = job.options
        voters = X if options.elect_on == "weighted" else X / weight_vector[:, None]
        signs = elementwise.raw_signs(voters, options.consensus)
        signs_total += float(signs.sum())
        zero = (signs == 0).nonzero().reshape(-1)
        merged = elementwise.disjoint_merge(X, torch.where(signs == 0, 1.0, signs), options.normalize, weight_vector)
        if zero.numel():
            columns = X[:, zero]
            minus = elementwise.disjoint_merge(columns, columns.new_tensor(-1.0).expand(zero.numel()),
                                               options.normalize, weight_vector)
            undecided.append((zero + start * n, minus))
        out[start:stop] = merged.reshape(stop - start, n)
    if undecided and elementwise.fallback_sign(signs_total) < 0:
        flat = out.view(-1)
        for positions, minus in undecided:
            flat[positions] = minus
    return out
