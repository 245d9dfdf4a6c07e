"""Does the NSC premise hold on the bundled example? The null-space ratio at NSC's targets, per task.

NSC (docs/algorithms.md, NSC) assumes that fine-tuning compresses the null space of each adapter's down-projection A
(the task's expert sees a lower ratio than the base does) and that a lower ratio in the merged model
means higher accuracy. This script measures, on the validation inputs of the text setting, the mean
ratio ω_k of every task k (its own A_k, its own inputs) for: the base (all coefficients 0), `ta` at
λ = 1/T and at NSC's starting point 0.4, each expert alone (λ_k = 1, the rest 0), and, with `--table`,
learned coefficients (a `search-mask --strategy nsc` output). Label-free: no label is read.

    python -m examples.nsc_premise [--target-blocks 0,1,2,3] [--target-modules o_proj] [--table coeffs.json]
                                   [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def task_ratios(problem, side_path, coefficients) -> list[float]:
    """Mean ω_k per task over all of the task's inputs, with the given coefficients (tasks × modules)."""
    import torch

    from loramerge_cli.search.nsc import task_losses

    with torch.no_grad():
        side_path.coefficients.copy_(coefficients)
    return task_losses(problem, side_path, batch_size=64)


def measure(setting: Path, target_blocks: list[str] | None, table: Path | None, val_limit: int,
            target_modules: list[str] | None = None) -> dict:
    import torch

    from examples.main_job import adapter_args
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.evaluation.functional import SidePath
    from loramerge_cli.masks import load_table
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search.nsc import NscSettings, build_nsc_problem
    from loramerge_cli.search.runner import SearchRequest

    tasks_file = setting / "tasks.yaml"
    request = SearchRequest(
        adapters=adapter_args(setting, tasks_file), merge=MergeConfig(merger="ta"), tasks=tasks_file,
        eval=EvalSettings(split="validation", val_limit=val_limit, threads=1), strategy="nsc",
        nsc=NscSettings(target_blocks=target_blocks, target_modules=target_modules),
    )
    problem = build_nsc_problem(request)
    engine = problem.engine
    side_path = SidePath(engine.modules, problem.adapters, problem.paths, engine.device, engine.dtype, 0.0)
    shape = side_path.coefficients.shape
    task_count = len(problem.adapters)
    rows = {
        "base": task_ratios(problem, side_path, torch.zeros(shape)),
        f"ta, λ = 1/T = {1 / task_count:.3g}": task_ratios(problem, side_path, torch.full(shape, 1 / task_count)),
        "ta, λ = 0.4 (NSC's start)": task_ratios(problem, side_path, torch.full(shape, 0.4)),
    }
    experts = []
    for index in range(task_count):
        alone = torch.zeros(shape)
        alone[index] = 1.0
        experts.append(task_ratios(problem, side_path, alone)[index])
    rows["each expert alone"] = experts
    if table is not None:
        weights = load_table(table)
        learned = torch.tensor([[weights.weight(task, path) for path in problem.paths] for task in range(task_count)])
        rows[f"coefficients of {table.name}"] = task_ratios(problem, side_path, learned)
    return {"targets": problem.targets, "tasks": [a.name for a in problem.adapters], "rows": rows}


def main(argv=None):
    from rich.console import Console
    from rich.table import Table

    from examples.bundled.build import DEFAULT_OUT, build

    from examples.arguments import at_least, output_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--target-blocks", help="comma-separated block indices (default: NSC's, the last quarter)")
    parser.add_argument("--target-modules", help="comma-separated module names (default: NSC's, v_proj here)")
    parser.add_argument("--table", type=Path, help="a coefficient table to measure too")
    parser.add_argument("--val-limit", type=at_least(1), default=256)
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    build(args.out, log=console.log)
    blocks = args.target_blocks.split(",") if args.target_blocks else None
    modules = args.target_modules.split(",") if args.target_modules else None
    result = measure(args.out / "text", blocks, args.table, args.val_limit, modules)
    table = Table(title=f"mean null-space ratio ω_k at {', '.join(result['targets'])} (validation inputs; lower = "
                  "more of the input inside A_k's row space)", title_justify="left")
    table.add_column("coefficients")
    for task in result["tasks"]:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right")
    for label, values in result["rows"].items():
        table.add_row(label, *(f"{v:.3f}" for v in values), f"{sum(values) / len(values):.3f}")
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
