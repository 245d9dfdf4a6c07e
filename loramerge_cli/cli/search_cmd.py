"""`loramerge search-mask`: placeholder until the search engine lands."""

from __future__ import annotations

import typer

from loramerge_cli.cli.common import examples_epilog, fail

EPILOG = examples_epilog(
    "loramerge search-mask --adapters a/ b/ c/ --merger knots --tasks tasks.yaml --out mask.json",
)


def search_command() -> None:
    """Search a weight table (which units to prune) for a merger. Not implemented yet."""
    raise fail("error: search-mask is not implemented yet")


def register(app: typer.Typer) -> None:
    app.command(
        "search-mask",
        epilog=EPILOG,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(search_command)
