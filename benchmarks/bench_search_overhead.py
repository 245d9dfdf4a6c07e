"""The surrogate search's own bookkeeping (everything but scoring tables) at a real model's size, with a synthetic
fitness: its kernel grown by each new table's rows, against the same search rebuilding the kernel at each step
from every scored table as it did before (one n × n × U array of counts), with the same tables proposed.

Run by hand (never from the tests):

    .venv/bin/python benchmarks/bench_search_overhead.py --threads 1 --sizes 8x4,32x8 --json overhead.json
    .venv/bin/python benchmarks/bench_search_overhead.py --threads 1 --sizes 224x8 --proposals 8 --no-rebuild

A size is blocks x tasks (224 x 8: Llama-3-8B's 32 layers × 7 projections as blocks, 8 adapters). The screen
scores every single-unit table first (U·T of them), then `--proposals` tables are proposed (default: the
default budget's 2·U·T). Seconds exclude the fitness and the imports; each run is a subprocess, and its peak MB
the peak resident memory (ru_maxrss, the imports of numpy and torch, whose triangular solves the search uses,
included: about 230 MB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loramerge_cli.search import surrogate  # noqa: E402
from loramerge_cli.search.surrogate import Posterior, SurrogateSettings, _cholesky, run_surrogate  # noqa: E402


class PairwiseFitness:
    """f(S) = Σ w_i + ½ Σ V_ij over the pruned entries, plus a small deterministic wobble; timed."""

    def __init__(self, size: int, seed: int):
        generator = np.random.default_rng(seed)
        self.single = generator.normal(0, 1, size)
        upper = np.triu(generator.normal(0, 0.3, (size, size)), 1)
        self.pair, self.seconds = upper + upper.T, 0.0

    def __call__(self, candidates):
        started = time.perf_counter()
        values = []
        for pruned, _ in candidates:
            index = list(pruned)
            values.append(float(self.single[index].sum() + 0.5 * self.pair[np.ix_(index, index)].sum()
                                + 0.1 * np.sin(sum(index))))
        self.seconds += time.perf_counter() - started
        return values


def kernel_at_once(tables: np.ndarray, task_count: int, settings: SurrogateSettings) -> np.ndarray:
    """K + σ²I from every scored table, as the search built it before (n × n × U counts at once)."""
    a2, b2, s2 = settings.prior_single ** 2, settings.prior_pair ** 2, settings.noise ** 2
    compact = tables.astype(np.float32)
    shared = (compact @ compact.T).astype(np.float64)
    by_unit = compact.reshape(len(tables), -1, task_count)
    within = np.einsum("aut,but->abu", by_unit, by_unit).astype(np.float64)
    same_unit_pairs = (within * (within - 1) / 2).sum(axis=2)
    pairs = shared * (shared - 1) / 2
    return (a2 * shared + b2 * (pairs - same_unit_pairs) + (settings.same_unit_ratio ** 2) * b2 * same_unit_pairs
            + s2 * np.eye(len(tables)))


def posterior_rebuilt(scored, values):
    """Posterior.of as the search computed it before: the kernel rebuilt and factored anew (O(n³)) at every
    step (the grown kernel and factor are ignored)."""
    kernel = kernel_at_once(scored.tables, scored.task_count, scored.settings)
    return Posterior(scored.tables, values, (_cholesky(kernel), np.zeros((0, len(kernel)))), scored.settings,
                     surrogate.pair_prior_std(scored.dimension, scored.task_count, scored.settings))


def run(units: int, tasks: int, proposals: int, seed: int, rebuild: bool) -> dict:
    fitness = PairwiseFitness(units * tasks, seed)
    settings = SurrogateSettings(seed=seed, budget=units * tasks + proposals)
    if rebuild:
        Posterior.of = staticmethod(posterior_rebuilt)
    import torch  # noqa: F401 - imported by the search's first triangular solve: not part of its time
    started = time.perf_counter()
    _, spent = run_surrogate(settings, fitness, units, tasks)
    seconds = time.perf_counter() - started - fitness.seconds
    proposal_seconds = [r["seconds"] for r in spent["history"] if r["phase"] == "proposal"]
    return {"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tables": [r["tables"] for r in spent["history"]],
            "last_proposal_seconds": proposal_seconds[-1] if proposal_seconds else None}


def draw_gathered(posterior: Posterior, rng: np.random.Generator):
    """Posterior.draw as the search computed it before: each table's prior value and its share of the correction
    gathered from its k² pairs (np.ix_), table by table, instead of products of the dense 0/1 rows."""
    tables, settings = posterior.tables, posterior.settings
    single, upper, noise = posterior.prior_draw(rng)
    pair = upper + upper.T
    members = [np.flatnonzero(row) for row in tables]
    prior_values = np.array([single[units].sum() + 0.5 * pair[np.ix_(units, units)].sum() for units in members])
    weights = posterior.solve(posterior.values - prior_values - noise)
    correction = np.zeros(pair.shape)
    for units, weight in zip(members, weights):
        correction[np.ix_(units, units)] += weight
    np.fill_diagonal(correction, 0.0)
    return surrogate.PairwiseModel(single + settings.prior_single ** 2 * (tables.T @ weights),
                                   pair + posterior.pair_std ** 2 * correction)


def step_at(units: int, tasks: int, tables: int, table_size: int, seed: int) -> dict:
    """One proposal step's linear algebra with `tables` scored (the screen, then random tables of `table_size`
    pruned entries): the search's factor, grown by the step's one new table, against a new factorisation
    (Cholesky factor, its inverse, (K + σ²I)⁻¹ = L⁻ᵀ L⁻¹: what each step computed before). Both solve
    the same system; the seconds exclude growing the kernel."""
    size = units * tasks
    generator = np.random.default_rng(seed)
    chosen = [(), *[(i,) for i in range(size)]]
    chosen += [tuple(sorted(generator.choice(size, table_size, replace=False).tolist()))
               for _ in range(tables - len(chosen))]
    settings = SurrogateSettings(seed=seed)
    scored = surrogate.ScoredTables(size, tasks, settings, capacity=len(chosen))
    scored.add(chosen[:-1])
    scored.factor()  # where the search's previous step left it
    scored.add(chosen[-1:])
    values = generator.normal(0, 1, len(chosen))
    started = time.perf_counter()
    grown = Posterior.of(scored, values).solve(values)
    grown_seconds = time.perf_counter() - started
    started = time.perf_counter()
    inverse_factor = np.linalg.inv(_cholesky(np.array(scored.kernel)))
    refactored = (inverse_factor.T @ inverse_factor) @ values
    refactored_seconds = time.perf_counter() - started
    if not np.allclose(grown, refactored, rtol=1e-6, atol=1e-9):
        raise SystemExit(f"{units}x{tasks} at {tables} tables: the two solves differ")
    posterior = Posterior.of(scored, values)
    started = time.perf_counter()
    drawn = posterior.draw(np.random.default_rng(seed))
    draw_seconds = time.perf_counter() - started
    started = time.perf_counter()
    gathered = draw_gathered(posterior, np.random.default_rng(seed))
    gathered_seconds = time.perf_counter() - started
    if not all(np.allclose(mine, theirs, rtol=0, atol=1e-9)
               for mine, theirs in ((drawn.pair, gathered.pair), (drawn.single, gathered.single))):
        raise SystemExit(f"{units}x{tasks} at {tables} tables: the two draws differ")
    return {"tables": len(chosen), "grown_seconds": grown_seconds, "refactored_seconds": refactored_seconds,
            "draw_seconds": draw_seconds, "gathered_draw_seconds": gathered_seconds,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(job: dict) -> dict:
    """One run in a fresh process (its own peak memory); an error (out of memory) is reported, not raised."""
    threads = job.pop("threads")
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job), "--threads", str(threads)],
                          capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1].removeprefix("error: ")}
    return json.loads(done.stdout)


def sizes_list(text: str) -> str:
    """`BLOCKSxTASKS,…`, each a whole number >= 1 (an argparse type: a bad one is exit 2, before any work)."""
    import argparse

    for item in text.split(","):
        blocks, sep, tasks = item.partition("x")
        if not (sep and blocks.isdigit() and tasks.isdigit() and int(blocks) >= 1 and int(tasks) >= 1):
            raise argparse.ArgumentTypeError(f"{item!r}: expected BLOCKSxTASKS, both >= 1 (e.g. 8x4)")
    return text


def counts_list(text: str) -> list[int]:
    """`N,…`, each a whole number (an argparse type: a bad one is exit 2, before any work)."""
    if not all(item.isdigit() for item in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers, comma-separated (e.g. 1800,3600)")
    return [int(item) for item in text.split(",")]


def main(argv=None) -> None:
    from examples.arguments import at_least, output_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=sizes_list, default="8x4,32x8", help="blocks x tasks, comma-separated")
    parser.add_argument("--proposals", type=at_least(1), help="tables proposed after the screen (default: 2·U·T)")
    parser.add_argument("--seed", type=at_least(1), default=1)
    parser.add_argument("--threads", type=at_least(1), default=1, help="BLAS threads (set before numpy starts them)")
    parser.add_argument("--rebuild", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the search rebuilding its kernel every step")
    parser.add_argument("--step-at", type=counts_list,
                        help="instead of searching: time one proposal step's linear algebra with this many tables "
                        "scored, comma-separated (e.g. 1800,3600,5376: a 224 x 8 search's default budget ends at "
                        "5,376)")
    parser.add_argument("--table-size", type=at_least(1),
                        help="pruned entries of each table after the screen (with --step-at; default 40, or a "
                        "size's entries if fewer; a 224 x 8 search's tables prune up to 358)")
    parser.add_argument("--json", type=output_file)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step_at:
        for size in args.sizes.split(","):
            units, tasks = (int(part) for part in size.split("x"))
            if args.table_size is not None and args.table_size > units * tasks:
                parser.error(f"--table-size {args.table_size}: a {size} table has {units * tasks} entries")
            if min(args.step_at) < units * tasks + 2:
                parser.error(f"--step-at {min(args.step_at)}: a {size} search has scored {units * tasks + 1} tables "
                             "once its screen is done (give more)")
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(step_at(**job) if "table_size" in job else run(**job)))
        return
    if args.step_at:
        return time_steps(args)
    rows = []
    print(f"{'size':>8} {'proposals':>9} {'grown s':>9} {'MB':>7} {'last step s':>11} {'rebuilt s':>10} {'MB':>7} "
          f"{'ratio':>6}")
    for size in args.sizes.split(","):
        units, tasks = (int(part) for part in size.split("x"))
        proposals = args.proposals if args.proposals is not None else 2 * units * tasks
        job = {"units": units, "tasks": tasks, "proposals": proposals, "seed": args.seed}
        grown = spawn({**job, "rebuild": False, "threads": args.threads})
        row = {**job, "grown": grown}
        if "error" in grown:
            print(f"{size:>8} error: {grown['error']}")
            rows.append(row)
            continue
        line = (f"{size:>8} {proposals:9d} {grown['seconds']:9.2f} {grown['peak_mb']:7.0f} "
                f"{grown['last_proposal_seconds'] or 0:11.3f}")
        if args.rebuild:
            rebuilt = row["rebuilt"] = spawn({**job, "rebuild": True, "threads": args.threads})
            if "error" in rebuilt:
                line += f" error: {rebuilt['error']}"
            elif rebuilt["tables"] != grown["tables"]:
                raise SystemExit(f"{size}: the two searches proposed different tables")
            else:
                line += (f" {rebuilt['seconds']:10.2f} {rebuilt['peak_mb']:7.0f} "
                         f"{rebuilt['seconds'] / grown['seconds']:5.1f}×")
        print(line, flush=True)
        rows.append(row)
    if args.json:
        for row in rows:
            for side in ("grown", "rebuilt"):
                row.get(side, {}).pop("tables", None)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if any("error" in row["grown"] for row in rows):  # (the rebuilt side may run out of memory: reported)
        raise SystemExit(1)


def time_steps(args) -> None:
    """--step-at: one row per size and number of tables scored."""
    rows = []
    print(f"{'size':>8} {'tables':>7} {'grown s':>9} {'refactored s':>13} {'ratio':>7} {'draw s':>7} "
          f"{'gathered s':>10} {'ratio':>6} {'peak MB':>8}")
    for size in args.sizes.split(","):
        units, tasks = (int(part) for part in size.split("x"))
        for tables in args.step_at:
            table_size = args.table_size if args.table_size is not None else min(40, units * tasks)
            row = spawn({"units": units, "tasks": tasks, "tables": tables, "table_size": table_size,
                         "seed": args.seed, "threads": args.threads})
            rows.append({"units": units, "tasks": tasks, **row})
            if "error" in row:
                print(f"{size:>8} {tables:7d} error: {row['error']}", flush=True)
                continue
            print(f"{size:>8} {row['tables']:7d} {row['grown_seconds']:9.3f} {row['refactored_seconds']:13.2f} "
                  f"{row['refactored_seconds'] / row['grown_seconds']:6.0f}× {row['draw_seconds']:7.2f} "
                  f"{row['gathered_draw_seconds']:10.2f} {row['gathered_draw_seconds'] / row['draw_seconds']:5.1f}× "
                  f"{row['peak_mb']:8.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if any("error" in row for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
