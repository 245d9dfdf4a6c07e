"""Baselines on the same fitness and budget as ENMP: greedy leave-one-out pruning and random masks."""

from __future__ import annotations

from typing import Callable

import numpy as np

from loramerge_cli.search.decode import Candidate
from loramerge_cli.search.enmp import Evaluation, Fitness


class Ledger:
    """Distinct candidates evaluated so far, with the ENMP best rule and a budget."""

    def __init__(self, fitness: Fitness, budget: int):
        self.fitness, self.budget = fitness, budget
        self.memo: dict[Candidate, Evaluation] = {((), None): Evaluation((), None, 0.0, 0)}

    @property
    def remaining(self) -> int:
        return self.budget - (len(self.memo) - 1)

    def evaluate(self, candidates: list[Candidate]) -> list[Evaluation]:
        fresh = [c for c in dict.fromkeys(candidates) if c not in self.memo][: max(0, self.remaining)]
        for candidate, value in zip(fresh, self.fitness(fresh) if fresh else []):
            self.memo[candidate] = Evaluation(candidate[0], candidate[1], float(value), len(self.memo))
        return [self.memo[c] for c in candidates if c in self.memo]

    def best(self) -> Evaluation:
        return min(self.memo.values(), key=lambda e: (-e.fitness, len(e.pruned), e.order))


def greedy_search(
    fitness: Fitness, flat_size: int, max_pruned: int, budget: int,
    on_round: Callable[[dict], None] = lambda record: None,
) -> Ledger:
    """Add the single unit whose pruning helps most, while it helps and the budget lasts."""
    ledger = Ledger(fitness, budget)
    pruned: tuple[int, ...] = ()
    current = 0.0
    round_index = 0
    while len(pruned) < max_pruned and ledger.remaining > 0:
        options = [(tuple(sorted(pruned + (i,))), None) for i in range(flat_size) if i not in pruned]
        evaluated = ledger.evaluate(options)
        if not evaluated:
            break
        best = min(evaluated, key=lambda e: (-e.fitness, e.order))
        improves = best.fitness > current
        if improves:
            pruned, current = best.pruned, best.fitness
        round_index += 1
        kept = ledger.best()  # the best so far (the round's best is kept only when it improves)
        on_round({"round": round_index, "best_fitness": kept.fitness, "pruned": list(kept.pruned),
                  "round_best_fitness": best.fitness, "round_best_pruned": list(best.pruned),
                  "distinct_evaluated": len(ledger.memo)})
        if not improves:
            break
    return ledger


def random_search(
    fitness: Fitness, flat_size: int, pruned_count: int, budget: int, seed: int,
    on_round: Callable[[dict], None] = lambda record: None, batch: int = 16,
) -> Ledger:
    """Best of `budget` random masks pruning exactly `pruned_count` units (seeded); it stops early once every
    such mask is scored (a budget above their number would only draw repeats)."""
    import math

    ledger = Ledger(fitness, budget)
    generator = np.random.Generator(np.random.PCG64(seed))
    possible = math.comb(flat_size, pruned_count) if pruned_count else 0  # (the empty mask: scored already)
    attempts = round_index = 0
    while ledger.remaining > 0 and attempts < 100 * budget and len(ledger.memo) - 1 < possible:
        size = min(batch, ledger.remaining)
        candidates = [
            (tuple(sorted(int(i) for i in generator.choice(flat_size, pruned_count, replace=False))), None)
            for _ in range(size)
        ]
        attempts += size
        round_index += 1
        ledger.evaluate(candidates)
        on_round({"round": round_index, "best_fitness": ledger.best().fitness,
                  "distinct_evaluated": len(ledger.memo)})
    return ledger
