"""`--lambda auto`: pick λ on the validation split from a grid (Part A §A4).

Every method's result is linear in λ (λ multiplies the merged update, and truncation keeps a
fraction of the energy, which scaling does not change), so the adapters are merged once with λ = 1
and each grid point only rescales the merged factors.
"""

from __future__ import annotations

import math
from dataclasses import replace

from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
from loramerge_cli.evaluation.engine import EvalSettings, Evaluator, merged_deltas, scale_deltas
from loramerge_cli.evaluation.metrics import mean_defined, normalized_accuracy
from loramerge_cli.evaluation.specs import load_task_file

GRID_STEPS = [step / 10 for step in range(1, 21)]  # 0.1 … 2.0, times the method's default λ


def default_grid(default_lambda: float) -> list[float]:
    return [float(f"{step * default_lambda:.12g}") for step in GRID_STEPS]  # 0.3, not 0.30000000000000004


def best_lambda(records: list[dict], default_lambda: float) -> float:
    """Highest mean normalized accuracy; ties: closest to the default λ, then the smaller λ."""
    def rank(record):
        mean = record["mean_normalized_accuracy"]
        return (-(mean if mean is not None else -math.inf), abs(record["lambda"] - default_lambda), record["lambda"])

    return min(records, key=rank)["lambda"]


def tune_lambda(
    adapters: list,
    config,
    table,
    tasks_file,
    *,
    split: str = "validation",
    val_limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    run_dir=None,
    grid: list[float] | None = None,
    base: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    allow_base_mismatch: bool = False,
    evaluator: Evaluator | None = None,
) -> tuple[float, list[dict]]:
    """(chosen λ, one record per grid point: λ, accuracy and normalized accuracy per task, mean).

    `evaluator`, if given, is reused (its split and settings win over the keyword arguments).
    """
    from loramerge_cli.adapters.compat import check_base_kind, check_spec_base
    from loramerge_cli.merging.merge import merge, resolve_config

    default_lambda = resolve_config(replace(config, lam=None), len(adapters)).lam
    grid = list(grid) if grid is not None else default_grid(default_lambda)
    if not grid or not all(math.isfinite(value) for value in grid):
        raise LoramergeError("the λ grid must hold at least one finite value")
    result = merge(adapters, replace(config, lam=1.0), table, allow_base_mismatch)
    if evaluator is None:
        settings = EvalSettings(split=split, val_limit=val_limit, device=device, dtype=dtype, batch_size=batch_size,
                                threads=threads)
        task_file = load_task_file(tasks_file)
        check_spec_base(task_file, adapters, allow_base_mismatch)
        evaluator = Evaluator(task_file, adapters, settings, base=base)
        check_base_kind(evaluator)
    experts = expert_scores(evaluator, ScoreCache(run_dir))
    unit_deltas = merged_deltas(result)
    records = []
    for lam in grid:
        scores = evaluator.evaluate(scale_deltas(unit_deltas, lam))
        normalized, _ = normalized_accuracy(scores, experts)
        records.append({
            "lambda": lam,
            "accuracy": scores,
            "normalized_accuracy": normalized,
            "mean_normalized_accuracy": mean_defined(normalized),
        })
    return best_lambda(records, default_lambda), records
