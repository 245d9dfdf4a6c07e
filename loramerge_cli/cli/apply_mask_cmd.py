"""`loramerge apply-mask`: one pruned adapter per input, for tools that take plain LoRA adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    command_line,
    emit_json,
    examples_epilog,
    result_console,
    load_config_defaults,
)
from loramerge_cli.cli.merge_cmd import DtypeName

EPILOG = examples_epilog(
    "loramerge apply-mask --adapters a/ b/ c/ --mask mask.json --out pruned/",
    'loramerge apply-mask --adapters a/ b/ c/ --indices "[0, 4, 7]" --out pruned/ --force',
)


@command_errors
def apply_mask_command(
    ctx: typer.Context,
    adapters: Annotated[list[str], typer.Option("--adapters", help=ADAPTERS_HELP, show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder; each pruned adapter goes to OUT/<task>/.",
                                      show_default=False)],
    mask: Annotated[Path | None, typer.Option("--mask", help="Weight table JSON (loramerge.mask/v1).")] = None,
    indices: Annotated[str | None, typer.Option(
        "--indices", help='Pruned flat indices "[i, ...]", i = unit·T + task (the ENMP reference\'s --mask).')] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    dtype: Annotated[DtypeName | None, typer.Option(
        "--dtype", help="Dtype of the written weights. [default: each input's]", show_default=False)] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model id or path written to the configs.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help=THREADS_HELP, show_default=False)] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP)] = False,
    config: Annotated[Path | None, typer.Option(
        "--config", help=CONFIG_HELP, is_eager=True, callback=load_config_defaults)] = None,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help=QUIET_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Write one pruned copy of each adapter: lora_B multiplied by the table's weight, zero-weight modules
    removed, scales and config kept."""
    from dataclasses import replace

    from loramerge_cli import api
    from loramerge_cli.adapters.writer import check_output_dir
    from loramerge_cli.cli.recipe import build_recipe

    if mask is None and indices is None:
        raise typer.BadParameter('give --mask FILE or --indices "[..]"', param_hint="'--mask'")
    check_output_dir(out, force)
    apply_threads(threads)
    loaded = api.load_adapters(adapters, allow_pickle=allow_pickle)
    table = api.weight_table(loaded, mask, indices)
    pruned = [api.apply_table(adapter, table, index) for index, adapter in enumerate(loaded)]
    if base is not None:
        pruned = [replace(a, config={**a.config, "base_model_name_or_path": base}) for a in pruned]
    api.write_adapters(pruned, out, force=force, command=command_line(ctx), dtype=dtype, table=table,
                       recipe=build_recipe(ctx, loaded, out, {"mask": "mask.json"}))
    report = {
        "out": str(out),
        "adapters": [
            {"name": a.name, "folder": str(out / a.name), "modules": len(a.modules),
             "removed": len(original.modules) - len(a.modules)}
            for a, original in zip(pruned, loaded)
        ],
    }
    if json_output:
        emit_json(report)
        return
    console = result_console()
    for row in report["adapters"]:
        console.print(f"{row['folder']}: {row['modules']} modules kept, {row['removed']} removed")


def register(app: typer.Typer) -> None:
    app.command("apply-mask", epilog=EPILOG)(apply_mask_command)
