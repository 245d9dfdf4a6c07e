"""merge(): weight table -> space -> method -> λ -> exact factors (or truncated dense), per module.

Everything is validated by `resolve_config` before the first tensor is touched.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Callable

import torch

from loramerge_cli.adapters.compat import check_compatible
from loramerge_cli.adapters.model import Adapter
from loramerge_cli.adapters.units import unit_sort_key
from loramerge_cli.errors import LoramergeError
from loramerge_cli.masks import WeightTable, check_table
from loramerge_cli.merging import elementwise
from loramerge_cli.merging.lowrank import LowRank, truncate_dense
from loramerge_cli.merging.registry import PARAMETERS, PRESETS, Method, method_named
from loramerge_cli.merging.spaces import SPACES, project


@dataclass
class MergeConfig:
    """What to merge and how. `None` means: the preset's or the method's default."""

    merger: str = "ta"  # a preset (knots, core) or a method name
    method: str | None = None
    space: str | None = None
    lam: float | None = None
    weights: list[float] | None = None  # per adapter, in task order
    density: float | None = None
    drop_rate: float | None = None
    scope: str | None = None
    knots_scaled: bool | None = None
    seed: int = 1
    out_rank: int | None = None
    energy: float = 0.9999
    compute_dtype: torch.dtype = torch.float64


@dataclass
class ResolvedMerge:
    """A fully resolved merge: every parameter has the value that will be used."""

    merger: str
    method: Method
    space: str
    lam: float
    weights: list[float]
    params: dict  # density, drop_rate, scope as the method declares them
    knots_scaled: bool
    seed: int
    out_rank: int | None
    energy: float
    compute_dtype: torch.dtype

    def describe(self) -> dict:
        return {
            "merger": self.merger,
            "method": self.method.name,
            "space": self.space,
            "lambda": self.lam,
            "weights": self.weights,
            **self.params,
            **({"knots_scaled": self.knots_scaled} if self.space == "knots" else {}),
            **({"seed": self.seed} if self.method.uses_dare else {}),
            **({"out_rank": self.out_rank, "energy": self.energy} if self.is_dense else {}),
        }

    @property
    def is_dense(self) -> bool:
        return self.method.elementwise and self.space == "full"


@dataclass
class MergedModule:
    path: str
    lora_B: torch.Tensor  # d_out × k, scale 1
    lora_A: torch.Tensor  # k × d_in
    fan_in_fan_out: bool = False
    truncation_error: float | None = None  # relative Frobenius error of a truncated dense result
    capped: bool = False  # the energy target needed more than Σ r_t components

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


@dataclass
class MergeResult:
    modules: dict[str, MergedModule]
    omitted: list[str]  # every task left these modules: ΔW = 0, not written
    settings: ResolvedMerge
    warnings: list[str] = field(default_factory=list)


def resolve_config(config: MergeConfig, task_count: int, table: WeightTable | None = None) -> ResolvedMerge:
    """Fill defaults (preset, then method) and validate every parameter."""
    preset = PRESETS.get(config.merger)
    method_name = config.method or (preset.method if preset else config.merger)
    try:
        method = method_named(method_name)
    except KeyError as error:
        raise LoramergeError(str(error.args[0]) + "; presets: " + ", ".join(PRESETS)) from None
    space = config.space or (preset.space if preset else "full")
    if space not in SPACES:
        raise LoramergeError(f"unknown space {space!r} (known: {', '.join(SPACES)})")
    preset_params = preset.parameters if preset and method.name == preset.method else {}
    params = {}
    for name in method.parameters:
        value = getattr(config, name)
        if value is None:
            value = preset_params.get(name, method.defaults[name])
        problem = PARAMETERS[name].check(value)
        if problem:
            raise LoramergeError(problem)
        params[name] = value
    for name in PARAMETERS:
        if name not in method.parameters and getattr(config, name) is not None:
            raise LoramergeError(f"--{PARAMETERS[name].flag} does not apply to method {method.name}")
    knots_scaled = config.knots_scaled if config.knots_scaled is not None else preset_params.get("knots_scaled", False)
    if config.seed < 1:
        raise LoramergeError("--seed must be >= 1 (0 would mean a clock seed to CMA-ES)")
    weights = list(config.weights) if config.weights is not None else [1.0] * task_count
    if len(weights) != task_count:
        raise LoramergeError(f"--weights has {len(weights)} values for {task_count} adapters")
    if not all(w == w and abs(w) != float("inf") for w in weights):
        raise LoramergeError("--weights must be finite numbers")
    if config.lam is not None:
        lam = config.lam
    elif table is not None and table.scale is not None:
        lam = float(table.scale)
    else:
        lam = method.lambda_for(task_count)
    if not math.isfinite(lam):
        raise LoramergeError(f"λ must be a finite number (got {lam})")
    if config.out_rank is not None and config.out_rank < 1:
        raise LoramergeError("--out-rank must be >= 1")
    if not 0.0 < config.energy <= 1.0:
        raise LoramergeError("--energy must be in (0, 1]")
    return ResolvedMerge(
        merger=config.merger, method=method, space=space, lam=float(lam), weights=weights, params=params,
        knots_scaled=bool(knots_scaled), seed=config.seed, out_rank=config.out_rank, energy=config.energy,
        compute_dtype=config.compute_dtype,
    )


def module_paths(adapters: list[Adapter]) -> list[str]:
    """Union of the adapters' module paths, in natural order."""
    return sorted({path for adapter in adapters for path in adapter.modules}, key=unit_sort_key)


def merge(
    adapters: list[Adapter],
    config: MergeConfig | None = None,
    table: WeightTable | None = None,
    allow_base_mismatch: bool = False,
    progress: Callable[[str], None] | None = None,
) -> MergeResult:
    """Merge the adapters module by module. See Part A §A2–§A4 for the exact semantics.

    `progress(path)` is called after each module is done (the CLI's progress bar)."""
    config = config or MergeConfig()
    if not adapters:
        raise LoramergeError("no adapters to merge")
    check_compatible(adapters, allow_base_mismatch)
    if table is not None:
        check_table(table, adapters)
    settings = resolve_config(config, len(adapters), table)
    return run_merge(adapters, settings, table, progress)


def run_merge(
    adapters: list[Adapter],
    settings: ResolvedMerge,
    table: WeightTable | None = None,
    progress: Callable[[str], None] | None = None,
    cache: dict | None = None,
) -> MergeResult:
    """The merge proper, on validated inputs.

    `cache` (optional, scope `module` only) maps (module path, retained (task, weight) pairs, λ) to the
    finished module, so a search that changes a few units re-merges only those modules.
    """
    retained = {path: _retained_tasks(adapters, path, settings, table) for path in module_paths(adapters)}
    active = {path: tasks for path, tasks in retained.items() if tasks}
    omitted = [path for path, tasks in retained.items() if not tasks]
    result = MergeResult({}, omitted, settings)
    if settings.method.elementwise and settings.params.get("scope") == "adapter":
        merged = _merge_adapter_scope(active, adapters, settings)
        for path, delta in merged.items():
            result.modules[path] = _finish(path, delta, adapters, active[path], settings, result)
            if progress is not None:
                progress(path)
    else:
        for path, tasks in active.items():
            key = (path, tuple(tasks), settings.lam)
            if cache is None or key not in cache:
                warnings_before = len(result.warnings)
                delta = _merge_module(path, tasks, adapters, settings)
                module = _finish(path, delta, adapters, tasks, settings, result)
                entry = (module, result.warnings[warnings_before:])
                if cache is not None:
                    cache[key] = entry
            else:
                entry = cache[key]
                result.warnings.extend(entry[1])
            result.modules[path] = entry[0]
            if progress is not None:
                progress(path)
    for path in omitted if progress is not None else ():
        progress(path)
    return result


def _retained_tasks(adapters, path, settings: ResolvedMerge, table) -> list[tuple[int, float]]:
    """(task index, weight) of every task that stays in this module (weight ≠ 0)."""
    tasks = []
    for index, adapter in enumerate(adapters):
        if path not in adapter.modules:
            continue
        weight = settings.weights[index] * (table.weight(index, path) if table is not None else 1.0)
        if weight != 0.0:
            tasks.append((index, weight))
    return tasks


def _projected(path, tasks, adapters, settings: ResolvedMerge):
    factors = []
    for index, weight in tasks:
        scaled_B, A = adapters[index].modules[path].factors(settings.compute_dtype)
        factors.append((scaled_B * weight, A))
    return project(settings.space, factors, settings.knots_scaled)


def _dense_rows(projected, path, tasks, adapters, settings: ResolvedMerge) -> torch.Tensor:
    """The (T × D) matrix of flattened task tensors, DARE applied per (task, module)."""
    shape = projected.tasks[0].shape
    rows = None
    for row, (tensor, (index, _)) in enumerate(zip(projected.tasks, tasks)):
        dense = tensor.dense() if isinstance(tensor, LowRank) else tensor
        if rows is None:
            rows = dense.new_empty(len(tasks), shape[0] * shape[1])
        if settings.method.uses_dare:
            dense = elementwise.dare(dense, settings.params["drop_rate"], settings.seed, adapters[index].name, path)
        rows[row] = dense.reshape(-1)
    return rows


def _merge_module(path, tasks, adapters, settings: ResolvedMerge):
    projected = _projected(path, tasks, adapters, settings)
    method = settings.method
    if not method.elementwise:
        return projected.reconstruct(method.merge(projected.tasks))
    shape = projected.tasks[0].shape
    merged = method.combine(_dense_rows(projected, path, tasks, adapters, settings), None, settings.params)
    return projected.reconstruct(merged.reshape(shape))


def _merge_adapter_scope(active, adapters, settings: ResolvedMerge) -> dict:
    """Elementwise methods with scope `adapter`: one row per task over all its modules (sorted paths)."""
    if not active:  # every task left every module: nothing to merge
        return {}
    task_count = len(adapters)
    projections, blocks = {}, []
    for path in sorted(active):
        tasks = active[path]
        projected = _projected(path, tasks, adapters, settings)
        rows = _dense_rows(projected, path, tasks, adapters, settings)
        block = rows.new_zeros(task_count, rows.shape[1])
        present = torch.zeros(task_count, rows.shape[1], dtype=torch.bool)
        for row, (index, _) in zip(rows, tasks):
            block[index] = row
            present[index] = True
        projections[path] = projected
        blocks.append((path, block, present))
    X = torch.cat([block for _, block, _ in blocks], dim=1)
    present = torch.cat([mask for _, _, mask in blocks], dim=1)
    merged_row = settings.method.combine(X, present, settings.params)
    out, start = {}, 0
    for path, block, _ in blocks:
        width = block.shape[1]
        shape = projections[path].tasks[0].shape
        out[path] = projections[path].reconstruct(merged_row[start : start + width].reshape(shape))
        start += width
    return out


def _finish(path, delta, adapters, tasks, settings: ResolvedMerge, result: MergeResult) -> MergedModule:
    """Scale by λ and turn the result into LoRA factors (exact, or truncated SVD for dense results)."""
    fan_in_fan_out = adapters[tasks[0][0]].modules[path].fan_in_fan_out
    total_rank = sum(adapters[index].modules[path].rank for index, _ in tasks)
    if isinstance(delta, LowRank):
        return MergedModule(path, delta.left * settings.lam, delta.right, fan_in_fan_out)
    factors, error, capped = truncate_dense(delta * settings.lam, settings.out_rank, settings.energy, total_rank)
    if capped:
        result.warnings.append(
            f"{path}: keeping {settings.energy:g} of the energy needs more than Σ r_t = {total_rank} "
            f"components; capped (relative error {error:.3g})"
        )
    return MergedModule(path, factors.left, factors.right, fan_in_fan_out, error, capped)
