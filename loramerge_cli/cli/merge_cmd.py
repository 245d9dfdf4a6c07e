"""`loramerge merge`: adapters (+ weight table) -> merged PEFT adapter folder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from loramerge_cli.cli.common import command_errors, command_line, emit_json, examples_epilog, human_console
from loramerge_cli.cli.options import (
    adapter_options,
    choice,
    merge_config,
    merger_options,
    option,
    output_options,
    with_options,
)
from loramerge_cli.errors import UsageError, check_at_least
from loramerge_cli.merging.registry import DTYPES

DtypeName = Literal["float32", "float16", "bfloat16"]
EPILOG = examples_epilog(
    "loramerge merge --adapters a/ b/ c/ --merger knots --out merged/",
    "loramerge merge --adapters rte=org/rte mnli=org/mnli --merger ties --density 0.5 --lambda 1.2 --out merged/",
    "loramerge merge --adapters a/ b/ c/ --mask mask.json --out merged/ --head a",
    "loramerge merge --adapters a/ b/ c/ --merger tsv --lambda auto --tasks tasks.yaml --out merged/",
    "loramerge merge --config merge.yaml --out merged/ --force",
)
MASK_HELP = "Weight table JSON (loramerge.mask/v1)."
INDICES_HELP = 'Pruned flat indices "[i, ...]", i = unit·T + task (the ENMP reference\'s --mask).'


def table_options() -> list:
    return [option("mask", Path | None, None, help=MASK_HELP), option("indices", str | None, None, help=INDICES_HELP)]


def merge_options() -> list:
    """The options of `merge` after the merger's: table, output, dense results, --lambda auto."""
    return [
        *table_options(),
        option("override", bool, False, help="Let flags override the merger settings recorded in --mask."),
        option("out", Path, ..., help="Output folder (a PEFT adapter).", show_default=False),
        option("force", bool, False, help="Replace --out if it exists."),
        option("dtype", choice(DTYPES) | None, None, show_default=False,
               help="Dtype of the written weights. [default: the inputs']"),
        option("out_rank", int | None, None, help="Rank of truncated dense results."),
        option("energy", float | None, None, show_default=False,
               help="Dense results: keep this fraction of Σσ². [default: 0.9999]"),
        option("seed", int | None, None, show_default=False, help="Seed of randomized methods (DARE, DELLA, "
               "LoRA-LEGO), >= 1. [default: 1]"),
        option("head", str | None, None, help="Also write this task's head as modules_to_save, so a plain PEFT "
               "load serves it."),
        option("base", str | None, None, help="Base model id or path; overrides the configs'."),
        option("tasks", Path | None, None, help="Task spec YAML (for --lambda auto)."),
        option("val_limit", int | None, None, help="--lambda auto: examples per task (>= 1)."),
        option("device", str | None, None, help="--lambda auto: torch device."),
        option("batch_size", int | None, None, help="--lambda auto: batch size."),
        option("max_length", int | None, None, show_default=False, help="--lambda auto: token cap of tasks whose "
               "spec sets none. [default: the smaller of the tokenizer's model_max_length and the model's "
               "max_position_embeddings]"),
    ]


@command_errors
def merge_command(ctx: typer.Context, **flags) -> None:
    """Merge LoRA adapters into one adapter: weight table -> space -> method -> λ, written as exact LoRA
    factors (dense results truncated, with the error recorded). The math: docs/algorithms.md."""
    check_at_least(flags["val_limit"], 1, "--val-limit")
    tuning = None
    if flags["lam"] == "auto":
        if flags["tasks"] is None:
            raise UsageError("--lambda auto needs --tasks FILE (it tunes λ on the validation split)")
        from loramerge_cli.evaluation.data import check_task_file

        check_task_file(flags["tasks"], ["validation"])  # the spec and its data, before torch or adapters load
    config = merge_config(flags)  # flag values are checked before anything is read
    from loramerge_cli import api
    from loramerge_cli.cli import render

    if flags["lam"] == "auto":
        tuning = api.LambdaTuning(flags["tasks"], flags["val_limit"], flags["device"], flags["batch_size"],
                                  flags["base"], flags["max_length"])
    if flags["mask"] is not None and flags["indices"] is not None:
        raise UsageError("give --mask or --indices, not both")
    from loramerge_cli.adapters.writer import check_output_dir

    check_output_dir(flags["out"], flags["force"])  # before loading anything
    adapters = api.load_adapters(flags["adapters"], allow_pickle=flags["allow_pickle"])
    table = api.weight_table(adapters, flags["mask"], flags["indices"])
    plan = api.plan_merge(adapters, config, table, override=flags["override"], out=flags["out"],
                          force=flags["force"], dtype=flags["dtype"], head=flags["head"], base=flags["base"],
                          command=command_line(ctx), tuning=tuning,
                          allow_base_mismatch=flags["allow_base_mismatch"])
    console = human_console(flags["quiet"], flags["json_output"])
    module_count = len({path for adapter in adapters for path in adapter.modules})
    with render.module_progress(console, module_count) as advance:
        result = api.execute(plan, progress=advance)
    api.write(plan, result)
    report = _report(result, flags["out"])
    if flags["json_output"]:
        return emit_json(report)
    console.print(render.merge_table(report))
    for warning in report["warnings"]:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)


def _report(result, out: Path) -> dict:
    from collections import Counter

    tuning = result.provenance.get("lambda_tuning") or {}
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
        "warnings": list(result.warnings) + list(tuning.get("warnings", [])),
        **({"lambda_tuning": tuning} if tuning else {}),
    }


def register(app: typer.Typer) -> None:
    """Add `merge`, its options generated from the method registry as it is now."""
    command = with_options(adapter_options(), merger_options(), merge_options(), output_options())(merge_command)
    app.command("merge", epilog=EPILOG)(command)
