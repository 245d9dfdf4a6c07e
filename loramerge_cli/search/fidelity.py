"""Multi-fidelity scoring for successive halving: the validation set and seeded, nested subsets of it.

A rung is one fitness on a subset of every task's validation examples (the last rung: all of them).
The subsets are prefixes of one seeded permutation per task, so each rung's examples contain the
smaller rungs'. A rung's fitness is measured against the unpruned merge on the same examples, with the
experts' full-set accuracies as the normaliser, so every rung estimates the same quantity; only the
full set's score is ever reported as a table's fitness.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

Candidate = tuple[tuple[int, ...], float | None]
RungItem = tuple[int, Candidate]  # (rung index, candidate)


def rung_sizes(count: int, rungs: int, eta: int, min_examples: int) -> list[int]:
    """Examples per task of each rung, ascending, the last the full `count`: ⌈count / ηᵏ⌉ for
    k = rungs−1 … 0, dropping subsets smaller than `min_examples` (and repeats)."""
    sizes = [max(1, -(-count // eta**k)) for k in range(rungs - 1, -1, -1)]
    return sorted({size for size in sizes if size >= min_examples or size == count})


def subset_engine(engine, size: int, seed: int):
    """A view of `engine` (same model, weights and heads) that scores only `size` seeded examples per task."""
    from loramerge_cli.evaluation.loading import load_preprocessor

    view = copy.copy(engine)
    view.examples = {}
    for position, (name, examples) in enumerate(engine.examples.items()):
        order = np.random.Generator(np.random.PCG64([seed, position])).permutation(len(examples))
        keep = sorted(int(index) for index in order[:size])
        digest = hashlib.sha256(f"{examples.fingerprint}:{keep}".encode()).hexdigest()
        view.examples[name] = replace(
            examples, inputs=[examples.inputs[i] for i in keep],
            labels=None if examples.labels is None else [examples.labels[i] for i in keep], fingerprint=digest)
    view.prepared = view._prepare(load_preprocessor(engine.base, engine.task_file.type))
    return view


def examples_per_evaluation(fitness) -> int:
    """Forward examples one evaluation of `fitness` costs: its engine's examples over every task (0 if unknown)."""
    engine = getattr(fitness, "engine", None)
    examples = getattr(engine, "examples", None) or {}
    return sum(len(value) for value in examples.values())


@dataclass
class FidelityLadder:
    """Fitnesses of increasing fidelity; called on (rung, candidate) items.

    `costs[r]`: forward examples one evaluation at rung r costs; `one_example[r]`: the points one example
    moves a rung's fitness, about 100 / (T·n_r). `backend`, when set (worker processes),
    evaluates the items instead of the local rungs.
    """

    rungs: list  # Fitness per rung, the last on the full validation set
    costs: list[int]
    one_example: list[float]
    backend: Callable[[list[RungItem]], list[float]] | None = None
    sizes: list[int] | None = None  # examples per task of each rung, as `accuracy_ladder` was given them

    def __call__(self, items: list[RungItem]) -> list[float]:
        if self.backend is not None:
            return self.backend(items)
        return [self.rungs[rung]([candidate])[0] for rung, candidate in items]

    @property
    def references(self) -> list[float]:
        return [fitness.reference for fitness in self.rungs]

    @property
    def forward_passes(self) -> int:
        return sum(getattr(fitness, "forward_passes", 0) for fitness in self.rungs)


def single_rung(fitness) -> FidelityLadder:
    """The full validation set only (multi-fidelity off, or a fitness without subsets)."""
    cost = examples_per_evaluation(fitness)
    return FidelityLadder([fitness], [cost], [100.0 / cost if cost else 0.0])


def accuracy_ladder(full, sizes: list[int], seed: int, references: list[float] | None = None) -> FidelityLadder:
    """An `AccuracyFitness` per subset size (ascending; the last size is the full set, `full` itself).

    `references` (a worker's): each rung's unpruned score, so the worker does not rescore it."""
    from loramerge_cli.search.fitness import AccuracyFitness

    settings = replace(full.unit_settings, lam=full.base_lambda)
    rungs = []
    for index, size in enumerate(sizes[:-1]):
        engine = subset_engine(full.engine, size, seed)
        rung = AccuracyFitness(full.adapters, settings, full.template, engine, full.experts,
                               None if references is None else references[index])
        rung.cache = full.cache  # merged modules do not depend on the examples
        rungs.append(rung)
    rungs.append(full)
    costs = [examples_per_evaluation(rung) for rung in rungs]
    return FidelityLadder(rungs, costs, [100.0 / cost for cost in costs], sizes=list(sizes))


@dataclass
class LadderWorkerBuilder:
    """Picklable: builds a worker's ladder on its device (the same subsets as the parent's)."""

    request: object  # SearchRequest
    lam: float
    experts: dict
    references: list[float]
    sizes: list[int]
    seed: int

    def __call__(self, device: str) -> FidelityLadder:
        from loramerge_cli.search.fitness import AccuracyFitness
        from loramerge_cli.search.problem import build_problem

        problem = build_problem(self.request, device, self.lam)
        full = AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, self.experts,
                               self.references[-1])
        return accuracy_ladder(full, self.sizes, self.seed, self.references[:-1])
