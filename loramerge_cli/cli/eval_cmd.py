"""`loramerge eval`: accuracy and normalized accuracy of the base, the experts and merged adapters."""

from __future__ import annotations

from pathlib import Path

import typer

from loramerge_cli.cli.common import (
    ADAPTERS_HELP,
    ALLOW_PICKLE_HELP,
    command_errors,
    emit_json,
    examples_epilog,
    file_path_value,
)
from loramerge_cli.cli.options import (
    choice,
    max_length_option,
    option,
    output_options,
    resolve_backend,
    scale_options,
    setting_option,
    threads_option,
    with_options,
)

EPILOG = examples_epilog(
    "loramerge eval --adapters rte=adapters/rte mnli=adapters/mnli --tasks tasks.yaml",
    "loramerge eval --adapters adapters/rte adapters/mnli --tasks tasks.yaml --merged merged/ --split test",
    "loramerge eval --adapters a/ b/ --tasks tasks.yaml --merged ta=out/ta knots=out/knots --val-limit 256 "
    "--run-dir runs/eval --json > scores.json",
)


def eval_options() -> list:
    """The experts, the task spec, the merges to score, and how to evaluate."""
    from loramerge_cli.evaluation.settings import EvalSettings
    from loramerge_cli.merging.registry import DTYPES

    return [
        option("adapters", list[str], ..., show_default=False, help=ADAPTERS_HELP + " They are the experts; "
               "each task of --tasks is matched to one by name."),
        option("tasks", Path, ..., show_default=False, help="Task spec YAML (data, text columns, labels, heads)."),
        option("merged", list[str] | None, None, help="Merged adapter folder(s) to score on every task, "
               "optionally name=folder."),
        setting_option(EvalSettings, "split", help="Data split: validation or test (any split the spec names)."),
        setting_option(EvalSettings, "val_limit", min=1, show_default=False, help="Examples per task on the "
               "validation split (a seeded subset); overrides `limit`. [default: each task's `limit`, else all]"),
        option("base", str | None, None, help="Base model folder or Hub id; overrides the spec and the adapter "
               "configs."),
        setting_option(EvalSettings, "device", help="Torch device: cpu, cuda, cuda:1, mps."),
        *scale_options(),
        setting_option(EvalSettings, "dtype", "--eval-dtype", "--dtype", annotation=choice(DTYPES),
                       help="Dtype of the evaluated models, as merge and search-mask name it (--dtype is the same "
                       "flag; in a recipe, `dtype` is a merge's written dtype, not this)."),
        setting_option(EvalSettings, "batch_size", min=1, help="Sequences per forward pass."),
        max_length_option(),
        threads_option("Torch CPU threads (fixed, for reproducible numbers). [default: OMP_NUM_THREADS if set, "
                       "else min(8, CPUs); CPUs / N with N workers on this machine scoring the merges]"),
        setting_option(EvalSettings, "length_normalize", help="Causal LM: divide each choice's log-likelihood by its "
               "token count (in tasks whose spec does not set length_normalize)."),
        option("run_dir", Path | None, None, help="Folder caching expert and base scores (keyed by adapter and "
               "data hashes; the base model's weight files by name, size and mtime: a copy that keeps all three "
               "is not seen)."),
        option("out", Path | None, None, metavar="FILE.json", parser=file_path_value,
               help="Also write the report (as --json prints it) "
               "to this file (never over an input; an existing report only with --force)."),
        option("force", bool, False, help="Replace an existing --out report."),
        option("allow_pickle", bool, False, help=ALLOW_PICKLE_HELP),
        option("allow_base_mismatch", bool, False, help="DANGEROUS: score adapters with a task spec whose "
               "base_model is not the base they were trained on."),
    ]


@command_errors
def eval_command(ctx: typer.Context, **flags) -> None:
    """Score the base model, each expert on its own task, and each merged adapter on every task:
    accuracy and normalized accuracy (100 · merged / expert), with averages over tasks."""
    from loramerge_cli.cli.common import given_arguments, human_console, print_warnings, result_console
    from loramerge_cli.cli.progress import ProgressDisplay
    from loramerge_cli.cli.render import Fitting
    from loramerge_cli.errors import UsageError
    from loramerge_cli.evaluation.eval_plan import execute_eval, plan_eval
    from loramerge_cli.evaluation.settings import EvalSettings

    given = given_arguments(ctx)
    if flags["split"] != "validation" and any(arg.split("=")[0] == "--val-limit" for arg in given):
        raise UsageError(f"--val-limit limits the validation split only, not --split {flags['split']} (a task's "
                         "`limit` caps any split)")  # given in a recipe: a warning (the recipe is for all splits)
    backend, _ = resolve_backend(flags["device"], flags["devices"], flags["workers"], flags["threads"],
                                 flags["backend"], flags["ray_address"])  # the threads: plan_eval decides
    settings = EvalSettings(**{name: flags[name] for name in ("split", "val_limit", "device", "dtype", "batch_size",
                                                              "threads", "length_normalize", "max_length")})
    plan = plan_eval(flags["tasks"], flags["adapters"], flags["merged"], settings, base=flags["base"],
                     run_dir=flags["run_dir"], out=flags["out"], force=flags["force"],
                     allow_pickle=flags["allow_pickle"], allow_base_mismatch=flags["allow_base_mismatch"],
                     backend=backend)
    with ProgressDisplay(flags["quiet"] or flags["json_output"]) as display:
        report = execute_eval(plan, display)
    if flags["json_output"]:
        return emit_json(report)
    print_warnings(human_console(flags["quiet"]), report["warnings"])  # first: a stdout that fails must not lose them
    for title, key, mean_key in (("accuracy (%)", "accuracy", "mean_accuracy"),
                                 ("normalized accuracy (%)", "normalized_accuracy", "mean_normalized_accuracy")):
        result_console().print(Fitting(score_table(report, title, key, mean_key)))


def _percent(value: float | None, scale: float) -> str:
    return "—" if value is None else f"{value * scale:.2f}"


def score_table(report: dict, title: str, key: str, mean_key: str):
    """One row per candidate, one column per task, then the average."""
    from rich.table import Table

    scale = 100.0 if key == "accuracy" else 1.0
    split, sizes = report["split"], report["examples"]
    table = Table(title=f"{title}, {split} split")
    table.add_column("")
    for task in report["tasks"]:
        table.add_column(f"{task} ({sizes[task]})", justify="right")  # (Fitting keeps the numbers whole)
    table.add_column("average", justify="right", style="bold")
    for row in report["rows"]:
        cells = [_percent(row[key].get(task), scale) for task in report["tasks"]]
        table.add_row(row["name"], *cells, _percent(row[mean_key], scale))
    return table


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EPILOG)(with_options(eval_options(), output_options())(eval_command))
