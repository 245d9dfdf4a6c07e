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
from loramerge_cli.errors import LoramergeError, UsageError, brief, check_seed, is_finite_number
from loramerge_cli.masks import WeightTable, check_table
from loramerge_cli.merging import elementwise, spectral
from loramerge_cli.merging.config import (  # noqa: F401  (MergeConfig is imported from here too)
    DEFAULT_ENERGY,
    DEFAULT_MERGER,
    DEFAULT_SEED,
    SETTINGS,
    MergeConfig,
)
from loramerge_cli.merging.full_space import FullSpaceJob, merge_full_space
from loramerge_cli.merging.lowrank import LowRank, truncate_dense
from loramerge_cli.merging.registry import PARAMETERS, PRESETS, Method, merger_names, method_named, method_names
from loramerge_cli.merging.spaces import SPACES, project


@dataclass
class ResolvedMerge:
    """A fully resolved merge: every parameter has the value that will be used."""

    merger: str
    method: Method
    space: str
    lam: float
    weights: list[float]
    params: dict  # every parameter the method declares, resolved (given, recorded or its default)
    knots_scaled: bool
    seed: int
    out_rank: int | None
    energy: float
    compute_dtype: torch.dtype
    isotropize: bool = False

    def describe(self) -> dict:
        return {
            "merger": self.merger,
            "method": self.method.name,
            "space": self.space,
            "lambda": self.lam,
            "weights": self.weights,
            **self.params,
            **({"knots_scaled": self.knots_scaled} if self.space == "knots" else {}),
            **({"seed": self.seed} if self.method.randomized else {}),
            **({"isotropize": True} if self.isotropize else {}),
            **({"out_rank": self.out_rank, "energy": self.energy} if self.is_dense and not self.isotropize else {}),
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
    """A merge in memory: each written module's factors (lora_B, lora_A at scale 1), the modules every task left,
    the resolved settings, warnings and provenance. `api.write_merged_adapter` writes it as a PEFT folder."""

    modules: dict[str, MergedModule]
    omitted: list[str]  # every task left these modules: ΔW = 0, not written
    settings: ResolvedMerge
    warnings: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)  # written to loramerge.json beside the settings (λ tuning)
    tasks: list[str] | None = None  # the merged adapters' names, in order (None: a result built in code)


def _finite_real(value) -> bool:
    """A finite real number of any kind (int, float, a numpy scalar), not a bool."""
    import numbers

    try:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:
        return False


def _check_types(config: MergeConfig) -> None:
    """What the command line's parsing guarantees, for a MergeConfig built in code: switches are bools, λ a
    number, every parameter one some method declares, the compute dtype a torch dtype."""
    for name in ("knots_scaled", "isotropize"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, bool):
            raise UsageError(f"--{name.replace('_', '-')} must be true or false (got {value!r})")
    for name in ("merger", "method", "space"):
        if getattr(config, name) is not None and not isinstance(getattr(config, name), str):
            raise UsageError(f"--{name} must be a name (got {getattr(config, name)!r})")
    weights = config.weights
    if weights is not None and (isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__")
                                or not all(_finite_real(w) for w in weights)):
        raise UsageError(f"--weights must be a list of finite numbers, one per adapter (got {brief(weights)})")
    if config.out_rank is not None and (isinstance(config.out_rank, bool) or not isinstance(config.out_rank, int)):
        raise UsageError(f"--out-rank must be a whole number (got {config.out_rank!r})")
    if config.energy is not None and not _finite_real(config.energy):
        raise UsageError(f"--energy must be a number in (0, 1] (got {config.energy!r})")
    if config.lam is not None and not is_finite_number(config.lam):
        raise UsageError(f"--lambda must be a finite number (got {config.lam!r}; 'auto' is merge --lambda auto's: "
                         "plan_merge(..., tuning=TaskData(...)))")
    unknown = sorted(name for name in config.params if name not in PARAMETERS)
    if unknown:
        raise UsageError(f"no merger has a parameter {unknown[0]!r} (known: {', '.join(PARAMETERS)})")
    if config.compute_dtype not in (None, torch.float32, torch.float64):  # SVD and QR need a float type the CPU
        raise UsageError(f"compute_dtype must be torch.float32 or torch.float64 (got {config.compute_dtype!r})")


def resolve_config(config: MergeConfig, task_count: int, table: WeightTable | None = None) -> ResolvedMerge:
    """Fill defaults (preset, then method) and validate every parameter."""
    _check_types(config)
    merger = config.merger or DEFAULT_MERGER
    preset = PRESETS.get(merger)
    method_name = config.method_name()
    try:
        method = method_named(method_name)
    except KeyError:
        if config.method is None:  # (the merger's name: --merger, MergeConfig.merger)
            raise UsageError(f"unknown merger {merger!r} (known: {', '.join(merger_names())})") from None
        raise UsageError(f"unknown method {method_name!r} (known: {', '.join(method_names())})") from None
    space = config.space or (preset.space if preset else "full")
    if space not in SPACES:
        raise UsageError(f"unknown space {space!r} (known: {', '.join(SPACES)})")
    if space not in method.spaces:
        raise UsageError(f"method {method.name} works in the {' and '.join(method.spaces)} space only "
                         f"(it acts on the LoRA factors), not in {space}")
    preset_params = preset.parameters if preset and method.name == preset.method else {}
    params = {}
    for name in method.parameters:
        value = config.parameter(name)
        if value is None:
            value = preset_params.get(name, method.defaults[name])
        if isinstance(value, (list, tuple)):
            if not PARAMETERS[name].per_adapter or len(value) != task_count:
                raise UsageError(f"--{PARAMETERS[name].flag} takes one value, or one per adapter ({task_count})")
            problem = next((p for p in map(PARAMETERS[name].check, value) if p), None)
            value = [float(v) for v in value]
        else:
            problem = PARAMETERS[name].check(value)
        if problem:
            raise UsageError(problem)
        params[name] = value
    problem = method.check(params) if method.check is not None else None
    if problem:
        raise UsageError(problem)
    for name in PARAMETERS:
        if name not in method.parameters and config.parameter(name) is not None:
            raise UsageError(f"--{PARAMETERS[name].flag} does not apply to method {method.name}")
    knots_scaled = config.knots_scaled if config.knots_scaled is not None else preset_params.get("knots_scaled", False)
    seed = DEFAULT_SEED if config.seed is None else config.seed
    check_seed(seed)
    weights = [float(w) for w in config.weights] if config.weights is not None else [1.0] * task_count
    if len(weights) != task_count:
        raise UsageError(f"--weights has {len(weights)} values for {task_count} adapters")
    if config.lam is not None:
        lam = config.lam
    elif table is not None and table.scale is not None:
        lam = float(table.scale)
    else:
        lam = method.lambda_for(task_count)
    if not math.isfinite(lam):
        raise UsageError(f"--lambda must be a finite number (got {lam})")
    if config.out_rank is not None and config.out_rank < 1:
        raise UsageError("--out-rank must be >= 1")
    energy = DEFAULT_ENERGY if config.energy is None else config.energy
    if not 0.0 < energy <= 1.0:
        raise UsageError("--energy must be in (0, 1]")
    return ResolvedMerge(
        merger=merger, method=method, space=space, lam=float(lam), weights=weights, params=params,
        knots_scaled=bool(knots_scaled), seed=seed, out_rank=config.out_rank, energy=energy,
        compute_dtype=torch.float64 if config.compute_dtype is None else config.compute_dtype,
        isotropize=bool(config.isotropize),
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
    statistics: dict | None = None,
) -> MergeResult:
    """Merge the adapters module by module with exactly `config` (a table's recorded settings are not read:
    `api.merge` applies them). docs/algorithms.md, "The merge pipeline", gives the exact semantics.

    `progress(path)` is called after each module is done (the CLI's progress bar). `statistics`: the input
    Gram matrices of methods that read the tasks' data (RegMean; evaluation.grams.collect_grams). `out_rank` and
    `energy` act only where a result is truncated (dense results): the config may carry them resolved for any
    method, as the λ tuner's does; `api.plan_merge` refuses them where a caller gives them for nothing
    (`check_truncation`)."""
    config = config or MergeConfig()
    if not adapters:
        raise LoramergeError("no adapters to merge")
    check_compatible(adapters, allow_base_mismatch)
    if table is not None:
        check_table(table, adapters)
    settings = resolve_config(config, len(adapters), table)
    return run_merge(adapters, settings, table, progress, statistics=statistics)


def check_truncation(config: MergeConfig, settings: ResolvedMerge) -> None:
    """`out_rank` / `energy` given where nothing is truncated are refused (they would be ignored)."""
    truncation = [name for name in ("out_rank", "energy") if name in config.given()]
    if truncation and not settings.is_dense:
        raise UsageError(f"--{truncation[0].replace('_', '-')} truncates dense merges (elementwise methods in the full "
                         f"space); {settings.method.name} in the {settings.space} space is exact in the LoRA factors")
    if truncation and settings.isotropize:
        raise UsageError(f"--{truncation[0].replace('_', '-')} does not apply with --isotropize: the isotropized "
                         "update is written exactly (every direction above 1e-6·σ_max, up to min(m, n) of them)")


def run_merge(
    adapters: list[Adapter],
    settings: ResolvedMerge,
    table: WeightTable | None = None,
    progress: Callable[[str], None] | None = None,
    cache: dict | None = None,
    statistics: dict | None = None,
    finish: Callable[[MergedModule], MergedModule] | None = None,
) -> MergeResult:
    """The merge proper, on validated inputs.

    `cache` (optional, scope `module` only) maps (module path, retained (task, weight) pairs, λ) to the
    finished module, so a search that changes a few units re-merges only those modules. `finish`
    (optional) is applied to each module as it is finished, and the result keeps what it returns (the
    writer's dtype: a merge then holds one module in float64 at a time).
    """
    retained = {path: _retained_tasks(adapters, path, settings, table) for path in module_paths(adapters)}
    active = {path: tasks for path, tasks in retained.items() if tasks}
    omitted = [path for path, tasks in retained.items() if not tasks]
    result = MergeResult({}, omitted, settings, tasks=[adapter.name for adapter in adapters])
    if settings.method.elementwise and settings.params.get("scope") == "adapter":
        merged = _merge_adapter_scope(active, adapters, settings)
        for path in list(merged):  # popped: each dense update is freed once finished
            module = _finish(path, merged.pop(path), adapters, active[path], settings)
            result.modules[path] = module if finish is None else finish(module)
            if progress is not None:
                progress(path)
    else:
        for path, tasks in active.items():
            key = (path, tuple(tasks), settings.lam)
            if cache is None or key not in cache:
                merged = _merge_module(path, tasks, adapters, settings, statistics)
                module = _finish(path, merged, adapters, tasks, settings)
                if cache is not None:
                    cache[key] = module
            else:
                module = cache[key]
            result.modules[path] = module if finish is None else finish(module)
            if progress is not None:
                progress(path)
    for path in omitted if progress is not None else ():
        progress(path)
    summary = lossy_summary(result.modules.values(), settings)
    if summary:
        result.warnings.append(summary)
    return result


def lossy_summary(modules, settings: ResolvedMerge) -> str | None:
    """One line about the dense results whose truncation lost more than the --energy target allows
    (relative error > √(1 − energy)): how many, the worst error, and the --out-rank that is exact."""
    limit = max((1.0 - settings.energy) ** 0.5, 1e-9)  # rounding is not a loss
    lossy = [m for m in modules if m.truncation_error is not None and (m.capped or m.truncation_error > limit)]
    if not lossy:
        return None
    worst = max(lossy, key=lambda m: m.truncation_error)
    exact = max(min(m.lora_B.shape[0], m.lora_A.shape[1]) for m in lossy)
    return (f"{len(lossy)} of {len(list(modules))} dense results keep less than {settings.energy:g} of their "
            f"energy at rank ≤ {max(m.rank for m in lossy)} (worst relative error {worst.truncation_error:.3g}, "
            f"{worst.path}); --out-rank {exact} makes them exact")


def _retained_tasks(adapters, path, settings: ResolvedMerge, table) -> list[tuple[int, float]]:
    """(task index, weight) of every task that stays in this module: weight ≠ 0 and an update that is not zero
    (lora_A or lora_B all zeros: a pruned copy, an untrained module). A zero update leaves as a weight 0 does,
    bases included: in the knots space its V_t block would be rounding noise that TIES counts as votes and TSV
    as directions, and in the core space its A_t would turn the basis."""
    tasks = []
    for index, adapter in enumerate(adapters):
        if path not in adapter.modules:
            continue
        module = adapter.modules[path]
        if module.scale == 0 or not (module.lora_A.any() and module.lora_B.any()):
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
            dense = elementwise.dare(dense, settings.params["drop_rate"], settings.seed, adapters[index].name, path,
                                     settings.params.get("dare_rescale", "inverse"))
        rows[row] = dense.reshape(-1)
    return rows


def row_params(settings: ResolvedMerge, indices: list[int], weights: list[float], adapters=None, path=None) -> dict:
    """The method's parameters for rows of these tasks: per-adapter densities picked, weights attached,
    and (module scope) the seeds of randomized methods, keyed like DARE's by (seed, task, module)."""
    params = dict(settings.params)
    if isinstance(params.get("density"), list):
        params["density"] = [params["density"][index] for index in indices]
    params["row_weights"] = torch.tensor(weights, dtype=settings.compute_dtype)
    if path is not None:
        params["row_seeds"] = [elementwise.dare_seed(settings.seed, adapters[index].name, path) for index in indices]
        params["module_seed"] = elementwise.dare_seed(settings.seed, "", path)
    return params


def _merge_module(path, tasks, adapters, settings: ResolvedMerge, statistics: dict | None = None):
    merged = _merge_module_raw(path, tasks, adapters, settings, statistics)
    return spectral.isotropize(merged) if settings.isotropize else merged


def _merge_module_raw(path, tasks, adapters, settings: ResolvedMerge, statistics: dict | None = None):
    projected = _projected(path, tasks, adapters, settings)
    method = settings.method
    params = row_params(settings, [index for index, _ in tasks], [weight for _, weight in tasks], adapters, path)
    if method.needs_inputs:
        if statistics is None or path not in statistics:
            raise LoramergeError(f"method {method.name} reads each task's inputs: give the task spec (--tasks)")
        params["grams"] = [statistics[path][index] for index, _ in tasks]
    if not method.elementwise:
        merged = method.merge_with(projected.tasks, params) if method.merge_with else method.merge(projected.tasks)
        return projected.reconstruct(merged)
    if settings.space == "full" and method.full_space is not None:
        return _merge_full_space(path, tasks, adapters, settings, projected.tasks, params)
    shape = projected.tasks[0].shape
    merged = method.combine(_dense_rows(projected, path, tasks, adapters, settings), None, params)
    return projected.reconstruct(merged.reshape(shape))


def _merge_full_space(path, tasks, adapters, settings: ResolvedMerge, factors: list[LowRank], params: dict):
    """The chunked kernel (merging/full_space.py): the same result without (T × m·n) temporaries."""
    drop_rate = params.get("drop_rate", 0.0) if settings.method.uses_dare else 0.0
    keeps = [
        elementwise.dare_keep_mask(factors[0].shape, drop_rate, settings.seed, adapters[index].name, path)
        if drop_rate > 0.0 else None
        for index, _ in tasks
    ]
    density = params.get("density")
    job = FullSpaceJob(
        kind=settings.method.full_space,
        densities=None if density is None else elementwise.row_densities(density, len(tasks)),
        keep_rule=params.get("keep_rule", "round"),
        options=elementwise.TiesOptions(params.get("consensus", "mass"), params.get("normalize", "count"),
                                        params.get("elect_on", "weighted")),
        drop_rate=drop_rate,
        dare_rescale=params.get("dare_rescale", "inverse"),
        outliers=params.get("gamma"),
        magprune=params.get("epsilon"),
        seeds=tuple(params["row_seeds"]),
    )
    return merge_full_space(factors, keeps, [weight for _, weight in tasks], job)


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
    merged_row = settings.method.combine(X, present, row_params(settings, list(range(task_count)), settings.weights))
    out, start = {}, 0
    for path, block, _ in blocks:
        width = block.shape[1]
        shape = projections[path].tasks[0].shape
        merged = projections[path].reconstruct(merged_row[start : start + width].reshape(shape))
        out[path] = spectral.isotropize(merged) if settings.isotropize else merged
        start += width
    return out


def _finish(path, delta, adapters, tasks, settings: ResolvedMerge) -> MergedModule:
    """Scale by λ and turn the result into LoRA factors (exact, or truncated SVD for dense results)."""
    fan_in_fan_out = adapters[tasks[0][0]].modules[path].fan_in_fan_out
    total_rank = sum(adapters[index].modules[path].rank for index, _ in tasks)
    if isinstance(delta, LowRank):
        return MergedModule(path, delta.left * settings.lam, delta.right, fan_in_fan_out)
    if settings.lam == 0:
        delta = delta.new_zeros(1, 1).expand(delta.shape)  # the update is 0 (rank 0), without an m×n copy
    # λ scales the factors, not the dense update (an m×n copy: 470 MB for one 8B MLP projection)
    factors, error, capped = truncate_dense(delta, settings.out_rank, settings.energy, total_rank)
    return MergedModule(path, factors.left * settings.lam, factors.right, fan_in_fan_out, error, capped)
