"""Plan, then execute: `plan_merge` checks everything a merge needs before any tensor is touched, `execute`
merges, `write` writes. `loramerge merge` and `api.merge` both go through here, so they agree.

Settings precedence (docs/algorithms.md, "Settings and precedence"): the caller's settings over the weight
table's recorded ones over the preset's over the method's defaults. A caller's setting that differs from a
recorded one is refused unless `override`; λ never conflicts (the caller's wins, then the table's `scale`,
then its recorded λ). With `override` and another merger or method, the recorded parameters are dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from loramerge_cli import outputs
from loramerge_cli.adapters.compat import check_compatible, configless_warnings
from loramerge_cli.adapters.model import Adapter
from loramerge_cli.adapters.sources import check_base_given
from loramerge_cli.adapters.writer import (
    adapter_files,
    as_written,
    check_head,
    check_head_holds_no_update,
    check_output_dir,
    check_task_folder_names,
    default_head,
    output_dtype,
    table_files,
    write_merged_adapter,
    zeroed_warning,
)
from loramerge_cli.errors import LoramergeError, NonFiniteError, UsageError, brief, expect, is_finite_number
from loramerge_cli.events import Reporter, stage
from loramerge_cli.masks import WeightTable, align_table, check_table, check_table_type
from loramerge_cli.merging import merge as merging
from loramerge_cli.merging.config import zero_by_settings
from loramerge_cli.merging.merge import SETTINGS, MergeConfig, MergeResult, ResolvedMerge, resolve_config
from loramerge_cli.merging.registry import DTYPES, PARAMETERS, randomized_methods


@dataclass
class TaskData:
    """The task spec a merge reads data from (its validation split): to tune λ (`--lambda auto`), and for
    methods that read the tasks' inputs (RegMean), with the evaluation options."""

    tasks: Path
    val_limit: int | None = None
    device: str | None = None
    batch_size: int | None = None
    base: str | None = None
    max_length: int | None = None
    dtype: str | None = None  # of the evaluated model
    threads: int | None = None
    backend: object | None = None  # search/backends.py Backend: where the grid is scored (None: here)

    def __post_init__(self) -> None:
        from loramerge_cli.evaluation.settings import EvalSettings

        EvalSettings(val_limit=self.val_limit, batch_size=self.batch_size or EvalSettings.batch_size,
                     max_length=self.max_length, dtype=self.dtype or EvalSettings.dtype, threads=self.threads).check()
        check_base_given(self.base)  # the model loads from it: a folder that is not there is said now
        if self.backend is not None:
            self.backend.check()
            self.threads = self.backend.threads_each(self.device or "cpu", self.threads)

    def pinned_base(self, adapters: list[Adapter], allow_base_mismatch: bool = False) -> str:
        """The base model it evaluates (--base, else the spec's, checked against the adapters', else theirs), a
        Hub base pinned to its commit."""
        from loramerge_cli.adapters.compat import check_spec_base
        from loramerge_cli.evaluation.engine import resolve_base
        from loramerge_cli.evaluation.specs import load_task_file

        task_file = load_task_file(self.tasks)
        if self.base is None:  # (the evaluators are then given the pinned base: the check is made here)
            check_spec_base(task_file, adapters, allow_base_mismatch)
        return resolve_base(task_file, adapters, self.base)

    def check_devices(self) -> None:
        """The devices it evaluates on exist here (`Backend.check_devices`): planned once the data is used."""
        from loramerge_cli.search.backends import Backend

        (self.backend or Backend()).check_devices(self.device or "cpu")

    def options(self) -> dict:
        """The evaluation options given (search_lambda's keywords); with workers, the driver uses the first
        worker's device (the experts are scored there)."""
        options = {name: value for name, value in vars(self).items()
                   if name not in ("tasks", "backend") and value is not None}
        if self.backend is not None and self.backend.devices:
            options["device"] = self.backend.devices[0]
        return options

    def evaluator(self, adapters: list[Adapter], allow_base_mismatch: bool = False, threads: int | None = None,
                  report: Reporter | None = None):
        """An Evaluator of the adapters on the validation split (the spec's base checked against theirs); `report`
        receives the loading as a progress stage."""
        from loramerge_cli.evaluation.engine import checked_evaluator
        from loramerge_cli.evaluation.settings import EvalSettings
        from loramerge_cli.evaluation.specs import load_task_file

        options = {name: value for name, value in self.options().items() if name not in ("base", "threads")}
        threads = threads if threads is not None else self.threads
        return checked_evaluator(load_task_file(self.tasks), adapters, EvalSettings(threads=threads, **options),
                                 self.base, allow_base_mismatch, report=report)


LambdaTuning = TaskData  # `--lambda auto`'s data (the name api users know)


@dataclass
class MergePlan:
    """A merge that has passed every check: `execute` cannot fail on its inputs, `write` not on its target."""

    adapters: list[Adapter]
    settings: ResolvedMerge  # every value the merge uses (λ is replaced when it is tuned)
    table: WeightTable | None = None
    out: Path | None = None
    force: bool = False
    dtype: str | None = None
    head: str | None = None
    base: str | None = None
    command: str | None = None
    tuning: TaskData | None = None  # λ is tuned on this data
    allow_base_mismatch: bool = False
    data: TaskData | None = None  # the tasks' data the method reads (RegMean), else None
    table_lambda: float | None = None  # the λ a weight table sets (or records): tried beside λ auto's grid


def recorded_settings(table: WeightTable | None) -> dict:
    """The merger settings a weight table was searched with: MergeConfig's fields and every registered method
    parameter it records (`keep_rule`, `gamma`, …), by name."""
    merger = table.merger if table is not None and isinstance(table.merger, dict) else {}
    names = dict.fromkeys([*SETTINGS, *PARAMETERS])
    recorded = {name: merger[name] for name in names if name != "lam" and merger.get(name) is not None}
    if table is not None and table.scale is None and merger.get("lambda") is not None:
        recorded["lam"] = merger["lambda"]  # the table's scale, when present, wins
    return recorded


def check_recorded(table: WeightTable | None, adapter_count: int, origin: str = "mask") -> None:
    """The table's recorded merger settings can be used: a bad one is the table's fault (a data error naming
    it), not a flag's."""
    recorded = recorded_settings(table)
    problem = None
    merger = table.merger if table is not None and isinstance(table.merger, dict) else {}
    unknown = [name for name in merger if name not in {*SETTINGS, *PARAMETERS, "lambda"} or name == "lam"]
    if unknown:  # a typo (`densty`) would merge at the default, silently
        problem = f"unknown setting {unknown[0]!r}"
    lam = recorded.get("lam")
    if lam is not None and not is_finite_number(lam):
        problem = f"lambda must be a finite number (got {lam!r})"
    for name in ("knots_scaled", "isotropize"):
        if name in recorded and not isinstance(recorded[name], bool):
            problem = f"{name} must be true or false (got {recorded[name]!r})"
    if problem is None and recorded:
        fields = {name: value for name, value in recorded.items() if name in SETTINGS}
        params = {name: value for name, value in recorded.items() if name not in SETTINGS}
        try:
            resolve_config(MergeConfig(**fields, params=params), adapter_count)
        except (UsageError, TypeError, ValueError, OverflowError) as error:
            problem = str(error).removeprefix("--")
    if problem is not None:
        raise LoramergeError(f"{origin}: its recorded merger settings cannot be used: {problem}")


def combined_settings(given: dict, recorded: dict, override: bool) -> dict:
    """The caller's settings over the table's recorded ones (see the module docstring)."""
    conflicts = [name for name in given if name != "lam" and name in recorded and given[name] != recorded[name]]
    if conflicts and not override:
        name = conflicts[0]
        raise UsageError(
            f"--{name.replace('_', '-')} {given[name]} conflicts with the mask's recorded "
            f"{name} {recorded[name]}; pass --override to use yours"
        )
    given_method, recorded_method = _method_named(given), _method_named(recorded)
    other_method = given_method is not None and recorded_method is not None and given_method != recorded_method
    if other_method and not override:  # --merger tsv beside a recorded method ties (a table written by hand)
        name = "method" if "method" in given else "merger"
        raise UsageError(f"--{name} {given[name]} (method {given_method}) conflicts with the mask's recorded method "
                         f"{recorded_method}; pass --override to use yours")
    if override and (other_method or any(name in given and given[name] != recorded.get(name)
                                         for name in ("merger", "method"))):
        return given  # another merger or method: the recorded parameters may not apply to it
    return {**recorded, **given}


def _method_named(settings: dict) -> str | None:
    """The method settings name: their `method`, else their merger's (a preset's method, or the merger)."""
    from loramerge_cli.merging.registry import PRESETS

    if settings.get("method"):
        return settings["method"]
    merger = settings.get("merger")
    return (PRESETS[merger].method if merger in PRESETS else merger) if merger else None


def task_inputs(adapters: list[Adapter], *specs: TaskData | None) -> list[Path]:
    """The files and folders read with the task specs (their data, a local base model; never an output),
    each spec checked to have a task for every adapter (λ tuned or inputs read on some tasks only is refused,
    as search-mask does)."""
    from loramerge_cli.evaluation.model_fit import check_model_fit
    from loramerge_cli.evaluation.specs import load_task_file

    paths: list[Path] = []
    for spec in {spec.tasks: spec for spec in specs if spec is not None}.values():
        if not Path(spec.tasks).is_file():
            raise LoramergeError(f"{spec.tasks}: task spec not found (--tasks)")
        task_file = load_task_file(spec.tasks)
        task_file.check_covers([adapter.name for adapter in adapters])
        check_model_fit(task_file, adapters, spec.base, spec.max_length)
        files, folders = outputs.read_inputs(adapters, spec.tasks, spec.base)
        paths += files + folders
    return paths


def check_not_an_input(out: str | Path, adapters: list[Adapter]) -> None:
    """Refuse an output that is an input adapter's file or folder, holds one, or lies inside one."""
    outputs.check_not_an_input(out, adapter_files(adapters))


def check_loaded(adapters) -> None:
    """A non-empty list of loaded adapters (`load_adapters` turns sources into them)."""
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise UsageError(f"give a non-empty list of loaded adapters (api.load_adapters), not {adapters!r}")
    if not all(isinstance(adapter, Adapter) for adapter in adapters):
        wrong = next(adapter for adapter in adapters if not isinstance(adapter, Adapter))
        raise UsageError(f"{wrong!r} is not a loaded adapter: load sources with api.load_adapters first")
    for adapter in adapters:  # as loading checks them: an adapter changed in memory may hold NaN since
        tensors = [(f"module {path} {factor}", getattr(module, factor))
                   for path, module in adapter.modules.items() for factor in ("lora_A", "lora_B")]
        tensors += [(f"head {key}", tensor) for key, tensor in adapter.heads.items()]
        tensors += [(key, tensor) for key, tensor in adapter.base_copies.items()]
        for what, tensor in tensors:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(f"adapter {adapter.name}: {what} has NaN or Inf values")


def plan_merge(
    adapters: list[Adapter],
    config: MergeConfig | None = None,
    table: WeightTable | None = None,
    *,
    override: bool = False,
    out: str | Path | None = None,
    force: bool = False,
    dtype: str | None = None,
    head: str | None = None,
    base: str | None = None,
    command: str | None = None,
    tuning: TaskData | None = None,
    allow_base_mismatch: bool = False,
    data: TaskData | None = None,
) -> MergePlan:
    """Check everything, in the order a user fixes things: flags, output, inputs, table, settings.
    `tuning`: tune λ on that data; `data`: the task spec a data-reading method (RegMean) reads (default:
    `tuning`'s)."""
    config = config or MergeConfig()
    check_loaded(adapters)
    check_table_type(table)
    expect(config, MergeConfig, "config must be a MergeConfig")
    if tuning is not None and config.lam not in (None, "auto"):
        raise UsageError(f"λ is given ({config.lam}) and tuned (tuning=): give one (tuning= is --lambda auto)")
    for name, value, kinds in (("base", base, (str, os.PathLike)), ("head", head, str), ("command", command, str)):
        if value is not None and not isinstance(value, kinds):
            raise UsageError(f"{name} must be a string (got {value!r})")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if override and table is None:
        raise UsageError("--override does nothing without --mask: it lets flags replace the merge settings a weight "
                         "table records")
    data = data or tuning
    spec_inputs = task_inputs(adapters, data, tuning)
    if out is not None:
        check_output_dir(out, force, adapter_files(adapters, base) + spec_inputs + table_files(table))
    check_head(adapters, head)
    if table is not None:  # matched to the adapters by task name, as merge --mask does; errors name its file
        table = align_table(table, adapters)
        check_table(table, adapters, origin=table.origin or "mask")
        check_recorded(table, len(adapters), origin=table.origin or "mask")
    chosen = combined_settings(config.given(), recorded_settings(table), override)
    table_lambda = chosen.get("lam", table.scale if table is not None else None)
    if tuning is not None:
        chosen.pop("lam", None)  # λ is tuned: a recorded λ or the table's scale is one more point of the grid
    params = {name: value for name, value in chosen.items() if name not in SETTINGS}
    fields = {name: value for name, value in chosen.items() if name in SETTINGS}
    combined = replace(MergeConfig(**fields, params=params), compute_dtype=config.compute_dtype)
    check_compatible(adapters, allow_base_mismatch)
    settings = resolve_config(combined, len(adapters), None if tuning else table)
    check_head_holds_no_update(adapters, default_head(adapters, head), {  # the updates a table or weight keeps
        path for index, adapter in enumerate(adapters) for path in adapter.modules
        if settings.weights[index] != 0 and (table is None or table.weight(index, path) != 0)})
    if "seed" in config.given() and not settings.method.randomized:
        raise UsageError(f"--seed does nothing with {settings.method.name}: only randomized methods "
                         f"({', '.join(randomized_methods())}) draw")
    if config.given().get("knots_scaled") and settings.space != "knots":  # false there is the default anyway
        raise UsageError(f"--knots-scaled scales the knots space's components; {settings.method.name} runs in the "
                         f"{settings.space} space")
    merging.check_truncation(config, settings)  # the caller's own flags; a table's recorded ones may not apply
    if settings.method.needs_inputs and data is None:
        raise UsageError(f"method {settings.method.name} reads each task's inputs: give the task spec (--tasks FILE)")
    if settings.method.needs_inputs and tuning is not None and tuning != data:
        raise UsageError(f"method {settings.method.name} and --lambda auto read the same task data: give one")
    for used in (tuning, data if settings.method.needs_inputs else None):
        if used is not None:
            used.check_devices()
    base = written_base(base)
    read = tuning or (data if settings.method.needs_inputs else None)
    if read is not None:  # the base model it reads, pinned to one commit for the whole merge and its records
        read_base = read.pinned_base(adapters, allow_base_mismatch)
        tuning = replace(tuning, base=read_base) if tuning is not None else None
        data = replace(data, base=read_base) if data is not None else None
        base = recorded_base(base, read_base, adapters)
    empty = (zero_by_settings(None if tuning is not None else settings.lam, settings.weights)
             or ("every weight of the table is 0" if table is not None and not any(map(any, table.weights)) else None))
    if out is not None and empty:  # known now: the writer would refuse it after the merge
        raise LoramergeError(f"the merge is empty ({empty}): nothing to write")
    return MergePlan(adapters, settings, table, Path(out) if out is not None else None, force, dtype, head, base,
                     command, tuning, allow_base_mismatch, data if settings.method.needs_inputs else None,
                     float(table_lambda) if tuning is not None and table_lambda is not None else None)


def execute(plan: MergePlan, progress: Callable[[str], None] | None = None,
            on_event: Reporter | None = None) -> MergeResult:
    """Read the tasks' inputs if the method needs them, tune λ if asked, then merge. `progress(path)` is
    called after each module; `on_event` receives the progress stages (loramerge_cli.events). A plan with an
    output keeps each merged module as it will be written (the output dtype, checked against its range as it
    is finished), so the merge holds one module in float64 at a time; without one, the float64 factors."""
    expect(plan, MergePlan, "execute runs a merge plan (api.plan_merge; api.execute_eval runs an eval plan)")
    settings, tuning, statistics, engine, data_warnings = plan.settings, {}, None, None, []
    if plan.data is not None:
        from loramerge_cli.evaluation.grams import collect_grams

        engine = plan.data.evaluator(plan.adapters, plan.allow_base_mismatch, report=on_event)
        statistics = collect_grams(engine, plan.adapters, merging.module_paths(plan.adapters), on_event)
        data_warnings = engine.data_warnings()
        tuning["input_statistics"] = {"tasks": str(plan.data.tasks), "base_model": engine.base,
                                      "split": engine.settings.split,
                                      "examples": {name: len(e) for name, e in engine.examples.items()},
                                      **({"max_length": dict(engine.max_lengths)} if engine.max_lengths else {})}
    if plan.tuning is not None:
        from loramerge_cli.evaluation.tuning import search_lambda
        from loramerge_cli.evaluation.workers import tuning_pool

        config = _config_of(settings)
        options = plan.tuning.options()
        if engine is not None:  # RegMean's data and settings are the tuner's: one model load
            options = {"evaluator": engine, "statistics": statistics}
        with tuning_pool(plan.adapters, config, plan.table, plan.tuning, plan.allow_base_mismatch,
                         statistics) as pool:
            search = search_lambda(plan.adapters, config, plan.table, plan.tuning.tasks,
                                   allow_base_mismatch=plan.allow_base_mismatch, report=on_event, **options,
                                   **({"also": (plan.table_lambda,)} if plan.table_lambda is not None else {}),
                                   **({"pool": pool} if pool is not None else {}))
        settings = replace(settings, lam=float(search.best))
        tuning["lambda_tuning"] = {"tasks": str(plan.tuning.tasks), "base_model": plan.tuning.base,
                                   **search.describe()}
    modules = {path for adapter in plan.adapters for path in adapter.modules}
    with stage(on_event, "merging", len(modules)) as step:
        def advance(path: str) -> None:
            step(path)
            if progress is not None:
                progress(path)

        out_dtype, zeroed = output_dtype(plan.adapters, plan.dtype), {}
        finish = (lambda module: as_written(module, out_dtype, zeroed)) if plan.out is not None else None
        result = merging.run_merge(plan.adapters, settings, plan.table, progress=advance, statistics=statistics,
                                   finish=finish)
    result.provenance.update(tuning)
    result.warnings[:0] = configless_warnings(plan.adapters) + base_warnings(plan.base) + data_warnings
    result.warnings += [zeroed_warning(zeroed, out_dtype)] if zeroed else []
    return result


def _config_of(settings: ResolvedMerge) -> MergeConfig:
    """The MergeConfig that resolves to `settings` with λ left to its default (what the λ tuner takes)."""
    named = {name: value for name, value in settings.params.items() if name in SETTINGS}
    extra = {name: value for name, value in settings.params.items() if name not in SETTINGS}
    return MergeConfig(merger=settings.merger, method=settings.method.name, space=settings.space,
                       weights=settings.weights, knots_scaled=settings.knots_scaled, seed=settings.seed,
                       out_rank=settings.out_rank, energy=settings.energy, compute_dtype=settings.compute_dtype,
                       isotropize=settings.isotropize or None, params=extra, **named)


def write(plan: MergePlan, result: MergeResult, recipe: str | None = None, repo_id: str | None = None) -> Path:
    """Write the merge where the plan says (the output guard runs again: the disk may have changed).
    `recipe` (YAML text) becomes loramerge.yaml; `repo_id` is the Hub id the model card's code loads
    (`owner/name@branch` for a branch)."""
    expect(plan, MergePlan, "write takes the merge plan (api.plan_merge)")
    expect(result, MergeResult, "write takes the MergeResult api.execute returns")
    if plan.out is None:
        raise UsageError("the plan has no output folder (give out= to plan_merge)")
    outputs.check_not_an_input(plan.out, task_inputs(plan.adapters, plan.data, plan.tuning))
    return write_merged_adapter(result, plan.adapters, plan.out, dtype=plan.dtype, head=plan.head,
                                command=plan.command, force=plan.force, table=plan.table, base_model=plan.base,
                                extra_provenance=result.provenance, recipe=recipe, repo_id=repo_id)


@dataclass
class PrunePlan:
    """apply-mask, checked: each adapter's row of `table` applied and written to `out/<name>/`."""

    adapters: list[Adapter]
    table: WeightTable
    out: Path
    force: bool = False
    dtype: str | None = None
    base: str | None = None  # written as each config's base_model_name_or_path
    command: str | None = None


def written_base(base):
    """--base as the configs record it: a Hub id without the `hf://` a source may carry (PEFT and transformers
    read `org/name`; a revision, `@rev`, goes in the config's `revision`)."""
    if isinstance(base, str) and base.startswith("hf://"):
        return base.removeprefix("hf://")
    return base


def recorded_base(base: str | None, read_base: str, adapters: list[Adapter]) -> str | None:
    """The base a merge that read `read_base` (a Hub base pinned to its commit, or a folder) writes into its
    configs: that commit, where the configs name that repository (--base's, else the inputs' one base);
    else `base` as it is."""
    from loramerge_cli.adapters.sources import base_reference

    name = base_reference(read_base)[0]
    if name == read_base:  # a local folder: no revision to record
        return base
    named = {adapter.base_model for adapter in adapters if adapter.base_model}
    written = base_reference(base)[0] if base else named.pop() if len(named) == 1 else None
    return read_base if written is not None and written.removeprefix("hf://") == name else base


def base_warnings(base) -> list[str]:
    """--base spelled as a local path (/, ./, ../, ~) that names no folder here: written as given (it may be the
    path on the machine that loads the output), with a warning, as a typo would send every load to a missing
    model."""
    from loramerge_cli.adapters.card import is_repo_id
    from loramerge_cli.adapters.sources import base_reference

    base = None if base is None else os.fspath(base)
    if base is not None and not is_repo_id(base_reference(base)[0]) and not Path(base).expanduser().is_dir():
        return [f"--base {base}: no such folder here; written into the configs as given (a Hub id looks like "
                "org/name)"]
    return []


def plan_prune(adapters: list[Adapter], table: WeightTable, out: str | Path, *, force: bool = False,
               dtype: str | None = None, base: str | None = None, command: str | None = None) -> PrunePlan:
    """Check the dtype, the output (never an input) and the table against the adapters, before any work."""
    check_loaded(adapters)
    if not isinstance(table, WeightTable):
        raise UsageError(f"apply-mask needs a WeightTable (api.load_table, api.weight_table), not {brief(table)}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    check_output_dir(out, force, adapter_files(adapters, base) + table_files(table))
    check_task_folder_names(adapters)  # each task's folder sits beside the table and the recipe
    table = align_table(table, adapters)
    check_table(table, adapters, origin=table.origin or "mask")
    return PrunePlan(adapters, table, Path(out), force, dtype, written_base(base), command)


def prune(plan: PrunePlan) -> list[Adapter]:
    """Each adapter with its row of the table applied (lora_B × weight, zero-weight modules removed)."""
    from loramerge_cli.pruning import apply_table

    pruned = [apply_table(adapter, plan.table, index) for index, adapter in enumerate(plan.adapters)]
    if plan.base is not None:
        from loramerge_cli.adapters.sources import base_reference

        name, revision = base_reference(plan.base)  # a revision of another base than the adapter's is dropped
        pruned = [replace(a, config={**a.config, "base_model_name_or_path": name, "revision": revision or (
            a.config.get("revision") if a.config.get("base_model_name_or_path") == name else None)})
            for a in pruned]
    return pruned


def write_pruned(plan: PrunePlan, pruned: list[Adapter], recipe: str | None = None) -> Path:
    """Write the pruned adapters where the plan says, the table as out/mask.json, `recipe` as loramerge.yaml."""
    from loramerge_cli.adapters.writer import write_adapters

    return write_adapters(pruned, plan.out, force=plan.force, command=plan.command, dtype=plan.dtype,
                          table=plan.table, recipe=recipe)
