"""`loramerge inspect SRC...`: what the adapters are, how large each (unit, task) update is, what merges."""

from __future__ import annotations

from typing import Annotated

import typer

from loramerge_cli.cli.common import (
    ALLOW_PICKLE_HELP,
    DEBUG_HELP,
    JSON_HELP,
    QUIET_HELP,
    command_errors,
    emit_json,
    examples_epilog,
    human_console,
)

EPILOG = examples_epilog(
    "loramerge inspect adapters/rte adapters/mnli adapters/qnli",
    "loramerge inspect rte=org/knots-rte@main ./mnli --heatmap",
    "loramerge inspect adapters/* --json > summary.json",
)


@command_errors
def inspect_command(
    sources: Annotated[list[str], typer.Argument(help="Adapters: folders, .safetensors files or Hub ids "
                                                      "(name=source to name them).", show_default=False)],
    heatmap: Annotated[bool, typer.Option("--heatmap", help="Colour the ‖ΔW‖_F grid as a heatmap.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP)] = False,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help=QUIET_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Summarise adapters: base model, type, ranks, alphas, targets, units, dtype, size, the per-(unit, task)
    norm ‖B̃A‖_F (from the factors), pairwise compatibility and what a merge would refuse."""
    from loramerge_cli import api
    from loramerge_cli.cli import render

    summary = api.inspect_adapters(api.load_adapters(sources, allow_pickle=allow_pickle))
    if json_output:
        emit_json(summary)
        return
    console = human_console(quiet, stdout=True)  # the tables are this command's product
    console.print(render.adapters_table(summary))
    console.print(render.norms_table(summary["norms"], heatmap=heatmap))
    for line in render.compatibility_lines(summary):
        console.print(line)


def register(app: typer.Typer) -> None:
    app.command("inspect", epilog=EPILOG)(inspect_command)
