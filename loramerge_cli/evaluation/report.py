"""What `loramerge eval` reports: base, experts and merged adapters per task, with averages."""

from __future__ import annotations

from loramerge_cli.adapters.compat import check_merged_base
from loramerge_cli.evaluation import REPORT_FORMAT
from loramerge_cli.evaluation.cache import ScoreCache, base_scores, expert_scores
from loramerge_cli.evaluation.engine import EvalSettings, Evaluator, checked_evaluator
from loramerge_cli.evaluation.metrics import mean_defined, normalized_accuracy
from loramerge_cli.evaluation.specs import load_task_file
from loramerge_cli.evaluation.eval_plan import check_row_names, check_settings_fit
from loramerge_cli.events import stage


def score_row(name: str, kind: str, accuracy: dict[str, float], experts: dict[str, float], warnings: list[str]) -> dict:
    normalized, problems = normalized_accuracy(accuracy, experts)
    warnings.extend(problem for problem in problems if problem not in warnings)
    return {
        "name": name,
        "kind": kind,
        "accuracy": accuracy,
        "normalized_accuracy": normalized,
        "mean_accuracy": mean_defined(accuracy),
        "mean_normalized_accuracy": mean_defined(normalized),
    }



def eval_report(
    tasks_file,
    experts: list,
    merged: list | None = None,
    settings: EvalSettings | None = None,
    base: str | None = None,
    run_dir=None,
    allow_pickle: bool = False,
    report=None,
    pool=None,
    checked: bool = False,
    allow_base_mismatch: bool = False,
) -> dict:
    """Score the base model, each expert on its own task, and each merged adapter on every task.

    Expert and base scores are read from (and written to) the run directory's cache when given; `pool`, if
    given, scores the merged adapters on its workers (`MergedScorer`, evaluation/workers.py). `checked`: the
    caller ran `check_request` already (the command line, before its workers start). The spec's base must be
    the experts' (`allow_base_mismatch` overrides), and the model kind theirs.
    """
    settings = settings or EvalSettings()
    if not checked:
        check_request(tasks_file, experts, merged or [], settings, run_dir, base)
    task_file = load_task_file(tasks_file)
    task_file.check_covers([adapter.name for adapter in experts])  # as plan_eval (and so `eval`) says it
    check_settings_fit(settings, task_file, tasks_file)  # (eval_plan's, torch-free)
    check_merged_base(task_file, experts, merged or [], base, allow_base_mismatch)  # before the model loads
    engine = checked_evaluator(task_file, experts, settings, base, allow_base_mismatch, allow_pickle, report)
    for adapter in merged or []:  # a merge of another model is refused before any scoring, naming it
        engine.check_adapter(adapter)
    cache = ScoreCache(run_dir)
    expert_accuracy = expert_scores(engine, cache, report)
    base_accuracy = base_scores(engine, cache, report)
    from loramerge_cli.adapters.compat import configless_warnings, merged_revision_warnings

    warnings: list[str] = configless_warnings([*experts, *(merged or [])]) + engine.data_warnings() + \
        merged_revision_warnings(merged or [], engine.base)
    rows = [
        score_row("base", "base", base_accuracy, expert_accuracy, warnings),
        score_row("experts", "experts", expert_accuracy, expert_accuracy, warnings),
    ]
    merged = merged or []
    if pool is not None and merged:
        pool.reside(engine)  # the workers score the merges: this engine waits in host memory
        with stage(report, "starting the workers", 1) as step:  # (not in the scoring's time and ETA)
            pool.start()
            step()
    if merged:  # (no empty stage on the display)
        with stage(report, "merged × tasks", len(merged) * len(task_file.names)) as step:
            def scored(index: int, accuracy: dict) -> None:  # a worker's merge, as it arrives
                for task in task_file.names:
                    step(f"{merged[index].name} / {task} {100 * accuracy[task]:.1f}%")

            if pool is not None:
                merged_accuracy = pool([adapter.source.spec for adapter in merged], scored)
            else:
                merged_accuracy = [_score_each_task(engine, adapter, task_file.names, step) for adapter in merged]
            for adapter, accuracy in zip(merged, merged_accuracy):
                row = score_row(adapter.name, "merged", accuracy, expert_accuracy, warnings)
                row.update(source=adapter.source.spec, **adapter.source.hub_record())
                rows.append(row)
    return {
        "format": REPORT_FORMAT,
        "tasks": task_file.names,
        "split": engine.settings.split,
        "base_model": engine.base,
        "examples": {task: len(examples) for task, examples in engine.examples.items()},
        "max_length": dict(engine.max_lengths),
        "length_normalize": {task.name: task.length_normalized(engine.settings.length_normalize)
                             for task in task_file.tasks if task_file.type.choices},
        "dtype": engine.settings.dtype,  # the model's: accuracies in float16 can differ from float32's
        "rows": rows,
        "experts": [{"name": adapter.name, "source": adapter.source.spec, **adapter.source.hub_record(),
                     "sha256": adapter.source.identity} for adapter in experts],
        "warnings": warnings,
    }


def check_request(tasks_file, experts: list, merged: list, settings: EvalSettings, run_dir,
                  base: str | None = None, rows: bool = True) -> None:
    """What `eval` refuses before any model loads: settings out of range, a merge named as a report row, a bad
    data row (`rows`: read them all, not only those --val-limit keeps; off when the caller has), a run
    directory that is (or holds, or sits in) an input or holds a file that is not a score cache."""
    from loramerge_cli.adapters.sources import check_names
    from loramerge_cli.evaluation.cache import check_run_dir
    from loramerge_cli.evaluation.data import check_task_file
    from loramerge_cli.evaluation.model_fit import check_model_fit
    from loramerge_cli.outputs import read_inputs

    settings.check()
    check_names([adapter.name for adapter in experts])
    check_row_names([adapter.name for adapter in merged])
    if rows:
        check_model_fit(check_task_file(tasks_file, [settings.split]), [*experts, *merged], base, settings.max_length)
    if run_dir is not None:
        files, folders = read_inputs([*experts, *merged], tasks_file, base)
        check_run_dir(run_dir, files + folders)


def _score_each_task(engine: Evaluator, adapter, tasks: list[str], step) -> dict[str, float]:
    """{task: accuracy} of one merged adapter, a progress step per task."""
    from loramerge_cli.errors import NonFiniteError

    accuracy: dict[str, float] = {}
    for task in tasks:
        try:
            accuracy.update(engine.score_adapter(adapter, [task]))
        except NonFiniteError as error:  # which merge made the outputs overflow
            raise NonFiniteError(f"--merged {adapter.source.spec}: {error}") from None
        step(f"{adapter.name} / {task} {100 * accuracy[task]:.1f}%")
    return accuracy
