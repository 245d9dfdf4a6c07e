"""`eval` planned (every check before an adapter or the model loads; torch-free, so a bad spec or flag is
refused in a fraction of a second) and executed (evaluation/report.py scores)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from loramerge_cli.evaluation import REPORT_FORMAT
from loramerge_cli.evaluation.settings import EvalSettings


@dataclass
class EvalPlan:
    """`eval` checked and ready: the task spec, the experts and merges (sources), how to score them, where
    the report goes; `backend` spreads the merges over workers (search/backends.py; None: here)."""

    tasks: Path
    experts: list[str]
    merged: list[str]
    settings: EvalSettings
    base: str | None = None
    run_dir: Path | None = None
    out: Path | None = None
    force: bool = False
    allow_pickle: bool = False
    allow_base_mismatch: bool = False
    backend: object | None = None


def check_row_names(merged_names: list[str]) -> None:
    """Each merge names its own row of the report: no two alike, and neither 'base' nor 'experts'."""
    from loramerge_cli.adapters.sources import check_names
    from loramerge_cli.errors import UsageError

    check_names(merged_names, "merge")
    if {"base", "experts"} & set(merged_names):
        raise UsageError("--merged: 'base' and 'experts' name rows of the report already; name the merge with "
                         "name=folder")


def check_settings_fit(settings: EvalSettings, task_file, tasks) -> None:
    """Settings that the tasks' type must allow: --length-normalize needs choices."""
    from loramerge_cli.errors import UsageError

    if settings.length_normalize and not task_file.type.choices:
        raise UsageError(f"--length-normalize divides a choice's log-likelihood by its length: the tasks of {tasks} "
                         f"(model_type {task_file.model_type}) have no choices")


def plan_eval(tasks, experts: list[str], merged: list[str] | None = None, settings: EvalSettings | None = None, *,
              base: str | None = None, run_dir=None, out=None, force: bool = False, allow_pickle: bool = False,
              allow_base_mismatch: bool = False, backend=None) -> EvalPlan:
    """Every check `eval` makes before an adapter or the model loads: the settings, every data row, the inputs,
    the run directory (a score cache) and the report's file (never over an input; an existing report only with
    `force`)."""
    from loramerge_cli.adapters.sources import as_sources, check_base_given, source_names
    from loramerge_cli.errors import UsageError, expect
    from loramerge_cli.evaluation.cache import CACHE_LOCK_NAME, CACHE_NAME, check_run_dir
    from loramerge_cli.evaluation.data import check_task_file
    from loramerge_cli.evaluation.model_fit import check_model_fit
    from loramerge_cli.outputs import check_not_an_input, guard_output, read_inputs
    from loramerge_cli.search.backends import Backend

    experts, merged = as_sources(experts), as_sources(merged or [])
    if not all(isinstance(source, str) for source in [*experts, *merged]):  # (workers load them by source)
        raise UsageError("plan_eval takes the adapters' sources (paths, name=path, Hub ids), not loaded adapters: "
                         "api.evaluate scores loaded ones")
    settings = EvalSettings() if settings is None else settings
    expect(settings, EvalSettings, "settings must be an EvalSettings")
    settings.check()
    out = Path(out) if out is not None else None
    if force and out is None:
        raise UsageError("--force does nothing without --out: it lets --out replace an existing report")
    if out is not None and out.is_dir():
        raise UsageError(f"--out {out} is a folder: give a file (missing folders above it are made)")
    if backend is not None:
        backend.check()
        if len(merged or []) > 1:  # the merges are spread (one merge is scored here)
            settings = replace(settings, threads=backend.threads_each(settings.device, settings.threads))
    check_base_given(base)
    task_file = check_task_file(tasks, [settings.split])
    task_file.check_covers(source_names(experts))
    check_row_names(source_names(merged))
    check_settings_fit(settings, task_file, tasks)
    files, folders = read_inputs([*experts, *(merged or [])], tasks, base, allow_pickle)
    check_model_fit(task_file, [*experts, *(merged or [])], base, settings.max_length, allow_pickle)
    if run_dir is not None:  # the score cache: written too
        check_run_dir(run_dir, files + folders)
    if out is not None:
        if run_dir is not None:
            check_not_an_input(out, [Path(run_dir) / name for name in (CACHE_NAME, CACHE_LOCK_NAME)],
                               role="run-directory file")
        guard_output(out, inputs=files + folders, force=force, kind="file", formats=(REPORT_FORMAT,))
    (backend or Backend()).check_devices(settings.device)  # last: it imports torch for a device other than cpu
    return EvalPlan(Path(tasks), list(experts), list(merged or []), settings, base,
                    Path(run_dir) if run_dir is not None else None, out, force, allow_pickle, allow_base_mismatch,
                    backend)


def execute_eval(plan: EvalPlan, report=None) -> dict:
    """Load the adapters, score them (the merges on the plan's workers, if any) and write the report to the
    plan's file; returns the report."""
    import json

    from loramerge_cli.errors import expect

    expect(plan, EvalPlan, "execute_eval runs an eval plan (api.plan_eval; api.execute runs a merge plan)")

    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.evaluation.report import check_request, eval_report
    from loramerge_cli.evaluation.workers import EngineSource, MergedScorer
    from loramerge_cli.outputs import write_result
    from loramerge_cli.search.backends import worker_pool

    experts = load_adapters(plan.experts, allow_pickle=plan.allow_pickle)
    merged = load_adapters(plan.merged, allow_pickle=plan.allow_pickle)  # names unique
    settings = plan.settings
    check_request(plan.tasks, experts, merged, settings, plan.run_dir, plan.base, rows=False)  # before any model
    devices = getattr(plan.backend, "devices", None)
    if devices:  # the driver scores the experts and the base on the workers' first device
        settings = replace(settings, device=devices[0])
    scorer = MergedScorer(EngineSource(plan.tasks, plan.experts, settings, plan.base, plan.allow_pickle))
    spread = plan.backend if len(merged) > 1 else None
    with worker_pool(scorer, spread, plan.settings.device, settings.threads) as pool:
        result = eval_report(plan.tasks, experts, merged, settings, base=plan.base, run_dir=plan.run_dir,
                             allow_pickle=plan.allow_pickle, report=report, pool=pool, checked=True,
                             allow_base_mismatch=plan.allow_base_mismatch)
    if plan.settings.val_limit is not None and plan.settings.split != "validation":  # a --config may set it
        result["warnings"].insert(0, f"--val-limit limits the validation split only: the {plan.settings.split} "
                                     "split was scored in full (a task's `limit` in the spec caps any split)")
    if plan.out is not None:  # what appeared there during the work is not replaced
        write_result(plan.out, json.dumps(result, indent=2, default=str) + "\n", plan.force, (REPORT_FORMAT,))
    return result
