"""`loramerge inspect SRC...`: what the adapters are, how large each (unit, task) update is, what merges."""

from __future__ import annotations

import inspect
from typing import Annotated

import typer

from loramerge_cli.cli.common import (
    ADAPTERS_HELP,
    ALLOW_PICKLE_HELP,
    adapter_source_value,
    apply_threads,
    command_errors,
    emit_json,
    examples_epilog,
    human_console,
    result_console,
)
from loramerge_cli.cli.options import option, output_options, threads_option, with_options
from loramerge_cli.errors import UsageError

EPILOG = examples_epilog(
    "loramerge inspect adapters/rte adapters/mnli adapters/qnli",
    "loramerge inspect --adapters rte=adapters/rte mnli=adapters/mnli",
    "loramerge inspect rte=org/knots-rte@main ./mnli --heatmap",
    "loramerge inspect adapters/* --json > summary.json",
)


def inspect_options() -> list[inspect.Parameter]:
    """The adapters (positional, or --adapters), --heatmap, and the options every command shares."""
    sources = inspect.Parameter("sources", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        list[str] | None, typer.Argument(
            metavar="ADAPTER", help="Adapters: folders, .safetensors files or Hub ids (name=source to name them); "
            "or give them with --adapters.", show_default=False, parser=adapter_source_value)])
    return [sources,
            option("adapters", list[str] | None, None, help=ADAPTERS_HELP, show_default=False),
            option("heatmap", bool, False, help="Colour the norm grid (with a legend)."),
            threads_option(),
            option("allow_pickle", bool, False, help=ALLOW_PICKLE_HELP)]


@command_errors
def inspect_command(ctx: typer.Context, **flags) -> None:
    """Summarise adapters: base model, type, ranks, alphas, targets, units, dtype, size, the per-(unit, task)
    norm of each update (Frobenius, from the factors), pairwise compatibility and what a merge would refuse."""
    sources, adapters, heatmap, quiet = flags["sources"], flags["adapters"], flags["heatmap"], flags["quiet"]
    given = [*(sources or []), *(adapters or [])]
    if not given:  # before the heavy imports: a usage error is instant
        raise typer.BadParameter("give the adapters to inspect (positional or --adapters)", param_hint="ADAPTER")
    if heatmap and flags["json_output"]:
        raise UsageError("--heatmap does nothing with --json: it colours the norm grid of the tables")
    from loramerge_cli import api
    from loramerge_cli.cli import render

    apply_threads(flags["threads"])
    summary = api.inspect_adapters(api.load_adapters(given, allow_pickle=flags["allow_pickle"]))
    if flags["json_output"]:
        emit_json(summary, "inspect")
        return
    console = result_console()  # the tables are this command's product
    console.print(render.Fitting(render.adapters_table(summary)))
    coloured = heatmap and console.color_system is not None  # a pipe, a file, NO_COLOR, TERM=dumb: no colours
    console.print(render.Fitting(render.norms_table(summary["norms"], heatmap=coloured)))
    if heatmap and not coloured:
        human_console(quiet).print("note: --heatmap needs colours, and this output has none (a pipe or file, "
                                   "NO_COLOR, TERM=dumb): the plain table", highlight=False, soft_wrap=True)
    for line in render.compatibility_lines(summary):
        console.print(line)


def register(app: typer.Typer) -> None:
    app.command("inspect", epilog=EPILOG)(with_options(inspect_options(), output_options())(inspect_command))
