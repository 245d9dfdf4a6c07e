"""Worker processes sharing the CPUs: a search spread over `--workers` worker processes on this machine, each
process at CPUs / N torch threads (what loramerge now gives every spread run, `Backend.threads_each`) against
each at min(8, CPUs) (what `--devices cpu,cpu` and every library call gave before), as a ratio of wall times in
one run; both must find the same table (the scores do not depend on the thread count here; the test is that
they are equal).

Run by hand (never from the tests), alone on the machine:

    .venv/bin/python benchmarks/bench_workers.py --workers 2 --json bench_workers.json

The bundled example's text setting, merger ta at its default λ, the surrogate search (the default strategy)
with a budget of `--budget` full-set evaluations, 256 validation examples per task.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait for the Hub

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_eval import setting_paths  # noqa: E402

from loramerge_cli.evaluation.settings import EvalSettings  # noqa: E402
from loramerge_cli.merging.merge import MergeConfig  # noqa: E402
from loramerge_cli.search.backends import Backend  # noqa: E402
from loramerge_cli.search.enmp_settings import EnmpSettings  # noqa: E402
from loramerge_cli.search.runner import SearchRequest, run_search  # noqa: E402


def timed_search(request: SearchRequest) -> tuple[float, list]:
    started = time.perf_counter()
    table, _ = run_search(request)
    return time.perf_counter() - started, table.weights


def main() -> None:
    from examples.arguments import at_least, output_file
    from examples.bundled.build import DEFAULT_OUT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / DEFAULT_OUT, help="bundled example folder (built if needed)")
    parser.add_argument("--workers", type=at_least(1), default=2)
    parser.add_argument("--budget", type=at_least(1), default=48, help="full-set evaluations of the surrogate search")
    parser.add_argument("--val-limit", type=at_least(1), default=256)
    parser.add_argument("--json", type=output_file, help="also write the results here")
    args = parser.parse_args()

    tasks_file, adapters = setting_paths(args.out)
    devices = ["cpu"] * args.workers
    shared = Backend("process", devices).threads_each("cpu", None)
    alone = min(8, os.cpu_count() or 1)  # what each worker took before
    request = SearchRequest(strategy="surrogate", adapters=adapters, merge=MergeConfig(merger="ta"),
                            tasks=tasks_file, eval=EvalSettings(val_limit=args.val_limit, batch_size=32),
                            enmp=EnmpSettings(seed=1), budget=args.budget, devices=devices)
    runs = {}
    for name, threads in (("shared", shared), ("each_min8", alone)):
        seconds, weights = timed_search(replace(request, eval=replace(request.eval, threads=threads)))
        runs[name] = {"threads_per_process": threads, "seconds": round(seconds, 2), "weights": weights}
        print(f"{name:>10}: {threads} thread(s) in each of {args.workers} workers: {seconds:.1f} s", flush=True)
    same = runs["shared"].pop("weights") == runs["each_min8"].pop("weights")
    ratio = runs["each_min8"]["seconds"] / runs["shared"]["seconds"]
    print(f"min(8, CPUs) threads each / CPUs / N each: {ratio:.2f}x; the same table: {same}")
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "workers": args.workers, "budget": args.budget,
                                         "runs": runs, "ratio": round(ratio, 3), "same_table": same}, indent=2))


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
