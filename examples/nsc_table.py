"""Label-free merging on the bundled example (issue 6's table): NSC, AdaMerging and label-free ENMP
against `ta` at its default λ and against labelled ENMP, on the text setting (default) or the image one.

Every row runs the real command (`loramerge search-mask …` in a subprocess, timed) once per seed, then
scores the table it wrote as `merge --mask` would (merger `ta`; the table's scale, else the default λ)
on the validation and the test split. The label-free rows read no label; labels are read here only to
score their results.

    python -m examples.nsc_table [--setting text|image] [--seeds 1,2,3] [--rows nsc,nsc_o_proj,…] [--threads 1]
                                 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TA_LAMBDA = "{ta_lambda}"  # in a row's flags: replaced by 1/T, ta's default λ
ENMP_FLAGS = ["--merger", "ta", "--strategy", "enmp", "--popsize", "8", "--generations", "15", "--val-limit", "256"]
SURROGATE_FLAGS = ["--merger", "ta", "--val-limit", "256"]  # its default budget: 3 · units · tasks evaluations
NSC_PRIORS = ["--prior-single", "0.05", "--prior-pair", "0.01", "--noise", "0.025"]  # the --noise help's advice
ROWS = {  # key: (label, search-mask flags)
    "nsc": ("NSC, defaults (v_proj in the last quarter of the blocks)", ["--strategy", "nsc"]),
    "nsc_o_proj": ("NSC, --target-modules o_proj (the output projection)",
                   ["--strategy", "nsc", "--target-modules", "o_proj"]),
    "nsc_q_proj": ("NSC, --target-modules q_proj (the query projection)",
                   ["--strategy", "nsc", "--target-modules", "q_proj"]),
    "nsc_init_ta": ("NSC, --init 1/T (ta's default λ)", ["--strategy", "nsc", "--init", TA_LAMBDA]),
    "nsc_llm": ("NSC, the paper's LLM setting (--steps 500 --lr 3e-4 --batch-size 2)",
                ["--strategy", "nsc", "--steps", "500", "--lr", "3e-4", "--batch-size", "2"]),
    "entropy": ("AdaMerging (--objective entropy)", ["--strategy", "nsc", "--objective", "entropy"]),
    "enmp": ("ta + ENMP, labelled (popsize 8 × 15)", ENMP_FLAGS),
    "enmp_nsc": ("ta + ENMP --fitness nsc (no label read; v_proj)", [*ENMP_FLAGS, "--fitness", "nsc"]),
    "enmp_nsc_o_proj": ("ta + ENMP --fitness nsc --target-modules o_proj",
                        [*ENMP_FLAGS, "--fitness", "nsc", "--target-modules", "o_proj"]),
    "surrogate": ("ta + surrogate (the default strategy), labelled", SURROGATE_FLAGS),
    "surrogate_nsc": ("ta + surrogate --fitness nsc, its default priors (in accuracy points)",
                      [*SURROGATE_FLAGS, "--fitness", "nsc"]),
    "surrogate_nsc_priors": ("ta + surrogate --fitness nsc --prior-single 0.05 --prior-pair 0.01 --noise 0.025",
                             [*SURROGATE_FLAGS, "--fitness", "nsc", *NSC_PRIORS]),
}


class Scorer:
    """Mean normalized accuracy of a `ta` merge (with or without a table) on one split."""

    def __init__(self, adapters, tasks_file: Path, split: str, threads: int):
        from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
        from loramerge_cli.evaluation.engine import EvalSettings, Evaluator
        from loramerge_cli.evaluation.specs import load_task_file

        self.adapters = adapters
        self.engine = Evaluator(load_task_file(tasks_file), adapters, EvalSettings(split=split, threads=threads))
        self.experts = expert_scores(self.engine, ScoreCache())

    def __call__(self, table=None, lam: float | None = None) -> tuple[float, dict[str, float]]:
        from loramerge_cli.evaluation.metrics import mean_defined, normalized_accuracy
        from loramerge_cli.merging.merge import MergeConfig, resolve_config, run_merge

        settings = resolve_config(MergeConfig(merger="ta", lam=lam), len(self.adapters), table)
        per_task = normalized_accuracy(self.engine.score_merged(run_merge(self.adapters, settings, table)),
                                       self.experts)[0]
        return mean_defined(per_task), per_task


def run_command(flags: list[str], arguments: list[str], tasks_file: Path, seed: int, threads: int,
                out: Path) -> float:
    """`loramerge search-mask` with these flags; returns its wall time in seconds."""
    adapter_flags = [item for argument in arguments for item in ("--adapters", argument)]
    command = [sys.executable, "-m", "loramerge_cli", "search-mask", *adapter_flags, "--tasks", str(tasks_file),
               *flags, "--seed", str(seed), "--threads", str(threads), "--out", str(out)]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{finished.stderr[-2000:]}")
    return time.perf_counter() - started


def row_flags(key: str, task_count: int) -> list[str]:
    """A row's search-mask flags, `TA_LAMBDA` replaced by 1/T."""
    return [repr(1 / task_count) if flag == TA_LAMBDA else flag for flag in ROWS[key][1]]


def run_row(key: str, arguments, tasks_file, scorers, seeds, threads, workdir: Path, log) -> dict:
    from loramerge_cli.masks import load_table

    label = ROWS[key][0]
    flags = row_flags(key, len(scorers["test"].adapters))
    runs = []
    for seed in seeds:
        out = workdir / f"{key}-{seed}.json"
        seconds = run_command(flags, arguments, tasks_file, seed, threads, out)
        table = load_table(out)
        scores = {split: scorer(table) for split, scorer in scorers.items()}
        runs.append({"seed": seed, "seconds": seconds, "pruned": table.pruned_count(),
                     **{split: mean for split, (mean, _) in scores.items()}, "test_per_task": scores["test"][1]})
        log(f"{key} seed {seed}: validation {runs[-1]['validation']:.2f}, test {runs[-1]['test']:.2f}, "
            f"{seconds:.0f} s")
    return {"key": key, "label": label, "command": "loramerge search-mask … " + " ".join(flags), "runs": runs}


def baseline_rows(scorers, task_count: int) -> list[dict]:
    rows = []
    for label, lam in ((f"ta, default λ = 1/T = {1 / task_count:.3g}", None), ("ta, λ = 0.4 (NSC's start)", 0.4)):
        scores = {split: scorer(None, lam) for split, scorer in scorers.items()}
        rows.append({"key": "ta" if lam is None else "ta_0.4", "label": label, "command": None, "runs": [{
            "seed": None, "seconds": None, "pruned": 0, **{split: mean for split, (mean, _) in scores.items()},
            "test_per_task": scores["test"][1]}]})
    return rows


def render(rows: list[dict], setting: str, tasks: list[str], seeds, seconds: float):
    from rich.table import Table

    reference = next((row["runs"][0]["test"] for row in rows if row["key"] == "ta"), None)
    table = Table(title=f"Label-free merging, {setting} setting; mean over seeds {list(seeds)} (min–max); test per "
                  f"task: {' '.join(tasks)}; {seconds:.0f} s", title_justify="left")
    for column in ("merge", "validation", "test", "Δ test vs ta", "test per task", "pruned", "wall per run"):
        table.add_column(column, justify="left" if column in ("merge", "test per task") else "right")
    for row in rows:
        runs = row["runs"]
        test = [run["test"] for run in runs]
        spread = f" ({min(test):.2f}–{max(test):.2f})" if len(runs) > 1 else ""
        per_task = " ".join(f"{statistics.mean(run['test_per_task'][task] for run in runs):.1f}" for task in tasks)
        delta = f"{statistics.mean(test) - reference:+.2f}" if reference is not None and row["key"] != "ta" else ""
        wall = f"{statistics.mean(run['seconds'] for run in runs):.0f} s" if runs[0]["seconds"] is not None else ""
        searched = row["key"].startswith(("enmp", "surrogate"))  # a mask search: how many units it pruned
        pruned = f"{statistics.mean(run['pruned'] for run in runs):.1f}" if searched else ""
        table.add_row(row["label"], f"{statistics.mean(run['validation'] for run in runs):.2f}",
                      f"{statistics.mean(test):.2f}{spread}", delta, per_task, pruned, wall)
    return table


def main(argv=None):
    import torch
    from rich.console import Console

    from examples.bundled.build import DEFAULT_OUT
    from examples.main_job import bundled_setting

    from examples.arguments import at_least, integer_list, output_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--setting", choices=("text", "image"), default="text")
    parser.add_argument("--seeds", type=integer_list, default="1,2,3")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"a subset of {', '.join(ROWS)}")
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args(argv)
    unknown = [key for key in args.rows.split(",") if key not in ROWS]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)} (known: {', '.join(ROWS)})")
    console = Console(stderr=True)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tasks_file, arguments, adapters = bundled_setting(args.out, console.log, args.setting)
    scorers = {split: Scorer(adapters, tasks_file, split, args.threads) for split in ("validation", "test")}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    rows = baseline_rows(scorers, len(adapters))
    with tempfile.TemporaryDirectory() as workdir:
        rows += [run_row(key, arguments, tasks_file, scorers, seeds, args.threads, Path(workdir), console.log)
                 for key in args.rows.split(",")]
    seconds = time.perf_counter() - started
    tasks = [adapter.name for adapter in adapters]
    Console(width=200).print(render(rows, args.setting, tasks, seeds, seconds))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "seeds": seeds, "seconds": seconds}, indent=1))


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
