"""`loramerge apply-mask`: one pruned adapter per input, for tools that take plain LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import typer

from loramerge_cli.cli.common import (
    apply_threads,
    command_errors,
    command_line,
    emit_json,
    examples_epilog,
    human_console,
    print_warnings,
    result_console,
)
from loramerge_cli.cli.merge_cmd import table_options
from loramerge_cli.cli.options import adapter_options, choice, option, output_options, threads_option, with_options
from loramerge_cli.merging.registry import DTYPES

EPILOG = examples_epilog(
    "loramerge apply-mask --adapters a/ b/ c/ --mask mask.json --out pruned/",
    'loramerge apply-mask --adapters a/ b/ c/ --indices "[0, 4, 7]" --out pruned/ --force',
)


def prune_options() -> list:
    return [
        option("out", Path, ..., help="Output folder; each pruned adapter goes to OUT/<task>/.", show_default=False),
        *table_options(),
        option("force", bool, False, help="Replace --out if it exists."),
        option("dtype", choice(DTYPES) | None, None, show_default=False,
               help="Dtype of the written weights. [default: each input's]"),
        option("base", str | None, None, help="Base model id or path written to the configs."),
        threads_option(),
    ]


@command_errors
def apply_mask_command(ctx: typer.Context, **flags) -> None:
    """Write one pruned copy of each adapter: lora_B multiplied by the table's weight, zero-weight modules
    removed, scales and config kept."""
    from loramerge_cli import api
    from loramerge_cli.adapters.compat import configless_warnings
    from loramerge_cli.adapters.writer import check_output_dir
    from loramerge_cli.cli.recipe import build_recipe
    from loramerge_cli.outputs import input_files

    if flags["mask"] is None and flags["indices"] is None:
        raise typer.BadParameter('give --mask FILE or --indices "[..]"', param_hint="'--mask'")
    api.check_table_flags(flags["mask"], flags["indices"])
    out = flags["out"]
    check_output_dir(out, flags["force"], input_files(flags["adapters"], flags["mask"]))  # before loading
    apply_threads(flags["threads"])
    loaded = api.load_adapters(flags["adapters"], allow_pickle=flags["allow_pickle"])
    plan = api.plan_prune(loaded, api.weight_table(loaded, flags["mask"], flags["indices"]), out,
                          force=flags["force"], dtype=flags["dtype"], base=flags["base"],
                          command=command_line(ctx, local_paths=True))
    pruned = api.prune(plan)
    api.write_pruned(plan, pruned, recipe=build_recipe(ctx, loaded, out, {"mask": "mask.json"}))
    report = {"out": str(out), "adapters": [
        {"name": a.name, "folder": str(out / a.name) if a.modules else None, "modules": len(a.modules),
         "removed": len(original.modules) - len(a.modules)} for a, original in zip(pruned, loaded)],
        "warnings": configless_warnings(loaded) + api.base_warnings(plan.base)
        + _lambda_warning(plan.table, [bool(a.modules) for a in pruned]) + _fractional_warning(plan.table)
        + [_pruned_entirely(a, out, len(pruned)) for a in pruned if not a.modules]}
    if flags["json_output"]:
        return emit_json(report, "apply-mask")
    print_warnings(human_console(flags["quiet"]), report["warnings"])
    for row in report["adapters"]:
        shown = row["folder"] or f"{row['name']} (not written)"
        result_console().print(f"{shown}: {row['modules']} modules kept, {row['removed']} removed")


def _pruned_entirely(adapter, out, task_count: int) -> str:
    """What a task the table prunes entirely gets (no folder), and how to merge the others as merge --mask does."""
    head = f"; its task head is in {out / 'heads' / (adapter.name + '.safetensors')}" if adapter.heads else ""
    return (f"the table prunes every module of {adapter.name!r}: no folder is written for it (PEFT loads no LoRA "
            f"adapter without modules){head}. A merge of the others gives merge --mask's result at merge --mask's "
            f"λ: a default λ of 1/T counts all {task_count} tasks there, so pass it (--lambda)")


def _fractional_warning(table) -> list[str]:
    """A table of real weights (NSC's): the copies carry each weight in their factors, which is what merge --mask
    does with it, except where a TIES merge reads the weights themselves."""
    if all(value in (0, 1) for row in table.weights for value in row):
        return []
    return ["the table's weights other than 0 and 1 are in the copies' factors (lora_B × weight): a merge of the "
            "copies gives merge --mask's result, to rounding, except with --normalize weight or --elect-on "
            "unweighted, which read each task's weight itself (the copies carry none)"]


def _lambda_warning(table, kept: list[bool]) -> list[str]:
    """The merge a table was searched with (its merger, λ and the settings that differ from the merger's
    defaults, per-adapter lists cut to the adapters written: `kept`), which pruned adapters cannot carry: a merge
    of them must be told, flag by flag. A table that records no merger (only λ) says λ."""
    from loramerge_cli.plan import recorded_settings

    recorded = recorded_settings(table)
    lam = table.scale if table.scale is not None else recorded.get("lam")
    if "merger" not in recorded:
        if lam is None:
            return []
        return [f"the table sets λ = {_number(lam)}, which the pruned adapters do not carry: merge them with "
                f"--lambda {_number(lam)} (and the merger you choose) to get what merge --mask gives"]
    flags = _merge_flags({**recorded, **({"lam": lam} if lam is not None else {})}, kept)
    return [f"the table was searched with `merge {flags}`, which the pruned adapters do not carry: merge them "
            "with those flags to get what merge --mask gives"]


def _merge_flags(recorded: dict, kept: list[bool]) -> str:
    """`--merger M --lambda λ` (the λ merge --mask uses: with T counting every task) and a flag for each
    recorded setting that M's defaults do not give, per-adapter lists cut to the adapters `kept`."""
    from loramerge_cli.merging.config import SETTINGS, MergeConfig
    from loramerge_cli.merging.merge import resolve_config

    def resolved(settings: dict) -> dict:
        fields = {name: value for name, value in settings.items() if name in SETTINGS}
        params = {name: value for name, value in settings.items() if name not in SETTINGS}
        return resolve_config(MergeConfig(**fields, params=params), len(kept)).describe()

    given = resolved(recorded)
    defaults = resolved({"merger": recorded["merger"]})
    parts = [f"--merger {given['merger']}"]
    for name, value in given.items():
        if name == "merger" or (name != "lambda" and defaults.get(name) == value):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{flag} {','.join(_number(v) for v, keep in zip(value, kept) if keep)}")
        else:
            parts.append(f"{flag} {_number(value)}")
    return " ".join(parts)


def _number(value) -> str:
    """A flag's value as it reads back to the same number (0.3333333333333333, not 0.333333)."""
    return repr(float(value)).removesuffix(".0") if isinstance(value, float) else str(value)


def register(app: typer.Typer) -> None:
    command = with_options(adapter_options(with_base_mismatch=False), prune_options(), output_options())
    app.command("apply-mask", epilog=EPILOG)(command(apply_mask_command))
