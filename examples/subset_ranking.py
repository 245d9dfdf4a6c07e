"""How well a validation subset ranks pruning tables: the limit of successive halving on the bundled example.

Successive halving promotes the best third of a generation's tables from a subset of each task's
validation examples (the seeded prefixes the screened search uses: 29 and 86 of 256 here). This scores a
fixed set of tables once on the full validation set, keeping every example's output, and asks how a
subset ranks them against their full-set fitness:

- the groups: the 32 single-unit prunings (what the screen scores), 40 tables of 6 units drawn from the 16
  best singles (what CMA-ES draws after the screen), 40 tables of the 4 best singles plus 2 others (a
  greedy neighbourhood);
- the subset scores: accuracy (what the search uses), and three smooth scores of the same examples that
  count every example's change, not only those that flip: the probability of the label, its log, and the
  margin of the label's score over the best other class;
- per group, subset size and score, over 20 subset seeds: Spearman ρ with the full-set fitness, how often
  the best table is in the subset's best third, and the full-set points lost by keeping only that third;
- per merger, over all its tables, what a subset would have to see: how many examples change correctness
  in a table against the unpruned merge, its net gain in examples, the share of examples that change in
  some table, and how many of those changes lie in the half of the examples nearest the unpruned merge's
  decision boundary (smallest margin), the one cheap rule that could pick them in advance.

    python -m examples.subset_ranking [--mergers ta,ties,knots,core] [--lambdas ta=0.275,...] [--threads 2]
"""

from __future__ import annotations

import math
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCORES = ("accuracy", "probability", "log_probability", "margin")
LAMBDAS = {"ta": 0.275, "ties": 0.6, "knots": 0.65, "core": 0.35}  # the search tables' tuned λ


def example_outputs(engine, deltas) -> dict:
    """Per task, per example: whether it is right, and the smooth scores of its label (numpy arrays)."""
    import torch

    outputs = {}
    with engine.apply(deltas):
        for task, examples in engine.examples.items():
            scores = engine.scores(task).double()
            masked = engine.task_file.task(task).masked_labels
            if masked:
                scores[:, list(masked)] = float("-inf")
            labels = torch.tensor(examples.labels)[:, None]
            log_probability = torch.log_softmax(scores, -1).gather(1, labels)[:, 0]
            others = scores.scatter(1, labels, float("-inf")).max(-1).values
            outputs[task] = {"accuracy": (scores.argmax(-1) == labels[:, 0]).double().numpy(),
                             "probability": log_probability.exp().numpy(),
                             "log_probability": log_probability.numpy(),
                             "margin": (scores.gather(1, labels)[:, 0] - others).numpy()}
    return outputs


def subset_fitness(outputs, reference, experts, score: str, keep: dict | None = None) -> float:
    """Mean over tasks of the score's change from the unpruned merge on the examples `keep` (all when None);
    accuracy and probability normalized by the expert's accuracy, in points, as the search's fitness is."""
    changes = []
    for task, values in outputs.items():
        rows = slice(None) if keep is None else keep[task]
        change = values[score][rows].mean() - reference[task][score][rows].mean()
        changes.append(100.0 * change / experts[task] if score in ("accuracy", "probability") else change)
    return sum(changes) / len(changes)


def table_groups(full_fitness: dict, units: int, seed: int = 0) -> dict[str, list[tuple[int, ...]]]:
    """The three groups of tables of the module docstring (the singles given, scored)."""
    generator = random.Random(seed)
    singles = sorted(full_fitness, key=lambda table: -full_fitness[table])
    best16 = [table[0] for table in singles[:16]]
    base = [table[0] for table in singles[:4]]
    drawn, neighbours = set(), set()
    while len(drawn) < 40:
        drawn.add(tuple(sorted(generator.sample(best16, 6))))
    while len(neighbours) < 40:
        neighbours.add(tuple(sorted(base + generator.sample([i for i in range(units) if i not in base], 2))))
    return {"singles": sorted(full_fitness), "6 of the best 16 singles": sorted(drawn),
            "best 4 singles + 2": sorted(neighbours)}


def changes(merger: str, outputs: dict, reference: dict) -> dict:
    """Per table, the examples whose correctness differs from the unpruned merge's (all tasks together)."""
    import numpy as np

    def joined(values, score):
        return np.concatenate([values[task][score] for task in sorted(values)])

    right = joined(reference, "accuracy")
    changed = np.stack([joined(values, "accuracy") != right for values in outputs.values()])
    gains = np.array([joined(values, "accuracy").sum() - right.sum() for values in outputs.values()])
    near = np.argsort(np.abs(joined(reference, "margin")), kind="stable")[: len(right) // 2]
    return {"merger": merger, "group": "changes", "tables": len(outputs), "examples": len(right),
            "changed_per_table": float(changed.sum(1).mean()), "net_gain_per_table": float(gains.mean()),
            "ever_changed": float(changed.any(0).mean()),
            "changes_near_boundary": float(changed[:, near].sum() / max(1, changed.sum()))}


def measure(merger: str, lam: float, adapters, validation, sizes, subset_seeds: int, log) -> list[dict]:
    import numpy as np
    from scipy.stats import spearmanr

    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.masks import ones_table
    from loramerge_cli.merging.merge import MergeConfig, resolve_config
    from loramerge_cli.search.fidelity import seeded_orders
    from loramerge_cli.search.fitness import CandidateMerges

    started = time.perf_counter()
    template = ones_table(adapters)
    merges = CandidateMerges(adapters, resolve_config(MergeConfig(merger=merger, lam=lam), len(adapters)), template,
                             validation)
    experts = expert_scores(validation, ScoreCache())
    dimension = len(template.units) * len(adapters)
    reference = example_outputs(validation, merges.candidate_deltas((), None))
    outputs = {}

    def full(table):
        if table not in outputs:
            outputs[table] = example_outputs(validation, merges.candidate_deltas(table, None))
        return subset_fitness(outputs[table], reference, experts, "accuracy")

    singles = {(unit,): full((unit,)) for unit in range(dimension)}
    groups = table_groups(singles, dimension)
    truth = {table: full(table) for tables in groups.values() for table in tables}
    log(f"{merger}: {len(outputs)} tables scored in {time.perf_counter() - started:.0f} s")
    rows = [changes(merger, outputs, reference)]
    for group, tables in groups.items():
        target = np.array([truth[table] for table in tables])
        kept = math.ceil(len(tables) / 3)
        for size in sizes:
            for score in SCORES:
                rhos, found, lost = [], [], []
                for seed in range(1, subset_seeds + 1):
                    keep = {task: np.array(order[:size]) for task, order in seeded_orders(validation, seed).items()}
                    estimate = np.array([subset_fitness(outputs[t], reference, experts, score, keep) for t in tables])
                    rhos.append(spearmanr(estimate, target).statistic)
                    third = np.argsort(-estimate, kind="stable")[:kept]
                    found.append(float(target.argmax() in third))
                    lost.append(float(target.max() - target[third].max()))
                rows.append({"merger": merger, "group": group, "examples": size, "score": score,
                             "rho": float(np.mean(rhos)), "best_kept": float(np.mean(found)),
                             "points_lost": float(np.mean(lost))})
    return rows


def main(argv=None):
    from rich.console import Console
    from rich.table import Table

    from examples.arguments import at_least, integer_list, lambda_map
    from examples.enmp_table import table_parser, text_evaluators

    parser = table_parser(__doc__.split("\n\n")[0], threads=2, searches=False)
    parser.add_argument("--lambdas", type=lambda_map, default={},
                        help="merger=λ,… (default: the search tables' tuned λ)")
    parser.add_argument("--sizes", type=integer_list, default="29,86", help="subset sizes, examples per task")
    parser.add_argument("--subset-seeds", type=at_least(1), default=20)
    args = parser.parse_args(argv)
    lambdas = {**LAMBDAS, **args.lambdas}
    sizes = [int(size) for size in args.sizes.split(",")]
    unknown = [merger for merger in args.mergers.split(",") if merger not in lambdas]
    if unknown:  # every argument checked before any model loads
        parser.error(f"no λ for {', '.join(unknown)} (give --lambdas)")
    console = Console(stderr=True)
    _, adapters, validation, _ = text_evaluators(args, console.log)
    smallest = min(len(examples) for examples in validation.examples.values())
    if max(sizes) >= smallest:  # a subset of all of them is no subset (ρ = 1 by construction)
        parser.error(f"--sizes {max(sizes)}: every size must be below the {smallest} validation examples per task "
                     "(--val-limit)")
    rows = []
    for merger in args.mergers.split(","):
        rows += measure(merger, lambdas[merger], adapters, validation, sizes, args.subset_seeds, console.log)
    table = Table("merger", "tables", "examples per task", "score", "Spearman ρ", "best kept", "points lost")
    seen = Table("merger", "tables", "examples", "changed per table", "net gain per table", "ever changed",
                 "changes in the smallest-margin half")
    for row in rows:
        if row["group"] == "changes":
            seen.add_row(row["merger"], str(row["tables"]), str(row["examples"]), f"{row['changed_per_table']:.1f}",
                         f"{row['net_gain_per_table']:+.1f}", f"{row['ever_changed']:.0%}",
                         f"{row['changes_near_boundary']:.0%}")
            continue
        table.add_row(row["merger"], row["group"], str(row["examples"]), row["score"], f"{row['rho']:.2f}",
                      f"{row['best_kept']:.2f}", f"{row['points_lost']:.2f}")
    Console(width=160).print(table)
    Console(width=160).print(seen)
    if args.json:
        import json

        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
