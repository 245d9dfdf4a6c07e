"""Label-free ENMP fitness (docs/algorithms.md, NSC, `--fitness nsc`): the relative reduction, in percent, of the
NSC loss of the pruned merge against the unpruned merge. No labels are read.

A candidate is merged exactly as the accuracy fitness merges it (its 0/1 table, the merger, λ; merged
modules cached per retained task set) and patched into the one base model; the ratio at each target
is always measured with task k's own A_k on task k's inputs, whether or not k was pruned there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from loramerge_cli.search.fitness import CandidateMerges
from loramerge_cli.search.nsc_objectives import loss_over_batches


class NscFitness(CandidateMerges):
    """Scores candidates (pruned flat indices, λ or None) like `AccuracyFitness`, without labels."""

    def __init__(self, adapters, settings, template, engine, objective, reference: float | None = None):
        super().__init__(adapters, settings, template, engine)
        self.objective = objective
        self.reference = self.loss((), None) if reference is None else reference

    def loss(self, pruned: tuple[int, ...], lam: float | None) -> float:
        """The objective's loss of one candidate on every task's validation inputs (token-weighted)."""
        deltas = self.candidate_deltas(pruned, lam)
        self.forward_passes += 1
        with self.engine.apply(deltas), torch.no_grad():
            task_losses = [
                loss_over_batches(self.objective, self.engine, index, adapter.name,
                                  (batch.inputs for batch in self.engine.prepared[adapter.name].batches))
                for index, adapter in enumerate(self.adapters)]
        return sum(task_losses) / len(task_losses)

    def __call__(self, candidates: list[tuple[tuple[int, ...], float | None]]) -> list[float]:
        return [100.0 * (self.reference - self.loss(pruned, lam)) / self.reference for pruned, lam in candidates]


def build_nsc_fitness(request, device: str | None = None, lam: float | None = None,
                      reference: float | None = None) -> NscFitness:
    """The label-free fitness of a search request, on `device` (workers build their own)."""
    from loramerge_cli.masks import ones_table
    from loramerge_cli.merging.merge import resolve_config
    from loramerge_cli.search.nsc import build_nsc_problem

    if device:
        request = replace(request, eval=replace(request.eval, device=device))
    problem = build_nsc_problem(request, batch_size=None)
    merge_config = replace(request.merge, lam=lam if lam is not None else request.merge.lam)
    settings = resolve_config(merge_config, len(problem.adapters))
    return NscFitness(problem.adapters, settings, ones_table(problem.adapters), problem.engine, problem.objective,
                      reference)


@dataclass
class NscWorkerBuilder:
    """Picklable: builds a worker's label-free fitness on its device."""

    request: object
    lam: float
    reference: float

    def __call__(self, device: str) -> NscFitness:
        return build_nsc_fitness(self.request, device, self.lam, self.reference)
