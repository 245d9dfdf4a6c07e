"""The `loramerge` command: a Typer app with one thin module per subcommand.

Only typer (and rich) are imported here; torch, transformers and peft are imported inside the
command bodies, so `loramerge --help` answers fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from loramerge_cli import __version__
from loramerge_cli.cli import apply_mask_cmd, eval_cmd, inspect_cmd, merge_cmd, search_cmd
from loramerge_cli.cli.common import LoramergeGroup, examples_epilog, write_stdout


def build_app() -> typer.Typer:
    """The `loramerge` app; each command's options are generated from the registries as they are now."""
    application = typer.Typer(
        name="loramerge",
        cls=LoramergeGroup,
        help="Merge LoRA adapters exactly, and find which modules to prune and how much of each to keep.",
        epilog=examples_epilog(
            "loramerge inspect a/ b/ c/",
            "loramerge merge --adapters a/ b/ c/ --merger knots --out merged/",
            "loramerge merge --adapters a/ b/ c/ --mask mask.json --out merged/",
        ),
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # help texts hold literal brackets ("[i, ...]", "[default: ...]")
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    application.callback()(_root)
    _register_all(application)
    return application


def _show_version(value: bool) -> None:
    if value:
        write_stdout(f"loramerge {__version__}\n")
        raise typer.Exit()


def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_show_version)] = False,
) -> None:
    """Merge LoRA adapters exactly, and find which modules to prune and how much of each to keep."""


def _register_all(application: typer.Typer) -> None:
    for module in (inspect_cmd, merge_cmd, apply_mask_cmd, search_cmd, eval_cmd):
        module.register(application)


app = build_app()


from loramerge_cli.cli import main  # noqa: E402, F401 - the console script, also importable from here
