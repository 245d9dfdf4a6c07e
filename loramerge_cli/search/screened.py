"""Screened CMA-ES (`--strategy screened`; the default strategy is `surrogate`): the paper's ENMP search with
four parts added, each of which can be switched off.

* **screen** (step 0): every single-unit pruning is scored once on the full validation set; the scores set
  the CMA-ES mean per unit (the units whose pruning helped most start above the threshold θ, the most
  harmful far below it). Without the greedy phase the "stacks" — the k best helpful singles pruned
  together, k = 2 … K_max — are scored too. Off: the mean is the paper's x0 everywhere. With
  `screen_rungs` > 1 the singles are halved over that many rungs first (cheaper, a less exact start).
* **greedy** (after the screen, on the full set): greedy leave-one-out restricted to the `greedy_pool`
  best single units — each round scores the current table plus each remaining pool unit and keeps the best,
  while it improves and the ρ cap allows (greedy's own first round is the screen). CMA-ES then starts
  around the table it found (its units, then the best helpful singles, above θ; the rest in screen order
  below). Off (`greedy_pool` 0): CMA-ES starts right after the screen.
* **redraw**: a candidate whose decoded table was already scored (or drawn earlier in the generation) is
  drawn again, up to `redraws` times per slot, so a generation scores up to popsize new tables.
* **halving** (successive halving, inside each CMA-ES generation): the generation's new tables are scored
  on the smallest seeded validation subset, the best 1/η go on to the next subset, and so on to the full
  validation set. The cut accounts for the noise: every table within `noise_examples` examples of the last
  one kept goes on too (one example is 100 / (T·n_r) points on a subset of n_r examples per task). On a
  `NestedLadder` a promotion is scored, and counted, on the rung's new examples only.
  Off: every table is scored on the full set.

CMA-ES ranks a generation by (the largest subset a table reached, its score there). Only full-set
scores ever compete for the returned table, so its fitness is the full validation set's, and the
unpruned merge (fitness 0) is in that memo from the start: the result is never worse than not pruning.
The budget is counted twice: distinct full-set evaluations, and forward examples (each evaluation costs
the examples it runs, summed over tasks: a promotion to the larger subset only the new ones). The whole
state is written to the run directory after every step, so a killed run resumes to the same table.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Callable

import numpy as np

from loramerge_cli.errors import LoramergeError, UsageError
from loramerge_cli.events import stage
from loramerge_cli.search.decode import Candidate, decode_mask, feasible_tables, max_pruned
from loramerge_cli.search.enmp import (
    EnmpSettings,
    Evaluation,
    SteppedSearch,
    _search_numpy_state,
    new_cma,
)
from loramerge_cli.search.enmp_settings import LARGEST_SEARCH_VALUE
from loramerge_cli.search.parameters import SCREENED_PARAMETERS, check_declared
from loramerge_cli.search.state_io import write_progress


def rung_first(reached: list[tuple[int, float]]) -> list[float]:
    """What CMA-ES minimises for (largest rung reached, score there): −(step·rung + score), with a step of 1000
    points, or a power of 1000 above it where scores spread wider (a weak expert's normalised accuracy can
    exceed 1000), so that a larger rung always ranks first."""
    step = 1000.0
    spread = 2 * max((abs(score) for _, score in reached if math.isfinite(score)), default=0.0)
    while step <= spread:
        step *= 1000.0
    return [-(step * level + score) for level, score in reached]


@dataclass
class ScreenedSettings(EnmpSettings):
    """ENMP's search budget (its x0: the mean of every unit when the screen is off) and the four parts'
    switches and knobs (screen, greedy, redraws, halving); `addscale` stays ENMP's."""

    screen: bool = True
    redraws: int = 20  # per slot; 0: off
    halving: bool = True
    eta: int = 3  # successive halving: keep the best 1/η per rung; rung sizes n/η^k
    rungs: int = 3  # subsets per search, the full set included
    min_examples: int = 24  # per task: smaller subsets are left out
    noise_examples: float = 1.0  # tables within this many examples (100/(T·n_r) points each) of a cut go on too
    budget: int | None = None  # stop once this many distinct full-set evaluations are done
    greedy_pool: int = 8  # after the screen: greedy over this many best single units (0: off)
    screen_rungs: int = 1  # the screen's singles are halved over the last this many rungs (1: the full set only)

    def check(self) -> None:
        super().check()
        if self.addscale:
            raise UsageError("--addscale searches λ with --strategy enmp only")
        check_declared(self, SCREENED_PARAMETERS)
        if self.rungs < 1 or self.min_examples < 1 or self.noise_examples < 0:
            raise UsageError("rungs, min_examples must be >= 1 and noise_examples >= 0")
        if self.budget is not None and self.budget < 1:
            raise UsageError("--budget must be >= 1")
        if self.screen_rungs > self.rungs:
            raise UsageError(f"--screen-rungs must be from 1 to {self.rungs} (the subsets and the full set)")

    def rung_sizes(self, count: int) -> list[int]:
        """Examples per task of each halving rung on `count` validation examples per task (the last: all)."""
        from loramerge_cli.search.fidelity import rung_sizes

        return rung_sizes(count, self.rungs, self.eta, self.min_examples)


@dataclass
class ScreenedState:
    step: int  # steps completed: the screen (when on) is step 0, then one step per generation
    strategy: object | None  # the CMA-ES, created after the screen
    numpy_rng: tuple
    scores: list[dict]  # per rung: candidate -> score (points over the unpruned merge on that subset)
    memo: dict  # candidate -> Evaluation on the full validation set (the unpruned merge included)
    forward_examples: int = 0
    forward_passes: int = 0  # evaluations run (a promotion: one per new slice), the subsets' references included
    history: list = field(default_factory=list)
    prior: list | None = None  # the screen's score per unit (None: no screen)
    greedy: dict | None = None  # the greedy phase: pool, table (units in the order added), fitness, done
    greedy_steps: int = 0  # steps the greedy phase took (they are not CMA-ES generations)


def prior_mean(order: list[int], gains: list[float], k_max: int, sigma: float, threshold: float,
               helpful: list[int] | None = None) -> list[float]:
    """CMA-ES mean per unit from the screen (`order`: units best first): the ≤ K_max best helpful units
    (or the given `helpful` ones: the greedy phase's table) are pruned with probability 0.8 per sample, the
    others with probability falling linearly in rank from 0.3 to 0.02 (the paper's x0 = −1 at σ0 = 0.5)."""
    if helpful is None:
        helpful = [i for i in order[:k_max] if gains[i] > 0]
    rest = [i for i in order if i not in set(helpful)]
    normal = NormalDist()
    mean = [0.0] * len(order)
    for i in helpful:
        mean[i] = threshold + sigma * normal.inv_cdf(0.8)
    for rank, i in enumerate(rest):
        probability = 0.3 - 0.28 * rank / max(1, len(rest) - 1)
        mean[i] = threshold + sigma * normal.inv_cdf(probability)
    return mean


class ScreenedSearch(SteppedSearch):
    """`ladder`: a `FidelityLadder` (its last rung the full validation set); `run_dir` (optional) holds
    `screened_state.json` and `trajectory.jsonl`."""

    def __init__(self, settings: ScreenedSettings, unit_count: int, task_count: int, ladder,
                 run_dir: Path | None = None, on_event: Callable[[str, dict], None] = lambda kind, data: None):
        settings.check()
        self.settings = settings
        self.dimension = unit_count * task_count
        self.k_max = max_pruned(settings.max_prune, unit_count, task_count)
        self.feasible = feasible_tables(self.dimension, self.k_max)  # all scored: nothing left to search
        self.ladder = ladder
        last = len(ladder.costs) - 1
        self.levels = list(range(last + 1)) if settings.halving else [last]
        if settings.screen and settings.screen_rungs > len(self.levels):
            raise LoramergeError(f"--screen-rungs {settings.screen_rungs}: this validation set gives "
                                 f"{len(self.levels)} rung(s) (subsets under {settings.min_examples} examples per "
                                 f"task are left out); use at most {len(self.levels)}")
        self.run_dir = Path(run_dir) if run_dir else None
        self.on_event = on_event
        self.state: ScreenedState | None = None

    # -- state -------------------------------------------------------------------------------------
    def start(self, resume: bool = False) -> None:
        if resume:
            self.state = self._load_state()
            return
        empty: Candidate = ((), None)
        scores = [{} for _ in self.ladder.costs]
        for memo in scores:
            memo[empty] = 0.0
        self.state = ScreenedState(0, None, np.random.RandomState(self.settings.seed).get_state(), scores,
                                   {empty: Evaluation((), None, 0.0, 0)})
        if len(self.levels) > 1:  # the unpruned merge on the subsets (on the full set it is the baseline)
            self.state.forward_examples, self.state.forward_passes = self.ladder.reference_work
        if not self.settings.screen:
            self.state.step = 1  # no step 0
            self.state.strategy = self._new_strategy([self.settings.x0] * self.dimension)

    def _new_strategy(self, mean: list[float]):
        with _search_numpy_state(self.state):
            return new_cma(mean, self.settings)

    @property
    def last_step(self) -> int:
        return self.settings.generations

    def done(self) -> bool:
        budget = self.settings.budget
        return (self.state.step - self.state.greedy_steps > self.last_step
                or (budget is not None and len(self.state.memo) - 1 >= budget)
                or (self.state.step > 0 and self._all_scored()))

    def _all_scored(self, drawn=()) -> bool:
        """Every table the ρ cap allows is scored (or `drawn` this generation): redraws cannot find a new one."""
        if self.feasible > 1 << 20:  # far more tables than any search scores
            return False
        known = set(drawn).union(*(self.state.scores[rung] for rung in self.levels))
        return len(known) >= self.feasible

    # -- loop --------------------------------------------------------------------------------------
    def step(self) -> dict:
        started = time.perf_counter()
        state = self.state
        before = (state.forward_examples, len(state.memo))
        if state.step == 0:
            record = self._screen()
        elif state.greedy is not None and not state.greedy["done"]:
            record = self._greedy_round()
            state.greedy_steps += 1
        else:
            record = self._generation()
        best = self.best()
        seconds = time.perf_counter() - started
        record.update(
            generation=state.step, best_fitness=best.fitness, best_pruned=list(best.pruned), best_lambda=None,
            distinct_evaluated=len(state.memo), full_evaluations=len(state.memo) - 1,
            new_full_evaluations=len(state.memo) - before[1], forward_examples=state.forward_examples,
            new_forward_examples=state.forward_examples - before[0], seconds=seconds,
            seconds_per_evaluation=seconds / max(1, record["new_evaluations"]))
        if record["phase"] == "cma":
            record["cma_generation"] = state.step - state.greedy_steps
        elif record["phase"] == "greedy":
            record["round"] = state.greedy_steps
        state.step += 1
        state.history.append(record)
        self._save_state()
        self.on_event({"screen": "screen", "greedy": "greedy"}.get(record["phase"], "generation"), record)
        return record

    def _screen(self) -> dict:
        """Step 0, on the full set: every single-unit pruning, then the stacks of the best helpful singles;
        sets the prior."""
        state = self.state
        full = self.levels[-1:]
        singles = [((i,), None) for i in range(self.dimension)] if self.k_max else []
        counts = self._halve(singles, "screening single-unit prunings",
                             self.levels[-max(1, self.settings.screen_rungs):])
        gains, order = self._screen_order()
        helpful = [i for i in order[: self.k_max] if gains[i] > 0]
        start = state.memo.get(((order[0],), None)) if order else None  # greedy's start: a full-set gain > 0
        greedy = (self.settings.greedy_pool > 1 and self.k_max > 1 and start is not None and start.fitness > 0)
        # the stacks, unless the greedy phase follows (it scores the first, and adds units by their full-set gain)
        stacks = [] if greedy else [(tuple(sorted(helpful[:k])), None) for k in range(2, len(helpful) + 1)]
        more = self._halve([c for c in stacks if not self._scored(c)], None, full)
        state.prior = gains
        if greedy:  # greedy's first round is the screen
            state.greedy = {"pool": order[: self.settings.greedy_pool], "table": [order[0]],
                            "fitness": gains[order[0]], "done": False}
        else:
            self._start_cma()
        fitnesses = [state.memo[c].fitness for c in singles + stacks if c in state.memo]
        return {"phase": "screen", "mean_fitness": float(np.mean(fitnesses)) if fitnesses else 0.0,
                "mean_sparsity": float(np.mean([len(c[0]) for c in singles + stacks] or [0])) / self.dimension,
                "new_evaluations": counts["evaluations"] + more["evaluations"],
                "new_tables": counts["tables"] + more["tables"],
                "evaluations_per_rung": [a + b for a, b in zip(counts["per_rung"], more["per_rung"])],
                "redraws": 0, "cache_hits": 0}

    def _screen_order(self) -> tuple[list[float], list[int]]:
        """Each single's gain (its score on the largest rung it reached; 0 if --budget ran out first) and the
        units best first: those scored on more examples first, then by gain, then by index."""
        reached = [self._reached(((i,), None)) for i in range(self.dimension)]
        gains = [score for _, score in reached]
        return gains, sorted(range(self.dimension), key=lambda i: (-reached[i][0], -gains[i], i))

    def _start_cma(self) -> None:
        """CMA-ES from the screen's prior; after the greedy phase, the helpful units are its table's, then the
        best helpful singles up to K_max."""
        state = self.state
        gains, order = self._screen_order()
        helpful = None
        if state.greedy:  # its table first, then the best helpful singles, up to K_max
            table = list(state.greedy["table"])
            helpful = table + [i for i in order if gains[i] > 0 and i not in table][: max(0, self.k_max - len(table))]
        state.strategy = self._new_strategy(prior_mean(order, gains, self.k_max, self.settings.sigma0,
                                                       self.settings.threshold, helpful))

    def _greedy_round(self) -> dict:
        """One round of the greedy phase on the full set: the current table plus each pool unit not in it;
        the best addition is kept if it improves the table (ties: earlier in the pool). The phase ends when
        none improves, at the ρ cap or when the pool is used up; CMA-ES then starts around its table."""
        state, greedy = self.state, self.state.greedy
        table = greedy["table"]
        units = [i for i in greedy["pool"] if i not in table]
        options = [(tuple(sorted(table + [i])), None) for i in units]
        fresh = [c for c in options if c not in state.memo]
        counts = self._halve(fresh, None, self.levels[-1:])
        scored = [(state.memo[c].fitness, -position, i) for position, (c, i) in enumerate(zip(options, units))
                  if c in state.memo]  # all of them, unless --budget ran out
        fitness, _, unit = max(scored, default=(0.0, 0, None))
        if unit is not None and fitness > greedy["fitness"]:
            greedy["table"], greedy["fitness"] = table + [unit], fitness
        else:
            greedy["done"] = True
        if len(greedy["table"]) >= min(self.k_max, len(greedy["pool"])):
            greedy["done"] = True
        if greedy["done"]:
            self._start_cma()
        values = [value for value, _, _ in scored]
        return {"phase": "greedy", "mean_fitness": float(np.mean(values)) if values else 0.0,
                "mean_sparsity": float(np.mean([len(c[0]) for c in options] or [0])) / self.dimension,
                "new_evaluations": counts["evaluations"], "evaluations_per_rung": counts["per_rung"],
                "greedy_table": sorted(greedy["table"]), "greedy_fitness": greedy["fitness"],
                "redraws": 0, "cache_hits": len(options) - len(fresh)}

    def _generation(self) -> dict:
        """One CMA-ES generation: ask (redrawing already-scored tables), halve, tell. A redrawn solution can
        replace an injected one (the start table): cma's warning that it was never told is expected here."""
        from cma.evolution_strategy import InjectionWarning

        strategy = self.state.strategy
        candidates: list[Candidate] = []
        seen: set = set()
        redraws = 0
        with _search_numpy_state(self.state), warnings.catch_warnings():
            warnings.simplefilter("ignore", InjectionWarning)
            solutions = strategy.ask()
            for index, x in enumerate(solutions):
                candidate = self.decode(x)
                attempts = 0
                while ((candidate in seen or self._scored(candidate)) and attempts < self.settings.redraws
                       and not self._all_scored(seen)):
                    x = strategy.ask(1)[0]
                    candidate = self.decode(x)
                    attempts += 1
                redraws += attempts
                solutions[index] = x
                candidates.append(candidate)
                seen.add(candidate)
        fresh = [c for c in dict.fromkeys(candidates) if not self._scored(c)]
        counts = self._halve(fresh)
        reached = [self._reached(c) for c in candidates]
        with _search_numpy_state(self.state), warnings.catch_warnings():  # CMA-ES minimises
            warnings.simplefilter("ignore", InjectionWarning)
            strategy.tell(solutions, rung_first(reached))
        if self.settings.redraws and len(fresh) < len(candidates):  # stalled: redraws found no new table
            strategy.sigma = min(2.0 * strategy.sigma, LARGEST_SEARCH_VALUE)
        scored = [score for level, score in reached if level >= 0]
        return {"phase": "cma", "mean_fitness": float(np.mean(scored)) if scored else 0.0,
                "mean_sparsity": float(np.mean([len(c[0]) for c in candidates])) / self.dimension,
                "new_evaluations": counts["evaluations"], "evaluations_per_rung": counts["per_rung"],
                "redraws": redraws, "cache_hits": len(candidates) - len(fresh)}

    def decode(self, x) -> Candidate:
        return decode_mask(np.asarray(x), self.k_max, self.settings.threshold), None

    # -- successive halving ------------------------------------------------------------------------
    def _scored(self, candidate: Candidate) -> bool:
        """Scored on some rung (a table is never scored twice: CMA-ES ranks it by the largest rung it reached)."""
        return any(candidate in self.state.scores[rung] for rung in self.levels)

    def _reached(self, candidate: Candidate) -> tuple[int, float]:
        """(position of the largest rung scored, score there); the full set's position is the last."""
        for position in range(len(self.levels) - 1, -1, -1):
            score = self.state.scores[self.levels[position]].get(candidate)
            if score is not None:
                return position, score
        return -1, 0.0  # not scored: --budget ran out first (ranked below every scored table)

    def _halve(self, candidates: list[Candidate], stage_name: str | None = None,
               levels: list[int] | None = None) -> dict:
        """Score new candidates rung by rung (`levels`, default every rung), the best 1/η and those within
        the noise margin of the cut moving on; with `stage_name`, each rung is a progress stage of one step
        per evaluation."""
        state, ladder = self.state, self.ladder
        levels = self.levels if levels is None else levels
        alive = list(dict.fromkeys(candidates))
        per_rung = [0] * len(self.levels)
        before: dict = {}  # candidate -> the rung it was scored on in this call (a promotion's start)
        tables = 0  # distinct tables scored (a promotion is not another)
        for position, rung in enumerate(levels):
            memo = state.scores[rung]
            fresh = [c for c in alive if c not in memo]
            if rung == self.levels[-1] and self.settings.budget is not None:  # the best first, within --budget
                fresh = fresh[:max(0, self.settings.budget - (len(state.memo) - 1))]
            name = stage_name and (stage_name if len(levels) == 1 else f"{stage_name}, " + (
                "full set" if rung == self.levels[-1] else f"subset ({ladder.costs[rung]} examples per table)"))
            chunk = self.settings.popsize if name else max(1, len(fresh))  # progress every popsize tables
            with stage(self.on_event, name, len(fresh)) if name else nullcontext() as progress:
                for start in range(0, len(fresh), chunk):
                    batch = fresh[start:start + chunk]
                    items = [(rung, c, before[c]) if c in before else (rung, c) for c in batch]
                    for candidate, value in zip(batch, ladder(items)):
                        memo[candidate] = float(value)
                        examples, passes = ladder.work(rung, before.get(candidate))
                        before[candidate] = rung
                        state.forward_examples += examples
                        state.forward_passes += passes
                        if rung == self.levels[-1]:
                            state.memo[candidate] = Evaluation(candidate[0], None, float(value), len(state.memo))
                        if progress:
                            progress(f"{examples} examples")
            per_rung[self.levels.index(rung)] = len(fresh)
            tables += len(fresh) if position == 0 else 0
            if position == len(levels) - 1 or not alive:
                break
            ranked = sorted(alive, key=lambda c: (-memo[c], len(c[0]), c[0]))
            keep = math.ceil(len(ranked) / self.settings.eta)
            cut = memo[ranked[keep - 1]] - self.settings.noise_examples * ladder.one_example[rung]
            alive = [c for c in ranked if memo[c] >= cut]
        return {"evaluations": sum(per_rung), "per_rung": per_rung, "tables": tables}

    # -- run directory -----------------------------------------------------------------------------
    def _save_state(self) -> None:
        """Every score on every rung, in the order scored, as JSON (no pickle): the rest is rebuilt by replay."""
        if self.run_dir is None:
            return
        state = self.state
        scores = [[[list(candidate[0]), value] for candidate, value in memo.items() if candidate[0]]
                  for memo in state.scores]
        write_progress(self.run_dir, STATE_NAME, {"format": STATE_FORMAT, "step": state.step, "scores": scores,
                                                  "history": state.history}, state.history)

    def _load_state(self) -> ScreenedState:
        """Replay the seeded search on the saved scores: every step draws the same tables, reads their scores
        instead of evaluating them and tells CMA-ES the same ranking, so the search ends exactly where the
        killed run left it (its counts of evaluations and forward examples included). A run dir without a
        state (killed before the screen ended) starts over."""
        path = self.run_dir / STATE_NAME if self.run_dir else None
        if path is None or not path.is_file():
            self.start()
            return self.state
        step, scores, history = read_state(path, (self.dimension, self.k_max))
        ladder, run_dir, on_event = self.ladder, self.run_dir, self.on_event
        self.ladder = SavedScores(scores, path, ladder.costs, ladder.one_example, ladder.work,
                                  ladder.reference_work)
        self.run_dir, self.on_event = None, lambda kind, data: None
        try:
            self.start()
            while self.state.step < step:
                self.step()
        finally:
            self.ladder, self.run_dir, self.on_event = ladder, run_dir, on_event
        self.state.history = history
        self._save_state()  # both files again: a kill between their two writes left the trajectory one step short
        return self.state


STATE_NAME = "screened_state.json"
STATE_FORMAT = "loramerge.screened-state/v1"


@dataclass
class SavedScores:
    """A ladder that answers from a saved state's scores (a resumed search's replay), with the costs of the
    ladder it stands in for."""

    scores: list[dict]
    path: Path
    costs: list[int]
    one_example: list[float]
    work: Callable[..., tuple[int, int]]  # the ladder's: (forward examples, passes) of one evaluation
    reference_work: tuple[int, int]

    def __call__(self, items):
        try:
            return [self.scores[rung][candidate] for rung, candidate, *_ in items]
        except (KeyError, IndexError):
            raise LoramergeError(f"--resume: {self.path} does not match this search (its replay asks for a table "
                                 "it never scored); start a new run") from None


def read_state(path: Path, space: tuple[int, int] | None = None) -> tuple[int, list[dict], list]:
    """(steps done, scores per rung, history) from a state file; anything malformed is one line, and so is a
    table outside `space` (units × tasks, the ρ cap's most units pruned) where it is given."""
    from loramerge_cli.search.state_io import check_state_units, read_json_file

    def parse(data: dict) -> tuple[int, list[dict], list]:
        step, history = data["step"], data["history"]
        if not isinstance(step, int) or step < 0 or not isinstance(history, list):
            raise ValueError("bad step or history")
        scores = [{(tuple(int(i) for i in pruned), None): float(value) for pruned, value in rung}
                  for rung in data["scores"]]
        return step, scores, history

    state = read_json_file(path, STATE_FORMAT, "screened search state", parse)
    check_state_units(path, [pruned for rung in state[1] for pruned, _ in rung], space)
    return state


def run_screened(settings: ScreenedSettings, fitness, unit_count: int, task_count: int,
                 run_dir: Path | None = None, resume: bool = False,
                 on_event: Callable[[str, dict], None] = lambda kind, data: None) -> tuple[Evaluation, dict]:
    """Runs (or resumes) a screened search on `fitness` (a `FidelityLadder`, or a plain fitness: the full set
    only); returns the best table's evaluation and the budget spent (full-set evaluations, forward examples,
    the step records)."""
    from loramerge_cli.search.fidelity import FidelityLadder, NestedLadder, single_rung

    ladder = fitness if isinstance(fitness, (FidelityLadder, NestedLadder)) else single_rung(fitness)
    search = ScreenedSearch(settings, unit_count, task_count, ladder, run_dir, on_event)
    best = search.run(resume=resume)
    state = search.state
    return best, {"full_evaluations": len(state.memo) - 1, "forward_examples": state.forward_examples,
                  "history": state.history, "rung_examples": list(ladder.costs), "prior": state.prior,
                  "forward_passes": state.forward_passes + 1,  # every evaluation run, the full set's reference
                  "every_table_seen": search._all_scored()}


# -- search-mask glue (the strategy registry's entry and worker processes) --------------------------
def screened_settings(request) -> ScreenedSettings:
    """ENMP's budget flags (and --budget) with the strategy's own options (`request.options`, their names checked
    by strategies.check_options) on top."""
    return ScreenedSettings(**{**asdict(request.enmp), "budget": request.budget, **request.options})


@dataclass
class SingleRungBuilder:
    """Picklable: a worker's fitness (built by `build`) as a one-rung ladder."""

    build: Callable

    def __call__(self, device: str):
        from loramerge_cli.search.fidelity import single_rung

        return single_rung(self.build(device))


def fitness_ladder(settings: ScreenedSettings, fitness):
    """The ladder a screened search scores on: seeded subsets of the validation set, then all of it, when
    `fitness` is labelled accuracy (it has an evaluation engine's examples) and halving is on; else the full
    set only."""
    from loramerge_cli.search.fidelity import accuracy_ladder, single_rung

    examples = getattr(getattr(fitness, "engine", None), "examples", None)
    if not settings.halving or not examples or not hasattr(fitness, "experts"):
        return single_rung(fitness)
    sizes = settings.rung_sizes(max(len(value) for value in examples.values()))
    return accuracy_ladder(fitness, sizes, settings.seed) if len(sizes) > 1 else single_rung(fitness)


def screened_ladder(request, fitness, workers):
    """The ladder of `fitness_ladder`, and the picklable builder of the same ladder in a worker process."""
    from loramerge_cli.search.fidelity import LadderWorkerBuilder, NestedLadder

    settings = screened_settings(request)
    ladder = fitness_ladder(settings, fitness)
    if not isinstance(ladder, NestedLadder):  # the full set only
        return ladder, SingleRungBuilder(workers)
    return ladder, LadderWorkerBuilder(request, fitness.base_lambda, fitness.experts, fitness.reference,
                                       ladder.sizes, settings.seed)
