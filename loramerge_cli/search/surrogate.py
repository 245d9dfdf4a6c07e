"""Surrogate search (`--strategy surrogate`): Bayesian optimisation of the pruning table on a pairwise model.

Every evaluation of a table costs a pass over the validation set, so the search spends them where a model
of the fitness says they are worth most (docs/algorithms.md, "Surrogate search"):

* **screen** (the first steps, SCREEN_CHUNK tables each, each saved): every single-unit pruning, scored once
  on the full validation set (with the unpruned merge, fitness 0, they are the model's first observations);
* **model**: the fitness of a table S (a set of pruned flat units) is modelled as
  f(S) = Σ_{i∈S} w_i + Σ_{i<j∈S} v_ij + noise, with independent Gaussian priors w_i ~ N(0, a²),
  v_ij ~ N(0, b_ij²) and noise N(0, σ²) (a Bayesian linear regression on the units and their pairs, as in
  BOCS, Baptista & Poloczek 2018): pruning a unit can help only together with another one, which the
  screen alone cannot see and which greedy pays a full round to find. b_ij = b, or r·b for two tasks'
  entries of one unit (the merge couples the tasks of a module: TIES elects signs across them, KnOTS and
  CoreSpace share one basis);
* **proposals** (every later step): Thompson sampling. One draw of (w, v) from the posterior (by pathwise
  conditioning: a prior draw corrected by the observations, in the observations' dual space, so no
  (U·T)² × (U·T)² system is ever solved), then the table that maximises the drawn function
  under the ρ cap (local search: add, remove or swap one unit, from the empty table, the best scored
  table and seeded random ones), never one already scored. `proposals` draws per step give as many distinct
  tables, scored together (by the workers, when there are several).

The search is deterministic given the seed and the scores: proposal step k draws from a generator seeded by
(seed, k), so a killed run resumes from its saved scores to the same table, and `--workers N` equals serial.
The unpruned merge is in the memo from the start: the result is never worse than not pruning. The budget is
counted in distinct full-set evaluations (default 3·U·T: the screen and twice as many proposals) and in
forward examples (each evaluation runs the whole validation set).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from loramerge_cli.errors import LoramergeError, UsageError, check_integer, check_seed, is_finite_number
from loramerge_cli.search.decode import feasible_tables, max_pruned
from loramerge_cli.search.enmp import Evaluation, SteppedSearch
from loramerge_cli.search.parameters import SURROGATE_PARAMETERS, check_declared
from loramerge_cli.search.state_io import write_progress

STATE_NAME = "surrogate_state.json"
STATE_FORMAT = "loramerge.surrogate-state/v1"
SCREEN_CHUNK = 8  # single-unit tables per screen step: a killed screen keeps what it scored
SWAP_ROWS = 16  # rows of swap gains computed together by the hill-climb


@dataclass
class SurrogateSettings:
    """The ρ cap, the seed, the budget and the model's priors (fitness points: 100/(T·n) per example)."""

    max_prune: float = 0.2
    seed: int = 1  # (EnmpSettings' default: the one seed rule, errors.check_seed)
    budget: int | None = None  # distinct full-set evaluations, the screen included (None: 3·U·T)
    proposals: int = 1  # tables proposed (and scored together) per step
    prior_single: float = 1.0  # a: prior standard deviation of one unit's effect, in points
    prior_pair: float = 0.2  # b: of one pair's interaction
    same_unit_ratio: float = 2.0  # r: a pair of one unit's entries (two tasks, one block) has r·b
    noise: float = 0.5  # σ: what the model leaves unexplained, in points
    restarts: int = 8  # local-search starts per proposal
    exploit_every: int = 0  # proposal k maximises the posterior mean when k is a multiple of this (0: never)

    def check(self) -> None:
        if not is_finite_number(self.max_prune) or not 0 < self.max_prune <= 1:
            raise UsageError(f"--max-prune must be in (0, 1] (got {self.max_prune})")
        check_seed(self.seed)
        check_integer(self.budget, 1, "--budget")
        check_integer(self.restarts, 1, "restarts")
        check_declared(self, SURROGATE_PARAMETERS)


@dataclass
class PairwiseModel:
    """One posterior draw of the pairwise model: f(S) = Σ_{i∈S} w_i + ½ Σ_{i,j∈S} V_ij (V symmetric, zero
    diagonal)."""

    single: np.ndarray  # (U,)
    pair: np.ndarray  # (U, U)
    _row_bounds: tuple[np.ndarray, float] | None = field(default=None, init=False, repr=False, compare=False)

    def value(self, members: np.ndarray) -> float:
        """f of the table whose pruned units are `members` (a 0/1 vector)."""
        return float(self.single @ members + 0.5 * members @ self.pair @ members)

    def row_bounds(self) -> tuple[np.ndarray, float]:
        """(max_j −V_ij for each i, max |V_ij|): what bounds a swap's gain (computed once per draw)."""
        if self._row_bounds is None:
            self._row_bounds = (-self.pair.min(axis=1), float(np.abs(self.pair).max(initial=0.0)))
        return self._row_bounds


def check_budget(budget: int | None, dimension: int, k_max: int) -> None:
    """A budget holds the screen: every single-unit table of the `dimension` (units × tasks), where any may be
    pruned (`k_max` > 0). Checked when the search is planned (from the adapters' headers) and when it starts."""
    if k_max and budget is not None and budget < dimension:
        raise UsageError(f"--budget {budget} is less than the screen's {dimension} single-unit tables (units × "
                         f"tasks): give at least {dimension}")


def default_budget(dimension: int) -> int:
    """Distinct full-set evaluations when --budget is not given: the screen of `dimension` (units × tasks)
    single-unit tables, then twice as many proposals."""
    return 3 * dimension


def _indicator(pruned: tuple[int, ...], size: int) -> np.ndarray:
    members = np.zeros(size)
    members[list(pruned)] = 1.0
    return members


def _cholesky(kernel: np.ndarray, scale: float | None = None) -> np.ndarray:
    """The Cholesky factor of `kernel` (K + σ²I, or a block's Schur complement); where rounding makes it
    indefinite (priors far apart: a² = 1e8 beside σ² = 1e-8), with the least jitter on the diagonal that
    works, in steps of 10 from 1e-12 × `scale` (default: the mean of its diagonal; a block passes its
    kernel's, as its own diagonal may be rounding noise). Deterministic: resumes stay exact."""
    jitter = 0.0
    scale = float(np.mean(np.diag(kernel))) if scale is None else scale
    for _ in range(12):
        try:
            return np.linalg.cholesky(kernel + jitter * np.eye(len(kernel)))
        except np.linalg.LinAlgError:
            jitter = max(jitter * 10, 1e-12 * scale)
    raise LoramergeError("the surrogate's model cannot be fitted at these priors (its kernel is not positive "
                         "definite): give a larger --noise")


def _solve_lower(lower: np.ndarray, right: np.ndarray, transpose: bool = False) -> np.ndarray:
    """lower⁻¹ `right` (or lower⁻ᵀ `right`) for a lower triangular `lower`: O(n²) per column (torch's
    triangular solve; numpy has none)."""
    import torch

    if not len(lower):
        return right.copy()
    matrix = torch.from_numpy(np.ascontiguousarray(lower.T if transpose else lower))
    column = right.ndim == 1
    values = torch.from_numpy(np.ascontiguousarray(right[:, None] if column else right))
    solved = torch.linalg.solve_triangular(matrix, values, upper=transpose).numpy()
    return solved[:, 0] if column else solved


def pair_prior_std(size: int, task_count: int, settings: SurrogateSettings) -> np.ndarray:
    """b_ij for every pair of flat entries (i = u·T + t): r·b within one unit, b across units, 0 on the diagonal."""
    unit = np.arange(size) // task_count
    std = np.where(unit[:, None] == unit[None, :], settings.same_unit_ratio * settings.prior_pair, settings.prior_pair)
    np.fill_diagonal(std, 0.0)
    return std


class ScoredTables:
    """The tables scored so far (0/1 rows over U·T entries), each one's pruned entries, and the kernel
    K + σ²I over them, grown by the new tables' rows as they come: O(n·U·T) per table, not the O(n²·U) of a
    rebuild every step (about 17 GB at n = 1,800 on 224 blocks × 8 tasks). For two tables sharing s entries,
    c_u of them in unit u, K = a² s + b² (s(s−1)/2 − p) + r²b² p, where p = Σ_u c_u(c_u−1)/2 counts the shared pairs
    within one unit; the counts are exact integers, so K is the same to the bit however it is grown."""

    GROWTH_CHUNK = 16  # tables added per block of new rows (n × 16 × U counts at a time)
    FACTOR_BLOCK = 64  # rows of L kept together (a last, partial block is recomputed at each step)

    def __init__(self, dimension: int, task_count: int, settings: SurrogateSettings, capacity: int | None = None):
        self.dimension, self.task_count, self.settings = dimension, task_count, settings
        self.capacity = capacity  # most tables it will hold (the budget and the unpruned merge), if known
        self.count = 0
        self._tables = np.zeros((0, dimension))
        self._kernel = np.zeros((0, 0))
        self._factor = np.zeros((0, 0))  # its first `factored` rows: L where K + σ²I = L Lᵀ
        self.factored = 0

    @property
    def tables(self) -> np.ndarray:
        return self._tables[:self.count]

    @property
    def kernel(self) -> np.ndarray:
        return self._kernel[:self.count, :self.count]

    def add(self, tables: list[tuple[int, ...]]) -> None:
        for start in range(0, len(tables), self.GROWTH_CHUNK):
            self._add(tables[start:start + self.GROWTH_CHUNK])

    def _add(self, tables: list[tuple[int, ...]]) -> None:
        old, new = self.count, self.count + len(tables)
        if new > len(self._kernel):  # room for twice as many (at most the capacity): amortised O(n²) copies
            capacity = max(new, min(max(2 * len(self._kernel), 64), self.capacity or np.inf))
            kernel, rows, factor = (np.zeros((capacity, capacity)), np.zeros((capacity, self.dimension)),
                                    np.zeros((capacity, capacity)))
            kernel[:old, :old], rows[:old] = self._kernel[:old, :old], self._tables[:old]
            factor[:self.factored, :self.factored] = self._factor[:self.factored, :self.factored]
            self._kernel, self._tables, self._factor = kernel, rows, factor
        for row, pruned in enumerate(tables):
            self._tables[old + row] = _indicator(pruned, self.dimension)
        a2, b2, s2 = self.settings.prior_single ** 2, self.settings.prior_pair ** 2, self.settings.noise ** 2
        every, fresh = self._tables[:new], self._tables[old:new]
        shared = every @ fresh.T  # (new × added) exact counts
        within = np.einsum("aut,but->abu", every.reshape(new, -1, self.task_count),
                           fresh.reshape(len(tables), -1, self.task_count))
        same_unit_pairs = (within * (within - 1) / 2).sum(axis=2)
        pairs = shared * (shared - 1) / 2
        noise = np.zeros(shared.shape)
        noise[old + np.arange(len(tables)), np.arange(len(tables))] = 1.0
        block = (a2 * shared + b2 * (pairs - same_unit_pairs) + (self.settings.same_unit_ratio ** 2) * b2
                 * same_unit_pairs + s2 * noise)
        self._kernel[:new, old:new] = block
        self._kernel[old:new, :new] = block.T
        self.count = new

    def factor(self) -> tuple[np.ndarray, np.ndarray]:
        """L, the Cholesky factor of K + σ²I = L Lᵀ, as (its first rows, in whole FACTOR_BLOCKs, kept and grown;
        the remaining rows, over every column). A block of rows costs O(n²·block) (the blocked Cholesky
        algorithm): a step O(n²), not the O(n³) of a new factorisation. The blocks are fixed by row index,
        never by the steps that added the tables, so a resumed search computes the same factor to the bit."""
        block = self.FACTOR_BLOCK
        while self.factored + block <= self.count:
            start, stop = self.factored, self.factored + block
            self._factor[start:stop, :stop] = self._factor_rows(start, stop)
            self.factored = stop
        return self._factor[:self.factored, :self.factored], self._factor_rows(self.factored, self.count)

    def _factor_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of L from its rows above: L₂₁ = K₂₁ L₁₁⁻ᵀ, and L₂₂ the Cholesky factor of
        K₂₂ − L₂₁ L₂₁ᵀ."""
        kernel = self._kernel
        lower_left = _solve_lower(self._factor[:start, :start], kernel[:start, start:stop]).T
        scale = float(np.mean(np.diag(kernel)[:stop])) if stop else 1.0
        diagonal = _cholesky(kernel[start:stop, start:stop] - lower_left @ lower_left.T, scale)
        return np.hstack([lower_left, diagonal])


@dataclass
class Posterior:
    """What every posterior draw of one step shares: the scored tables (n × U·T, 0/1), their values and
    L for K + σ²I = L Lᵀ, in two parts (ScoredTables.factor)."""

    tables: np.ndarray
    values: np.ndarray
    factor: tuple[np.ndarray, np.ndarray]
    settings: SurrogateSettings
    pair_std: np.ndarray  # b_ij
    paired: np.ndarray = field(init=False, repr=False)  # which tables prune two entries or more (have pairs)

    def __post_init__(self):
        self.paired = np.flatnonzero(self.tables.sum(axis=1) >= 2)

    @classmethod
    def fit(cls, tables: np.ndarray, values: np.ndarray, settings: SurrogateSettings,
            task_count: int) -> "Posterior":
        """From 0/1 rows (the search keeps its ScoredTables and calls `of`)."""
        scored = ScoredTables(tables.shape[1], task_count, settings)
        scored.add([tuple(int(i) for i in np.flatnonzero(row)) for row in tables])
        return cls.of(scored, values)

    @classmethod
    def of(cls, scored: ScoredTables, values: np.ndarray) -> "Posterior":
        return cls(scored.tables, values, scored.factor(), scored.settings,
                   pair_prior_std(scored.dimension, scored.task_count, scored.settings))

    def solve(self, right: np.ndarray) -> np.ndarray:
        """(K + σ²I)⁻¹ `right` = L⁻ᵀ (L⁻¹ `right`): a forward and a back substitution through the two parts of
        L, O(n²) for a vector."""
        kept, rest = self.factor
        head = len(kept)
        rest_left, rest_right = rest[:, :head], rest[:, head:]
        inner_head = _solve_lower(kept, right[:head])
        inner_rest = _solve_lower(rest_right, right[head:] - rest_left @ inner_head)
        outer_rest = _solve_lower(rest_right, inner_rest, transpose=True)
        outer_head = _solve_lower(kept, inner_head - rest_left.T @ outer_rest, transpose=True)
        return np.concatenate([outer_head, outer_rest])

    def prior_draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """θ₀ and ε, the draws `draw` conditions: w ~ N(0, a²) per entry, V's upper triangle ~ N(0, b_ij²), and
        one noise value per scored table."""
        count, size = self.tables.shape
        single = rng.normal(0.0, self.settings.prior_single, size)
        upper = np.triu(rng.normal(0.0, 1.0, (size, size)), 1) * self.pair_std
        return single, upper, rng.normal(0.0, self.settings.noise, count)

    def draw(self, rng: np.random.Generator) -> PairwiseModel:
        """A draw from the posterior of (w, V) by pathwise conditioning: θ = θ₀ + Σ_prior Φᵀ (K + σ²I)⁻¹
        (y − Φθ₀ − ε), with θ₀ and ε prior and noise draws."""
        tables = self.tables
        single, upper, noise = self.prior_draw(rng)
        pair = upper + upper.T
        # Φθ₀, each table's prior value x·w + Σ_{i<j} x_i V_ij x_j: its pairs' part from products of the 0/1 rows
        # of the tables with pairs (not the screen's), faster than gathering each table's k² pairs at a real
        # model's size, where tables prune hundreds of entries
        paired = self.paired
        prior_values = tables @ single
        prior_values[paired] += np.einsum("nd,nd->n", tables[paired] @ upper, tables[paired])
        return self._conditioned(single, pair, self.solve(self.values - prior_values - noise))

    def mean(self) -> PairwiseModel:
        """The posterior mean of (w, V): Σ_prior Φᵀ (K + σ²I)⁻¹ y (a draw with θ₀ = 0 and ε = 0)."""
        size = self.tables.shape[1]
        return self._conditioned(np.zeros(size), np.zeros((size, size)), self.solve(self.values))

    def _conditioned(self, single: np.ndarray, pair: np.ndarray, weights: np.ndarray) -> PairwiseModel:
        """(single, pair) + Σ_prior Φᵀ `weights`: the observations' correction of a prior draw."""
        paired = self.paired  # (a table of one entry adds to the diagonal only, which V does not have)
        correction = (self.tables[paired] * weights[paired, None]).T @ self.tables[paired]  # Σ_n α_n x_n x_nᵀ
        np.fill_diagonal(correction, 0.0)
        return PairwiseModel(single + self.settings.prior_single ** 2 * (self.tables.T @ weights),
                             pair + self.pair_std ** 2 * correction)


def posterior_draw(tables: np.ndarray, values: np.ndarray, settings: SurrogateSettings, task_count: int,
                   rng: np.random.Generator) -> PairwiseModel:
    """One posterior draw given scored `tables` (entries u·T + t of `task_count` tasks) and their `values`."""
    return Posterior.fit(tables, values, settings, task_count).draw(rng)


def local_maximum(model: PairwiseModel, start: np.ndarray, k_max: int) -> np.ndarray:
    """Hill-climb `model` from `start` by the best of: add a unit (while fewer than k_max), remove one, swap one
    in for one out (ties: that order, then lower indices); stops where no move gains. With g = w + V x, adding
    j gains g_j, removing i loses g_i, swapping i for j gains g_j − g_i − V_ij; g is updated per move."""
    members = start.copy()
    gain = model.single + model.pair @ members
    for _ in range(4 * len(members) + 4 * k_max):
        inside, outside = np.flatnonzero(members), np.flatnonzero(members == 0)
        best, added, removed = 1e-12, None, None
        if len(inside) < k_max and len(outside):
            j = outside[int(np.argmax(gain[outside]))]
            if gain[j] > best:
                best, added, removed = gain[j], j, None
        if len(inside):
            i = inside[int(np.argmin(gain[inside]))]
            if -gain[i] > best:
                best, added, removed = -gain[i], None, i
            if len(outside):
                swap = _best_swap(model, gain, inside, outside, best)
                if swap is not None:
                    best, added, removed = swap
        if added is None and removed is None:
            break
        if added is not None:
            members[added] = 1.0
            gain += model.pair[:, added]
        if removed is not None:
            members[removed] = 0.0
            gain -= model.pair[:, removed]
    return members


def _best_swap(model: PairwiseModel, gain: np.ndarray, inside: np.ndarray, outside: np.ndarray,
               floor: float) -> tuple[float, int, int] | None:
    """(gain, added, removed) of the best swap whose gain g_j − g_i − V_ij exceeds `floor` (ties: the first
    removed entry in index order, then the first added), or None. Exact, without the whole |inside| × U·T
    table of gains: a row i can hold at most max g_outside − g_i + max_j(−V_ij), so rows are computed in the
    order of that bound (in chunks) until the best gain found exceeds every bound left."""
    row_bound, pair_bound = model.row_bounds()
    inside_gain = gain[inside]
    bounds = float(gain[outside].max()) - inside_gain + row_bound[inside]
    slack = 1e-9 * (1.0 + float(np.abs(gain).max()) + pair_bound)  # far above the rounding of two subtractions
    rows = np.flatnonzero(bounds + slack > floor)
    rows = rows[np.argsort(-bounds[rows], kind="stable")]
    found: list[tuple[float, int, int]] = []  # (gain, row, column) of each computed row's best
    top = -np.inf
    for start in range(0, len(rows), SWAP_ROWS):
        chunk = rows[start:start + SWAP_ROWS]
        if bounds[chunk[0]] + slack < top:
            break
        gains = gain[None, :] - inside_gain[chunk][:, None] - model.pair[inside[chunk]]
        gains[:, inside] = -np.inf  # only tables out of `members` are swapped in
        columns = np.argmax(gains, axis=1)
        values = gains[np.arange(len(chunk)), columns]
        found += zip(values.tolist(), chunk.tolist(), columns.tolist())
        top = max(top, float(values.max()))
    if not found or top <= floor:
        return None
    value, row, column = min(found, key=lambda item: (-item[0], item[1], item[2]))
    return value, int(column), int(inside[row])


@dataclass
class SurrogateState:
    step: int  # steps completed: the screen's first, SCREEN_CHUNK single-unit tables each
    memo: dict  # candidate -> Evaluation on the full validation set (the unpruned merge included)
    forward_examples: int = 0
    history: list = field(default_factory=list)
    screen_steps: int = 0  # steps of the screen done


class SurrogateSearch(SteppedSearch):
    """`fitness`: a batch of candidates -> full-set fitness values; `run_dir` (optional) holds
    `surrogate_state.json` and `trajectory.jsonl`."""

    def __init__(self, settings: SurrogateSettings, unit_count: int, task_count: int, fitness,
                 run_dir: Path | None = None, on_event: Callable[[str, dict], None] = lambda kind, data: None):
        settings.check()
        self.settings, self.fitness = settings, fitness
        self.dimension, self.task_count = unit_count * task_count, task_count
        self.k_max = max_pruned(settings.max_prune, unit_count, task_count)
        self.feasible = feasible_tables(self.dimension, self.k_max)
        self.budget = settings.budget if settings.budget is not None else default_budget(self.dimension)
        check_budget(self.budget, self.dimension, self.k_max)
        self.total = min(self.budget, self.feasible - 1)  # evaluations the search will run
        self.cost = _examples_per_evaluation(fitness)
        self.run_dir = Path(run_dir) if run_dir else None
        self.on_event = on_event
        self.state: SurrogateState | None = None

    def start(self, resume: bool = False) -> None:
        self.state = SurrogateState(0, {((), None): Evaluation((), None, 0.0, 0)})
        self.scored = ScoredTables(self.dimension, self.task_count, self.settings, self.budget + 1)
        if resume:
            self._load_state()

    def done(self) -> bool:
        scored = len(self.state.memo) - 1
        return scored >= self.budget or len(self.state.memo) >= self.feasible

    def step(self) -> dict:
        started = time.perf_counter()
        state = self.state
        room = self.budget - (len(state.memo) - 1)
        screen = [(i,) for i in range(self.dimension) if ((i,), None) not in state.memo] if self.k_max else []
        if screen:
            phase = "screen"
            tables = screen[:min(max(SCREEN_CHUNK, self.settings.proposals), room)]
            state.screen_steps += 1
        else:  # proposal k (from 1) draws from a generator seeded by (seed, k)
            phase = "proposal"
            tables = self.propose(min(self.settings.proposals, room), state.step - state.screen_steps + 1)
        candidates = [(table, None) for table in tables]
        values = [float(value) for value in (self.fitness(candidates) if candidates else [])]
        for candidate, value in zip(candidates, values):  # a NaN would poison the model and the saved state
            if not np.isfinite(value):
                raise LoramergeError(f"the fitness of table {list(candidate[0])} is {value}: the search cannot "
                                     "model it (check the evaluation dtype and the data)")
        for candidate, value in zip(candidates, values):
            state.memo[candidate] = Evaluation(candidate[0], None, value, len(state.memo))
        state.forward_examples += self.cost * len(candidates)
        best = self.best()
        seconds = time.perf_counter() - started
        record = {"phase": phase, "generation": state.step, "new_evaluations": len(candidates),
                  "tables": [list(table) for table in tables],
                  "scores": [state.memo[candidate].fitness for candidate in candidates], "best_fitness": best.fitness,
                  "best_pruned": list(best.pruned), "best_lambda": None, "distinct_evaluated": len(state.memo),
                  "full_evaluations": len(state.memo) - 1, "new_full_evaluations": len(candidates),
                  "budget": self.budget, "total": self.total, "forward_examples": state.forward_examples,
                  "new_forward_examples": self.cost * len(candidates), "seconds": seconds,
                  "seconds_per_evaluation": seconds / max(1, len(candidates))}
        state.step += 1
        state.history.append(record)
        self._save_state()
        self.on_event(phase, record)
        return record

    def propose(self, count: int, step: int) -> list[tuple[int, ...]]:
        """`count` distinct unscored tables, one Thompson draw each (seeded by the seed and the step); every
        `exploit_every`-th step, the first is the maximiser of the posterior mean instead (exploitation)."""
        rng = np.random.default_rng([self.settings.seed, step])
        evaluations = list(self.state.memo.values())  # in the order scored: the kernel's rows
        self.scored.add([e.pruned for e in evaluations[self.scored.count:]])
        values = np.array([e.fitness for e in evaluations])
        taken = {e.pruned for e in evaluations}
        posterior = Posterior.of(self.scored, values)
        proposals: list[tuple[int, ...]] = []
        every = self.settings.exploit_every
        while len(proposals) < count and len(taken) < self.feasible:
            exploit = every and step % every == 0 and not proposals
            table = self._acquire(posterior.mean() if exploit else posterior.draw(rng), rng, taken)
            proposals.append(table)
            taken.add(table)
        return proposals

    def _acquire(self, model: PairwiseModel, rng: np.random.Generator, taken: set) -> tuple[int, ...]:
        """The unscored local maximum of highest drawn value (hill-climbs from the empty table, the best scored
        one and seeded random ones); if every one is scored, the best unscored table one move from them; if
        those are all scored too, a seeded random unscored table."""
        starts = [np.zeros(self.dimension), _indicator(self.best().pruned, self.dimension)]
        for _ in range(self.settings.restarts - 1):
            size = int(rng.integers(1, self.k_max + 1))
            starts.append(_indicator(tuple(rng.choice(self.dimension, size, replace=False)), self.dimension))
        peaks: dict[tuple[int, ...], tuple[float, np.ndarray]] = {}
        for start in starts:
            peak = local_maximum(model, start, self.k_max)
            peaks.setdefault(_table(peak), (model.value(peak), peak))
        options = {table: value for table, (value, _) in peaks.items() if table and table not in taken}
        if not options:
            for value, peak in peaks.values():
                for gain, table in _moves(model, peak, self.k_max):
                    if table and table not in taken:
                        options[table] = value + gain
                        break
        if options:
            return max(options, key=lambda table: (options[table], [-i for i in table]))
        while True:
            size = int(rng.integers(1, self.k_max + 1))
            table = tuple(sorted(int(i) for i in rng.choice(self.dimension, size, replace=False)))
            if table not in taken:
                return table

    # -- run directory -----------------------------------------------------------------------------
    def _save_state(self) -> None:
        """Every full-set score in the order scored, as JSON: the proposals are rebuilt from them and the seed."""
        if self.run_dir is None:
            return
        state = self.state
        scores = [[list(e.pruned), e.fitness] for e in state.memo.values() if e.pruned]
        write_progress(self.run_dir, STATE_NAME, {"format": STATE_FORMAT, "step": state.step, "forward_examples":
                                                  state.forward_examples, "scores": scores, "history": state.history},
                       state.history)

    def _load_state(self) -> None:
        """The saved scores, in their order (so the model and every later draw are the killed run's); a run
        dir without a state (killed during the screen) starts over."""
        path = self.run_dir / STATE_NAME if self.run_dir else None
        if path is None or not path.is_file():
            return
        step, forward_examples, scores, history = read_state(path, (self.dimension, self.k_max), self.budget)
        for pruned, value in scores:
            self.state.memo[(pruned, None)] = Evaluation(pruned, None, value, len(self.state.memo))
        if self.cost and forward_examples != self.cost * len(scores):
            raise LoramergeError(f"--resume: {path} does not match this search (its forward examples are not "
                                 f"{self.cost} per table scored); start a new run")
        self.state.step, self.state.forward_examples, self.state.history = step, forward_examples, history
        self.state.screen_steps = sum(record.get("phase") == "screen" for record in history)
        self._save_state()  # both files again: a kill between their two writes left the trajectory one step short


def _table(members: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.flatnonzero(members))


def _moves(model: PairwiseModel, members: np.ndarray, k_max: int):
    """(gain in drawn value, table) of every table one add, remove or swap from `members` (within the ρ cap),
    best first."""
    gain = model.single + model.pair @ members
    inside, outside = np.flatnonzero(members), np.flatnonzero(members == 0)
    gains = [-gain[inside]]
    moves = [((), (int(i),)) for i in inside]
    if len(inside) < k_max:
        gains.append(gain[outside])
        moves += [((int(j),), ()) for j in outside]
    swap = gain[None, outside] - gain[inside, None] - model.pair[np.ix_(inside, outside)]
    gains.append(swap.ravel())
    moves += [((int(j),), (int(i),)) for i in inside for j in outside]
    flat = np.concatenate(gains)
    current = set(inside.tolist())
    for index in np.argsort(-flat, kind="stable"):
        added, removed = moves[index]
        yield float(flat[index]), tuple(sorted((current - set(removed)) | set(added)))


@dataclass
class CountedFitness:
    """A full-set fitness with the forward examples one evaluation costs (known before any worker scores it);
    `backend` (the workers, when there are several) scores in its place."""

    fitness: Callable
    examples: int
    backend: Callable | None = None

    def __call__(self, candidates):
        return (self.backend or self.fitness)(candidates)


def _examples_per_evaluation(fitness) -> int:
    from loramerge_cli.search.fidelity import examples_per_evaluation

    examples = getattr(fitness, "examples", None)
    return examples if isinstance(examples, int) else examples_per_evaluation(fitness)


def read_state(path: Path, space: tuple[int, int] | None = None,
               budget: int | None = None) -> tuple[int, int, list, list]:
    """(steps done, forward examples, [(pruned, fitness)] in order, history); anything malformed is one line, and
    so is a table outside `space` (units × tasks, the ρ cap's most units pruned) or more tables than `budget`,
    where they are given."""
    from loramerge_cli.search.state_io import check_state_units, read_json_file

    def parse(data: dict) -> tuple[int, int, list, list]:
        step, examples, history = data["step"], data["forward_examples"], data["history"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError("bad step")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
            raise ValueError("bad forward examples")
        if not isinstance(history, list) or len(history) != step or not all(isinstance(r, dict) for r in history):
            raise ValueError("the history is not one record per step")
        scores = []
        for pruned, value in data["scores"]:
            if (not isinstance(pruned, list) or not pruned or not is_finite_number(value)
                    or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in pruned)
                    or sorted(set(pruned)) != pruned):
                raise ValueError("a table is not a sorted list of distinct unit indices with a finite score")
            scores.append((tuple(pruned), float(value)))
        if len({pruned for pruned, _ in scores}) != len(scores):
            raise ValueError("a table is scored twice")
        counts = [record.get("new_evaluations") for record in history]
        if any(isinstance(c, bool) or not isinstance(c, int) for c in counts) or sum(counts) != len(scores):
            raise ValueError("the history does not count the scores")
        return step, examples, scores, history

    state = read_json_file(path, STATE_FORMAT, "surrogate search state", parse)
    check_state_units(path, [pruned for pruned, _ in state[2]], space)
    if budget is not None and len(state[2]) > budget:
        raise LoramergeError(f"--resume: {path} does not match this search ({len(state[2])} tables scored, more "
                             f"than its --budget {budget}); start a new run")
    return state


def run_surrogate(settings: SurrogateSettings, fitness, unit_count: int, task_count: int,
                  run_dir: Path | None = None, resume: bool = False,
                  on_event: Callable[[str, dict], None] = lambda kind, data: None) -> tuple[Evaluation, dict]:
    """Runs (or resumes) a surrogate search; returns the best table's evaluation and the budget spent."""
    search = SurrogateSearch(settings, unit_count, task_count, fitness, run_dir, on_event)
    best = search.run(resume=resume)
    state = search.state
    return best, {"full_evaluations": len(state.memo) - 1, "forward_examples": state.forward_examples,
                  "history": state.history}


def surrogate_settings(request) -> SurrogateSettings:
    """--max-prune, --seed and --budget with the strategy's own options (`request.options`, their names checked by
    strategies.check_options) on top."""
    return SurrogateSettings(max_prune=request.enmp.max_prune, seed=request.enmp.seed, budget=request.budget,
                             **request.options)
