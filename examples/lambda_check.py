"""Does `--lambda auto` reach the optimum? On the bundled example, for every merger: the λ the auto grid
picks against the best λ of a fine grid (0.05, 0.10, …, 2.0), both on the validation split.

The gap is measured in examples: for each task, how many more validation examples the best fine-grid λ
gets right than the picked λ; the check passes when that is at most one example on every task's
normalized-accuracy scale (mean normalized accuracy within the mean, over tasks, of one example's worth
100 / (n_t · expert accuracy_t)).

    python -m examples.lambda_check [--setting text,image] [--mergers ta,ties,…] [--val-limit 256] [--threads 1]
                                    [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FINE_GRID = [round(0.05 * step, 2) for step in range(1, 41)]


def check_merger(adapters, merger: str, engine, experts) -> dict:
    """The auto grid's choice and the fine grid's best for one merger, scored by one engine."""
    from loramerge_cli.evaluation.engine import merged_deltas, scale_deltas
    from loramerge_cli.evaluation.metrics import mean_defined, normalized_accuracy
    from loramerge_cli.evaluation.tuning import best_lambda, grid_search
    from loramerge_cli.merging.merge import MergeConfig, merge, resolve_config

    default = resolve_config(MergeConfig(merger=merger), len(adapters)).lam
    unit = merged_deltas(merge(adapters, MergeConfig(merger=merger, lam=1.0)))
    scored: dict[float, dict] = {}

    def record(lam: float) -> dict:
        if lam not in scored:
            accuracy = engine.evaluate(scale_deltas(unit, lam))
            normalized, _ = normalized_accuracy(accuracy, experts)
            scored[lam] = {"lambda": lam, "accuracy": accuracy, "mean_normalized_accuracy": mean_defined(normalized)}
        return scored[lam]

    auto_points = []

    def mean_at(lam, stage):
        auto_points.append(lam)
        return record(lam)["mean_normalized_accuracy"]

    picked, warnings = grid_search(mean_at, default)
    fine_best = best_lambda([record(lam) for lam in FINE_GRID], default)
    sizes = {task: len(engine.examples[task]) for task in experts}
    gap_examples = {task: round((scored[fine_best]["accuracy"][task] - scored[picked]["accuracy"][task]) * size)
                    for task, size in sizes.items()}
    one_example = sum(100 / (sizes[t] * experts[t]) for t in experts if experts[t] > 0) / len(experts)
    gap = scored[fine_best]["mean_normalized_accuracy"] - scored[picked]["mean_normalized_accuracy"]
    return {"merger": merger, "default": default, "picked": picked, "picked_score": record(picked)[
        "mean_normalized_accuracy"], "auto_evaluations": len(auto_points), "fine_best": fine_best,
        "fine_best_score": scored[fine_best]["mean_normalized_accuracy"], "gap": gap,
        "one_example_per_task": one_example, "gap_examples_per_task": gap_examples,
        "within_one_example": gap <= one_example + 1e-9, "warnings": warnings}


def main(argv=None):
    import torch
    from rich.console import Console
    from rich.table import Table

    from examples.bundled.build import DEFAULT_OUT
    from examples.main_job import MERGERS, bundled_setting
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.evaluation.engine import EvalSettings, Evaluator
    from loramerge_cli.evaluation.specs import load_task_file

    from examples.arguments import at_least, merger_list, names_of, output_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--setting", type=names_of(("text", "image"), "setting"), default="text,image")
    parser.add_argument("--mergers", type=merger_list, default=",".join(MERGERS))
    parser.add_argument("--val-limit", type=at_least(1), default=256, help="validation examples per task (main_job's)")
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = []
    for setting in args.setting.split(","):
        tasks_file, _, adapters = bundled_setting(args.out, console.log, setting)
        settings = EvalSettings(split="validation", val_limit=args.val_limit, threads=args.threads, batch_size=32)
        engine = Evaluator(load_task_file(tasks_file), adapters, settings)
        experts = expert_scores(engine, ScoreCache())
        for merger in args.mergers.split(","):
            results.append({"setting": setting, **check_merger(adapters, merger, engine, experts)})
            row = results[-1]
            console.log(f"{setting} {merger}: auto λ {row['picked']:g} ({row['picked_score']:.2f}), fine best "
                        f"{row['fine_best']:g} ({row['fine_best_score']:.2f}), gap {row['gap']:.3f} "
                        f"(one example per task: {row['one_example_per_task']:.3f})")
    seconds = time.perf_counter() - started
    table = Table(title=f"--lambda auto against a fine grid (0.05 steps to 2.0), validation, {seconds:.0f} s",
                  title_justify="left")
    for column in ("setting", "merger", "default λ", "auto λ", "auto score", "evaluations", "fine best λ",
                   "fine score", "gap", "1 example/task", "examples behind per task", "ok"):
        table.add_column(column, justify="left" if column in ("setting", "merger") else "right")
    for row in results:
        table.add_row(row["setting"], row["merger"], f"{row['default']:.3g}", f"{row['picked']:g}",
                      f"{row['picked_score']:.2f}", str(row["auto_evaluations"]), f"{row['fine_best']:g}",
                      f"{row['fine_best_score']:.2f}", f"{row['gap']:.2f}", f"{row['one_example_per_task']:.2f}",
                      " ".join(str(value) for value in row["gap_examples_per_task"].values()),
                      "yes" if row["within_one_example"] else "NO")
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "seconds": seconds}, indent=1))


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
