"""`bench_search.py --backend ray` (issue 13): seconds per ENMP generation with 1 and 2 Ray CPU actors against
the serial search, on the bundled example's text setting, and the Ray overhead per candidate.

The three runs draw the same candidates (same seed) and must record the same fitness values (checked). Each
actor builds its worker once (model, data; not timed per generation, reported as start seconds) and records
the unpruned merge's block outputs on its first candidate (inside generation 1, so "steady" figures leave
generation 1 out). Overhead per candidate, two ways: the seconds per candidate of one actor that does no work
(dispatch, transfer, scheduling alone), and (1-actor seconds − serial seconds) / candidates scored over the
steady generations (the same, plus whatever the machine's load did between the runs).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local cluster on 127.0.0.1 only

from loramerge_cli.search.enmp import EnmpSearch  # noqa: E402

DISPATCH_ITEMS = 400


class Echo:
    """A worker that does no work: `RayPool` over it times the dispatch alone."""

    def __call__(self, device: str):
        return lambda items: list(items)


def dispatch_seconds(threads: int) -> float:
    """Seconds per item of one actor that does nothing with candidate-shaped items."""
    import sys

    import ray

    from loramerge_cli.search.ray_backend import RayPool

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor cannot import benchmarks/
    pool = RayPool(Echo(), ["cpu"], threads=threads)
    try:
        items = [((index, index + 7, index + 13), None) for index in range(DISPATCH_ITEMS)]
        started = time.perf_counter()
        assert pool(items) == items
        return (time.perf_counter() - started) / DISPATCH_ITEMS
    finally:
        pool.close()


def _search(request, fitness, problem) -> tuple[list[dict], list]:
    search = EnmpSearch(request.enmp, len(problem.template.units), len(problem.adapters), fitness,
                        base_lambda=problem.settings.lam)
    search.start()
    records = [search.step() for _ in range(request.enmp.generations)]
    values = sorted((key, value.fitness) for key, value in search.state.memo.items())
    return records, values


def run_ray(args, make_request) -> dict:
    import ray

    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.search.fitness import AccuracyFitness
    from loramerge_cli.search.ray_backend import RayPool
    from loramerge_cli.search.runner import WorkerBuilder, build_problem

    request = make_request(args)
    problem = build_problem(request)
    experts = expert_scores(problem.engine, ScoreCache(None))
    fitness = AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, experts)
    runs = {"serial": _search(request, fitness, problem)}
    starts = {}
    ray.init(num_cpus=max(args.actors), include_dashboard=False, log_to_driver=False)
    try:
        dispatch = dispatch_seconds(args.threads)
        for count in args.actors:
            started = time.perf_counter()
            pool = RayPool(WorkerBuilder(request, problem.settings.lam, experts, fitness.reference), ["cpu"] * count,
                           threads=args.threads)
            starts[count] = time.perf_counter() - started
            try:
                runs[f"{count} actor(s)"] = _search(request, pool, problem)
            finally:
                pool.close()
    finally:
        ray.shutdown()
    serial_values = runs["serial"][1]
    summary = {}
    for name, (records, values) in runs.items():
        steady = records[1:] or records
        summary[name] = {
            "seconds_per_generation": sum(r["seconds"] for r in records) / len(records),
            "steady_seconds_per_generation": sum(r["seconds"] for r in steady) / len(steady),
            "steady_candidates": sum(r["new_evaluations"] for r in steady),
            "same_fitness_as_serial": values == serial_values,
            "generations": [{"generation": r["generation"], "seconds": r["seconds"],
                             "new_evaluations": r["new_evaluations"], "best_fitness": r["best_fitness"]}
                            for r in records],
        }
    serial = summary["serial"]
    for count in args.actors:
        entry = summary[f"{count} actor(s)"]
        entry["start_seconds"] = starts[count]
        entry["serial_over_this"] = serial["steady_seconds_per_generation"] / entry["steady_seconds_per_generation"]
    one = summary.get("1 actor(s)")
    overhead = None
    if one is not None and serial["steady_candidates"]:
        overhead = (sum(g["seconds"] for g in one["generations"][1:]) -
                    sum(g["seconds"] for g in serial["generations"][1:])) / serial["steady_candidates"]
    return {"settings": {"setting": str(request.tasks), "merger": args.merger, "lambda": problem.settings.lam,
                         "units": len(problem.template.units), "tasks": len(problem.adapters),
                         "popsize": args.popsize, "generations": args.generations, "threads": args.threads,
                         "val_limit": args.val_limit, "actors": args.actors, "ray": ray.__version__},
            "runs": summary, "overhead_seconds_per_candidate": overhead, "dispatch_seconds_per_candidate": dispatch}


def render_ray(report: dict) -> None:
    settings = report["settings"]
    print(f"ENMP on the bundled text setting ({settings['merger']}, {settings['units']} units × {settings['tasks']} "
          f"tasks, popsize {settings['popsize']}, {settings['generations']} generations, {settings['threads']} "
          f"thread(s) per process, val-limit {settings['val_limit']}, Ray {settings['ray']})")
    print(f"{'run':<14}{'s/gen':>8}{'steady s/gen':>14}{'serial / run':>14}{'start s':>9}  same fitness")
    for name, entry in report["runs"].items():
        ratio = entry.get("serial_over_this")
        start = entry.get("start_seconds")
        print(f"{name:<14}{entry['seconds_per_generation']:>8.2f}{entry['steady_seconds_per_generation']:>14.2f}"
              f"{'' if ratio is None else f'{ratio:.2f}×':>14}{'' if start is None else f'{start:.1f}':>9}  "
              f"{entry['same_fitness_as_serial']}")
    print(f"Ray dispatch per candidate (one actor that does no work, {DISPATCH_ITEMS} candidates): "
          f"{1000 * report['dispatch_seconds_per_candidate']:.2f} ms")
    overhead = report["overhead_seconds_per_candidate"]
    if overhead is not None:
        print(f"1 actor − serial per candidate, steady generations: {1000 * overhead:.1f} ms (load noise included)")


if __name__ == "__main__":
    import sys

    print("bench_search_ray.py is the Ray part of bench_search.py: run `python benchmarks/bench_search.py "
          "--backend ray` (--help for its flags)", file=sys.stderr)
    sys.exit(2)
