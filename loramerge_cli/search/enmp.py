"""ENMP: CMA-ES over a (task × unit) pruning table, memoised, checkpointed every generation.

The fitness is pluggable (`Fitness`): labelled validation accuracy through the evaluation engine, or
the label-free NSC objective. Everything that makes a run reproducible lives in `SearchState`, which is
written to the run directory after every generation, so `resume` continues a killed run exactly.
"""

from __future__ import annotations

import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from loramerge_cli.errors import LoramergeError, is_finite_number
from loramerge_cli.search.decode import Candidate, decode_mask, decode_scale, max_pruned
from loramerge_cli.search.enmp_settings import EnmpSettings  # noqa: F401  (imported from here too)
from loramerge_cli.search.state_io import write_progress

_GLOBAL_NUMPY_STATE = threading.RLock()


@contextmanager
def _search_numpy_state(state) -> Iterator[None]:
    """pycma draws from (and reseeds) numpy's global generator: run it on the search's own saved state,
    then give the caller's state back untouched. One search at a time holds the generator (searches in
    several threads would each save another's state as the caller's)."""
    with _GLOBAL_NUMPY_STATE:
        callers = np.random.get_state()
        np.random.set_state(state.numpy_rng)
        try:
            yield
        finally:
            state.numpy_rng = np.random.get_state()
            np.random.set_state(callers)


class Fitness(Protocol):
    def __call__(self, candidates: list[Candidate]) -> list[float]:
        """Fitness (points of mean normalized accuracy over the unpruned merge) of each candidate."""


@dataclass
class Evaluation:
    pruned: tuple[int, ...]
    lam: float | None
    fitness: float
    order: int  # evaluation index: earlier wins ties


@dataclass
class SearchState:
    generation: int  # generations completed
    strategy: object  # CMAEvolutionStrategy (never saved: rebuilt by replay on resume)
    numpy_rng: tuple  # numpy's global RNG state (pycma samples through numpy)
    memo: dict = field(default_factory=dict)  # (pruned, λ) -> Evaluation
    history: list = field(default_factory=list)  # one dict per generation


class SeededNormal:
    """A randn(λ, N) for pycma, drawing from its own numpy Generator."""

    def __init__(self, seed: int):
        self.generator = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, *shape):
        return self.generator.standard_normal(shape)


def cma_options(popsize: int, generations: int, seed: int) -> dict:
    """pycma options of a search: seeded, silent, and never stopping on its own."""
    return {
        "maxiter": generations,
        "popsize": popsize,
        "seed": seed,
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
        "tolfun": 0,
        "tolfunhist": 0,
        "tolx": 0,
        "tolstagnation": 10**9,
        "tolflatfitness": 10**9,
    }


def new_cma(mean: list[float], settings):
    """pycma's CMA-ES from `mean` with the settings' (ENMP's or the screened search's) σ0, population, generations
    and seeded normal draws (call it inside `_search_numpy_state`: pycma draws from numpy's global generator
    too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import cma
    options = cma_options(settings.popsize, settings.generations, settings.seed)
    options["randn"] = SeededNormal(settings.seed)
    with warnings.catch_warnings():  # its constructor adds a global warnings filter: taken back on the way out
        return cma.CMAEvolutionStrategy(mean, settings.sigma0, options)


def new_strategy(settings: EnmpSettings, dimension: int):
    """The paper's start: every unit at x0 (the scale gene, with --addscale, at 0)."""
    x0 = [settings.x0] * dimension
    if settings.addscale:
        x0[-1] = 0.0
    return new_cma(x0, settings)


class EnmpSearch:
    """Runs the search; `run_dir` (optional) holds `state.json`, `trajectory.jsonl`, `best.json`."""

    def __init__(
        self,
        settings: EnmpSettings,
        unit_count: int,
        task_count: int,
        fitness: Fitness,
        base_lambda: float | None = None,
        run_dir: Path | None = None,
        on_generation: Callable[[dict], None] | None = None,
    ):
        settings.check()
        self.settings = settings
        self.unit_count, self.task_count = unit_count, task_count
        self.dimension = unit_count * task_count + (1 if settings.addscale else 0)
        self.k_max = max_pruned(settings.max_prune, unit_count, task_count)
        self.fitness = fitness
        self.base_lambda = base_lambda
        self.run_dir = Path(run_dir) if run_dir else None
        self.on_generation = on_generation or (lambda record: None)
        self.state: SearchState | None = None

    # -- state -------------------------------------------------------------------------------------
    def start(self, resume: bool = False) -> None:
        if resume:
            self.state = self._load_state()
            return
        empty = ((), self._default_lambda())
        memo = {empty: Evaluation((), empty[1], 0.0, 0)}  # the unpruned merge is the reference: fitness 0
        self.state = SearchState(0, None, np.random.RandomState(self.settings.seed).get_state(), memo, [])
        with _search_numpy_state(self.state):
            self.state.strategy = new_strategy(self.settings, self.dimension)

    def _default_lambda(self) -> float | None:
        return decode_scale(0.0, self.base_lambda) if self.settings.addscale else None

    def decode(self, x: np.ndarray) -> Candidate:
        z = np.asarray(x[: self.unit_count * self.task_count])
        lam = decode_scale(float(x[-1]), self.base_lambda) if self.settings.addscale else None
        return decode_mask(z, self.k_max, self.settings.threshold), lam

    # -- loop --------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Evaluation:
        if self.state is None:
            self.start(resume)
        while self.state.generation < self.settings.generations:
            self.step()
        return self.best()

    def step(self) -> dict:
        """One generation: ask, evaluate the masks not in the memo, tell, checkpoint."""
        state = self.state
        started = time.perf_counter()
        with _search_numpy_state(state):
            solutions = state.strategy.ask()
        candidates = [self.decode(x) for x in solutions]
        fresh = list(dict.fromkeys(c for c in candidates if c not in state.memo))
        values = self.fitness(fresh) if fresh else []
        for candidate, value in zip(fresh, values):
            state.memo[candidate] = Evaluation(candidate[0], candidate[1], float(value), len(state.memo))
        fitnesses = [state.memo[c].fitness for c in candidates]
        with _search_numpy_state(state):
            state.strategy.tell(solutions, [-f for f in fitnesses])  # CMA-ES minimises
        state.generation += 1
        best = self.best()
        record = {
            "generation": state.generation,
            "best_fitness": best.fitness,
            "mean_fitness": float(np.mean(fitnesses)),
            "best_pruned": list(best.pruned),
            "best_lambda": best.lam,
            "mean_sparsity": float(np.mean([len(c[0]) for c in candidates])) / (self.unit_count * self.task_count),
            "distinct_evaluated": len(state.memo),
            "new_evaluations": len(fresh),
            "cache_hits": len(candidates) - len(fresh),
            "seconds": time.perf_counter() - started,
            "seconds_per_evaluation": (time.perf_counter() - started) / max(1, len(fresh)),
        }
        state.history.append(record)
        self._save_state()
        self.on_generation(record)
        return record

    def best(self) -> Evaluation:
        """Highest fitness; ties: fewest pruned units, then earliest evaluated."""
        return min(self.state.memo.values(), key=lambda e: (-e.fitness, len(e.pruned), e.order))

    # -- run directory -----------------------------------------------------------------------------
    def _save_state(self) -> None:
        """The memo and history as JSON (no pickle); the CMA-ES state is rebuilt from them on resume."""
        if self.run_dir is None:
            return
        memo = [[list(e.pruned), e.lam, e.fitness, e.order] for e in self.state.memo.values()]
        state = {"format": STATE_FORMAT, "generation": self.state.generation, "memo": memo,
                 "history": self.state.history}
        write_progress(self.run_dir, STATE_NAME, state, self.state.history)

    def _load_state(self) -> SearchState:
        """Replay the seeded search against the saved memo: every generation asks the same points, finds their
        fitness in the memo and tells it, so the strategy ends exactly where the killed run left it. A run dir
        without a state (killed before the first generation ended) starts over."""
        path = self.run_dir / STATE_NAME if self.run_dir else None
        if path is None or not path.is_file():
            self.start()
            return self.state
        generation, memo, history = read_state(path, (self.unit_count * self.task_count, self.k_max))
        self.start()
        self.state.memo.update(memo)
        state = self.state
        for _ in range(generation):
            with _search_numpy_state(state):
                solutions = state.strategy.ask()
            candidates = [self.decode(x) for x in solutions]
            missing = [c for c in candidates if c not in state.memo]
            if missing:
                raise LoramergeError(f"--resume: {path} does not match this search (generation "
                                     f"{state.generation + 1} asks for a table it never scored); start a new run")
            with _search_numpy_state(state):
                state.strategy.tell(solutions, [-state.memo[c].fitness for c in candidates])
            state.generation += 1
        state.history = history
        return state


class SteppedSearch:
    """A search run step by step (`start`, `step`, `done` are its own) from a fresh or a resumed state; its best
    is ENMP's rule over `state.memo`."""

    state = None

    def run(self, resume: bool = False) -> Evaluation:
        if self.state is None:
            self.start(resume)
        while not self.done():
            self.step()
        return self.best()

    best = EnmpSearch.best


STATE_NAME = "state.json"
STATE_FORMAT = "loramerge.enmp-state/v1"


def read_state(path: Path, space: tuple[int, int] | None = None) -> tuple[int, dict, list]:
    """(generations done, memo, history) from a state file; anything malformed is one line, and so is a table
    outside `space` (units × tasks, the ρ cap's most units pruned) where it is given."""
    from loramerge_cli.search.state_io import check_state_units, read_json_file

    def parse(data: dict) -> tuple[int, dict, list]:
        generation, history = data["generation"], data["history"]
        if not isinstance(generation, int) or generation < 0 or not isinstance(history, list):
            raise ValueError("bad generation or history")
        memo = {}
        for pruned, lam, fitness, order in data["memo"]:
            if not is_finite_number(fitness):
                raise ValueError(f"a table's score is {fitness!r}, not a finite number")
            key = (tuple(int(i) for i in pruned), None if lam is None else float(lam))
            memo[key] = Evaluation(key[0], key[1], float(fitness), int(order))
        return generation, memo, history

    state = read_json_file(path, STATE_FORMAT, "search state", parse)
    check_state_units(path, [pruned for pruned, _ in state[1]], space)
    return state

