"""The search strategies: the one place to add one (docs/contributing.md, "Adding a search strategy").

A mask strategy gets the fitness (a batch of candidates -> fitness values), the search space and an event
callback, and returns its best evaluation, how many distinct candidates it scored, and its history. It says
whether it can resume a run directory; one that cannot is refused with --resume (never silently restarted).
`nsc` is a coefficient strategy: it learns real weights by gradient descent (search/nsc.py), not masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loramerge_cli.errors import UsageError


@dataclass
class SearchSpace:
    """What a mask strategy searches: the flat index i = u·T + t over units × tasks, and where to keep state."""

    unit_count: int
    task_count: int
    base_lambda: float
    run_dir: Path | None = None
    resume: bool = False


@dataclass
class Outcome:
    best: object  # enmp.Evaluation
    evaluations: int  # distinct candidates scored (the unpruned reference not counted)
    history: list[dict]


@dataclass(frozen=True)
class Strategy:
    name: str
    help: str
    resumable: bool
    run: Callable | None  # (request, fitness, SearchSpace, on_event) -> Outcome; None for `nsc`
    kind: str = "mask"  # "mask" (0/1 tables scored by a fitness) or "coefficients" (nsc)


def _budget(request) -> int:
    return request.budget or request.enmp.popsize * request.enmp.generations


def _run_enmp(request, fitness, space: SearchSpace, on_event) -> Outcome:
    from loramerge_cli.search.enmp import EnmpSearch

    search = EnmpSearch(request.enmp, space.unit_count, space.task_count, fitness, base_lambda=space.base_lambda,
                        run_dir=space.run_dir, on_generation=lambda record: on_event("generation", record))
    best = search.run(resume=space.resume)
    return Outcome(best, len(search.state.memo) - 1, search.state.history)


def _rounds(on_event) -> tuple[list[dict], Callable[[dict], None]]:
    history: list[dict] = []

    def on_round(record: dict) -> None:
        history.append(record)
        on_event("round", record)

    return history, on_round


def _run_greedy(request, fitness, space: SearchSpace, on_event) -> Outcome:
    from loramerge_cli.search.baselines import greedy_search
    from loramerge_cli.search.decode import max_pruned

    history, on_round = _rounds(on_event)
    k_max = max_pruned(request.enmp.max_prune, space.unit_count, space.task_count)
    ledger = greedy_search(fitness, space.unit_count * space.task_count, k_max, _budget(request), on_round)
    return Outcome(ledger.best(), len(ledger.memo) - 1, history)


def _run_random(request, fitness, space: SearchSpace, on_event) -> Outcome:
    from loramerge_cli.search.baselines import random_search

    history, on_round = _rounds(on_event)
    flat = space.unit_count * space.task_count
    sparsity = request.sparsity if request.sparsity is not None else request.enmp.max_prune / 2
    count = max(1, min(flat, round(sparsity * flat)))
    ledger = random_search(fitness, flat, count, _budget(request), request.enmp.seed, on_round)
    return Outcome(ledger.best(), len(ledger.memo) - 1, history)


STRATEGIES: dict[str, Strategy] = {
    "enmp": Strategy("enmp", "CMA-ES over the binary table (ENMP)", True, _run_enmp),
    "greedy": Strategy("greedy", "leave-one-out: prune the unit that helps most, while it helps", False,
                       _run_greedy),
    "random": Strategy("random", "best of N random masks of a fixed sparsity", False, _run_random),
    "nsc": Strategy("nsc", "learn one coefficient per task and module by gradient descent on unlabeled inputs",
                    True, None, kind="coefficients"),
}


def strategy_named(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)} (got {name!r})")
    return STRATEGIES[name]
