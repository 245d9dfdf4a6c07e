"""`loramerge merge`: adapters (+ weight table) -> merged PEFT adapter folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import typer

from loramerge_cli.cli.common import (
    ADAPTERS_HELP,
    ALLOW_BASE_MISMATCH_HELP,
    ALLOW_PICKLE_HELP,
    CONFIG_HELP,
    DEBUG_HELP,
    JSON_HELP,
    QUIET_HELP,
    command_errors,
    command_line,
    emit_json,
    examples_epilog,
    human_console,
    load_config_defaults,
    parse_float_list,
)
from loramerge_cli.errors import LoramergeError
from loramerge_cli.outputs import input_files

# Mirrors merging.registry.merger_names() (importing the registry imports torch); a test keeps them equal.
MERGERS = ("cat", "core", "dare", "dare_ties", "iso_c", "knots", "magnitude", "ta", "ties", "tsv", "tsv_iso")
DtypeName = Literal["float32", "float16", "bfloat16"]
# Settings a weight table may record in its `merger` field (as ResolvedMerge.describe() writes them);
# the names are MergeConfig fields. Its "lambda" is handled apart (Part A §A2).
RECORDED = ("merger", "method", "space", "density", "drop_rate", "scope", "knots_scaled", "seed", "weights",
            "out_rank", "energy")
EPILOG = examples_epilog(
    "loramerge merge --adapters a/ b/ c/ --merger knots --out merged/",
    "loramerge merge --adapters rte=org/rte mnli=org/mnli --merger ties --density 0.5 --lambda 1.2 --out merged/",
    "loramerge merge --adapters a/ b/ c/ --mask mask.json --out merged/ --head a",
    "loramerge merge --adapters a/ b/ c/ --merger tsv --lambda auto --tasks tasks.yaml --out merged/",
    "loramerge merge --config merge.yaml --out merged/ --force",
)


def _lambda_value(text: str | None) -> float | str | None:
    if text is None or text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise LoramergeError(f"--lambda: expected a finite number or 'auto', got {text!r}")
    return value


def _table(adapters, mask: Path | None, indices: str | None):
    from loramerge_cli import api

    if mask is not None and indices is not None:
        raise typer.BadParameter("give --mask or --indices, not both", param_hint="'--mask'")
    if mask is not None:
        table = api.load_table(mask)
        api.check_table(table, adapters, origin=str(mask))
        return table
    if indices is not None:
        return api.from_pruned_indices(adapters, api.parse_indices(indices))
    return None


def _recorded_settings(table) -> dict:
    """The merger settings a weight table was searched with, by MergeConfig field."""
    merger = table.merger if table is not None and isinstance(table.merger, dict) else {}
    recorded = {field: merger[field] for field in RECORDED if merger.get(field) is not None}
    if table is not None and table.scale is None and merger.get("lambda") is not None:
        recorded["lam"] = float(merger["lambda"])  # Part A §A2: the table's scale, when present, wins
    return recorded


def _combined_settings(flags: dict, recorded: dict, override: bool) -> dict:
    """The user's flags over the table's recorded settings; a conflict needs --override (--lambda never
    conflicts: it always wins, Part A §A2)."""
    given = {field: value for field, value in flags.items() if value is not None}
    conflicts = [field for field in given if field != "lam" and field in recorded and given[field] != recorded[field]]
    if conflicts and not override:
        field = conflicts[0]
        raise LoramergeError(
            f"--{field.replace('_', '-')} {given[field]} conflicts with the mask's recorded "
            f"{field} {recorded[field]}; pass --override to use yours"
        )
    if override and ("merger" in given or "method" in given):
        return given  # another method: the recorded parameters may not apply to it
    return {**recorded, **given}


def _tune_lambda(adapters, config, table, tasks: Path, eval_options: dict):
    try:
        from loramerge_cli.evaluation.tuning import tune_lambda
    except ImportError:
        raise LoramergeError("--lambda auto needs the evaluation engine, which is not installed") from None
    options = {key: value for key, value in eval_options.items() if value is not None}
    return tune_lambda(adapters, config, table, tasks, **options)


@command_errors
def merge_command(
    ctx: typer.Context,
    adapters: Annotated[list[str], typer.Option("--adapters", help=ADAPTERS_HELP, show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder (a PEFT adapter).", show_default=False)],
    merger: Annotated[str | None, typer.Option(
        "--merger", help=f"Preset or method: {', '.join(MERGERS)}. [default: ta]", show_default=False)] = None,
    method: Annotated[str | None, typer.Option("--method", help="Override the preset's method.")] = None,
    space: Annotated[str | None, typer.Option(
        "--space", help="Override the space the method acts in: full, knots or core.")] = None,
    lam: Annotated[str | None, typer.Option(
        "--lambda", help="λ, the factor on the merged update: a number, or 'auto' (tuned on --tasks). "
        "[default: the table's scale, else the method's]", show_default=False)] = None,
    weights: Annotated[str | None, typer.Option(
        "--weights", help="Per-adapter weights w1,w2,... in task order, applied before the method. [default: 1]",
        show_default=False)] = None,
    density: Annotated[float | None, typer.Option(
        "--density", help="ties, magnitude, dare_ties: fraction of entries each task keeps when trimming.")] = None,
    drop_rate: Annotated[float | None, typer.Option(
        "--drop-rate", help="dare, dare_ties: probability of dropping an entry.")] = None,
    scope: Annotated[Literal["module", "adapter"] | None, typer.Option(
        "--scope", help="Trim and elect per module, or over the whole adapter.")] = None,
    knots_scaled: Annotated[bool | None, typer.Option(
        "--knots-scaled/--no-knots-scaled", help="knots space: scale the components by their singular values.",
        show_default=False)] = None,
    mask: Annotated[Path | None, typer.Option("--mask", help="Weight table JSON (loramerge.mask/v1).")] = None,
    indices: Annotated[str | None, typer.Option(
        "--indices", help='Pruned flat indices "[i, ...]", i = unit·T + task (the ENMP reference\'s --mask).')] = None,
    override: Annotated[bool, typer.Option(
        "--override", help="Let flags override the merger settings recorded in --mask.")] = False,
    out_rank: Annotated[int | None, typer.Option("--out-rank", help="Rank of truncated dense results.")] = None,
    energy: Annotated[float | None, typer.Option(
        "--energy", help="Dense results: keep this fraction of Σσ². [default: 0.9999]", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    dtype: Annotated[DtypeName | None, typer.Option(
        "--dtype", help="Dtype of the written weights. [default: the inputs']", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of randomized methods (DARE), >= 1. [default: 1]",
                                             show_default=False)] = None,
    head: Annotated[str | None, typer.Option(
        "--head", help="Also write this task's head as modules_to_save, so a plain PEFT load serves it.")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model id or path; overrides the configs'.")] = None,
    tasks: Annotated[Path | None, typer.Option("--tasks", help="Task spec YAML (for --lambda auto).")] = None,
    val_limit: Annotated[int | None, typer.Option("--val-limit", help="--lambda auto: examples per task.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="--lambda auto: torch device.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="--lambda auto: batch size.")] = None,
    allow_base_mismatch: Annotated[bool, typer.Option("--allow-base-mismatch", help=ALLOW_BASE_MISMATCH_HELP)] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP)] = False,
    config: Annotated[Path | None, typer.Option(
        "--config", help=CONFIG_HELP, is_eager=True, callback=load_config_defaults)] = None,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help=QUIET_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Merge LoRA adapters into one adapter (Part A of the spec): weight table -> space -> method -> λ,
    written as exact LoRA factors (dense results truncated, with the error recorded)."""
    # Cheap checks first: nothing is loaded before the command line is known to be usable.
    if seed is not None and seed < 1:
        raise LoramergeError("--seed must be >= 1 (0 would mean a clock seed to CMA-ES)")
    lam_value = _lambda_value(lam)
    weight_list = parse_float_list(weights, "--weights")
    if lam_value == "auto" and tasks is None:
        raise LoramergeError("--lambda auto needs --tasks FILE (it tunes λ on the validation split)")
    from loramerge_cli import api
    from loramerge_cli.adapters.compat import check_compatible
    from loramerge_cli.adapters.writer import adapter_files, check_head, check_output_dir
    from loramerge_cli.cli import render
    from loramerge_cli.merging.merge import MergeConfig, resolve_config, run_merge

    check_output_dir(out, force, input_files(adapters, mask, tasks))
    loaded = api.load_adapters(adapters, allow_pickle=allow_pickle)
    check_output_dir(out, force, adapter_files(loaded))
    check_head(loaded, head)
    table = _table(loaded, mask, indices)
    flags = {"merger": merger, "method": method, "space": space, "lam": lam_value, "weights": weight_list,
             "density": density, "drop_rate": drop_rate, "scope": scope, "knots_scaled": knots_scaled,
             "seed": seed, "out_rank": out_rank, "energy": energy}
    chosen = _combined_settings(flags, _recorded_settings(table), override)
    lam_value = chosen.pop("lam", None)
    merge_config = MergeConfig(**{"merger": "ta", **chosen, "lam": None if lam_value == "auto" else lam_value})
    check_compatible(loaded, allow_base_mismatch)
    resolve_config(merge_config, len(loaded), table)  # every parameter checked before any work
    extra = {}
    if lam_value == "auto":
        best, grid = _tune_lambda(loaded, merge_config, table, tasks,
                                  {"val_limit": val_limit, "device": device, "batch_size": batch_size, "base": base,
                                   "allow_base_mismatch": allow_base_mismatch})
        merge_config.lam = float(best)
        extra["lambda_tuning"] = {"tasks": str(tasks), "best": float(best), "grid": grid}

    console = human_console(quiet, json_output)
    module_count = len({path for adapter in loaded for path in adapter.modules})
    settings = resolve_config(merge_config, len(loaded), table)
    with render.module_progress(console, module_count) as advance:
        result = run_merge(loaded, settings, table, progress=advance)
    api.write_merged_adapter(result, loaded, out, dtype=dtype, head=head, command=command_line(ctx), force=force,
                             table=table, base_model=base, extra_provenance=extra)
    report = _report(result, out)
    if json_output:
        emit_json(report)
        return
    console.print(render.merge_table(report))
    for warning in result.warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)


def _report(result, out: Path) -> dict:
    from collections import Counter

    written = {path: module for path, module in result.modules.items() if module.rank > 0}
    errors = [m.truncation_error for m in written.values() if m.truncation_error is not None]
    ranks = Counter(module.rank for module in written.values())
    return {
        "out": str(out),
        "merger": result.settings.merger,
        "method": result.settings.method.name,
        "space": result.settings.space,
        "parameters": result.settings.describe(),
        "modules": len(written),
        "omitted": sorted(set(result.omitted) | (set(result.modules) - set(written))),
        "ranks": {str(rank): ranks[rank] for rank in sorted(ranks)},
        "max_truncation_error": max(errors) if errors else None,
        "warnings": list(result.warnings),
    }


def register(app: typer.Typer) -> None:
    app.command("merge", epilog=EPILOG)(merge_command)
