"""Fitness of a pruning table: mean normalized validation accuracy of the pruned merge, in points
over the unpruned merge (docs/algorithms.md, ENMP). Merged modules are cached per (module, retained tasks), and each
candidate's forward pass starts at its first changed block (`BlockReplay`)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import torch

from loramerge_cli.evaluation.engine import Evaluator, merged_deltas
from loramerge_cli.evaluation.metrics import mean_defined, normalized_accuracy
from loramerge_cli.evaluation.replay import BlockReplay
from loramerge_cli.masks import WeightTable
from loramerge_cli.merging.merge import ResolvedMerge, module_paths, run_merge


def mean_normalized(scores: dict[str, float], experts: dict[str, float]) -> float:
    """Mean normalized accuracy (points) of {task: accuracy}; 0 if no task's is defined."""
    return mean_defined(normalized_accuracy(scores, experts)[0]) or 0.0


def pruned_table(template: WeightTable, pruned: tuple[int, ...]) -> WeightTable:
    """A 0/1 table with the flat indices i = u·T + t of `pruned` set to 0."""
    task_count = len(template.tasks)
    weights = [[1.0] * len(template.units) for _ in template.tasks]
    for index in pruned:
        unit, task = divmod(index, task_count)
        weights[task][unit] = 0.0
    return replace(template, weights=weights)


MERGE_CACHE_MB = 2048  # merged modules a search keeps for the next candidates (per process)


class MergedModuleCache(OrderedDict):
    """Merged modules by (path, retained tasks, λ) for run_merge, within `budget_mb`: the least recently used
    go first, and each is kept in float32, what scoring reads (merged_deltas casts to it before anything
    else, so the scores are those of the float64 result). Unbounded, a search on an 8B model would keep
    gigabytes: every distinct pruning of a block is 7 merged modules."""

    def __init__(self, budget_mb: float = MERGE_CACHE_MB):
        super().__init__()
        self.budget = budget_mb * 2**20
        self.size = 0

    def __getitem__(self, key):
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key, module) -> None:
        module = replace(module, lora_B=module.lora_B.to(torch.float32), lora_A=module.lora_A.to(torch.float32))
        if key in self:
            self.size -= _bytes(super().__getitem__(key))
        super().__setitem__(key, module)
        self.size += _bytes(module)
        while self.size > self.budget and len(self) > 1:
            _, dropped = self.popitem(last=False)
            self.size -= _bytes(dropped)


def _bytes(module) -> int:
    return module.lora_B.nbytes + module.lora_A.nbytes


class CandidateMerges:
    """Merges candidates (pruned indices, λ or None for the merger's λ): once at λ = 1, with merged modules
    cached per retained task set, then scaled. The base of every fitness."""

    def __init__(self, adapters, settings: ResolvedMerge, template: WeightTable, engine: Evaluator):
        self.adapters = adapters
        self.unit_settings = replace(settings, lam=1.0)  # merge once at λ = 1, scale the factors
        self.base_lambda = settings.lam
        self.template = template
        self.engine = engine
        self.cache = MergedModuleCache() if settings.params.get("scope", "module") == "module" else None
        self.forward_passes = 0

    def candidate_deltas(self, pruned: tuple[int, ...], lam: float | None) -> dict:
        """The merged updates of one candidate, at λ (the merger's when None)."""
        result = run_merge(self.adapters, self.unit_settings, pruned_table(self.template, pruned), cache=self.cache)
        return merged_deltas(result, self.base_lambda if lam is None else lam)


class AccuracyFitness(CandidateMerges):
    """Scores candidates with one evaluation engine: mean normalized accuracy over the unpruned merge."""

    def __init__(
        self, adapters, settings: ResolvedMerge, template: WeightTable, engine: Evaluator, experts: dict,
        reference: float | None = None,
    ):
        super().__init__(adapters, settings, template, engine)
        self.experts = experts
        self.replay = BlockReplay(engine, module_paths(adapters), engine.settings.block_cache_mb)
        self.reference_scores: dict[str, float] | None = None  # {task: accuracy} of the unpruned merge
        if reference is None:  # scored here; a worker is handed it and records the replay on first use
            self.reference_scores = self._record_reference()
            self.reference = self._mean(self.reference_scores)
            self.forward_passes += 1
        else:
            self.reference = reference

    def _record_reference(self) -> dict[str, float]:
        return self.replay.record(self.candidate_deltas((), None))

    def _mean(self, scores: dict[str, float]) -> float:
        return mean_normalized(scores, self.experts)

    def task_scores(self, pruned: tuple[int, ...], lam: float | None) -> dict[str, float]:
        """{task: accuracy} of one candidate."""
        if self.replay.enabled and not self.replay.recorded:  # a worker: record the reference once
            self._record_reference()
        self.forward_passes += 1
        return self.replay.evaluate(self.candidate_deltas(pruned, lam))

    def score(self, pruned: tuple[int, ...], lam: float | None) -> float:
        """Mean normalized accuracy (points) of one candidate."""
        return self._mean(self.task_scores(pruned, lam))

    def __call__(self, candidates: list[tuple[tuple[int, ...], float | None]]) -> list[float]:
        return [self.score(pruned, lam) - self.reference for pruned, lam in candidates]
