"""`loramerge inspect SRC...`: what the adapters are, how large each (unit, task) update is, what merges."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from loramerge_cli.cli.common import (
    ADAPTERS_HELP,
    ALLOW_PICKLE_HELP,
    CONFIG_HELP,
    DEBUG_HELP,
    JSON_HELP,
    QUIET_HELP,
    THREADS_HELP,
    apply_threads,
    command_errors,
    emit_json,
    examples_epilog,
    human_console,
    result_console,
    load_config_defaults,
    adapter_source_value,
    path_value,
)

EPILOG = examples_epilog(
    "loramerge inspect adapters/rte adapters/mnli adapters/qnli",
    "loramerge inspect --adapters rte=adapters/rte mnli=adapters/mnli",
    "loramerge inspect rte=org/knots-rte@main ./mnli --heatmap",
    "loramerge inspect adapters/* --json > summary.json",
)


@command_errors
def inspect_command(
    sources: Annotated[Optional[list[str]], typer.Argument(
        metavar="ADAPTER", help="Adapters: folders, .safetensors files or Hub ids (name=source to name them); "
        "or give them with --adapters.", show_default=False, parser=adapter_source_value)] = None,
    adapters: Annotated[Optional[list[str]], typer.Option("--adapters", help=ADAPTERS_HELP, show_default=False,
                                                          parser=adapter_source_value)] = None,
    heatmap: Annotated[bool, typer.Option("--heatmap", help="Colour the norm grid (with a legend).")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help=THREADS_HELP, show_default=False)] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP)] = False,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help=CONFIG_HELP, is_eager=True, callback=load_config_defaults, parser=path_value)] = None,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help=QUIET_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Summarise adapters: base model, type, ranks, alphas, targets, units, dtype, size, the per-(unit, task)
    norm of each update (Frobenius, from the factors), pairwise compatibility and what a merge would refuse."""
    given = [*(sources or []), *(adapters or [])]
    if not given:  # before the heavy imports: a usage error is instant
        raise typer.BadParameter("give the adapters to inspect (positional or --adapters)", param_hint="ADAPTER")
    from loramerge_cli import api
    from loramerge_cli.cli import render

    apply_threads(threads)
    summary = api.inspect_adapters(api.load_adapters(given, allow_pickle=allow_pickle))
    if json_output:
        emit_json(summary, "inspect")
        return
    console = result_console()  # the tables are this command's product
    console.print(render.adapters_table(summary))
    coloured = heatmap and console.color_system is not None  # a pipe, a file, NO_COLOR, TERM=dumb: no colours
    console.print(render.norms_table(summary["norms"], heatmap=coloured))
    if heatmap and not coloured:
        human_console(quiet).print("note: --heatmap needs colours, and this output has none (a pipe or file, NO_COLOR, "
                              "TERM=dumb): the plain table", highlight=False, soft_wrap=True)
    for line in render.compatibility_lines(summary):
        console.print(line)


def register(app: typer.Typer) -> None:
    app.command("inspect", epilog=EPILOG)(inspect_command)
