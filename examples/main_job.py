"""The main job on the bundled example: build it once (cached), tune λ and merge with every merger,
evaluate on the test split, run one mask search with the default strategy (surrogate) and one paper ENMP
search with the example's recorded budget, print one table.

    python -m examples.main_job [--out examples/.cache/bundled] [--json results.json] [--no-search]

Everything goes through loramerge's library API, in one process, so the models are loaded once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait for the Hub

MERGERS = ("ta", "ties", "dare_ties", "tsv", "iso_c", "tsv_iso", "knots", "core")
ENMP_BUDGET = {"merger": "ta", "popsize": 8, "generations": 15, "val_limit": 256}  # the recorded budget
SEARCHES = (("surrogate", "the default strategy"), ("enmp", "paper ENMP"))  # each: merger ta, λ auto, seed 1
THREADS = 2


def adapter_args(setting: Path, tasks_file: Path) -> list[str]:
    import yaml

    names = [task["name"] for task in yaml.safe_load(tasks_file.read_text(encoding="utf-8"))["tasks"]]
    return [f"{name}={setting / 'adapters' / name}" for name in names]


def bundled_setting(out: Path, log, setting: str = "text") -> tuple[Path, list[str], list]:
    """Build the bundled example if it is not up to date; one setting's (text or image) tasks.yaml,
    adapter arguments (`name=folder`, task order) and loaded adapters."""
    from examples.bundled.build import build
    from loramerge_cli import api

    build(out, log=log)
    tasks_file = out / setting / "tasks.yaml"
    arguments = adapter_args(out / setting, tasks_file)
    return tasks_file, arguments, api.load_adapters(arguments)


def run_setting(setting: Path, merged_root: Path, mergers, search: bool, log, threads: int = THREADS) -> dict:
    """Rows (base, experts, each merger at its tuned λ, the searches) of mean normalized test accuracy."""
    from dataclasses import replace

    from loramerge_cli import api
    from loramerge_cli.evaluation.cache import ScoreCache, base_scores, expert_scores
    from loramerge_cli.evaluation.engine import EvalSettings, Evaluator
    from loramerge_cli.evaluation.metrics import mean_defined, normalized_accuracy
    from loramerge_cli.evaluation.specs import load_task_file
    from loramerge_cli.evaluation.tuning import tune_lambda
    from loramerge_cli.merging.merge import MergeConfig, merge
    from loramerge_cli.search.enmp import EnmpSettings
    from loramerge_cli.search.runner import SearchRequest, run_search

    tasks_file = setting / "tasks.yaml"
    arguments = adapter_args(setting, tasks_file)
    adapters = api.load_adapters(arguments)
    validation_settings = EvalSettings(split="validation", val_limit=ENMP_BUDGET["val_limit"], threads=threads,
                                       batch_size=32)
    validation = Evaluator(load_task_file(tasks_file), adapters, validation_settings)
    test = Evaluator(load_task_file(tasks_file), adapters, replace(validation_settings, split="test", val_limit=None))
    cache = ScoreCache(merged_root / "scores")
    experts = expert_scores(test, cache)
    rows = []

    def add_row(name: str, scores: dict, lam=None, seconds=None, note=""):
        normalized, _ = normalized_accuracy(scores, experts)
        rows.append({"method": name, "lambda": lam, "accuracy": scores, "normalized": normalized,
                     "mean_normalized": mean_defined(normalized), "seconds": seconds, "note": note})

    add_row("base", base_scores(test, cache))
    add_row("experts", experts)
    for merger in mergers:
        started = time.perf_counter()
        log(f"{setting.name}: {merger}: choosing λ on the validation split, then merging and testing …")
        lam, _ = tune_lambda(adapters, MergeConfig(merger=merger), None, tasks_file, evaluator=validation,
                             run_dir=merged_root / "scores")
        result = merge(adapters, MergeConfig(merger=merger, lam=lam))
        api.write_merged_adapter(result, adapters, merged_root / merger, force=True,
                                 command=f"python -m examples.main_job ({merger}, λ auto)")
        add_row(merger, test.score_merged(result), lam, time.perf_counter() - started)
        log(f"{setting.name}: {merger} λ={lam:.3g} mean normalized test accuracy {rows[-1]['mean_normalized']:.1f}")
    for strategy, what in SEARCHES if search else ():
        started = time.perf_counter()
        request = SearchRequest(
            adapters=arguments, merge=MergeConfig(merger=ENMP_BUDGET["merger"]), tasks=tasks_file,
            eval=validation_settings, lambda_auto=True, strategy=strategy,
            enmp=EnmpSettings(popsize=ENMP_BUDGET["popsize"], generations=ENMP_BUDGET["generations"], seed=1)
            if strategy == "enmp" else EnmpSettings(seed=1),  # the surrogate: its default budget, 3 · units · tasks
        )
        log(f"{setting.name}: {strategy} search ({what}) on {ENMP_BUDGET['merger']}, λ auto …")
        table, provenance = run_search(request, improvements(log, f"{setting.name}: {strategy}"))
        table.save(merged_root / f"{strategy}_mask.json")
        lam = table.merger["lambda"]
        result = merge(adapters, MergeConfig(merger=ENMP_BUDGET["merger"], lam=lam), table)
        api.write_merged_adapter(result, adapters, merged_root / strategy, force=True, table=table,
                                 command=f"python -m examples.main_job ({what})")
        note = (f"{what}: {table.pruned_count()} of {len(table.tasks) * len(table.units)} units pruned, "
                f"{provenance['evaluations']} evaluations")
        add_row(f"{ENMP_BUDGET['merger']} + {strategy}", test.score_merged(result), lam, time.perf_counter() - started,
                note)
        log(f"{setting.name}: {strategy} search, {note}, mean normalized test accuracy "
            f"{rows[-1]['mean_normalized']:.1f}")
    return {"tasks": list(experts), "rows": rows}


def improvements(log, prefix: str):
    """A run_search callback that logs the chosen λ and each new best table (not every step)."""
    best = {"fitness": 0.0}

    def on_event(kind: str, data: dict) -> None:
        if kind == "lambda":
            log(f"{prefix}: λ = {data['lambda']:.3g}; searching …")
        elif "best_fitness" in data and round(data["best_fitness"], 2) > best["fitness"]:  # as logged
            best["fitness"] = round(data["best_fitness"], 2)
            evaluations = data.get("full_evaluations", data.get("distinct_evaluated", 1) - 1)
            log(f"{prefix}: best so far {data['best_fitness']:+.2f} points over the unpruned merge, table "
                f"{data.get('best_pruned', '')}, after {evaluations} evaluations")

    return on_event


def render(results: dict):
    from rich.table import Table

    order = "; ".join(f"{setting}: {', '.join(data['tasks'])}" for setting, data in results["settings"].items())
    table = Table(title=f"bundled example: test accuracy (%) per task ({order}) and mean normalized accuracy; "
                  "seconds include choosing λ", title_justify="left")
    for column in ("setting", "method", "λ", "tasks (acc %)", "mean norm. acc", "seconds"):
        table.add_column(column, justify="left" if column in ("setting", "method", "tasks (acc %)") else "right")
    for setting, data in results["settings"].items():
        for row in data["rows"]:
            accuracies = " ".join(f"{100 * value:.1f}" for value in row["accuracy"].values())
            table.add_row(
                setting, row["method"] + (f" ({row['note']})" if row["note"] else ""),
                "" if row["lambda"] is None else f"{row['lambda']:.3g}", accuracies,
                "" if row["mean_normalized"] is None else f"{row['mean_normalized']:.1f}",
                "" if row["seconds"] is None else f"{row['seconds']:.0f}",
            )
    return table


def main(argv: list[str] | None = None) -> dict:
    from examples.bundled.build import DEFAULT_OUT
    from loramerge_cli.errors import LoramergeError

    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundled example folder (built if needed)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-search", action="store_true", help="skip the mask searches")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch CPU threads (default {THREADS}, as the "
                        "README's table was measured; another count can move a figure in its last digit)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.json is not None and (args.json.is_dir() or not args.json.resolve().parent.is_dir()):
        parser.error(f"--json {args.json}: give a file in an existing folder")  # before the job, not after it
    try:
        return run_job(args)
    except LoramergeError as error:  # a bad --out: one line, as loramerge's commands say it
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:  # Ctrl-C: one line and 130, as loramerge's commands (the build's cache stays)
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def run_job(args) -> dict:
    import torch
    from rich.console import Console

    from examples.bundled.build import FULL, build, stamp, up_to_date

    console = Console(stderr=True, soft_wrap=True)  # one unwrapped line per message (Console.log's table wraps)

    def log(message: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {message}", highlight=False)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from loramerge_cli.cli.progress import ProgressDisplay

    cached = up_to_date(args.out.resolve(), stamp(FULL))
    with ProgressDisplay(console=console) as display:  # a live elapsed-time line while the build trains
        display.start("bundled example (a fresh build takes 3–4 min on 2 cores)", None)
        build(args.out, log=lambda message: display.print(f"build: {message}"))
        display.finish("bundled example (a fresh build takes 3–4 min on 2 cores)")
    built = round(time.perf_counter() - started, 1)
    results = {"settings": {}}
    for setting, search in (("text", not args.no_search), ("image", False)):
        results["settings"][setting] = run_setting(args.out / setting, args.out / "merged" / setting, MERGERS,
                                                   search, log, args.threads)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["build_seconds"] = built
    Console(width=140).print(render(results))
    Console(soft_wrap=True).print(f"wall time {results['seconds']:.0f} s: the job {results['seconds'] - built:.0f} s, "
                                  f"the build {built:.0f} s ({'cached' if cached else 'built'} in {args.out})")
    if args.json:
        from loramerge_cli import atomic

        atomic.write_text(args.json, json.dumps(results, indent=1, default=str))  # never a half-written file
    return results


if __name__ == "__main__":
    main()
