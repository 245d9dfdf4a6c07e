"""`--lambda auto`: pick λ on the validation split from a grid (docs/algorithms.md, Methods).

The grid is absolute, not relative to the method's default: a coarse, roughly logarithmic grid from
0.05 to 2.0 (plus the default λ), then round points between the neighbours of the two best coarse
points (steps of 0.05 around 0.5: validation curves of real merges are bumpy, and a narrow peak can
hide between two coarse points). A best point on an edge of the coarse grid extends it (down to 0.005,
up to 8) and warns.

Every method's result is linear in λ (λ multiplies the merged update, and truncation keeps a
fraction of the energy, which scaling does not change), so the adapters are merged once with λ = 1
and each grid point only rescales the merged factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

from loramerge_cli.errors import LoramergeError, NonFiniteError
from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
from loramerge_cli.evaluation.engine import EvalSettings, Evaluator, checked_evaluator, merged_deltas, scale_deltas
from loramerge_cli.evaluation.metrics import check_experts, mean_defined, normalized_accuracy
from loramerge_cli.evaluation.specs import load_task_file
from loramerge_cli.events import stage as progress_stage

COARSE_GRID = (0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2, 1.6, 2.0)  # steps of ×1.33 … ×1.5
EDGE_FACTOR = 1.5  # an edge extends by this factor per step
EDGE_LIMITS = (0.005, 8.0)  # … but not beyond these
REFINE_INTERVALS = 8  # the refinement step is the first 1-2-5 step >= (gap between the neighbours) / 8
# Each stage of the grid search, as its progress is shown (the points of a stage are known as it starts).
STAGE_NAMES = {"given": "λ grid", "coarse": "λ grid", "table": "λ of the table", "edge": "λ grid, extended",
               "refine": "λ grid, refined"}
REFINE_AROUND = 2  # the best coarse points refined around (validation curves can have two close peaks)


def _rounded(value: float) -> float:
    return float(f"{value:.4g}")  # 0.3, not 0.30000000000000004


def coarse_grid(default_lambda: float | None = None) -> list[float]:
    """The coarse grid, with the method's default λ added, exactly (1/3, not 0.3333: a tie then gives the
    default merge byte for byte), when it lies inside it."""
    points = set(COARSE_GRID)
    if default_lambda is not None and COARSE_GRID[0] <= default_lambda <= COARSE_GRID[-1]:
        points.add(float(default_lambda))
    return sorted(points)


def refine_points(low: float, high: float) -> list[float]:
    """Points strictly between `low` and `high` on round multiples of a 1-2-5 step, at most 7 of them
    (0.3 … 0.6 gives 0.35, 0.4, …, 0.55)."""
    width = high - low
    exponent = math.floor(math.log10(width / (REFINE_INTERVALS * 5)))
    step = next(factor * 10.0 ** exponent for factor in (1, 2, 5, 10, 20, 50)
                if factor * 10.0 ** exponent >= width / REFINE_INTERVALS)
    first = math.floor(low / step) + 1
    points = [_rounded(index * step) for index in range(first, math.ceil(high / step))]
    return [point for point in points if low < point < high]


def best_lambda(records: list[dict], default_lambda: float) -> float:
    """Highest mean normalized accuracy; ties: closest to the default λ, then the smaller λ."""
    def rank(record):
        mean = record["mean_normalized_accuracy"]
        return (-(mean if mean is not None else -math.inf), abs(record["lambda"] - default_lambda), record["lambda"])

    return min(records, key=rank)["lambda"]


@dataclass
class LambdaSearch:
    """What `--lambda auto` tried and chose: one record per λ (stage coarse, edge, refine or given)."""

    best: float
    default: float
    records: list[dict]
    warnings: list[str] = field(default_factory=list)
    max_length: dict[str, int] = field(default_factory=dict)  # text tasks: the token cap each used
    dtype: str | None = None  # the evaluation's
    data: dict = field(default_factory=dict)  # which examples were scored: split, val_limit, sample_seed, examples

    def describe(self) -> dict:
        """The JSON form written to the output's provenance and `--json`."""
        best = next(record for record in self.records if record["lambda"] == self.best)
        return {"best": self.best, "default": self.default,
                "best_mean_normalized_accuracy": best["mean_normalized_accuracy"],
                "grid": sorted(self.records, key=lambda record: record["lambda"]), "warnings": list(self.warnings),
                "max_length": dict(self.max_length), "dtype": self.dtype, **self.data}


def tune_lambda(adapters: list, config, table, tasks_file, **options) -> tuple[float, list[dict]]:
    """(chosen λ, one record per λ tried: λ, stage, accuracy and normalized accuracy per task, mean)."""
    search = search_lambda(adapters, config, table, tasks_file, **options)
    return search.best, search.records


def search_lambda(
    adapters: list,
    config,
    table,
    tasks_file,
    *,
    split: str = "validation",
    val_limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    max_length: int | None = None,
    run_dir=None,
    grid: list[float] | None = None,
    base: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    allow_base_mismatch: bool = False,
    evaluator: Evaluator | None = None,
    report=None,
    statistics: dict | None = None,
    pool=None,
    also: tuple[float, ...] = (),
    experts: dict[str, float] | None = None,
) -> LambdaSearch:
    """Score the merge at every λ of the grid (the default one, or exactly `grid` when given) on `split`;
    `report` receives progress stages (loramerge_cli.events).

    `evaluator`, if given, is reused (its split and settings win over the keyword arguments). `statistics`:
    the input Gram matrices of a data-reading method (RegMean). `pool`, if given, scores each stage's points
    on its workers (`LambdaScorer`, evaluation/workers.py). `also`: λs tried beside the default grid (a weight
    table's own λ, which the merge uses without --lambda auto: so the choice is never worse on validation).
    `experts`: each expert's accuracy on its task, when already scored (else scored here, by `evaluator`).
    """
    from loramerge_cli.merging.merge import merge, resolve_config

    default_lambda = resolve_config(replace(config, lam=None), len(adapters)).lam
    if grid is not None and (not grid or not all(math.isfinite(value) for value in grid)):
        raise LoramergeError("the λ grid must hold at least one finite value")
    if pool is None:
        unit_deltas = merged_deltas(merge(adapters, replace(config, lam=1.0), table, allow_base_mismatch,
                                          statistics=statistics))
    expert_warnings = []
    if evaluator is None:  # (a caller that built it says its caps)
        settings = EvalSettings(split=split, val_limit=val_limit, device=device, dtype=dtype, batch_size=batch_size,
                                threads=threads, max_length=max_length)
        evaluator = checked_evaluator(load_task_file(tasks_file), adapters, settings, base, allow_base_mismatch,
                                      report=report)
        expert_warnings = evaluator.data_warnings()
    if experts is None:  # (a caller that scored them checked them: check_experts)
        experts = expert_scores(evaluator, ScoreCache(run_dir), report)
        expert_warnings += check_experts(experts, "λ")
    if pool is not None:  # the grid's workers: this process scores nothing more
        pool.reside(evaluator)
    records: list[dict] = []

    non_finite: list[str] = []  # each λ whose merged model gave NaN or Inf, and why

    def means_at(lams: list[float], stage: str) -> list[float | None]:
        with progress_stage(report, STAGE_NAMES.get(stage, "λ grid"), len(lams)) as step:  # (each with its ETA)
            return scored(lams, stage, step)

    def scored(lams: list[float], stage: str, step) -> list[float | None]:
        def record(lam: float, scores: dict[str, float] | str) -> dict:
            if isinstance(scores, str):  # NaN or Inf at this λ: no score, the grid goes on
                return {"lambda": lam, "stage": stage, "accuracy": {}, "normalized_accuracy": {},
                        "mean_normalized_accuracy": None, "non_finite": scores}
            normalized, _ = normalized_accuracy(scores, experts)
            return {"lambda": lam, "stage": stage, "accuracy": scores, "normalized_accuracy": normalized,
                    "mean_normalized_accuracy": mean_defined(normalized)}

        def shown(done: dict) -> None:  # the progress bar moves as each λ is scored
            mean = done["mean_normalized_accuracy"]
            step(f"λ {done['lambda']:.4g}: " + ("NaN or Inf" if "non_finite" in done else
                                                 "—" if mean is None else f"{mean:.2f}"))

        if pool is not None:
            done = pool(lams, lambda index, scores: shown(record(lams[index], scores)))
            stage_records = [record(lam, scores) for lam, scores in zip(lams, done)]
        else:
            stage_records = []
            for lam in lams:
                stage_records.append(record(lam, finite_scores(evaluator, scale_deltas(unit_deltas, lam))))
                shown(stage_records[-1])
        records.extend(stage_records)
        non_finite.extend(f"λ {done['lambda']:g}: {done['non_finite']}" for done in stage_records
                          if "non_finite" in done)
        return [done["mean_normalized_accuracy"] for done in stage_records]

    best, warnings = grid_search(lambda lam, stage: means_at([lam], stage)[0], default_lambda, grid,
                                 means_at=means_at, also=also)
    warnings = expert_warnings + warnings
    if non_finite:
        if len(non_finite) == len(records):
            raise NonFiniteError(f"λ auto: every λ tried gave NaN or Inf ({non_finite[0]})")
        warnings.append(f"λ auto: {len(non_finite)} of {len(records)} λs gave NaN or Inf and were not scored "
                        f"({non_finite[0]})")
    chosen = evaluator.settings
    return LambdaSearch(best, default_lambda, records, warnings, dict(evaluator.max_lengths), chosen.dtype,
                        {"split": chosen.split, "val_limit": chosen.val_limit, "sample_seed": chosen.sample_seed,
                         "examples": {name: len(examples) for name, examples in evaluator.examples.items()}})


def finite_scores(evaluator: Evaluator, deltas) -> dict[str, float] | str:
    """{task: accuracy} of `deltas`, or why their model is NaN or Inf in the evaluation's dtype (a λ too large
    for float16): one point of a grid, which the grid skips."""
    try:
        return evaluator.evaluate(deltas)
    except NonFiniteError as error:
        return str(error)


def grid_search(
    mean_at: Callable[[float, str], float | None], default_lambda: float, grid: list[float] | None = None,
    means_at: Callable[[list[float], str], list[float | None]] | None = None, also: tuple[float, ...] = (),
) -> tuple[float, list[str]]:
    """(best λ, warnings): `mean_at(λ, stage)` scores one λ (higher is better, None: undefined), once per λ;
    `means_at(λs, stage)`, if given, scores each stage's new points at once (on a backend's workers).

    Exactly `grid` when given; else the coarse grid, its edge extended while the best lies on it, then
    refine_points between the neighbours of each of the REFINE_AROUND best points (the best at an end of what
    was tried, an extension's limit: between it and its one neighbour); `also` with the coarse grid (stage
    "table"). The warning, if any, names the final best."""
    tried: dict[float, float | None] = {}

    def score(points, stage: str) -> None:
        new = [lam for lam in dict.fromkeys(points) if lam not in tried]
        if new:
            means = means_at(new, stage) if means_at is not None else [mean_at(lam, stage) for lam in new]
            tried.update(zip(new, means))

    def best(among=None) -> float:
        records = [{"lambda": lam, "mean_normalized_accuracy": mean} for lam, mean in tried.items()
                   if among is None or lam in among]
        return best_lambda(records, default_lambda)

    if grid is not None:
        score(list(grid), "given")
        chosen = best()
        if len(tried) > 1 and chosen in (min(grid), max(grid)):
            return chosen, [(f"λ auto: the best λ {chosen:g} is on the edge of the given grid "
                             f"{min(grid):g} … {max(grid):g}; the optimum may lie beyond it")]
        return chosen, []
    score(coarse_grid(default_lambda), "coarse")
    score([float(lam) for lam in also], "table")  # exactly: auto is then never below the table's own merge
    extended = _extend_edges(score, best)
    points = sorted(tried)
    leaders = []
    while len(leaders) < min(REFINE_AROUND, len(points)):
        leaders.append(best([lam for lam in points if lam not in leaders]))
    around = [(points[index - 1] if index > 0 else points[index] if rank == 0 else None,  # the best at an end
               points[index + 1] if index + 1 < len(points) else points[index] if rank == 0 else None)  # (at an
              for rank, index in enumerate(map(points.index, leaders))]  # extension's limit): toward its neighbour
    score([lam for low, high in around if low is not None and high is not None and low < high
           for lam in refine_points(low, high)], "refine")
    chosen = best()
    if extended is None:
        return chosen, []
    edge, reached, at_limit = extended
    if at_limit and chosen == reached:  # (a refinement that moved the best inward found an interior optimum)
        return chosen, [(f"λ auto: the grid was extended from its edge {edge:g} as far as it goes, {reached:g}, and "
                         f"the best λ, {chosen:g}, is still at that end; the optimum may lie beyond (give --lambda "
                         "explicitly)")]
    return chosen, [(f"λ auto: the best λ of the grid {COARSE_GRID[0]:g} … {COARSE_GRID[-1]:g} was on its edge "
                     f"{edge:g}; the grid was extended to {reached:g} and the best is now {chosen:g}")]


def _extend_edges(score, best) -> tuple[float, float, bool] | None:
    """While the best λ is the smallest (largest) tried, try λ / 1.5 (× 1.5), the last step ending on
    EDGE_LIMITS. Returns (the edge, the farthest λ tried, whether the best is still that farthest λ), or None
    when the best was inside the coarse grid."""
    low, high = COARSE_GRID[0], COARSE_GRID[-1]
    for direction, edge, limit in ((-1, low, EDGE_LIMITS[0]), (1, high, EDGE_LIMITS[1])):
        if best() != edge:
            continue
        value = edge
        while best() == value and value != limit:
            following = _rounded(value * EDGE_FACTOR ** direction)
            value = max(following, limit) if direction < 0 else min(following, limit)
            score([value], "edge")
        return edge, value, best() == value
    return None
