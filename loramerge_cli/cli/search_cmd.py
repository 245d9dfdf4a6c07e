"""`loramerge search-mask`: find which (task, block) LoRA modules to prune before merging (ENMP), or
learn one merge coefficient per (task, module) from unlabeled inputs (NSC)."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperCommand

from loramerge_cli.cli.common import (command_errors, command_line, emit_json, examples_epilog, file_path_value,
                                      human_console, print_warnings, result_console)
from loramerge_cli.cli.options import (
    adapter_options,
    choice,
    max_length_option,
    merge_config,
    merger_options,
    option,
    output_options,
    resolve_backend,
    scale_options,
    setting_option,
    threads_option,
    with_options,
)
from loramerge_cli.cli.recipe import per_adapter_values
from loramerge_cli.merging.registry import DTYPES, randomized_methods

EPILOG = examples_epilog(
    "loramerge search-mask --adapters a/ b/ c/ --merger knots --tasks tasks.yaml --out mask.json",
    "loramerge search-mask --adapters a/ b/ c/ --merger ta --lambda auto --tasks tasks.yaml --budget 64 "
    "--val-limit 256 --run-dir runs/ta --out mask.json",
    "loramerge search-mask --adapters a/ b/ c/ --merger ta --tasks tasks.yaml --strategy enmp --popsize 8 "
    "--generations 15 --out enmp.json",
    "loramerge search-mask --run-dir runs/ta --resume",
    "loramerge search-mask --adapters a/ b/ c/ --merger ties --tasks tasks.yaml --strategy greedy --out greedy.json",
    "loramerge merge --adapters a/ b/ c/ --mask mask.json --out merged/",
    "loramerge search-mask --adapters a/ b/ c/ --tasks inputs.yaml --strategy nsc --out coeffs.json",
    "loramerge search-mask --adapters a/ b/ c/ --tasks inputs.yaml --strategy nsc --target-blocks 9,10,11 "
    "--target-modules out_proj --steps 100 --out coeffs.json",
    "loramerge merge --adapters a/ b/ c/ --mask coeffs.json --merger ta --out merged/",
    "loramerge search-mask --adapters a/ b/ c/ --merger ta --tasks inputs.yaml --fitness nsc --out mask.json",
    "loramerge search-mask --adapters a/ b/ c/ --tasks tasks.yaml --devices cuda:0,cuda:1 --out mask.json",
    "loramerge search-mask --adapters a/ b/ c/ --tasks tasks.yaml --device cuda --backend ray --ray-address auto "
    "--out mask.json",
)


RESUME_ONLY = "unless --run-dir DIR --resume continues a saved search"


def search_options() -> list:
    """Strategy, fitness, budgets, evaluation and run-directory options (after the merger's)."""
    from loramerge_cli.evaluation.settings import EvalSettings
    from loramerge_cli.search.enmp_settings import EnmpSettings
    from loramerge_cli.search.nsc_settings import OBJECTIVES, NscSettings
    from loramerge_cli.search.plan import FITNESSES
    from loramerge_cli.search.strategies import DEFAULT_STRATEGY, STRATEGIES

    strategies = "; ".join(f"{name}: {strategy.help}" for name, strategy in STRATEGIES.items())
    resumable = " and ".join(name for name, strategy in STRATEGIES.items() if strategy.resumable)
    return [
        option("tasks", Path | None, None, help=f"Task spec YAML with validation splits. Required {RESUME_ONLY}.",
               show_default=False),
        option("out", Path | None, None, help=f"Weight table JSON to write. Required {RESUME_ONLY}.",
               parser=file_path_value, show_default=False),
        option("strategy", choice(STRATEGIES), DEFAULT_STRATEGY, help=f"{strategies}. `--strategy NAME -h` lists "
               "the options NAME reads only."),
        option("fitness", choice(FITNESSES), "accuracy", help="Mask strategies: labelled validation "
               "accuracy, or nsc: % reduction of the label-free --objective loss (no labels read)."),
        setting_option(NscSettings, "objective", annotation=choice(OBJECTIVES), help="Label-free loss: nsc "
                       "(null-space ratio at the targets) or entropy (AdaMerging: mean prediction entropy; "
                       "classification tasks)."),
        setting_option(NscSettings, "steps", help="nsc: AdamW steps."),
        setting_option(NscSettings, "lr", help="nsc: AdamW learning rate (weight decay 0.01)."),
        setting_option(NscSettings, "init", help="nsc: starting value of every coefficient, a number (the paper's "
                       "0.4; ta's default λ is 1/T, so 0.25 for 4 tasks)."),
        option("target_blocks", str | None, None, show_default=False, help="nsc: blocks the ratio is measured in: "
               "indices (9,10,11) or unit prefixes. [default: the last quarter of the blocks with LoRA]"),
        option("target_modules", str | None, None, show_default=False, help="nsc: module names in those blocks "
               "(o_proj,out_proj), matched on whole path components. [default: the value projection (v_proj, "
               "value), else the attention output projection, else the last LoRA attention module]"),
        setting_option(EnmpSettings, "max_prune", help="Largest fraction of the (task, block) units that may be "
                       "pruned."),
        *strategy_options(),
        setting_option(EnmpSettings, "popsize", help="CMA-ES population size."),
        setting_option(EnmpSettings, "generations", help="CMA-ES generations."),
        setting_option(EnmpSettings, "sigma0", help="CMA-ES initial step size."),
        setting_option(EnmpSettings, "threshold", help="CMA-ES: a unit is pruned when its search value is above "
                       "this."),
        setting_option(EnmpSettings, "addscale", help="Also search λ (one extra gene)."),
        option("budget", int | None, None, show_default=False,
               help="greedy/random: distinct evaluations [default: popsize·generations]; screened: stop after "
               "this many distinct full-set evaluations; surrogate: distinct full-set evaluations, the screen "
               "included [default: 3·units·tasks]."),
        option("sparsity", float | None, None, show_default=False,
               help="random: fraction of units pruned. [default: max-prune/2]"),
        setting_option(EnmpSettings, "seed", help="Seed (1 … 2^32 − 1): surrogate draws, CMA-ES, random masks, NSC "
                       f"batches, randomized merge methods ({', '.join(randomized_methods())})."),
        setting_option(EvalSettings, "val_limit", show_default=False, help="Validation examples per task (>= 1). "
                       "[default: each task's `limit` in --tasks, else all]"),
        setting_option(EvalSettings, "device", help="Torch device of the search (and of each worker of --workers "
                       "or --backend ray)."),
        *scale_options(),
        threads_option("Torch threads per process (the same in every process). [default: OMP_NUM_THREADS if set, "
                       "else min(8, CPUs); CPUs / N with N workers on this machine (--workers, --devices); 1 "
                       "in each Ray CPU actor the cluster counts]"),
        setting_option(EvalSettings, "batch_size", help="Evaluation batch size; nsc: examples per task and step."),
        setting_option(EvalSettings, "dtype", name="eval_dtype", annotation=choice(DTYPES),
                       help="Dtype of the evaluated model."),
        max_length_option(),
        setting_option(EvalSettings, "block_cache_mb", help="MB of the unpruned merge's block outputs kept so that "
                       "each candidate's forward pass starts at its first changed block (same scores; 0: off)."),
        option("run_dir", Path | None, None, help="Checkpoints after every step or generation (state, "
               "trajectory.jsonl, best table)."),
        option("resume", bool, False, help=f"Continue the search saved in --run-dir ({resumable}) with its saved "
               "settings (flags given must equal them); refused if an input changed since. Nothing in a run dir is "
               "a pickle."),
        option("report_test", bool, False, help="Also score the result on the test split."),
        option("plot", Path | None, None, help="Write fitness.png and mask.png to this folder (needs the plot "
               "extra)."),
        option("base", str | None, None, help="Base model id or path."),
        option("force", bool, False, help="Replace --out if it exists."),
    ]


def strategy_options() -> list:
    """Each strategy's own settings (its registered `parameters`), as options named after them."""
    from loramerge_cli.search.strategies import STRATEGIES

    options, owners = [], {}
    for strategy in STRATEGIES.values():
        for parameter in strategy.parameters:
            if parameter.name in owners:  # one option each: a second owner would make the command line ambiguous
                raise TypeError(f"strategies {owners[parameter.name]!r} and {strategy.name!r} both declare a setting "
                                f"named {parameter.name!r}: each search-mask option has one owner, rename one")
            owners[parameter.name] = strategy.name
            flags = parameter.flags or ((f"--{parameter.name}/--no-{parameter.name}",) if parameter.type is bool
                                        else ())
            allowed = f" Allowed: {parameter.bounds()}." if parameter.bounds() else ""
            options.append(option(parameter.name, parameter.type, parameter.default, *flags,
                                  help=f"{strategy.name}: {parameter.help}{allowed}"))
    return options


def check_strategy_flags(ctx: typer.Context, flags: dict) -> None:
    """A setting of another strategy given on the command line is a usage error, and so is a shared one the
    strategy never reads (one whose `needs` switch is off, `--no-screen --greedy-pool 4`, is refused by the
    strategy's own check, for the library too)."""
    from loramerge_cli.errors import UsageError
    from loramerge_cli.search.rundir import flag_name
    from loramerge_cli.search.strategies import (SHARED_SETTINGS, STRATEGIES, labelled_only, read_by,
                                                 strategy_named)

    strategy = flags["strategy"]
    own = {parameter.name for parameter in strategy_named(strategy).parameters}  # a resumed run's: checked
    for other in STRATEGIES.values():
        for parameter in other.parameters:
            source = ctx.get_parameter_source(parameter.name)
            if source is None or source.name == "DEFAULT":
                continue
            flag = f"--{parameter.name.replace('_', '-')}"
            if parameter.name not in own:
                raise UsageError(f"{flag} is a setting of --strategy {other.name}, not of {strategy}")
            if parameter.labelled and flags["fitness"] != "accuracy" and not flags["resume"]:  # given, even at its
                # default value (a run saved before this check resumes)
                raise UsageError(labelled_only(parameter, flags[parameter.name], flags["fitness"]))
    shared = {name for names in SHARED_SETTINGS.values() for name in names} | merger_option_names() | {"block_cache_mb"}
    for name in sorted(shared & foreign_options(strategy)):  # given, even at its default value (the library,
        source = ctx.get_parameter_source(name)  # which cannot tell, refuses one changed from its default)
        if source is not None and source.name != "DEFAULT" and not (name == "merger" and flags[name] == "ta"):
            # (--merger ta names the sum NSC weighs)
            raise UsageError(f"{flag_name(name)} does nothing with --strategy {strategy}{read_by(name)}")


def strategy_settings(flags: dict, strategy: str) -> dict:
    """The chosen strategy's own settings from the command line (`SearchRequest.options`)."""
    from loramerge_cli.search.strategies import strategy_named

    return {parameter.name: flags[parameter.name] for parameter in strategy_named(strategy).parameters}


@command_errors
def search_command(ctx: typer.Context, **flags) -> None:
    """Search a weight table: which (task, block) LoRA modules to drop before merging, scored on labelled
    validation data or label-free (surrogate, the default: single-unit screen, then Thompson sampling on a
    Bayesian model of unit and pair effects; screened: the same screen, then CMA-ES scoring on validation
    subsets first; ENMP: the paper's CMA-ES; greedy and random baselines on the same fitness and budget),
    or learn real coefficients per (task, module) from unlabeled inputs (NSC; merge --mask applies them)."""
    from loramerge_cli.search.plan import plan_search  # torch-free: a bad request is refused in a moment

    per_adapter_values(ctx, flags)
    dropped = _seed_a_recipe_gave_to_a_search_that_draws_nothing(ctx, flags)  # (before a resume compares it)
    flags = resumed_flags(ctx, flags)
    check_strategy_flags(ctx, flags)
    plan = plan_search(search_request(flags, command_line(ctx)), out=flags["out"], force=flags["force"],
                       plot=flags["plot"])
    from loramerge_cli import api
    from loramerge_cli.cli import render, render_nsc
    from loramerge_cli.cli.progress import ProgressDisplay

    print_warnings(human_console(flags["quiet"], flags["json_output"]), dropped)
    console = ProgressDisplay(flags["quiet"] or flags["json_output"])  # progress and logs: stderr
    coefficients = plan.strategy.kind == "coefficients"
    if coefficients:
        console.inner, summary = render_nsc.nsc_progress(console, flags["steps"]), render_nsc.nsc_summary
    elif flags["fitness"] == "nsc":
        console.inner = render_nsc.label_free_progress(console, flags["generations"])
        summary = render_nsc.label_free_summary
    else:
        rounds_budget = flags["budget"] or flags["popsize"] * flags["generations"]  # (greedy/random's default)
        console.inner = render.search_progress(console, flags["generations"], rounds_budget)
        summary = render.search_summary
    if plan.finished is not None:  # nothing to search: the finished run's table, to --out if not there yet
        console.print(f"the search in {flags['run_dir']} had already finished: nothing to resume; its table:",
                      highlight=False)
    with console:
        table, provenance = api.search(plan, console)
    if coefficients or flags["fitness"] == "nsc":  # (the labelled searches said theirs as they began)
        print_warnings(human_console(flags["quiet"], flags["json_output"]), provenance.get("warnings", []))
    if flags["json_output"]:  # (what the command dropped is in the document's warnings, not in the table)
        return emit_json({**table.to_json(), **({"warnings": dropped} if dropped else {})})
    result_console().print(summary(table, provenance))  # the result: stdout


def _seed_a_recipe_gave_to_a_search_that_draws_nothing(ctx: typer.Context, flags: dict) -> list[str]:
    """A recipe's seed (a merge recipe's, say) for a strategy and a merge that draw nothing (greedy, ties): dropped,
    with a warning, as merge drops it; typed on the command line it is refused by the plan."""
    def source(name: str) -> str:
        return getattr(ctx.get_parameter_source(name), "name", "")

    if source("seed") != "DEFAULT_MAP":
        return []
    from loramerge_cli.search.enmp_settings import EnmpSettings
    from loramerge_cli.search.rundir import read_config
    from loramerge_cli.search.strategies import STRATEGIES

    effective = dict(flags)  # on --resume, what the saved run used where the command line says nothing
    if flags["resume"] and flags["run_dir"] is not None:
        saved = (read_config(Path(flags["run_dir"])) or {}).get("flags")
        for name in ("strategy", "fitness", "merger", "method"):
            if isinstance(saved, dict) and name in saved and source(name) in ("", "DEFAULT"):
                effective[name] = saved[name]
    strategy = STRATEGIES.get(effective["strategy"])
    if effective["fitness"] != "accuracy":
        return []
    config = merge_config(effective)
    if strategy is None or strategy.draws or config.draws() or flags["seed"] == EnmpSettings.seed:
        return []
    flags["seed"] = EnmpSettings.seed
    return [f"the recipe's seed dropped: --strategy {strategy.name} and {config.method_name()} draw nothing"]


def resumed_flags(ctx: typer.Context, flags: dict) -> dict:
    """With --run-dir and --resume, the saved run's flags under the ones given now (which must equal them,
    bar where the table goes and how the search runs); then --adapters, --tasks and --out must be known."""
    if flags["resume"] and flags["run_dir"] is None:
        from loramerge_cli.errors import UsageError

        raise UsageError("--resume needs --run-dir (the folder of the search to continue)")
    if flags["resume"]:
        from loramerge_cli.search.rundir import resumed_flags as saved_flags

        sources = {name: ctx.get_parameter_source(name) for name in flags}  # typer vendors click: compare names
        given = [name for name, value in flags.items()
                 if value is not None and sources[name] is not None and sources[name].name != "DEFAULT"]
        _check_own_settings_of_the_saved_strategy(ctx, flags, given)
        saved = saved_flags(flags["run_dir"], given, flags)
        if saved is None and not flags["adapters"]:
            from loramerge_cli.errors import LoramergeError
            from loramerge_cli.search.rundir import read_config

            if read_config(Path(flags["run_dir"])) is not None:  # a search the library started: no flags saved
                raise LoramergeError(f"--resume: {flags['run_dir']} holds a search started from the library, which "
                                     "saves no command-line flags: give its settings as flags with --resume")
            raise LoramergeError(f"--resume: {flags['run_dir']} holds no search to resume")
        flags = saved or flags
    for name in ("adapters", "tasks", "out"):
        if not flags[name]:
            raise typer.BadParameter(f"missing (needed {RESUME_ONLY})", param_hint=f"'--{name}'")
    return flags


def _check_own_settings_of_the_saved_strategy(ctx: typer.Context, flags: dict, given: list[str]) -> None:
    """On resume without --strategy, another strategy's setting given now is named as that (the saved flags hold
    every setting, another strategy's at its default: "--eta is 2 but the saved run used 3" read as if it ran)."""
    from loramerge_cli.search.rundir import read_config
    from loramerge_cli.search.strategies import STRATEGIES

    saved = ((read_config(Path(flags["run_dir"])) or {}).get("flags") or {}).get("strategy")
    if "strategy" not in given and isinstance(saved, str) and saved in STRATEGIES:
        check_strategy_flags(ctx, {**flags, "strategy": saved})


def search_request(flags: dict, command: str):
    """The SearchRequest of the command line (flag values checked here, the rest by plan_search)."""
    from dataclasses import fields

    from loramerge_cli.cli.common import parse_names
    from loramerge_cli.evaluation.settings import EvalSettings
    from loramerge_cli.search.enmp_settings import EnmpSettings
    from loramerge_cli.search.nsc_settings import NscSettings
    from loramerge_cli.search.plan import SearchRequest
    from loramerge_cli.search.rundir import normal_flags

    spread, threads = resolve_backend(flags["device"], flags["devices"], flags["workers"], flags["threads"],
                                      flags["backend"], flags["ray_address"])
    seed = flags["seed"]
    return SearchRequest(
        adapters=flags["adapters"], merge=merge_config(flags), tasks=flags["tasks"],
        eval=EvalSettings(val_limit=flags["val_limit"], device=flags["device"], dtype=flags["eval_dtype"],
                          batch_size=flags["batch_size"], threads=threads, block_cache_mb=flags["block_cache_mb"],
                          max_length=flags["max_length"]),
        lambda_auto=flags["lam"] == "auto", base=flags["base"], allow_base_mismatch=flags["allow_base_mismatch"],
        allow_pickle=flags["allow_pickle"], strategy=flags["strategy"], fitness=flags["fitness"],
        options=strategy_settings(flags, flags["strategy"]),
        enmp=EnmpSettings(**{field.name: flags[field.name] for field in fields(EnmpSettings) if field.name in flags}),
        nsc=NscSettings(steps=flags["steps"], lr=flags["lr"], init=flags["init"], batch_size=flags["batch_size"],
                        seed=seed, objective=flags["objective"],
                        target_blocks=parse_names(flags["target_blocks"], "--target-blocks"),
                        target_modules=parse_names(flags["target_modules"], "--target-modules")),
        budget=flags["budget"], sparsity=flags["sparsity"], run_dir=flags["run_dir"], resume=flags["resume"],
        report_test=flags["report_test"], devices=spread.devices, backend=spread.name,
        ray_address=spread.address, command=command, flags=normal_flags(flags),
    )


def merger_option_names() -> set[str]:
    """The merger options' names (--merger, --lambda as `lam`, every method parameter, …)."""
    return {parameter.name for parameter in merger_options("ta", tables=False)}


TABLE_SCORING = frozenset({"workers", "devices", "backend", "ray_address", "plot", "block_cache_mb"})  # (masks)


def foreign_options(strategy: str) -> set[str]:
    """The options of other strategies that `strategy` never reads (its help leaves them out): their own settings
    and the shared ones it does not use (a mask strategy reads the label-free objective's, for --fitness nsc)."""
    from loramerge_cli.search.strategies import NSC_OBJECTIVE, STRATEGIES

    owners: dict[str, set[str]] = {}
    merger_names = merger_option_names()
    for candidate in STRATEGIES.values():
        names = {p.name for p in candidate.parameters} | set(candidate.uses)
        names |= NSC_OBJECTIVE | merger_names if candidate.kind == "mask" else set()  # (coefficients: a
        # task-arithmetic sum of their own)
        for name in names:
            owners.setdefault(name, set()).add(candidate.name)
    foreign = {name for name, owned_by in owners.items() if strategy not in owned_by}
    if STRATEGIES[strategy].kind == "coefficients":  # one model on one device, trained: no tables to spread,
        foreign |= TABLE_SCORING | {"fitness"}  # replay or plot; it is its own label-free fitness
    return foreign


def _strategy_in(args: list[str]) -> str | None:
    """The value of `--strategy` in raw arguments, if one is given."""
    for index, arg in enumerate(args):
        if arg == "--strategy" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--strategy="):
            return arg.partition("=")[2]
    return None


class SearchMaskCommand(TyperCommand):
    """search-mask, whose `--help` after `--strategy NAME` lists only the options NAME reads."""

    def parse_args(self, ctx, args):
        from loramerge_cli.search.strategies import STRATEGIES

        strategy = _strategy_in(args)
        if strategy not in STRATEGIES or not {"-h", "--help"} & set(args):
            return super().parse_args(ctx, args)
        foreign = foreign_options(strategy)
        hidden = [param for param in self.params if not getattr(param, "hidden", True) and param.name in foreign]
        for param in hidden:
            param.hidden = True
        try:
            return super().parse_args(ctx, args)  # --help is eager: it prints (and exits) in here
        finally:
            for param in hidden:
                param.hidden = False


def register(app: typer.Typer) -> None:
    """Add `search-mask`, its merger options generated from the method registry as it is now."""
    command = with_options(adapter_options(required=RESUME_ONLY), merger_options("ta", tables=False), search_options(),
                           output_options())
    app.command("search-mask", epilog=EPILOG, cls=SearchMaskCommand)(command(search_command))
