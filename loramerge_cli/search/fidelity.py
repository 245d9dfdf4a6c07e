"""Multi-fidelity scoring for successive halving: the validation set and seeded, nested subsets of it.

A rung is one fitness on a subset of every task's validation examples (the last rung: all of them).
The subsets are prefixes of one seeded permutation per task, so each rung's examples contain the
smaller rungs'. A rung's fitness is measured against the unpruned merge on the same examples, with the
experts' full-set accuracies as the normaliser, so every rung estimates the same quantity; only the
full set's score is ever reported as a table's fitness.

On labelled accuracy (`NestedLadder`) the subsets are scored slice by slice: slice r is rung r's examples
less rung r−1's. A table promoted from rung r−1 to a subset rung r is scored on slice r only, and its
rung-r accuracy counts the correct examples of both slices (accuracy is a mean over examples). That is the
score of rung r's examples at once up to the batches the examples share (a model's outputs for one
example can depend, in the last bits, on its batch-mates; in half precision by more). The full set is
never assembled from slices: a table reaching it is scored by the full-set fitness itself, so every
full-set score is exactly what scoring the table on the validation set gives.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from loramerge_cli.search.decode import Candidate
RungItem = tuple[int, Candidate]  # (rung index, candidate)


def rung_sizes(count: int, rungs: int, eta: int, min_examples: int) -> list[int]:
    """Examples per task of each rung, ascending, the last the full `count`: ⌈count / ηᵏ⌉ for
    k = rungs−1 … 0, dropping subsets smaller than `min_examples` (and repeats)."""
    sizes = [max(1, -(-count // eta**k)) for k in range(rungs - 1, -1, -1)]
    return sorted({size for size in sizes if size >= min_examples or size == count})


def seeded_orders(engine, seed: int) -> dict[str, list[int]]:
    """One seeded permutation of each task's validation examples (the rungs are its prefixes)."""
    return {name: [int(i) for i in np.random.Generator(np.random.PCG64([seed, position])).permutation(len(examples))]
            for position, (name, examples) in enumerate(engine.examples.items())}


def subset_engine(engine, keep: dict[str, list[int]]):
    """A view of `engine` (same model, weights and heads) that scores only the examples `keep[task]` (a task
    with none is left out)."""
    from loramerge_cli.evaluation.loading import load_preprocessor

    view = copy.copy(engine)
    view.examples = {}
    for name, examples in engine.examples.items():
        indices = sorted(keep.get(name, ()))
        if not indices:
            continue
        digest = hashlib.sha256(f"{examples.fingerprint}:{indices}".encode()).hexdigest()
        view.examples[name] = replace(
            examples, inputs=[examples.inputs[i] for i in indices],
            labels=None if examples.labels is None else [examples.labels[i] for i in indices], fingerprint=digest)
    view.task_file = replace(engine.task_file, tasks=[t for t in engine.task_file.tasks if t.name in view.examples])
    view.prepared = view._prepare(load_preprocessor(engine.base, engine.task_file.type))
    return view


def examples_per_evaluation(fitness) -> int:
    """Forward examples one evaluation of `fitness` costs: its engine's examples over every task (0 if unknown)."""
    engine = getattr(fitness, "engine", None)
    examples = getattr(engine, "examples", None) or {}
    return sum(len(value) for value in examples.values())


FULL = -1  # a part of the validation set: all of it, scored by the full-set fitness itself


@dataclass
class FidelityLadder:
    """Fitnesses of increasing fidelity; called on (rung, candidate) items, or (rung, candidate, rung scored
    before) for a promotion (scored on the whole rung all the same: its rungs are independent fitnesses).

    `costs[r]`: forward examples one evaluation at rung r costs; `one_example[r]`: the points one example
    moves a rung's fitness, about 100 / (T·n_r).
    """

    rungs: list  # Fitness per rung, the last on the full validation set
    costs: list[int]
    one_example: list[float]
    backend: Callable[[list[RungItem]], list[float]] | None = None

    def work(self, rung: int, before: int | None = None) -> tuple[int, int]:
        """(forward examples, forward passes) of scoring a table on `rung`, promoted from rung `before`
        (None: new): the whole rung, one pass."""
        return self.costs[rung], 1

    @property
    def reference_work(self) -> tuple[int, int]:
        """(forward examples, forward passes) spent scoring the unpruned merge on the subsets."""
        return sum(self.costs[:-1]), len(self.costs) - 1

    def __call__(self, items: list) -> list[float]:
        if self.backend is not None:
            return self.backend([item[:2] for item in items])
        return [self.rungs[rung]([candidate])[0] for rung, candidate, *_ in items]


def single_rung(fitness) -> FidelityLadder:
    """The full validation set only (multi-fidelity off, or a fitness without subsets)."""
    cost = examples_per_evaluation(fitness)
    return FidelityLadder([fitness], [cost], [100.0 / cost if cost else 0.0])


@dataclass
class SliceScorer:
    """Scores (part, candidate) items: a slice's {task: accuracy}, or for `FULL` the full-set fitness (points
    over the unpruned merge). What a worker process serves."""

    slices: list  # AccuracyFitness per slice, in rung order
    full: object  # the full-set fitness

    def __call__(self, items: list) -> list:
        return [self.full([candidate])[0] if part == FULL else self.slices[part].task_scores(*candidate)
                for part, candidate in items]


def slice_scorer(full, sizes: list[int], seed: int, score_references: bool = True) -> SliceScorer:
    """The slices of the subset rungs of `sizes` (examples per task, ascending, the last all of them: `full`
    itself) of `full`'s validation set. `score_references` off (a worker): the unpruned merge is recorded on
    first use, not scored."""
    from loramerge_cli.search.fitness import AccuracyFitness

    settings = replace(full.unit_settings, lam=full.base_lambda)
    orders = seeded_orders(full.engine, seed)
    slices = []
    for index, size in enumerate(sizes[:-1]):
        start = sizes[index - 1] if index else 0
        engine = subset_engine(full.engine, {name: order[start:size] for name, order in orders.items()})
        part = AccuracyFitness(full.adapters, settings, full.template, engine, full.experts,
                               None if score_references else 0.0)
        part.cache = full.cache  # merged modules do not depend on the examples
        slices.append(part)
    return SliceScorer(slices, full)


@dataclass
class NestedLadder:
    """Rungs on nested seeded prefixes, scored slice by slice (the module docstring); `backend`, when set
    (worker processes), scores the parts instead of `scorer`."""

    scorer: SliceScorer
    sizes: list[int]
    backend: Callable[[list], list] | None = None

    def work(self, rung: int, before: int | None = None) -> tuple[int, int]:
        """(forward examples, forward passes) of scoring a table on `rung`, promoted from rung `before`
        (None: new): a promotion to a subset runs the new slices only; the full set is the full fitness."""
        last = len(self.sizes) - 1
        if rung == last:
            return self.costs[last], 1
        if before is None:
            return self.costs[rung], rung + 1
        return self.costs[rung] - self.costs[before], rung - before

    @property
    def reference_work(self) -> tuple[int, int]:
        """(forward examples, forward passes) spent scoring the unpruned merge on the subsets' slices."""
        return self.costs[-2], len(self.sizes) - 1

    def __post_init__(self) -> None:
        full = self.scorer.full
        self.tasks = list(full.engine.examples)
        self.counts = [{name: len(examples) for name, examples in part.engine.examples.items()}
                       for part in self.scorer.slices]
        self.costs = list(np.cumsum([sum(counts.values()) for counts in self.counts]).tolist())
        self.costs.append(sum(len(examples) for examples in full.engine.examples.values()))
        self.one_example = [100.0 / cost for cost in self.costs]
        references = [part.reference_scores for part in self.scorer.slices]
        self.references = [self._mean(references, rung) for rung in range(len(self.scorer.slices))] + [full.reference]
        self.parts: dict = {}  # candidate -> [{task: accuracy} per slice scored]

    def _mean(self, parts: list[dict], rung: int) -> float:
        """Mean normalized accuracy over slices 0..rung: each task's correct examples over its examples."""
        from loramerge_cli.search.fitness import mean_normalized

        correct, total = dict.fromkeys(self.tasks, 0), dict.fromkeys(self.tasks, 0)
        for index in range(rung + 1):
            for task, accuracy in parts[index].items():
                count = self.counts[index][task]
                correct[task] += round(accuracy * count)
                total[task] += count
        scores = {task: correct[task] / total[task] for task in self.tasks if total[task]}
        return mean_normalized(scores, self.scorer.full.experts)

    def __call__(self, items: list) -> list[float]:
        """Scores of (rung, candidate[, rung scored before in this halving]) items: on the full set by the
        full-set fitness; on a subset from the slices, running only those the candidate has not run."""
        work, plan = [], []
        for rung, candidate, *before in items:
            if rung == len(self.sizes) - 1:
                parts = [FULL]
            else:
                first = before[0] + 1 if before else 0
                if first and len(self.parts.get(candidate, ())) != first:
                    raise RuntimeError(f"promotion of {candidate} to rung {rung}: rung {first - 1} was not scored")
                parts = list(range(first, rung + 1))
            plan.append((rung, candidate, parts))
            work.extend((part, candidate) for part in parts)
        results = iter((self.backend or self.scorer)(work))
        values = []
        for rung, candidate, parts in plan:
            if parts == [FULL]:
                values.append(float(next(results)))
                continue
            scored = self.parts.setdefault(candidate, [])
            if not parts[0]:
                scored.clear()
            scored.extend(next(results) for _ in parts)
            values.append(self._mean(scored, rung) - self.references[rung])
        return values

    @property
    def forward_passes(self) -> int:
        """Evaluations this process ran (references included; not a worker's)."""
        return sum(part.forward_passes for part in self.scorer.slices) + self.scorer.full.forward_passes


def accuracy_ladder(full, sizes: list[int], seed: int) -> NestedLadder:
    """The nested rungs `sizes` (examples per task, ascending; the last the full set, `full` itself)."""
    return NestedLadder(slice_scorer(full, sizes, seed), list(sizes))


@dataclass
class LadderWorkerBuilder:
    """Picklable: builds a worker's slice scorer on its device (the same slices as the parent's)."""

    request: object  # SearchRequest
    lam: float
    experts: dict
    reference: float  # the unpruned merge's full-set fitness
    sizes: list[int]
    seed: int

    def __call__(self, device: str) -> SliceScorer:
        from loramerge_cli.search.fitness import AccuracyFitness
        from loramerge_cli.search.problem import build_problem

        problem = build_problem(self.request, device, self.lam)
        full = AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, self.experts,
                               self.reference)
        return slice_scorer(full, self.sizes, self.seed, score_references=False)
