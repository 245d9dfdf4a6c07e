"""Evaluation benchmark (issue 4): candidate evaluations per second on the bundled example's text setting,
loramerge's engine against a naive reload-per-candidate loop, as a ratio in one run.

Run by hand (never from the tests):

    .venv/bin/python benchmarks/bench_eval.py --threads 1 --json bench_eval.json

Every side scores the same merged candidates (task arithmetic at several λ, and random pruning masks) on
the same validation examples, with the same tokenised batches and the same torch thread count:

* engine: one `Evaluator`; each candidate is written as W0 + ΔW into the resident model and W0 is
  copied back afterwards; task heads are swapped per task.
* naive (issue 4's): per candidate, write the merged adapter folder, `from_pretrained` the base, load
  the folder with `PeftModel.from_pretrained`, `merge_and_unload()`, then per task load the head from
  the folder's `heads/` and evaluate.
* naive dense (the reference code's way, for scale): per candidate, `from_pretrained` the base, add
  ΔW to each weight, swap heads per task, evaluate.

Merging is done once, before timing (every side gets the same `MergeResult`s); the naive sides share the
engine's tokenised batches, so they differ only in how a candidate reaches the weights. After one untimed
warm-up per side, the sides take turns per candidate (so they see the same machine load), each running
the candidate `--repeats` times; the fastest run counts. Every side must give the engine's accuracies
exactly; mismatches are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait for the Hub

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loramerge_cli.evaluation import batches as batching  # noqa: E402
from loramerge_cli.evaluation.engine import Delta, EvalSettings, Evaluator, merged_deltas  # noqa: E402
from loramerge_cli.evaluation.heads import read_head_file  # noqa: E402
from loramerge_cli.evaluation.loading import load_base  # noqa: E402
from loramerge_cli.evaluation.metrics import accuracy  # noqa: E402

SIDES = {
    "engine": "engine",
    "naive_dense": "naive, dense reload",
    "naive_peft": "naive, PEFT reload",
}
LEGEND = ("engine: W0 + ΔW written into one resident model; naive, dense reload: from_pretrained + W += ΔW per "
          "candidate; naive, PEFT reload: write the merged folder, from_pretrained + PeftModel + merge_and_unload "
          "per candidate (issue 4's naive loop)")


def setting_paths(out: Path) -> tuple[Path, list[str]]:
    """The text setting's tasks.yaml (built if needed) and its `name=adapter folder` arguments."""
    import yaml

    from examples.bundled.build import FULL, build, stamp, up_to_date

    if up_to_date(out.resolve(), stamp(FULL)):
        build(out)
    else:  # (minutes of silence otherwise)
        print(f"building the bundled example in {out} (a fresh build takes 3–4 min on 2 cores) …", file=sys.stderr,
              flush=True)
        build(out, log=lambda message: print(f"build: {message}", file=sys.stderr, flush=True))
    setting = out / "text"
    tasks_file = setting / "tasks.yaml"
    names = [task["name"] for task in yaml.safe_load(tasks_file.read_text())["tasks"]]
    return tasks_file, [f"{name}={setting / 'adapters' / name}" for name in names]


def build_engine(tasks_file: Path, adapters: list, args) -> Evaluator:
    from loramerge_cli.evaluation.specs import load_task_file

    settings = EvalSettings(split="validation", val_limit=args.val_limit, threads=args.threads,
                            batch_size=args.batch_size)
    return Evaluator(load_task_file(tasks_file), adapters, settings)


def candidates(adapters: list, count: int, merger: str, seed: int) -> list[tuple[str, object]]:
    """(label, MergeResult): the first half the merger at λ0·(0.5, 1, 1.5, …), the rest random masks at λ0
    pruning 20 % of the (task, unit) pairs."""
    from loramerge_cli.masks import from_pruned_indices, ones_table
    from loramerge_cli.merging.merge import MergeConfig, merge, resolve_config

    base_lambda = resolve_config(MergeConfig(merger=merger), len(adapters)).lam
    flat = len(ones_table(adapters).units) * len(adapters)
    rng = random.Random(seed)
    out = []
    for index in range(count):
        if index < (count + 1) // 2:
            lam = round(base_lambda * 0.5 * (index + 1), 6)
            out.append((f"{merger} λ={lam:g}", merge(adapters, MergeConfig(merger=merger, lam=lam))))
        else:
            pruned = sorted(rng.sample(range(flat), max(1, round(0.2 * flat))))
            table = from_pruned_indices(adapters, pruned)
            label = f"{merger} mask {index - (count + 1) // 2 + 1} ({len(pruned)}/{flat} pruned)"
            out.append((label, merge(adapters, MergeConfig(merger=merger), table)))
    return out


class NaiveEvaluator:
    """Reloads the base model for every candidate; shares the engine's tokenised batches, labels and heads
    so the two sides differ only in how a candidate reaches the weights. Classification tasks only."""

    def __init__(self, engine: Evaluator, workdir: Path | None = None):
        self.engine = engine
        self.workdir = workdir  # where the PEFT route writes its merged folders
        self.num_labels = int(engine.model.config.num_labels)

    def _fresh_base(self):
        return load_base(self.engine.base, self.engine.task_file.type, self.engine.device, self.engine.dtype,
                         self.num_labels)

    def _task_accuracy(self, model, task: str, head: dict) -> float:
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for key, tensor in head.items():
                parameters[key].copy_(tensor.to(parameters[key].dtype))
        scores = batching.classifier_scores(model, self.engine.prepared[task])
        return accuracy(scores, self.engine.examples[task].labels, self.engine.task_file.task(task).masked_labels)

    def evaluate_peft(self, result, adapters: list) -> dict[str, float]:
        """Issue 4's naive loop: write the merged folder, reload base + PEFT adapter, merge_and_unload,
        swap heads, evaluate."""
        from peft import PeftModel

        from loramerge_cli.adapters.writer import write_merged_adapter

        folder = write_merged_adapter(result, adapters, self.workdir / "candidate", force=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(self._fresh_base(), str(folder)).merge_and_unload().eval()
        return {task: self._task_accuracy(model, task, read_head_file(folder / "heads" / f"{task}.safetensors"))
                for task in self.engine.task_file.names}

    def evaluate_dense(self, deltas: dict[str, Delta], tasks: list[str] | None = None) -> dict[str, float]:
        """The reference code's way: a fresh copy of the base, W += ΔW per module, heads per task."""
        model = self._fresh_base()
        with torch.no_grad():
            for path, delta in deltas.items():
                weight = model.get_submodule(path).weight
                weight.copy_((weight.to(torch.float32) + delta.dense(weight.device)).to(weight.dtype))
        return {task: self._task_accuracy(model, task, self.engine.heads[task])
                for task in (tasks or self.engine.task_file.names)}


def fastest(function, repeats: int) -> tuple[float, object]:
    """(fastest wall seconds over `repeats` calls, the last output)."""
    best, output = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        output = function()
        best = min(best, time.perf_counter() - started)
    return best, output


def mismatches(engine_scores: list[dict], naive_scores: list[dict], labels: list[str]) -> list[str]:
    out = []
    for label, ours, theirs in zip(labels, engine_scores, naive_scores):
        for task, value in ours.items():
            if value != theirs[task]:
                out.append(f"{label} / {task}: engine {value:.6f}, naive {theirs[task]:.6f}")
    return out


def run(args) -> dict:
    from loramerge_cli.adapters.peft_reader import load_adapters

    torch.set_num_threads(args.threads)
    tasks_file, arguments = setting_paths(args.out)
    adapters = load_adapters(arguments)
    started = time.perf_counter()
    engine = build_engine(tasks_file, adapters, args)
    engine_setup = time.perf_counter() - started
    chosen = candidates(adapters, args.candidates, args.merger, args.seed)
    labels = [label for label, _ in chosen]
    results = [result for _, result in chosen]
    sides = {side: {"seconds": [], "scores": []} for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as workdir:
        naive = NaiveEvaluator(engine, Path(workdir))
        evaluate = {
            "engine": engine.score_merged,
            "naive_dense": lambda result: naive.evaluate_dense(merged_deltas(result)),
            "naive_peft": lambda result: naive.evaluate_peft(result, adapters),
        }
        for side in SIDES:  # warm-up, untimed
            evaluate[side](results[0])
        for result in results:  # the sides take turns per candidate, so they share the machine's load
            for side in SIDES:
                seconds, scores = fastest(lambda: evaluate[side](result), args.repeats)
                sides[side]["seconds"].append(seconds)
                sides[side]["scores"].append(scores)
    examples = {task: engine.prepared[task].count for task in engine.task_file.names}
    totals = {side: sum(sides[side]["seconds"]) for side in SIDES}
    return {
        "settings": {"setting": str(tasks_file), "merger": args.merger, "candidates": args.candidates,
                     "repeats": args.repeats, "threads": args.threads, "val_limit": args.val_limit,
                     "batch_size": args.batch_size, "examples": examples, "torch": torch.__version__,
                     "engine_setup_seconds": engine_setup},
        "candidates": [{"candidate": label, **{side: {"seconds": sides[side]["seconds"][index],
                                                      "accuracy": sides[side]["scores"][index]} for side in SIDES}}
                       for index, label in enumerate(labels)],
        "sides": {side: {"seconds": totals[side], "evaluations_per_second": len(results) / totals[side]}
                  for side in SIDES},
        "speedup": {side: totals[side] / totals["engine"] for side in SIDES if side != "engine"},
        "mismatches": {side: mismatches(sides["engine"]["scores"], sides[side]["scores"], labels)
                       for side in SIDES if side != "engine"},
    }


def render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    settings = report["settings"]
    console = Console(width=max(Console().width, 110))
    examples = sum(settings["examples"].values())
    table = Table(title=f"candidate evaluations, bundled text setting: {len(settings['examples'])} tasks, "
                        f"{examples} validation examples, {settings['candidates']} candidates, "
                        f"{settings['threads']} thread(s)", title_justify="left")
    for column in ("side", "s / candidate", "evaluations / s", "naive s / engine s", "accuracy mismatches"):
        table.add_column(column, justify="left" if column == "side" else "right")
    for side in SIDES:
        data = report["sides"][side]
        table.add_row(SIDES[side], f"{data['seconds'] / settings['candidates']:.3f}",
                      f"{data['evaluations_per_second']:.2f}",
                      f"{report['speedup'][side]:.2f}×" if side in report["speedup"] else "",
                      str(len(report["mismatches"][side])) if side in report["mismatches"] else "")
    console.print(table)
    console.print(LEGEND)
    console.print(f"each candidate: fastest of {settings['repeats']} timed runs per side; engine setup (model, data, "
                  f"tokenisation, once) {settings['engine_setup_seconds']:.1f} s, not counted")
    for side, lines in report["mismatches"].items():
        for line in lines:
            console.print(f"[red]mismatch ({side}):[/red] {line}")


def main(argv: list[str] | None = None) -> dict:
    from examples.bundled.build import DEFAULT_OUT
    from examples.arguments import at_least, merger_name, output_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / DEFAULT_OUT, help="bundled example folder (built if needed)")
    parser.add_argument("--merger", type=merger_name, default="ta", help="merger of the candidates (default ta)")
    parser.add_argument("--candidates", type=at_least(1), default=8, help="candidates per pass (default 8)")
    parser.add_argument("--repeats", type=at_least(1), default=3,
                        help="timed runs per candidate and side; the fastest counts")
    parser.add_argument("--val-limit", type=at_least(1), default=256, help="validation examples per task (default 256)")
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads, both sides (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random masks")
    parser.add_argument("--json", type=output_file, help="also write the results here")
    args = parser.parse_args(argv)
    if args.candidates < 1 or args.repeats < 1:
        parser.error("--candidates and --repeats must be >= 1")
    report = run(args)
    render(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


if __name__ == "__main__":
    from examples.arguments import run_script

    run_script(main)
