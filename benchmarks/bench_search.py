"""Search benchmark (issue 5): seconds per ENMP generation on the bundled example's text setting, loramerge as
is against a naive loop without its caches, as a ratio in one run, and the share of candidates that needed a
forward pass; then (issue 11) forward examples per point of validation fitness gained, for paper ENMP,
for the screened search at the same popsize, generations and seed, and for the surrogate search (the default
strategy) at its default budget (3·units·tasks full-set evaluations).

Run by hand (never from the tests):

    .venv/bin/python benchmarks/bench_search.py --threads 1 --json bench_search.json

Budget (defaults): merger ta at its default λ, popsize 16, 10 generations, the paper's x0 = -1 and σ0 = 0.5,
ρ = 0.2, CMA-ES seed 1, no --addscale (`--addscale` to search λ too), 256 validation examples per task.

* cached (the library as is): one `Evaluator`, `AccuracyFitness` with its per-(module, retained tasks) merge
  cache, `EnmpSearch` with its memo by decoded mask; experts and the unpruned merge scored once at setup.
* naive (the reference code's loop, one worker): every candidate is re-merged from scratch (no merge cache)
  and scored on a freshly loaded base model (W += ΔW, heads swapped per task), with no memo, so repeated
  masks are scored again; at setup the worker scores the experts and the unpruned merge itself.

Both sides see the same candidates: after each cached generation the naive side replays the decoded
candidates that generation drew (same seed), in order, and must reproduce every fitness exactly (mismatches
are reported); taking turns per generation, the two sides share the machine's load. The naive side times the
first `--naive-generations` generations (default: all); CMA-ES's ask/tell (milliseconds) is not part of its
time. It reuses the engine's tokenised batches, so its cost is merging, loading and scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait for the Hub

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_eval import NaiveEvaluator, setting_paths  # noqa: E402

from loramerge_cli.evaluation.engine import EvalSettings, adapter_deltas, merged_deltas  # noqa: E402
from loramerge_cli.evaluation.metrics import mean_defined, normalized_accuracy  # noqa: E402
from loramerge_cli.merging.merge import MergeConfig, run_merge  # noqa: E402
from loramerge_cli.search.enmp import EnmpSearch, EnmpSettings  # noqa: E402
from loramerge_cli.search.fitness import AccuracyFitness, pruned_table  # noqa: E402
from loramerge_cli.search.runner import SearchRequest, build_problem  # noqa: E402


def make_request(args) -> SearchRequest:
    tasks_file, arguments = setting_paths(args.out)
    return SearchRequest(
        adapters=arguments, merge=MergeConfig(merger=args.merger, lam=args.lam), tasks=tasks_file,
        eval=EvalSettings(split="validation", val_limit=args.val_limit, threads=args.threads,
                          batch_size=args.batch_size, block_cache_mb=args.block_cache_mb),
        enmp=EnmpSettings(popsize=args.popsize, generations=args.generations, seed=args.seed, sigma0=args.sigma0,
                          x0=args.x0, max_prune=args.max_prune, addscale=args.addscale),
    )


class CachedSearch:
    """The library as is; `generation()` runs one ENMP step and records its decoded candidates (memo hits
    included) with their fitness."""

    def __init__(self, request: SearchRequest):
        from loramerge_cli.evaluation.cache import ScoreCache, expert_scores

        started = time.perf_counter()
        self.problem = problem = build_problem(request)
        experts = expert_scores(problem.engine, ScoreCache(None))
        self.fitness = AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, experts)
        self.setup_seconds = time.perf_counter() - started
        self.search = EnmpSearch(request.enmp, len(problem.template.units), len(problem.adapters), self.fitness,
                                 base_lambda=problem.settings.lam)
        self.drawn: list = []
        self.search.decode = self._recording_decode
        self.search.start()

    def _recording_decode(self, x):
        candidate = EnmpSearch.decode(self.search, x)
        self.drawn.append(candidate)
        return candidate

    def generation(self) -> dict:
        self.drawn = []
        record = self.search.step()
        record["candidates"] = self.drawn
        record["fitness"] = [self.search.state.memo[candidate].fitness for candidate in self.drawn]
        return record


class NaiveLoop:
    """The reference code's loop on one worker: scores the experts and the unpruned merge itself, then
    re-merges every candidate from scratch and scores it on a freshly loaded base, with no memo."""

    def __init__(self, cached: CachedSearch):
        self.problem, self.fitness = cached.problem, cached.fitness
        self.evaluator = NaiveEvaluator(self.problem.engine)
        started = time.perf_counter()
        self.experts = {
            adapter.name: self.evaluator.evaluate_dense(adapter_deltas(adapter), [adapter.name])[adapter.name]
            for adapter in self.problem.adapters
        }
        self.reference = self.score((), None)
        self.setup_seconds = time.perf_counter() - started
        self.mismatches: list[str] = []

    def score(self, pruned: tuple[int, ...], lam: float | None) -> float:
        table = pruned_table(self.problem.template, pruned)
        result = run_merge(self.problem.adapters, self.fitness.unit_settings, table)  # no cache: from scratch
        scores = self.evaluator.evaluate_dense(merged_deltas(result, self.fitness.base_lambda if lam is None else lam))
        return mean_defined(normalized_accuracy(scores, self.experts)[0]) or 0.0

    def generation(self, record: dict) -> float:
        """Replays one recorded generation; returns its seconds and notes any fitness that differs."""
        started = time.perf_counter()
        values = [self.score(pruned, lam) - self.reference for pruned, lam in record["candidates"]]
        seconds = time.perf_counter() - started
        for (pruned, lam), ours, theirs in zip(record["candidates"], record["fitness"], values):
            if ours != theirs:
                self.mismatches.append(f"generation {record['generation']}, pruned {list(pruned)}, λ {lam}: "
                                       f"cached {ours:.6f}, naive {theirs:.6f}")
        return seconds


def fitness_memo_keys(generations: list[dict]) -> list:
    """The candidates that needed a forward pass: the unpruned merge, then each distinct drawn mask."""
    return list(dict.fromkeys([((), None)] + [c for record in generations for c in record["candidates"]]))


def per_point(examples: int, gained: float) -> float | None:
    """Forward examples spent per point of validation fitness gained (None when nothing was gained)."""
    return examples / gained if gained > 0 else None


def screened_run(cached: CachedSearch, args) -> dict:
    """The screened search (CMA-ES with successive halving) on the same fitness, popsize, generations
    and seed: its budget in forward examples and full-set evaluations, and examples per point gained."""
    from loramerge_cli.search.screened import ScreenedSearch, ScreenedSettings, fitness_ladder

    settings = ScreenedSettings(popsize=args.popsize, generations=args.generations, seed=args.seed,
                                sigma0=args.sigma0, max_prune=args.max_prune)
    started = time.perf_counter()
    ladder = fitness_ladder(settings, cached.fitness)
    search = ScreenedSearch(settings, len(cached.problem.template.units), len(cached.problem.adapters), ladder)
    best = search.run()
    examples = search.state.forward_examples
    return {"best_fitness": best.fitness, "full_evaluations": len(search.state.memo) - 1,
            "forward_examples": examples, "examples_per_point": per_point(examples, best.fitness),
            "rung_examples": ladder.costs, "seconds": time.perf_counter() - started}


def surrogate_run(cached: CachedSearch, args) -> dict:
    """The default strategy (the surrogate search) on the same fitness and seed, at its default budget."""
    from loramerge_cli.search.surrogate import SurrogateSearch, SurrogateSettings

    started = time.perf_counter()
    search = SurrogateSearch(SurrogateSettings(seed=args.seed, max_prune=args.max_prune),
                             len(cached.problem.template.units), len(cached.problem.adapters), cached.fitness)
    best = search.run()
    examples = search.state.forward_examples
    return {"best_fitness": best.fitness, "full_evaluations": len(search.state.memo) - 1,
            "forward_examples": examples, "examples_per_point": per_point(examples, best.fitness),
            "seconds": time.perf_counter() - started}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    request = make_request(args)
    cached = CachedSearch(request)
    naive = NaiveLoop(cached)
    problem, fitness = cached.problem, cached.fitness
    timed = min(args.naive_generations or args.generations, args.generations)
    generations, naive_seconds = [], []
    for index in range(args.generations):  # the sides take turns per generation: they share the machine's load
        generations.append(cached.generation())
        if index < timed:
            naive_seconds.append(naive.generation(generations[-1]))
    asked = sum(len(record["candidates"]) for record in generations)
    forward = sum(record["new_evaluations"] for record in generations)
    cached_timed = sum(record["seconds"] for record in generations[:timed])
    naive_timed = sum(naive_seconds)
    naive_per_generation = naive_timed / timed
    modules = len(fitness.cache)  # distinct (module, retained tasks) merges the cached side computed
    requested = sum(len(run_merge(problem.adapters, fitness.unit_settings, pruned_table(problem.template, pruned),
                                  cache=fitness.cache).modules)
                    for pruned, _ in fitness_memo_keys(generations))  # every one a cache hit by now
    from loramerge_cli.search.fidelity import examples_per_evaluation

    cost = examples_per_evaluation(fitness)
    best_fitness = generations[-1]["best_fitness"]
    replayed, blocks_run = fitness.replay.replayed_blocks, fitness.replay.full_blocks  # ENMP's own: the
    screened = screened_run(cached, args) if args.screened else None  # searches below share the counters
    surrogate = surrogate_run(cached, args) if args.surrogate else None
    return {
        "enmp_budget": {"full_evaluations": forward, "forward_examples": forward * cost,
                        "best_fitness": best_fitness, "examples_per_point": per_point(forward * cost, best_fitness)},
        "screened": screened,
        "surrogate": surrogate,
        "settings": {"setting": str(request.tasks), "merger": args.merger, "lambda": problem.settings.lam,
                     "units": len(problem.template.units), "tasks": len(problem.adapters),
                     "enmp": vars(request.enmp), "threads": args.threads, "val_limit": args.val_limit,
                     "batch_size": args.batch_size, "naive_generations": timed, "torch": torch.__version__},
        "generations": [
            {"generation": record["generation"], "candidates": len(record["candidates"]),
             "forward_passes": record["new_evaluations"], "memo_hits": record["cache_hits"],
             "cached_seconds": record["seconds"],
             "naive_seconds": naive_seconds[index] if index < timed else None,
             "best_fitness": record["best_fitness"], "mean_fitness": record["mean_fitness"],
             "mean_sparsity": record["mean_sparsity"]}
            for index, record in enumerate(generations)],
        "cached": {"setup_seconds": cached.setup_seconds,
                   "seconds_per_generation": sum(record["seconds"] for record in generations) / len(generations),
                   "candidates": asked, "forward_passes": forward, "forward_share": forward / asked,
                   "distinct_candidates_drawn": len({c for record in generations for c in record["candidates"]}),
                   "module_merges": modules, "module_merges_without_cache": requested,
                   "blocks_replayed": replayed, "blocks_run": blocks_run,
                   "block_replay": fitness.replay.enabled},
        "naive": {"setup_seconds": naive.setup_seconds, "seconds_per_generation": naive_per_generation,
                  "forward_passes": sum(len(record["candidates"]) for record in generations[:timed]),
                  "estimated_total_seconds": naive.setup_seconds + naive_per_generation * len(generations)},
        "speedup_per_generation": naive_timed / cached_timed,
        "experts_match": naive.experts == fitness.experts, "reference_match": naive.reference == fitness.reference,
        "mismatches": naive.mismatches,
    }


def _ratio(naive_seconds: float | None, cached_seconds: float) -> str:
    if naive_seconds is None:
        return ""
    return "memo only" if cached_seconds < 0.01 else f"{naive_seconds / cached_seconds:.1f}×"


def render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    settings, cached, naive = report["settings"], report["cached"], report["naive"]
    enmp = settings["enmp"]
    addscale = ", --addscale" if enmp["addscale"] else ""
    console = Console(width=max(Console().width, 110))
    table = Table(title=f"ENMP on the bundled text setting: {settings['merger']} λ={settings['lambda']:g}, "
                        f"{settings['units']} units × {settings['tasks']} tasks, popsize {enmp['popsize']}, "
                        f"x0 {enmp['x0']:g}, σ0 {enmp['sigma0']:g}, seed {enmp['seed']}{addscale}, "
                        f"{settings['threads']} thread(s)", title_justify="left")
    for column in ("gen", "candidates", "forward passes", "memo hits", "cached s", "naive s", "naive / cached",
                   "best fitness", "mean sparsity"):
        table.add_column(column, justify="right")
    for row in report["generations"]:
        naive_seconds = row["naive_seconds"]
        table.add_row(str(row["generation"]), str(row["candidates"]), str(row["forward_passes"]),
                      str(row["memo_hits"]), f"{row['cached_seconds']:.2f}",
                      "" if naive_seconds is None else f"{naive_seconds:.2f}",
                      _ratio(naive_seconds, row["cached_seconds"]),
                      f"{row['best_fitness']:+.2f}", f"{100 * row['mean_sparsity']:.1f} %")
    console.print(table)
    console.print(
        f"seconds per generation: cached {cached['seconds_per_generation']:.2f}, "
        f"naive {naive['seconds_per_generation']:.2f} "
        f"(over {settings['naive_generations']} generation(s)); naive / cached on the same generations: "
        f"{report['speedup_per_generation']:.2f}×")
    console.print(
        f"forward passes: {cached['forward_passes']} of {cached['candidates']} candidates "
        f"({100 * cached['forward_share']:.1f} %; {cached['distinct_candidates_drawn']} distinct candidates drawn), "
        f"plus the unpruned merge once at setup; module merges computed "
        f"{cached['module_merges']} of {cached['module_merges_without_cache']} needed without the merge cache")
    blocks = cached["blocks_replayed"] + cached["blocks_run"]
    console.print(
        f"block replay: {cached['blocks_replayed']} of the {blocks} blocks of the forward passes replayed "
        f"from the unpruned merge's outputs ({100 * cached['blocks_replayed'] / max(blocks, 1):.1f} %)"
        if cached["block_replay"] else "block replay: off")
    console.print(
        f"setup (scored once): cached {cached['setup_seconds']:.1f} s (model, data, experts, unpruned merge), naive "
        f"{naive['setup_seconds']:.1f} s (experts, unpruned merge; it reuses the cached side's tokenised data)")
    console.print(
        f"whole budget (setup + {len(report['generations'])} generations): cached "
        f"{cached['setup_seconds'] + cached['seconds_per_generation'] * len(report['generations']):.0f} s, naive "
        f"≈{naive['estimated_total_seconds']:.0f} s + data loading")
    for name, spent in (("paper ENMP", report["enmp_budget"]), ("screened", report["screened"]),
                        ("surrogate (default)", report.get("surrogate"))):
        if spent is None:
            continue
        ratio = spent["examples_per_point"]
        console.print(
            f"{name}: best validation fitness {spent['best_fitness']:+.2f} after {spent['full_evaluations']} "
            f"full-set evaluations, {spent['forward_examples']} forward examples: "
            + (f"{ratio:.0f} forward examples per point gained" if ratio else "no point gained"))
    checks = [report["experts_match"], report["reference_match"], not report["mismatches"]]
    console.print("fitness check: " + ("every replayed candidate, the experts and the unpruned merge score exactly "
                                        "as in the cached run" if all(checks) else "[red]MISMATCH[/red]"))
    for line in report["mismatches"]:
        console.print("  " + line)


def main(argv: list[str] | None = None) -> dict:
    from examples.bundled.build import DEFAULT_OUT
    from examples.arguments import at_least, fraction, integer_list, merger_name, output_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / DEFAULT_OUT, help="bundled example folder (built if needed)")
    parser.add_argument("--merger", type=merger_name, default="ta", help="merger (default ta)")
    parser.add_argument("--lam", type=float, help="λ (default: the merger's)")
    parser.add_argument("--popsize", type=at_least(2), default=16)
    parser.add_argument("--generations", type=at_least(1), default=10)
    parser.add_argument("--naive-generations", type=at_least(0), default=0,
                        help="generations the naive loop replays and times (default 0: all)")
    parser.add_argument("--x0", type=float, default=-1.0)
    parser.add_argument("--sigma0", type=float, default=0.5)
    parser.add_argument("--max-prune", type=fraction, default=0.2)
    parser.add_argument("--seed", type=int, default=1, help="CMA-ES seed")
    parser.add_argument("--addscale", action="store_true", help="search λ too (one extra gene)")
    parser.add_argument("--val-limit", type=at_least(1), default=256, help="validation examples per task (default 256)")
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--block-cache-mb", type=at_least(0, float), default=1024,
                        help="cached side: block outputs kept for replay (default 1024; 0: off)")
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads, both sides (default 1)")
    parser.add_argument("--no-screened", dest="screened", action="store_false",
                        help="skip the screened search on the same budget")
    parser.add_argument("--no-surrogate", dest="surrogate", action="store_false",
                        help="skip the surrogate search (the default strategy) at its default budget")
    parser.add_argument("--json", type=output_file, help="also write the results here")
    parser.add_argument("--backend", choices=["naive", "ray"], default="naive",
                        help="naive: against the naive loop (default); ray: serial against 1 and 2 Ray CPU actors "
                             "(bench_search_ray.py)")
    parser.add_argument("--actors", type=lambda text: [int(n) for n in integer_list(text).split(",")], default=[1, 2],
                        help="--backend ray: actor counts (default 1,2)")
    args = parser.parse_args(argv)
    if args.naive_generations < 0:
        parser.error("--naive-generations must be >= 0")
    if args.backend == "ray":
        from bench_search_ray import render_ray, run_ray

        report = run_ray(args, make_request)
        render_ray(report)
    else:
        report = run(args)
        render(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
