"""`loramerge eval`: accuracy and normalized accuracy of the base, the experts and merged adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from loramerge_cli.cli.common import (
    ADAPTERS_HELP,
    ALLOW_PICKLE_HELP,
    CONFIG_HELP,
    DEBUG_HELP,
    JSON_HELP,
    QUIET_HELP,
    command_errors,
    emit_json,
    examples_epilog,
    human_console,
    load_config_defaults,
)

EPILOG = examples_epilog(
    "loramerge eval --adapters rte=adapters/rte mnli=adapters/mnli --tasks tasks.yaml",
    "loramerge eval --adapters adapters/rte adapters/mnli --tasks tasks.yaml --merged merged/ --split test",
    "loramerge eval --adapters a/ b/ --tasks tasks.yaml --merged ta=out/ta knots=out/knots --val-limit 256 "
    "--run-dir runs/eval --json > scores.json",
)


@command_errors
def eval_command(
    adapters: Annotated[list[str], typer.Option("--adapters", help=ADAPTERS_HELP + " They are the experts; "
                                                "each task of --tasks is matched to one by name.",
                                                show_default=False)],
    tasks: Annotated[Path, typer.Option("--tasks", help="Task spec YAML (data, text columns, labels, heads).",
                                        show_default=False)],
    merged: Annotated[Optional[list[str]], typer.Option("--merged", help="Merged adapter folder(s) to score on "
                                                        "every task, optionally name=folder.")] = None,
    split: Annotated[str, typer.Option("--split", help="Data split: validation or test (any split the spec "
                                       "names).")] = "validation",
    val_limit: Annotated[Optional[int], typer.Option("--val-limit", min=1, help="Examples per task on the "
                                                     "validation split (a seeded subset); overrides `limit`.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model folder or Hub id; overrides the "
                                                "spec and the adapter configs.")] = None,
    device: Annotated[str, typer.Option("--device", help="Torch device: cpu, cuda, cuda:1, mps.")] = "cpu",
    dtype: Annotated[Literal["float32", "bfloat16", "float16"], typer.Option("--dtype", help="Model dtype.")] = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = 16,
    max_length: Annotated[Optional[int], typer.Option(
        "--max-length", min=2, help="Token cap of tasks whose spec sets none. [default: the smaller of the "
        "tokenizer's model_max_length and the model's max_position_embeddings]", show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Torch CPU threads (fixed, for "
                                                   "reproducible numbers); default min(8, CPUs).")] = None,
    length_normalize: Annotated[bool, typer.Option("--length-normalize", help="Causal LM: divide each choice's "
                                                   "log-likelihood by its token count.")] = False,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Folder caching expert and base scores "
                                                    "(keyed by adapter and data hashes).")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP)] = False,
    config: Annotated[Optional[Path], typer.Option("--config", help=CONFIG_HELP, is_eager=True,
                                                   callback=load_config_defaults)] = None,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help=QUIET_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Score the base model, each expert on its own task, and each merged adapter on every task:
    accuracy and normalized accuracy (100 · merged / expert), with averages over tasks."""
    from loramerge_cli.evaluation.data import check_task_file

    check_task_file(tasks, [split])  # the spec and its data, before any adapter or model loads
    from loramerge_cli.adapters.peft_reader import load_adapter, load_adapters
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.evaluation.report import eval_report

    console = human_console(quiet, json_output)
    experts = load_adapters(adapters, allow_pickle=allow_pickle)
    merged_adapters = [load_adapter(source, allow_pickle=allow_pickle) for source in merged or []]
    settings = EvalSettings(split=split, val_limit=val_limit, device=device, dtype=dtype, batch_size=batch_size,
                            threads=threads, length_normalize=length_normalize, max_length=max_length)
    with console.status("evaluating"):
        report = eval_report(tasks, experts, merged_adapters, settings, base=base, run_dir=run_dir,
                             allow_pickle=allow_pickle)
    if json_output:
        emit_json(report)
        return
    for title, key, mean_key in (("accuracy (%)", "accuracy", "mean_accuracy"),
                                 ("normalized accuracy (%)", "normalized_accuracy", "mean_normalized_accuracy")):
        console.print(score_table(report, title, key, mean_key))
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")


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
        table.add_column(f"{task} ({sizes[task]})", justify="right")
    table.add_column("average", justify="right", style="bold")
    for row in report["rows"]:
        cells = [_percent(row[key].get(task), scale) for task in report["tasks"]]
        table.add_row(row["name"], *cells, _percent(row[mean_key], scale))
    return table


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EPILOG)(eval_command)
