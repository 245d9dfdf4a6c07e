"""Mask-search strategies on the bundled example's text setting, with the budget counted in forward examples.

For each merger (ta, ties, knots, core) at its tuned λ, on one validation fitness: the surrogate search (the
default, at its default budget of 3·U·T full-set evaluations), the screened search, paper ENMP, greedy
leave-one-out and random masks, each over several seeds (greedy once: it is deterministic). Per run:
validation fitness (points over the unpruned merge), test mean normalized accuracy, distinct full-set
evaluations, forward examples (each evaluation costs its examples summed over tasks). Paper ENMP runs until it
has spent as many forward examples as the screened search (at most `--generations`), random masks get as many
forward examples and prune as many units as the screened search's table; greedy gets up to popsize ×
generations evaluations.
`--ablations` adds the screened search with one part switched off each (screen, greedy phase, redraw,
halving).

    python -m examples.search_table [--seeds 1,2,3] [--mergers ta,ties] [--json out.json] [--plot curves.png]
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STRATEGIES = ("surrogate", "screened", "enmp", "greedy", "random")
ABLATIONS = {"screened_no_screen": {"screen": False}, "screened_no_greedy": {"greedy_pool": 0},
             "screened_no_redraw": {"redraws": 0}, "screened_no_halving": {"halving": False},
             "screened_screen_rungs_2": {"screen_rungs": 2}, "screened_screen_rungs_3": {"screen_rungs": 3}}


class SharedScores:
    """The full-set fitness with one score memo shared by every strategy and seed of a merger: it saves wall
    time only (the same table scores the same); each strategy still counts its own evaluations and examples."""

    def __init__(self, fitness):
        self.fitness = fitness
        self.scores: dict = {}

    def __getattr__(self, name):
        return getattr(self.fitness, name)

    def __call__(self, candidates):
        missing = [c for c in dict.fromkeys(candidates) if c not in self.scores]
        for candidate, value in zip(missing, self.fitness(missing) if missing else []):
            self.scores[candidate] = value
        return [self.scores[c] for c in candidates]


def best_at(curve: list[tuple[int, float]], examples: int) -> float:
    """Best validation fitness a search had reached within `examples` forward examples (0: the unpruned merge)."""
    return max([fitness for spent, fitness in curve if spent <= examples], default=0.0)


def examples_to_reach(curve: list[tuple[int, float]], fitness: float) -> int | None:
    """Forward examples a search had spent when its best validation fitness first reached `fitness`."""
    return next((spent for spent, best in curve if best >= fitness), None)


def run_merger(merger, adapters, tasks_file, validation, test, seeds, budget, strategies, ablations, log) -> dict:
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.evaluation.tuning import tune_lambda
    from loramerge_cli.masks import ones_table
    from loramerge_cli.merging.merge import MergeConfig, resolve_config
    from loramerge_cli.search.baselines import greedy_search, random_search
    from loramerge_cli.search.decode import max_pruned
    from loramerge_cli.search.enmp import EnmpSearch, EnmpSettings
    from loramerge_cli.search.fidelity import examples_per_evaluation
    from loramerge_cli.search.fitness import AccuracyFitness
    from loramerge_cli.search.screened import ScreenedSearch, ScreenedSettings, fitness_ladder
    from loramerge_cli.search.surrogate import SurrogateSearch, SurrogateSettings

    started = time.perf_counter()
    lam = budget["lambdas"].get(merger)
    if lam is None:
        lam, _ = tune_lambda(adapters, MergeConfig(merger=merger), None, tasks_file, evaluator=validation)
    settings = resolve_config(MergeConfig(merger=merger, lam=lam), len(adapters))
    template = ones_table(adapters)
    fitness = SharedScores(AccuracyFitness(adapters, settings, template, validation,
                                           expert_scores(validation, ScoreCache())))
    test_fitness = AccuracyFitness(adapters, settings, template, test, expert_scores(test, ScoreCache()))
    units, tasks = len(template.units), len(adapters)
    cost = examples_per_evaluation(fitness)
    k_max = max_pruned(budget["max_prune"], units, tasks)
    row = {"merger": merger, "lambda": lam, "examples_per_evaluation": cost,
           "unpruned": {"validation": fitness.reference, "test": test_fitness.reference}}
    log(f"{merger}: λ {lam:.3g}, unpruned validation {fitness.reference:.2f} ({time.perf_counter() - started:.0f} s)")

    def outcome(best, evaluations, examples, curve, seconds, key="", seed=None):
        result = {"fitness": best.fitness, "pruned": len(best.pruned), "evaluations": evaluations,
                  "forward_examples": examples,
                  "test": test_fitness.score(best.pruned, None) - test_fitness.reference, "seconds": seconds,
                  "curve": curve}
        if budget.get("runs_jsonl"):  # every finished run at once: a long grid leaves its partial results
            with open(budget["runs_jsonl"], "a") as handle:
                handle.write(json.dumps({"merger": merger, "lambda": lam, "strategy": key, "seed": seed,
                                         "unpruned": row["unpruned"], "pruned_units": list(best.pruned),
                                         **result}) + "\n")
        return result

    def screened(seed, **changes):
        clock = time.perf_counter()
        search_settings = ScreenedSettings(popsize=budget["popsize"], generations=budget["screened_generations"],
                                           max_prune=budget["max_prune"], seed=seed, **changes)
        search = ScreenedSearch(search_settings, units, tasks, fitness_ladder(search_settings, fitness))
        best = search.run()
        state = search.state
        curve = [(record["forward_examples"], record["best_fitness"]) for record in state.history]
        key = next((name for name, switched in ABLATIONS.items() if switched == changes), "screened")
        return outcome(best, len(state.memo) - 1, state.forward_examples, curve, time.perf_counter() - clock, key,
                       seed)

    runs = {key: [] for key in (*strategies, *ablations)}

    def run_greedy():  # deterministic: once, after the first seed
        clock = time.perf_counter()
        curve: list = []
        ledger = greedy_search(fitness, units * tasks, k_max, budget["popsize"] * budget["generations"],
                               lambda record: curve.append(((record["distinct_evaluated"] - 1) * cost,
                                                            record["best_fitness"])))
        evaluations = len(ledger.memo) - 1
        runs["greedy"].append(outcome(ledger.best(), evaluations, evaluations * cost, curve,
                                      time.perf_counter() - clock, "greedy"))
        log(f"{merger}: greedy {runs['greedy'][-1]['fitness']:+.2f} ({runs['greedy'][-1]['forward_examples']} "
            f"examples)")

    for seed in seeds:
        target = budget.get("enmp_examples")  # when the default search runs elsewhere
        if "screened" in strategies:
            runs["screened"].append(screened(seed))
            target = runs["screened"][-1]["forward_examples"]
        for key in ablations:
            runs[key].append(screened(seed, **ABLATIONS[key]))
        if "surrogate" in strategies:  # the default, at its default budget: 3·U·T distinct full-set evaluations
            clock = time.perf_counter()
            search = SurrogateSearch(SurrogateSettings(max_prune=budget["max_prune"], seed=seed,
                                                       exploit_every=budget["exploit_every"]), units, tasks,
                                     fitness)
            best = search.run()
            curve = [(record["forward_examples"], record["best_fitness"]) for record in search.state.history]
            runs["surrogate"].append(outcome(best, len(search.state.memo) - 1, search.state.forward_examples, curve,
                                             time.perf_counter() - clock, "surrogate", seed))
            target = runs["surrogate"][-1]["forward_examples"]  # the default's: ENMP and random get as many
        reference = runs.get("surrogate") or runs.get("screened")  # the default search's run (else the screened one's)
        if "enmp" in strategies:  # up to the default search's forward examples (equal cost), at most --generations
            clock = time.perf_counter()
            enmp = EnmpSearch(EnmpSettings(popsize=budget["popsize"], generations=budget["generations"], seed=seed,
                                           max_prune=budget["max_prune"]), units, tasks, fitness, base_lambda=lam)
            enmp.start()
            while enmp.state.generation < budget["generations"] and (
                    target is None or (len(enmp.state.memo) - 1) * cost < target):
                enmp.step()
            curve = [((record["distinct_evaluated"] - 1) * cost, record["best_fitness"])
                     for record in enmp.state.history]
            evaluations = len(enmp.state.memo) - 1
            runs["enmp"].append(outcome(enmp.best(), evaluations, evaluations * cost, curve,
                                        time.perf_counter() - clock, "enmp", seed))
            runs["enmp"][-1]["at_default_examples"] = best_at(curve, target) if target else None
        if "random" in strategies and target and reference:  # as many forward examples and pruned units as the
            clock = time.perf_counter()  # default search
            count = max(1, reference[-1]["pruned"])
            ledger = random_search(fitness, units * tasks, count, max(1, target // cost), seed)
            runs["random"].append(outcome(ledger.best(), len(ledger.memo) - 1, (len(ledger.memo) - 1) * cost, [],
                                          time.perf_counter() - clock, "random", seed))
        log(f"{merger} seed {seed}: " + ", ".join(
            f"{key} {runs[key][-1]['fitness']:+.2f} ({runs[key][-1]['evaluations']} full, "
            f"{runs[key][-1]['forward_examples']} examples, {runs[key][-1]['seconds']:.0f} s)"
            for key in runs if runs[key]))
        if seed == seeds[0] and "greedy" in strategies:
            run_greedy()
    greedy_examples = runs["greedy"][0]["forward_examples"] if runs.get("greedy") else None
    for values in runs.values():
        for run in values:
            if greedy_examples and run["curve"]:
                run["at_half_greedy"] = best_at(run["curve"], greedy_examples // 2)
    full_set = runs.get("screened_no_halving") or []
    for halved, full in zip(runs.get("screened") or [], full_set):  # the same seed, halving on and off
        per_task = 100.0 * tasks / cost  # one example in every task, in points (≈ 100 / n)
        full["examples_to_halving_fitness"] = examples_to_reach(full["curve"], halved["fitness"] - per_task)
    row["runs"] = runs
    fields = ("fitness", "test", "pruned", "evaluations", "forward_examples", "seconds")
    row["mean"] = {key: {name: statistics.mean(run[name] for run in values) for name in fields}
                   for key, values in runs.items() if values}
    return row


def render(rows: list[dict], seeds, budget, keys, seconds):
    from rich.table import Table

    table = Table(title=f"Mask search on the text setting, mean over seeds {list(seeds)}: Δval / Δtest over the "
                  f"unpruned merge (full-set evaluations; thousands of forward examples); popsize "
                  f"{budget['popsize']}, ENMP {budget['generations']} generations, screened "
                  f"{budget['screened_generations']}, {budget['val_limit']} validation examples per task; "
                  f"{seconds:.0f} s", title_justify="left")
    table.add_column("merger")
    table.add_column("λ", justify="right")
    table.add_column("unpruned val / test", justify="right")
    for key in keys:
        table.add_column(key.replace("_", " "), justify="right")
    for row in rows:
        cells = [row["merger"], f"{row['lambda']:.3g}",
                 f"{row['unpruned']['validation']:.1f} / {row['unpruned']['test']:.1f}"]
        for key in keys:
            mean = row["mean"].get(key)
            if mean is None:
                cells.append("")
                continue
            cells.append(f"{mean['fitness']:+.2f} / {mean['test']:+.2f} ({mean['evaluations']:.0f}; "
                         f"{mean['forward_examples'] / 1000:.0f}k)")
        table.add_row(*cells)
    return table


def plot(rows: list[dict], keys, path: Path) -> None:
    """Best validation fitness against forward examples, one panel per merger, each strategy's first seed."""
    from loramerge_cli.search.plots import new_figure

    figure, axes = new_figure((4.2 * len(rows), 3.4), columns=len(rows))
    axes = list(axes) if len(rows) > 1 else [axes]
    for axis, row in zip(axes, rows):
        for key in keys:
            run = row["runs"][key][0] if row["runs"].get(key) else None
            curve = run["curve"] if run else []
            if curve:  # best so far (a greedy round records its own best, which can fall)
                bests = list(itertools.accumulate([0.0] + [best for _, best in curve], max))
                axis.step([0] + [spent for spent, _ in curve], bests, where="post", label=key.replace("_", " "))
            elif run:  # random masks record no curve: their best, where their examples ran out
                axis.plot([run["forward_examples"]], [run["fitness"]], "x", label=f"{key} (its end)")
        axis.set_title(f"{row['merger']} (λ {row['lambda']:.3g})")
        from matplotlib.ticker import EngFormatter

        axis.xaxis.set_major_formatter(EngFormatter(sep=""))  # 500, 1.5k, 120k (`:.0f`k read 0k for 500)
        axis.set_xlabel("forward examples")
        axis.set_ylabel("best validation fitness (points)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    from rich.console import Console

    from examples.arguments import at_least, lambda_map, names_of, output_file, plot_file
    from examples.enmp_table import table_parser, text_evaluators

    parser = table_parser(__doc__.split("\n\n")[0], threads=1)
    parser.add_argument("--generations", type=at_least(1), default=15, help="paper ENMP's generations (greedy and "
                        "random get up to popsize × generations evaluations)")
    parser.add_argument("--screened-generations", type=at_least(1), default=8)
    parser.add_argument("--strategies", type=names_of(STRATEGIES, "strategy"), default=",".join(STRATEGIES),
                        help="comma-separated; random is given the forward examples of the surrogate search (else the "
                        "screened one), so it runs beside one of them")
    parser.add_argument("--ablations", default="", help=f"comma-separated: {', '.join(ABLATIONS)}")
    parser.add_argument("--lambdas", type=lambda_map, default={},
                        help="merger=λ,… : skip the λ tuning of these mergers")
    parser.add_argument("--exploit-every", type=at_least(0), default=0, help="the surrogate search's --exploit-every")
    parser.add_argument("--enmp-examples", type=at_least(1), help="without the surrogate or screened search in this "
                        "run: stop paper ENMP once it has spent this many forward examples")
    parser.add_argument("--runs-jsonl", type=output_file, help="append every finished run here as it ends")
    parser.add_argument("--plot", type=plot_file,
                        help="write a PNG of best validation fitness against forward examples")
    args = parser.parse_args(argv)
    strategies = [key for key in args.strategies.split(",") if key]
    ablations = [key for key in args.ablations.split(",") if key]
    unknown = [key for key in ablations if key not in ABLATIONS]
    if unknown:
        parser.error(f"--ablations: unknown {', '.join(unknown)}")
    if not strategies and not ablations:
        parser.error("--strategies: name at least one")
    if "random" in strategies and not {"surrogate", "screened"} & set(strategies):
        parser.error("--strategies: random is given the surrogate's (or the screened search's) forward examples: "
                     "list one of them too")
    console = Console(stderr=True)
    started = time.perf_counter()
    tasks_file, adapters, validation, test = text_evaluators(args, console.log)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    budget = {"popsize": args.popsize, "generations": args.generations, "max_prune": args.max_prune,
              "screened_generations": args.screened_generations, "val_limit": args.val_limit,
              "lambdas": args.lambdas,
              "runs_jsonl": str(args.runs_jsonl) if args.runs_jsonl else None, "enmp_examples": args.enmp_examples,
              "exploit_every": args.exploit_every}
    rows = []
    for merger in args.mergers.split(","):
        rows.append(run_merger(merger, adapters, tasks_file, validation, test, seeds, budget, strategies, ablations,
                               console.log))
        if args.json:  # after every merger: a long run leaves its finished rows behind
            args.json.write_text(json.dumps({"rows": rows, "budget": budget, "seeds": seeds,
                                             "seconds": time.perf_counter() - started}, indent=1, default=str))
    keys = [*strategies, *ablations]
    Console(width=200).print(render(rows, seeds, budget, keys, time.perf_counter() - started))
    if args.plot:
        plot(rows, keys, args.plot)


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
