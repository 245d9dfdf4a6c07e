"""`loramerge search-mask`: find which (task, block) LoRA modules to prune before merging (ENMP), or
learn one merge coefficient per (task, module) from unlabeled inputs (NSC)."""

from __future__ import annotations

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
from loramerge_cli.cli.merge_cmd import MERGERS, _lambda_value
from loramerge_cli.errors import LoramergeError

EPILOG = examples_epilog(
    "loramerge search-mask --adapters a/ b/ c/ --merger knots --tasks tasks.yaml --out mask.json",
    "loramerge search-mask --adapters a/ b/ c/ --merger ta --lambda auto --tasks tasks.yaml --popsize 8 "
    "--generations 15 --val-limit 256 --run-dir runs/ta --out mask.json",
    "loramerge search-mask --adapters a/ b/ c/ --merger ta --tasks tasks.yaml --run-dir runs/ta --resume "
    "--out mask.json",
    "loramerge search-mask --adapters a/ b/ c/ --merger ties --tasks tasks.yaml --strategy greedy --out greedy.json",
    "loramerge merge --adapters a/ b/ c/ --mask mask.json --out merged/",
    "loramerge search-mask --adapters a/ b/ c/ --tasks inputs.yaml --strategy nsc --out coeffs.json",
    "loramerge search-mask --adapters a/ b/ c/ --tasks inputs.yaml --strategy nsc --target-blocks 9,10,11 "
    "--target-modules out_proj --steps 100 --out coeffs.json",
    "loramerge merge --adapters a/ b/ c/ --mask coeffs.json --merger ta --out merged/",
    "loramerge search-mask --adapters a/ b/ c/ --merger ta --tasks inputs.yaml --fitness nsc --out mask.json",
)


@command_errors
def search_command(
    ctx: typer.Context,
    adapters: Annotated[list[str], typer.Option("--adapters", help=ADAPTERS_HELP, show_default=False)],
    tasks: Annotated[Path, typer.Option("--tasks", help="Task spec YAML with validation splits.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Weight table JSON to write.", show_default=False)],
    merger: Annotated[str, typer.Option("--merger", help=f"Preset or method: {', '.join(MERGERS)}.")] = "ta",
    method: Annotated[str | None, typer.Option("--method", help="Override the preset's method.")] = None,
    space: Annotated[str | None, typer.Option("--space", help="Override the space: full, knots or core.")] = None,
    lam: Annotated[str | None, typer.Option(
        "--lambda", help="λ of the merge: a number, or 'auto' (tuned on validation first). [default: the method's]",
        show_default=False)] = None,
    weights: Annotated[str | None, typer.Option("--weights", help="Per-adapter weights w1,w2,...")] = None,
    density: Annotated[float | None, typer.Option(
        "--density", help="Trim density (ties, magnitude, dare_ties).")] = None,
    drop_rate: Annotated[float | None, typer.Option("--drop-rate", help="DARE drop rate.")] = None,
    scope: Annotated[Literal["module", "adapter"] | None, typer.Option("--scope", help="Trim scope.")] = None,
    knots_scaled: Annotated[bool | None, typer.Option(
        "--knots-scaled/--no-knots-scaled", help="knots space: scale components by S.", show_default=False)] = None,
    strategy: Annotated[Literal["screened", "enmp", "greedy", "random", "nsc"], typer.Option(
        "--strategy", help="screened (every single-unit pruning scored first, then CMA-ES from that prior, new "
        "tables only, successive halving on validation subsets), enmp (the paper's CMA-ES), greedy "
        "(leave-one-out), random (best of N), nsc (learn one coefficient per task and module by gradient descent "
        "on unlabeled inputs).")] = "screened",
    screen: Annotated[bool, typer.Option(
        "--screen/--no-screen", help="screened: score every single-unit pruning first and start CMA-ES from it.")
    ] = True,
    redraws: Annotated[int, typer.Option(
        "--redraws", help="screened: redraws of a candidate whose table was already scored (0: off).")] = 20,
    fidelity: Annotated[bool, typer.Option(
        "--halving/--no-halving", help="screened: score new tables on seeded validation subsets first "
        "(successive halving); the result's fitness is always the full set's.")] = True,
    eta: Annotated[int, typer.Option(
        "--eta", help="screened: successive halving keeps the best 1/eta per subset; subsets n/eta, n/eta².")] = 3,
    fitness: Annotated[Literal["accuracy", "nsc"], typer.Option(
        "--fitness", help="enmp/greedy/random: labelled validation accuracy, or nsc: % reduction of the label-free "
        "--objective loss (no labels read).")] = "accuracy",
    objective: Annotated[Literal["nsc", "entropy"], typer.Option(
        "--objective", help="Label-free loss: nsc (null-space ratio at the targets) or entropy (AdaMerging: "
        "mean prediction entropy; classification tasks).")] = "nsc",
    steps: Annotated[int, typer.Option("--steps", help="nsc: AdamW steps.")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="nsc: AdamW learning rate (weight decay 0.01).")] = 1e-3,
    init: Annotated[float, typer.Option(
        "--init", help="nsc: starting value of every coefficient (the paper's 0.4; 1/T starts from ta's "
        "default λ).")] = 0.4,
    target_blocks: Annotated[str | None, typer.Option(
        "--target-blocks", help="nsc: blocks the ratio is measured in: indices (9,10,11) or unit prefixes. "
        "[default: the last quarter of the blocks with LoRA]", show_default=False)] = None,
    target_modules: Annotated[str | None, typer.Option(
        "--target-modules", help="nsc: module names in those blocks (o_proj,out_proj), matched on whole path "
        "components; v_proj is the paper's choice for decoder LMs (README, label-free table). [default: the "
        "attention output projection, else the last LoRA attention module]",
        show_default=False)] = None,
    max_prune: Annotated[float, typer.Option("--max-prune", help="ρ: at most ⌊ρ·units·tasks⌋ pruned.")] = 0.2,
    popsize: Annotated[int, typer.Option("--popsize", help="CMA-ES population size.")] = 16,
    generations: Annotated[int, typer.Option("--generations", help="CMA-ES generations.")] = 60,
    sigma0: Annotated[float, typer.Option("--sigma0", help="CMA-ES initial step size.")] = 0.5,
    threshold: Annotated[float, typer.Option("--threshold", help="θ: latent values above it prune.")] = 0.0,
    addscale: Annotated[bool, typer.Option("--addscale", help="Also search λ (one extra gene).")] = False,
    budget: Annotated[int | None, typer.Option(
        "--budget", help="greedy/random: distinct evaluations [default: popsize·generations]; screened: stop "
        "after this many distinct full-set evaluations.",
        show_default=False)] = None,
    sparsity: Annotated[float | None, typer.Option(
        "--sparsity", help="random: fraction of units pruned. [default: max-prune/2]", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed (>= 1) of CMA-ES, random masks and DARE.")] = 1,
    val_limit: Annotated[int | None, typer.Option("--val-limit", help="Validation examples per task.")] = None,
    device: Annotated[str, typer.Option("--device", help="Torch device of a serial search.")] = "cpu",
    devices: Annotated[str | None, typer.Option(
        "--devices", help="Comma-separated devices, one worker process each (cuda:0,cuda:1).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="CPU worker processes.")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="Torch threads per process (the same in every process). "
        "[default: min(8, CPUs); CPUs / N with --workers N]",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Evaluation batch size; nsc: examples per task and step.")] = 16,
    eval_dtype: Annotated[str, typer.Option("--eval-dtype", help="Dtype of the evaluated model.")] = "float32",
    block_cache_mb: Annotated[float, typer.Option(
        "--block-cache-mb", help="MB of the unpruned merge's block outputs kept so that each candidate's "
        "forward pass starts at its first changed block (same scores; 0: off).")] = 1024,
    run_dir: Annotated[Path | None, typer.Option(
        "--run-dir", help="Checkpoints every generation (state, trajectory.jsonl, best table).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the search saved in --run-dir (its CMA-ES state is a pickle: resume only "
        "run directories you made).")] = False,
    report_test: Annotated[bool, typer.Option(
        "--report-test", help="Also score the result on the test split.")] = False,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Write fitness.png and mask.png to this folder (needs the plot extra).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model id or path.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    allow_base_mismatch: Annotated[bool, typer.Option("--allow-base-mismatch", help=ALLOW_BASE_MISMATCH_HELP)] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP)] = False,
    config: Annotated[Path | None, typer.Option(
        "--config", help=CONFIG_HELP, is_eager=True, callback=load_config_defaults)] = None,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help=QUIET_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False,
) -> None:
    """Search a weight table: which (task, block) LoRA modules to drop before merging, scored on labelled
    validation data or label-free (ENMP: CMA-ES; greedy and random baselines on the same fitness and budget),
    or learn real coefficients per (task, module) from unlabeled inputs (NSC; merge --mask applies them)."""
    if seed < 1:
        raise LoramergeError("--seed must be >= 1 (pycma reads 0 as 'seed from the clock')")
    if strategy == "nsc" and plot is not None:
        raise LoramergeError("--plot draws search curves and masks; --strategy nsc has neither")
    if out.exists() and not force:
        raise LoramergeError(f"{out} exists; pass --force to replace it")
    if devices and workers:
        raise LoramergeError("give --devices or --workers, not both")
    device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
    if workers is not None:
        if workers < 1:
            raise LoramergeError("--workers must be >= 1")
        device_list = [device] * workers
        if threads is None:  # share the cores instead of oversubscribing them; every process uses the same count
            import os

            threads = max(1, (os.cpu_count() or 1) // workers)
    lam_value = _lambda_value(lam)
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search.enmp import EnmpSettings
    from loramerge_cli.search.nsc import NscSettings
    from loramerge_cli.search.runner import SearchRequest, run_search
    from loramerge_cli.search.screened import ScreenedSettings

    request = SearchRequest(
        adapters=adapters,
        merge=MergeConfig(merger=merger, method=method, space=space,
                          lam=None if lam_value in (None, "auto") else lam_value,
                          weights=parse_float_list(weights, "--weights"), density=density, drop_rate=drop_rate,
                          scope=scope, knots_scaled=knots_scaled, seed=seed),
        tasks=tasks,
        eval=EvalSettings(val_limit=val_limit, device=device, dtype=eval_dtype, batch_size=batch_size,
                          threads=threads, block_cache_mb=block_cache_mb),
        lambda_auto=lam_value == "auto",
        base=base,
        allow_base_mismatch=allow_base_mismatch,
        allow_pickle=allow_pickle,
        strategy=strategy,
        enmp=EnmpSettings(max_prune=max_prune, popsize=popsize, generations=generations, sigma0=sigma0,
                          threshold=threshold, seed=seed, addscale=addscale),
        screened=ScreenedSettings(max_prune=max_prune, popsize=popsize, generations=generations, sigma0=sigma0,
                                  threshold=threshold, seed=seed, screen=screen, redraws=redraws, fidelity=fidelity,
                                  eta=eta, budget=budget),
        fitness=fitness,
        nsc=NscSettings(steps=steps, lr=lr, init=init, batch_size=batch_size, seed=seed, objective=objective,
                        target_blocks=_names(target_blocks), target_modules=_names(target_modules)),
        budget=budget,
        sparsity=sparsity,
        run_dir=run_dir,
        resume=resume,
        report_test=report_test,
        devices=device_list,
        command=command_line(ctx),
    )
    console = human_console(quiet, json_output)
    from loramerge_cli.cli import render, render_nsc

    if strategy == "nsc":
        progress, summary = render_nsc.nsc_progress(console, steps), render_nsc.nsc_summary
    elif fitness == "nsc":
        progress, summary = render_nsc.label_free_progress(console, generations), render_nsc.label_free_summary
    else:
        progress, summary = render.search_progress(console, generations), render.search_summary
    table, provenance = run_search(request, progress)
    table.save(out)
    if run_dir is not None:
        table.save(Path(run_dir) / "best.json")
    if plot is not None:
        from loramerge_cli.search.plots import write_plots

        write_plots(table, provenance["history"], plot)
    if json_output:
        emit_json(table.to_json())
        return
    console.print(summary(table, provenance))


def _names(text: str | None) -> list[str] | None:
    """A comma-separated flag value as a list (None when not given)."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise LoramergeError("--target-blocks / --target-modules: give at least one name")
    return names


def register(app: typer.Typer) -> None:
    app.command("search-mask", epilog=EPILOG)(search_command)
