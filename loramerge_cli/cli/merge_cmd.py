"""`loramerge merge`: adapters (+ weight table) -> merged PEFT adapter folder."""

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
    path_value,
    print_warnings,
    result_console,
)
from loramerge_cli.cli.options import (
    adapter_options,
    choice,
    max_length_option,
    merge_config,
    merger_options,
    option,
    output_options,
    push_options,
    resolve_backend,
    scale_options,
    threads_option,
    with_options,
)
from loramerge_cli.cli.recipe import per_adapter_values
from loramerge_cli.errors import LoramergeError, UsageError, check_at_least
from loramerge_cli.evaluation.settings import EvalSettings
from loramerge_cli.merging.registry import DTYPES, randomized_methods

EPILOG = examples_epilog(
    "loramerge merge --adapters a/ b/ c/ --merger knots --out merged/",
    "loramerge merge --adapters rte=org/rte mnli=org/mnli --merger ties --density 0.5 --lambda 1.2 --out merged/",
    "loramerge merge --adapters a/ b/ c/ --mask mask.json --out merged/ --head a",
    "loramerge merge --adapters a/ b/ c/ --merger tsv --lambda auto --tasks tasks.yaml --out merged/",
    "loramerge merge --adapters a/ b/ c/ --merger regmean --tasks tasks.yaml --val-limit 256 --out merged/",
    "loramerge merge --config merge.yaml --out merged/ --force",
    "loramerge merge --config merged/loramerge.yaml --out again/          # rebuild a merge bit for bit",
    "loramerge merge --adapters a/ b/ --merger ties --out merged/ --push-to-hub me/merged --private --dry-run",
)
MASK_HELP = "Weight table JSON (loramerge.mask/v1); - reads it from standard input (search-mask --json | ...)."
INDICES_HELP = 'Pruned flat indices "[i, ...]", i = unit·T + task (the ENMP reference\'s --mask).'


def table_path_value(value):
    """--mask: a literal `-` is standard input (kept as the text "-"; `./-` is the file named -), else a path."""
    from loramerge_cli.masks import STANDARD_INPUT

    return STANDARD_INPUT if value == STANDARD_INPUT else path_value(value)


def table_options() -> list:
    return [option("mask", Path | None, None, help=MASK_HELP, parser=table_path_value),
            option("indices", str | None, None, help=INDICES_HELP)]


def merge_options() -> list:
    """The options of `merge` after the merger's: table, output, dense results, --lambda auto."""
    return [
        *table_options(),
        option("override", bool, False, help="Let flags override the merger settings recorded in --mask."),
        option("out", Path, ..., help="Output folder (a PEFT adapter).", show_default=False),
        option("force", bool, False, help="Replace --out if it exists."),
        option("dtype", choice(DTYPES) | None, None, show_default=False,
               help="Dtype of the written weights (--eval-dtype: of the model --lambda auto evaluates). "
               "[default: the inputs']"),
        option("out_rank", int | None, None, show_default=False, help="Dense results (elementwise methods in the "
               "full space): write this rank. [default: the least rank keeping --energy]"),
        option("energy", float | None, None, show_default=False,
               help="Dense results: keep this fraction of the update's energy (sum of squared singular values), "
               "at a rank of at most the adapters' ranks summed: a warning says what that leaves out. "
               "[default: 0.9999]"),
        option("seed", int | None, None, show_default=False, help="Seed of randomized methods "
               f"({', '.join(randomized_methods())}), 1 … 2^32 − 1. [default: 1]"),
        option("head", str | None, None, help="Also write this task's head as modules_to_save, so a plain PEFT "
               "load serves it."),
        option("base", str | None, None, help="Base model id or path; overrides the configs'."),
        option("tasks", Path | None, None, help="Task spec YAML: its validation split tunes --lambda auto and "
               "gives the inputs of data-reading methods (regmean)."),
        option("val_limit", int | None, None, show_default=False, help="--lambda auto, regmean: examples per task "
               "(>= 1). [default: each task's `limit` in --tasks, else all]"),
        option("device", str | None, None, help="--lambda auto, regmean: torch device."),
        *scale_options(),
        option("batch_size", int | None, None, show_default=False,
               help=f"--lambda auto, regmean: batch size. [default: {EvalSettings.batch_size}]"),
        option("eval_dtype", choice(DTYPES) | None, None, show_default=False,
               help="--lambda auto: dtype of the evaluated model. [default: float32]"),
        max_length_option("--lambda auto, regmean: "),
        threads_option("Torch CPU threads. [default: OMP_NUM_THREADS if set, else torch's, and min(8, CPUs) while "
                       "--lambda auto or regmean evaluates; CPUs / N with N workers on this machine scoring the "
                       "--lambda auto grid]"),
        *push_options(),
    ]


def _truncation_a_recipe_gave_with_isotropize(ctx: typer.Context, flags: dict) -> list[str]:
    """A recipe written before --out-rank/--energy were refused with --isotropize may hold them (they did
    nothing): dropped, with a warning; typed on the command line they are refused by the plan."""
    if not flags["isotropize"]:
        return []
    given = [name for name in ("out_rank", "energy") if flags[name] is not None
             and getattr(ctx.get_parameter_source(name), "name", "") == "DEFAULT_MAP"]
    for name in given:
        flags[name] = ctx.params[name] = None  # (the new recipe records what ran)
    return [f"the recipe's {', '.join(name.replace('_', '-') for name in given)} dropped: with --isotropize the "
            "update is written exactly (they did nothing)"] if given else []


def _seed_a_recipe_gave_to_an_exact_merger(ctx: typer.Context, flags: dict) -> list[str]:
    """A recipe's seed (a search recipe's is the search's) with a method that draws nothing: dropped, with a
    warning; typed on the command line it is refused by the plan."""
    if flags["seed"] is None or getattr(ctx.get_parameter_source("seed"), "name", "") != "DEFAULT_MAP":
        return []
    config = merge_config(flags)
    if config.draws():
        return []
    flags["seed"] = ctx.params["seed"] = None
    return [f"the recipe's seed dropped: {config.method_name()} draws nothing"]


def _refuse_an_empty_merge(config, adapter_count: int, complete: bool) -> None:
    """λ = 0 or every weight 0 is bad usage, said before the adapters load; after the settings' own errors when
    the flags are the whole merge (`complete`: no table to add settings), which a wrong value would otherwise
    hide behind this one."""
    from loramerge_cli.merging.config import zero_by_settings

    if complete:
        from loramerge_cli.merging.merge import resolve_config

        resolve_config(config, adapter_count)
    empty = zero_by_settings(config.lam, config.weights)  # (λ auto: config.lam is None)
    if empty and (config.lam == 0 or len(config.weights) == adapter_count):  # (else the plan names the count)
        raise UsageError(f"the merge is empty ({empty}): nothing to write")


@command_errors
def merge_command(ctx: typer.Context, **flags) -> None:
    """Merge LoRA adapters into one adapter: weight table -> space -> method -> λ, written as exact LoRA
    factors (dense results truncated, with the error recorded). The output folder holds a model card,
    loramerge.yaml (rerun it with --config) and every task's head. The math: docs/algorithms.md."""
    per_adapter_values(ctx, flags)
    check_at_least(flags["val_limit"], 1, "--val-limit")
    if flags["lam"] == "auto" and flags["tasks"] is None:
        raise UsageError("--lambda auto needs --tasks FILE (it tunes λ on the validation split)")
    spread, threads = resolve_backend(flags["device"] or "cpu", flags["devices"], flags["workers"], flags["threads"],
                                      flags["backend"], flags["ray_address"])
    dropped = _truncation_a_recipe_gave_with_isotropize(ctx, flags) + _seed_a_recipe_gave_to_an_exact_merger(ctx, flags)
    config = merge_config(flags)  # flag values are checked before anything is read
    if flags["mask"] is None and not _reads_tasks(config, flags["lam"] == "auto"):  # (a table may name a method)
        _refuse_idle_task_flags(flags)
    spec_inputs = []
    if flags["tasks"] is not None:
        from loramerge_cli.adapters.sources import source_names
        from loramerge_cli.evaluation.data import check_task_file
        from loramerge_cli.evaluation.model_fit import check_model_fit

        # the spec and its data, before torch or adapters load
        # (labels only for --lambda auto: RegMean reads the inputs alone)
        task_file = check_task_file(flags["tasks"], ["validation"], labelled=flags["lam"] == "auto")
        task_file.check_covers(source_names(flags["adapters"]))
        check_model_fit(task_file, flags["adapters"], flags["base"], flags["max_length"], flags["allow_pickle"])
        spec_inputs = task_file.inputs()
    from loramerge_cli.hub import check_repo_id

    check_repo_id(flags["push_to_hub"], flags["dry_run"], flags["private"], flags["revision"])
    apply_threads(flags["threads"])
    from loramerge_cli import api
    from loramerge_cli.cli.progress import ProgressDisplay

    data = None if flags["tasks"] is None else api.TaskData(
        flags["tasks"], flags["val_limit"], flags["device"], flags["batch_size"], flags["base"], flags["max_length"],
        dtype=flags["eval_dtype"], threads=threads, backend=spread)
    api.check_table_flags(flags["mask"], flags["indices"])  # the range of --indices once the adapters are read
    from loramerge_cli.adapters.writer import check_output_dir, default_head
    from loramerge_cli.outputs import base_model_folders, input_files

    check_output_dir(flags["out"], flags["force"],  # before loading anything
                     input_files(flags["adapters"], flags["mask"], *spec_inputs) + base_model_folders([flags["base"]]))
    _refuse_an_empty_merge(config, len(flags["adapters"]), flags["mask"] is None)
    adapters = api.load_adapters(flags["adapters"], allow_pickle=flags["allow_pickle"])
    table = api.weight_table(adapters, flags["mask"], flags["indices"])
    plan = api.plan_merge(adapters, config, table, override=flags["override"], out=flags["out"],
                          force=flags["force"], dtype=flags["dtype"], head=flags["head"], base=flags["base"],
                          command=command_line(ctx, local_paths=True), tuning=data if flags["lam"] == "auto" else None,
                          data=data, allow_base_mismatch=flags["allow_base_mismatch"])
    if plan.tuning is None and plan.data is None:  # nothing reads the tasks: their flags would do nothing
        _refuse_idle_task_flags(flags)
    with ProgressDisplay(flags["quiet"] or flags["json_output"], terminal_only=("merging",)) as display:
        result = api.execute(plan, on_event=display)  # λ grid and merge progress: stderr
    pushed_to = flags["push_to_hub"] and flags["push_to_hub"] + (f"@{flags['revision']}" if flags["revision"] else "")
    api.write(plan, result, recipe=_recipe(ctx, plan, result), repo_id=pushed_to)
    report = _report(result, flags["out"])
    served = default_head(adapters, flags["head"])
    if served is None and any(adapter.heads for adapter in adapters):  # an LM's trained lm_head or embeddings
        modules = sorted({name for adapter in adapters for name in adapter.head_modules})
        report["warnings"].append(
            f"the inputs' modules_to_save weights ({', '.join(modules[:3])}{', …' if len(modules) > 3 else ''}) are "
            "not in the merged adapter, which serves the base's; each task's are in heads/<task>.safetensors, and "
            "--head TASK puts one task's in modules_to_save")
    report["warnings"] += _changed_recipe_inputs(flags["config"], adapters) + dropped
    if flags["push_to_hub"] is not None:
        from loramerge_cli.hub import local_paths_warnings, push_folder

        publishing = local_paths_warnings(flags["out"])
        if flags["json_output"]:
            report["warnings"] += publishing
        console = human_console(flags["quiet"], flags["json_output"])
        print_warnings(console, publishing)  # before the upload: one that fails ends the command before the report
        try:
            report["push"] = push_folder(flags["out"], flags["push_to_hub"], private=flags["private"],
                                         revision=flags["revision"], dry_run=flags["dry_run"])
        except LoramergeError as error:  # the merge is written: --json still reports it, with the failed push
            if flags["json_output"]:
                emit_json({**report, "push": {"repo_id": flags["push_to_hub"], "error": str(error)}}, "merge")
            raise
    if flags["json_output"]:
        return emit_json(report, "merge")
    _print_report(report, human_console(flags["quiet"]), served, flags["head"])


def _changed_recipe_inputs(config: Path | None, adapters) -> list[str]:
    """An output's recipe rebuilds it only from the same inputs: those whose sha256 differs from the one the
    output's loramerge.json (beside the recipe) records."""
    import json

    try:
        recipe_record = Path(config).parent / "loramerge.json" if config else None
        inputs = json.loads(recipe_record.read_text(encoding="utf-8"))["inputs"] if recipe_record else []
        # an input changed in memory (a weight table applied) is identified by its tensors: never its file's
        recorded = {item["name"]: item.get("modified_sha256") or item["sha256"] for item in inputs}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no output beside the recipe: no comparison
        return []
    return [f"adapter {adapter.name!r} is not the one {config} was written for (sha256 {adapter.source.identity[:12]}… "
            f"where its loramerge.json records {recorded[adapter.name][:12]}…): this is not a rebuild"
            for adapter in adapters if recorded.get(adapter.name, adapter.source.identity) != adapter.source.identity]


def _reads_tasks(config, tuned: bool) -> bool:
    """Whether the merge reads the tasks' data: λ is tuned on them, or its method reads their inputs (RegMean).
    An unknown merger is left to the plan, which names it."""
    from loramerge_cli.merging.registry import method_named

    try:
        return tuned or method_named(config.method_name()).needs_inputs
    except KeyError:
        return True


def _refuse_idle_task_flags(flags: dict) -> None:
    """A usage error for the flags that serve reading the tasks (--tasks and how it is evaluated) where nothing
    reads them."""
    from loramerge_cli.cli.recipe import TUNING_ONLY

    idle = sorted(name for name in (*TUNING_ONLY, "devices", "workers", "ray_address") if flags[name] is not None)
    if idle or flags["backend"] != "process":
        flag = f"--{(idle or ['backend'])[0].replace('_', '-')}"
        raise UsageError(f"{flag} does nothing here: it serves --lambda auto and the mergers that read the tasks' "
                         "inputs (regmean)")


def _recipe(ctx: typer.Context, plan, result) -> str:
    """loramerge.yaml of this merge: λ as used (tuned or given), the table as the folder's mask.json."""
    from loramerge_cli.adapters.sources import base_reference
    from loramerge_cli.cli.recipe import build_recipe

    lam = result.settings.lam if plan.tuning is not None else ctx.params.get("lam")
    pinned = {"base": plan.base} if plan.base and base_reference(plan.base)[1] and plan.base != ctx.params.get("base") \
        else {}
    rebuild = ""
    if plan.data is not None:  # the inputs a merge reads (RegMean) are computed with a rounding of this count
        import torch

        from loramerge_cli.evaluation.engine import default_threads

        rebuild = f" --threads {default_threads(plan.data.threads) or torch.get_num_threads()}"
    resolved = {"lam": lam, "mask": "mask.json" if plan.table else None, **pinned}
    return build_recipe(ctx, plan.adapters, plan.out, resolved, reads_data=plan.data is not None, rebuild_flags=rebuild)


def _print_report(report: dict, console, served: str | None, head: str | None) -> None:
    """Warnings and the default-head note on stderr (first: a stdout that fails must not lose them), then the
    result table and any upload on stdout."""
    from loramerge_cli.cli import render
    from loramerge_cli.cli.render import push_lines

    print_warnings(console, report["warnings"])
    if served != head:
        console.print(f"note: no --head: the head of task {served!r} is in modules_to_save, so that the merge loads "
                      "with a task head (--head TASK picks another)", markup=False, highlight=False, soft_wrap=True)
    result_console().print(render.Fitting(render.merge_table(report)))  # (no value cut)
    for line in push_lines(report["push"]) if "push" in report else []:
        result_console().print(line, markup=False, highlight=False)


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
