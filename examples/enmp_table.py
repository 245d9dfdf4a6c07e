"""ENMP against its baselines on the bundled example's text setting (issue 5's table).

For each merger (ta, ties, knots, core) at its tuned λ (`--lambda auto`), on the same fitness and
budget: ENMP, ENMP with `--addscale`, greedy leave-one-out pruning and random masks at ENMP's sparsity
(same number of evaluations), each over several seeds; validation fitness and test mean normalized
accuracy, against the unpruned merge.

    python -m examples.enmp_table [--seeds 1,2,3] [--popsize 16] [--generations 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MERGERS = ("ta", "ties", "knots", "core")


def run_merger(merger, adapters, tasks_file, validation, test, seeds, budget, log) -> dict:
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.evaluation.tuning import tune_lambda
    from loramerge_cli.masks import ones_table
    from loramerge_cli.merging.merge import MergeConfig, resolve_config
    from loramerge_cli.search.baselines import greedy_search, random_search
    from loramerge_cli.search.decode import max_pruned
    from loramerge_cli.search.enmp import EnmpSearch, EnmpSettings
    from loramerge_cli.search.fitness import AccuracyFitness

    lam, _ = tune_lambda(adapters, MergeConfig(merger=merger), None, tasks_file, evaluator=validation)
    settings = resolve_config(MergeConfig(merger=merger, lam=lam), len(adapters))
    template = ones_table(adapters)
    fitness = AccuracyFitness(adapters, settings, template, validation, expert_scores(validation, ScoreCache()))
    test_fitness = AccuracyFitness(adapters, settings, template, test, expert_scores(test, ScoreCache()))
    units, tasks = len(template.units), len(adapters)
    k_max = max_pruned(budget["max_prune"], units, tasks)
    row = {"merger": merger, "lambda": lam, "unpruned": {"validation": fitness.reference,
                                                         "test": test_fitness.reference}}

    def outcome(best, evaluations):
        lam_used = best.lam if best.lam is not None else None
        return {"fitness": best.fitness, "pruned": len(best.pruned), "evaluations": evaluations,
                "test": test_fitness.score(best.pruned, lam_used), "lambda": best.lam}

    runs = {"enmp": [], "enmp_addscale": [], "greedy": [], "random": []}
    for seed in seeds:
        for key, addscale in (("enmp", False), ("enmp_addscale", True)):
            enmp = EnmpSettings(popsize=budget["popsize"], generations=budget["generations"], seed=seed,
                                max_prune=budget["max_prune"], addscale=addscale)
            search = EnmpSearch(enmp, units, tasks, fitness, base_lambda=lam)
            best = search.run()
            runs[key].append(outcome(best, len(search.state.memo) - 1))
        enmp_run = runs["enmp"][-1]
        count = max(1, enmp_run["pruned"])
        ledger = random_search(fitness, units * tasks, count, enmp_run["evaluations"], seed)
        runs["random"].append(outcome(ledger.best(), len(ledger.memo) - 1))
        log(f"{merger} seed {seed}: ENMP {enmp_run['fitness']:+.2f} ({enmp_run['pruned']} pruned), "
            f"random {runs['random'][-1]['fitness']:+.2f}, addscale {runs['enmp_addscale'][-1]['fitness']:+.2f}")
    ledger = greedy_search(fitness, units * tasks, k_max, budget["popsize"] * budget["generations"])
    runs["greedy"].append(outcome(ledger.best(), len(ledger.memo) - 1))  # deterministic: one run
    row["runs"] = runs
    row["mean"] = {
        key: {field: statistics.mean(run[field] for run in values)
              for field in ("fitness", "test", "pruned", "evaluations")}
        for key, values in runs.items()
    }
    return row


def render(rows: list[dict], seeds, budget, seconds):
    from rich.table import Table

    table = Table(title=f"ENMP vs baselines, text setting; mean over seeds {list(seeds)}; budget popsize "
                  f"{budget['popsize']} × {budget['generations']} generations, {budget['val_limit']} validation "
                  f"examples per task; {seconds:.0f} s", title_justify="left")
    table.add_column("merger")
    table.add_column("λ", justify="right")
    table.add_column("unpruned val / test", justify="right")
    for key in ("enmp", "enmp_addscale", "greedy", "random"):
        table.add_column(f"+{key.replace('_', ' ')} Δval / test (pruned; evaluations)", justify="right")
    for row in rows:
        cells = [row["merger"], f"{row['lambda']:.3g}",
                 f"{row['unpruned']['validation']:.1f} / {row['unpruned']['test']:.1f}"]
        for key in ("enmp", "enmp_addscale", "greedy", "random"):
            mean = row["mean"][key]
            cells.append(f"{mean['fitness']:+.2f} / {mean['test']:.1f} "
                         f"({mean['pruned']:.1f}; {mean['evaluations']:.0f})")
        table.add_row(*cells)
    return table


def table_parser(description: str, threads: int, searches: bool = True) -> argparse.ArgumentParser:
    """The options every search table on the bundled text setting shares (`searches`: also the seeds and the
    search settings, for the scripts that run searches)."""
    from examples.arguments import at_least, fraction, integer_list, merger_list, output_file
    from examples.bundled.build import DEFAULT_OUT

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--mergers", type=merger_list, default=",".join(MERGERS))
    if searches:
        parser.add_argument("--seeds", type=integer_list, default="1,2,3")
        parser.add_argument("--popsize", type=at_least(2), default=16)
        parser.add_argument("--max-prune", type=fraction, default=0.2)
    parser.add_argument("--val-limit", type=at_least(1), default=256)
    parser.add_argument("--threads", type=at_least(1), default=threads)
    parser.add_argument("--json", type=output_file)
    return parser


def text_evaluators(args, log):
    """The bundled text setting (built if needed): its task spec, adapters, and validation (first
    --val-limit examples per task) and test evaluators."""
    import torch

    from examples.main_job import bundled_setting
    from loramerge_cli.evaluation.engine import EvalSettings, Evaluator
    from loramerge_cli.evaluation.specs import load_task_file

    torch.set_num_threads(args.threads)
    tasks_file, _, adapters = bundled_setting(args.out, log)
    settings = EvalSettings(split="validation", val_limit=args.val_limit, threads=args.threads, batch_size=32)
    validation = Evaluator(load_task_file(tasks_file), adapters, settings)
    test = Evaluator(load_task_file(tasks_file), adapters, replace(settings, split="test", val_limit=None))
    return tasks_file, adapters, validation, test


def main(argv=None):
    from rich.console import Console

    from examples.arguments import at_least

    parser = table_parser(__doc__.split("\n\n")[0], threads=2)
    parser.add_argument("--generations", type=at_least(1), default=15)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    started = time.perf_counter()
    tasks_file, adapters, validation, test = text_evaluators(args, console.log)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    budget = {"popsize": args.popsize, "generations": args.generations, "max_prune": args.max_prune,
              "val_limit": args.val_limit}
    rows = [run_merger(merger, adapters, tasks_file, validation, test, seeds, budget, console.log)
            for merger in args.mergers.split(",")]
    seconds = time.perf_counter() - started
    Console(width=160).print(render(rows, seeds, budget, seconds))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "budget": budget, "seeds": seeds, "seconds": seconds},
                                        indent=1, default=str))


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
