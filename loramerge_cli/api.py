"""The library API the CLI uses: load, inspect, plan, merge, prune, write. Importing it imports torch."""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from loramerge_cli.adapters import writer
from loramerge_cli.adapters.compat import compatibility_problems
from loramerge_cli.adapters.model import Adapter, LoraModule
from loramerge_cli.adapters.peft_reader import load_adapter, load_adapters
from loramerge_cli.adapters.units import sorted_units
from loramerge_cli.adapters.writer import write_adapter
from loramerge_cli.errors import LoramergeError, UsageError, expect, expect_adapters
from loramerge_cli.hub import local_paths_warnings, push_folder
from loramerge_cli.masks import (
    WeightTable,
    align_table,
    check_table,
    check_table_type,
    from_pruned_indices,
    load_table,
    ones_table,
    parse_indices,
)
from loramerge_cli.merging.merge import MergeConfig, MergeResult
from loramerge_cli.plan import (
    LambdaTuning,
    MergePlan,
    PrunePlan,
    TaskData,
    base_warnings,
    check_not_an_input,
    check_recorded,
    plan_merge,
    plan_prune,
    prune,
    write,
    write_pruned,
)
from loramerge_cli.pruning import apply_table
from loramerge_cli import plan as merge_plan
from loramerge_cli.evaluation import eval_plan
from loramerge_cli.evaluation.eval_plan import EvalPlan, plan_eval
from loramerge_cli.evaluation.settings import EvalSettings
from loramerge_cli.search.enmp_settings import EnmpSettings
from loramerge_cli.search.nsc_settings import NscSettings
from loramerge_cli.search.plan import SearchPlan, SearchRequest, plan_search

__all__ = [
    "Adapter", "EnmpSettings", "EvalPlan", "EvalSettings", "LambdaTuning", "LoramergeError", "MergeConfig",
    "MergePlan", "MergeResult",
    "NscSettings", "PrunePlan", "SearchPlan", "SearchRequest", "TaskData", "UsageError", "WeightTable", "apply_table",
    "base_warnings", "check_not_an_input", "check_table", "check_table_flags", "evaluate", "execute", "execute_eval",
    "from_pruned_indices", "inspect_adapters", "load_adapter", "load_adapters", "load_table", "local_paths_warnings",
    "merge", "module_norm", "ones_table", "parse_indices", "plan_eval", "plan_merge", "plan_prune", "plan_search",
    "prune", "push_folder", "search", "weight_table", "write", "write_adapter", "write_adapters",
    "write_merged_adapter", "write_pruned",
]


def _keeps_torch_threads(function):
    """The call leaves torch's CPU thread count as the caller had it (the evaluator fixes it while it scores:
    CPU reductions, and so the scores, depend on it)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


execute = _keeps_torch_threads(merge_plan.execute)
execute_eval = _keeps_torch_threads(eval_plan.execute_eval)


@_keeps_torch_threads
def merge(adapters: list[Adapter], config: MergeConfig | None = None, table: WeightTable | None = None,
          progress: Callable[[str], None] | None = None, **options) -> MergeResult:
    """The merge `loramerge merge` does: the table's recorded settings apply under `config`'s (a conflict needs
    `override=True`), then defaults. `options` are `plan_merge`'s (override, allow_base_mismatch, tuning).
    `merging.merge.merge` merges with exactly `config` instead. It writes nothing: `write_merged_adapter` does,
    or `plan_merge(..., out=...)` then `write`."""
    writing = sorted(name for name in ("out", "force", "dtype") if name in options)
    if writing:
        raise UsageError(f"api.merge writes nothing, so it takes no {', '.join(writing)}: write its result with "
                         "write_merged_adapter(result, adapters, out, ...), or plan_merge(..., out=...) then write")
    return merge_plan.execute(plan_merge(adapters, config, table, **options), progress)


@_keeps_torch_threads
def search(plan: SearchPlan, on_event: Callable[[str, dict], None] = lambda kind, data: None):
    """Run a planned search (`plan_search`); write its table to the plan's `out` (the run directory holds it
    already, as best.json, marked by finished.json) and its plots. `plan.request.adapters` may be loaded
    Adapters. A plan resuming a run that finished (`plan.finished`) searches nothing: its table is the run's.
    Returns (WeightTable, provenance)."""
    from loramerge_cli.masks import table_from_text
    from loramerge_cli.outputs import holds, write_result
    from loramerge_cli.search.rundir import BEST_NAME

    expect(plan, SearchPlan, "search runs a plan (api.plan_search(request))")

    if plan.out is not None and plan.finished is None:  # (a plan searched twice: its table is there now)
        from loramerge_cli.outputs import guard_output

        guard_output(plan.out, force=plan.force, kind="file")
    if plan.finished is not None:  # --resume of a run that finished: its table, searched once
        table = table_from_text(plan.finished, Path(plan.request.run_dir) / BEST_NAME)
        provenance = table.provenance
    else:
        from loramerge_cli.search.runner import run_search

        table, provenance = run_search(plan.request, on_event)
    text = plan.finished if plan.finished is not None else table.text()
    if plan.out is not None:  # the file names its adapters, and the absolute paths of its commands, relative to
        from loramerge_cli.adapters.writer import table_file  # its folder, as an output folder's records do

        table = table_file(table, plan.out)
        provenance, text = table.provenance, table.text()
    if plan.out is not None and not holds(plan.out, text):  # what appeared there during the search is not replaced
        write_result(plan.out, text, plan.force)
    if plan.plot is not None:
        from loramerge_cli.search.plots import write_plots

        write_plots(table, provenance["history"], plan.plot, plan.force)
    return table, provenance


@_keeps_torch_threads
def evaluate(tasks: str | Path, experts: list[Adapter], merged: list[Adapter] | None = None, settings=None, **options):
    """`loramerge eval` on loaded adapters: the base, each expert on its task, each merge on every task."""
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.evaluation.report import eval_report

    merged = list(merged or [])
    merge_plan.check_loaded(experts)
    if merged:
        merge_plan.check_loaded(merged)
    settings = EvalSettings() if settings is None else settings
    expect(settings, EvalSettings, "settings must be an EvalSettings")
    return eval_report(tasks, experts, merged, settings, **options)


def check_table_flags(mask: str | Path | None, indices: str | list[int] | None) -> None:
    """--mask or --indices (not both), an --indices list well formed: usage, before anything is read."""
    if mask is not None and indices is not None:
        raise UsageError("give --mask or --indices, not both")
    if indices is not None:
        parse_indices(indices)


def weight_table(adapters: list[Adapter], mask: str | Path | None = None, indices: str | list[int] | None = None):
    """The weight table of a --mask file or an --indices list (None for neither), checked against the adapters."""
    check_table_flags(mask, indices)
    if mask is not None:
        table = align_table(load_table(mask), adapters)  # matched by task name, not by order
        check_table(table, adapters, origin=str(mask))
        check_recorded(table, len(adapters), origin=str(mask))
        return table
    if indices is not None:
        return from_pruned_indices(adapters, parse_indices(indices))
    return None


def write_merged_adapter(result: MergeResult, adapters: list[Adapter], out_dir: str | Path, **options) -> Path:
    """Write a merge result as a PEFT LoRA folder; never into an input adapter's folder (even with force)."""
    expect(result, MergeResult, "result must be a MergeResult (api.merge returns one)")
    merge_plan.check_loaded(adapters)
    check_table_type(options.get("table"))
    extra = {**result.provenance, **(options.pop("extra_provenance", None) or {})}  # λ tuning, RegMean's inputs
    return writer.write_merged_adapter(result, adapters, out_dir, extra_provenance=extra, **options)


def write_adapters(adapters: list[Adapter], out_dir: str | Path, **options) -> Path:
    """Write each adapter to OUT/<name>/; never into an input adapter's folder (even with force)."""
    merge_plan.check_loaded(adapters)
    check_table_type(options.get("table"))
    return writer.write_adapters(adapters, out_dir, **options)


def module_norm(module: LoraModule) -> float:
    """‖B̃A‖_F = |scale|·‖BA‖_F, with ‖BA‖_F² = trace((BᵀB)(AAᵀ)) from the r×r Gram matrices: never forms BA. The
    factors are divided by their largest entries first and the scale applied last, so that a huge lora_alpha gives
    a huge norm (or inf), never NaN."""
    expect(module, LoraModule, "module_norm takes a LoraModule (one of an adapter's modules' values)")
    B, A = module.lora_B.to(torch.float64), module.lora_A.to(torch.float64)
    largest_B, largest_A = float(B.abs().max()) if B.numel() else 0.0, float(A.abs().max()) if A.numel() else 0.0
    if largest_B == 0.0 or largest_A == 0.0:
        return 0.0
    B, A = B / largest_B, A / largest_A
    squared = float(((B.T @ B) * (A @ A.T)).sum())
    return _product([abs(module.scale), largest_B, largest_A, math.sqrt(max(squared, 0.0))])


def _product(values: list[float]) -> float:
    """The product of non-negative floats, inf only if the product itself is past float64's range (not because
    a partial product is: 1e300 · 1e30 · 1e-30)."""
    mantissa, exponent = 1.0, 0
    for value in values:
        if value == 0.0:
            return 0.0
        fraction, power = math.frexp(value)
        mantissa, exponent = mantissa * fraction, exponent + power
    try:
        return math.ldexp(mantissa, exponent)
    except OverflowError:
        return math.inf


def norm_grid(adapters: list[Adapter]) -> dict:
    """‖B̃A‖_F per (unit, task), over the unit's modules (the root of their squares' sum); None where a task has
    none, or where the norm is past float64's range (the adapter's note says so).

    Modules outside any block are listed under their own path after the units.
    """
    expect_adapters(adapters, "norm_grid")
    norms: dict[str, list[list[float]]] = {}
    for task, adapter in enumerate(adapters):
        for path, module in adapter.modules.items():
            norms.setdefault(module.unit or path, [[] for _ in adapters])[task].append(module_norm(module))
    block_keys = {m.unit for a in adapters for m in a.modules.values() if m.unit is not None}
    blocks = sorted_units(block_keys)
    others = sorted(key for key in norms if key not in block_keys)
    rows = blocks + others
    values = [[_finite_or_none(math.hypot(*cell)) if cell else None for cell in norms[row]] for row in rows]
    return {"tasks": [a.name for a in adapters], "units": rows, "blocks": len(blocks), "values": values}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _size_bytes(adapter: Adapter) -> int:
    tensors = [t for m in adapter.modules.values() for t in (m.lora_A, m.lora_B)]
    tensors += [*adapter.heads.values(), *adapter.base_copies.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _summary(adapter: Adapter) -> dict:
    modules = adapter.modules.values()
    return {
        "name": adapter.name,
        **adapter.source.describe(),
        "base_model": adapter.base_model,
        "peft_type": str(adapter.config.get("peft_type", "LORA")).upper(),
        "task_type": adapter.config.get("task_type"),
        "dtype": ",".join(sorted({str(m.lora_A.dtype).removeprefix("torch.") for m in modules} |
                                 {str(m.lora_B.dtype).removeprefix("torch.") for m in modules})) or None,
        "modules": len(adapter.modules),
        "ranks": _counts(m.rank for m in modules),
        "alphas": _counts(m.alpha for m in modules),
        "scales": _counts(float(f"{m.scale:.8g}") for m in modules),  # (8 significant digits: 1e-12/3 is no 0)
        "use_rslora": bool(adapter.config.get("use_rslora", False)),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in modules),
        "targets": target_names([m.path for m in modules], adapter.config.get("target_modules")),
        "units": len(adapter.units),
        "heads": adapter.head_modules,
        "size_bytes": _size_bytes(adapter),
        "notes": _notes(adapter),
    }


def target_names(paths: list[str], configured=None) -> list[str]:
    """The targeted modules by leaf name (`q_proj`), or by their path inside the block where the leaf is
    ambiguous: LoRA modules with that leaf sit at several places of a block, or the config's
    target_modules names a longer suffix (BERT's `attention.output.dense`, not every `dense`)."""
    from loramerge_cli.adapters.units import unit_of

    inside = {}  # leaf -> in-block paths
    for path in paths:
        unit = unit_of(path)
        relative = path[len(unit) + 1:] if unit else path
        inside.setdefault(relative.rsplit(".", 1)[-1], set()).add(relative)
    suffixes = [name for name in configured or [] if isinstance(configured, list) and "." in name]
    names = set()
    for leaf, relatives in inside.items():
        longer = any(name.rsplit(".", 1)[-1] == leaf for name in suffixes)
        names.update(relatives if len(relatives) > 1 or longer else {leaf})
    return sorted(names)


def _notes(adapter: Adapter) -> list[str]:
    """What a user should know before merging this adapter."""
    notes = []
    if adapter.source.config_file is None:
        notes.append("no adapter_config.json beside the weights: read with lora_alpha = r (scale 1)")
    if adapter.base_copies:
        layers = ", ".join(sorted({key.rsplit(".", 1)[0] for key in adapter.base_copies}))
        notes.append(f"carries the base weights of {layers} (PEFT's save_embedding_layers); merges keep them")
    overflow = _overflow(adapter)
    if overflow is not None:
        notes.append(overflow)
    beyond = next((path for path, module in adapter.modules.items() if not math.isfinite(module_norm(module))), None)
    if beyond is not None:
        notes.append(f"module {beyond}: its update's norm ‖scale·B·A‖ is past a float64's range; its unit's norm is "
                     "not shown (null)")
    return notes


def _counts(values) -> dict:
    """{value: how many modules}, as JSON-friendly strings sorted by value."""
    counts = Counter(values)
    return {str(int(v) if float(v).is_integer() and abs(v) < 2**53 else v): counts[v] for v in sorted(counts)}


def inspect_adapters(adapters: list[Adapter]) -> dict:
    """Everything `loramerge inspect` shows: per-adapter summaries, the norm grid, compatibility."""
    merge_plan.check_loaded(adapters)
    pairs = []
    for i, first in enumerate(adapters):
        for second in adapters[i + 1:]:
            problems = compatibility_problems([first, second])
            pairs.append({"adapters": [first.name, second.name], "compatible": not problems, "problems": problems})
    return {
        "adapters": [_summary(adapter) for adapter in adapters],
        "units": sorted_units(unit for adapter in adapters for unit in adapter.units),
        "norms": norm_grid(adapters),
        "pairs": pairs,
        "merge_refusals": compatibility_problems(adapters) if len(adapters) > 1 else [],
    }


def _overflow(adapter: Adapter) -> str | None:
    """A note on the first module whose own update scale·B·A is past the adapter's dtype's range (finite factors
    can multiply past it): apply-mask's copies are refused, and a merge unless λ and the weights bring the
    merged update back in range (writer.check_updates_in_range)."""
    from loramerge_cli.adapters.writer import check_updates_in_range

    for path, module in adapter.modules.items():
        try:
            check_updates_in_range({path: module}, module.lora_B.dtype)
        except LoramergeError as error:
            reached = str(error).removesuffix("; nothing written").split(" B·A ", 1)[-1]
            return (f"module {path}: its update scale·B·A {reached}: apply-mask's copies are refused, and a merge "
                    "unless λ and the weights bring the merged update back in range")
    return None
