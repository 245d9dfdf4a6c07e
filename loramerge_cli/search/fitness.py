"""Fitness of a pruning table: mean normalized validation accuracy of the pruned merge, in points
over the unpruned merge (Part A §A5). Merged modules are cached per (module, retained tasks)."""

from __future__ import annotations

from dataclasses import replace

from loramerge_cli.evaluation.engine import Evaluator, merged_deltas
from loramerge_cli.evaluation.metrics import mean_defined, normalized_accuracy
from loramerge_cli.masks import WeightTable
from loramerge_cli.merging.merge import ResolvedMerge, run_merge


def pruned_table(template: WeightTable, pruned: tuple[int, ...]) -> WeightTable:
    """A 0/1 table with the flat indices i = u·T + t of `pruned` set to 0."""
    task_count = len(template.tasks)
    weights = [[1.0] * len(template.units) for _ in template.tasks]
    for index in pruned:
        unit, task = divmod(index, task_count)
        weights[task][unit] = 0.0
    return replace(template, weights=weights)


class AccuracyFitness:
    """Scores candidates (pruned indices, λ or None for the merger's λ) with one evaluation engine."""

    def __init__(
        self, adapters, settings: ResolvedMerge, template: WeightTable, engine: Evaluator, experts: dict,
        reference: float | None = None,
    ):
        self.adapters = adapters
        self.unit_settings = replace(settings, lam=1.0)  # merge once at λ = 1, scale the factors
        self.base_lambda = settings.lam
        self.template = template
        self.engine = engine
        self.experts = experts
        self.cache: dict | None = {} if settings.params.get("scope", "module") == "module" else None
        self.forward_passes = 0
        self.reference = self.score((), None) if reference is None else reference

    def score(self, pruned: tuple[int, ...], lam: float | None) -> float:
        """Mean normalized accuracy (points) of one candidate."""
        result = run_merge(self.adapters, self.unit_settings, pruned_table(self.template, pruned), cache=self.cache)
        self.forward_passes += 1
        scores = self.engine.evaluate(merged_deltas(result, self.base_lambda if lam is None else lam))
        normalized, _ = normalized_accuracy(scores, self.experts)
        return mean_defined(normalized) or 0.0

    def __call__(self, candidates: list[tuple[tuple[int, ...], float | None]]) -> list[float]:
        return [self.score(pruned, lam) - self.reference for pruned, lam in candidates]
