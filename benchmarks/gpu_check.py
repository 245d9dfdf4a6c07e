"""GPU check (issue 13): the bundled example's text setting through the CLI on cuda and on cpu, the results
compared and the GPU's costs printed. Run through benchmarks/gpu_check.sh (which builds the example first).

Steps, each on cpu and on cuda:0 (eval also in bfloat16 on cuda):
  eval        base, experts and two merged adapters (ta, ties) on every task
  lambda      merge --merger ta --lambda auto (the 20-point grid)
  enmp        search-mask --strategy enmp (ties, same seed)
  nsc         search-mask --strategy nsc (label-free coefficients)
Checks: eval and grid accuracies within one example per task; the chosen λ and the ENMP table the same; NSC
coefficients within --nsc-tolerance. Prints seconds per step and per generation and the peak GPU memory of
each cuda step (torch.cuda.max_memory_allocated, in this process). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEVICES = {"cpu": "cpu", "gpu": "cuda:0"}  # "gpu" is --device (cpu: a dry run of this script without a GPU)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def cli(args: list[str]):
    """The loramerge CLI in this process; returns (stdout, seconds, peak GPU MB)."""
    from typer.testing import CliRunner

    from loramerge_cli.cli.app import app

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    seconds = time.perf_counter() - started
    if result.exit_code != 0:
        raise SystemExit(f"loramerge {' '.join(map(str, args))} failed ({result.exit_code}): {result.stderr[-2000:]}")
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return result.stdout, seconds, peak


def within_one_example(a: dict, b: dict, sizes: dict) -> bool:
    return all(abs(a[task] - b[task]) * sizes[task] <= 1 + 1e-9 for task in a)


def run(args) -> dict:
    from bench_eval import setting_paths

    tasks, adapters = setting_paths(args.example)
    work = args.work / time.strftime("%Y%m%d-%H%M%S")  # fresh run directories on every run
    work.mkdir(parents=True)
    common = ["--adapters", *adapters, "--tasks", tasks]
    limit = ["--val-limit", str(args.val_limit)]
    merged = []
    for merger in ("ta", "ties"):
        folder = work / f"merged_{merger}"
        cli(["merge", "--adapters", *adapters, "--merger", merger, "--out", folder, "--quiet"])
        merged.append(f"{merger}={folder}")
    report: dict = {"settings": vars(args) | {"example": str(args.example), "work": str(work)},
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
                    "torch": torch.__version__, "steps": {}, "checks": {}}
    steps, checks = report["steps"], report["checks"]

    def record(name: str, device: str, seconds: float, peak: float, **extra) -> None:
        steps[f"{name} {device}"] = {"seconds": round(seconds, 2), "peak_gpu_mb": round(peak, 1), **extra}

    # eval
    evals = {}
    for role, dtype in (("cpu", "float32"), ("gpu", "float32"), ("gpu", "bfloat16")):
        stdout, seconds, peak = cli(["eval", *common, "--merged", *merged, *limit, "--device", DEVICES[role],
                                     "--dtype", dtype, "--json", "--threads", str(args.threads)])
        evals[f"{role} {dtype}"] = json.loads(stdout)
        record("eval", f"{DEVICES[role]} {dtype}", seconds, peak if role == "gpu" else 0.0)
    sizes = evals["cpu float32"]["examples"]
    rows = {key: {row["name"]: row["accuracy"] for row in value["rows"]} for key, value in evals.items()}
    checks["eval: cuda float32 within one example per task of cpu"] = all(
        within_one_example(rows["gpu float32"][name], rows["cpu float32"][name], sizes)
        for name in rows["cpu float32"])
    report["bfloat16_vs_float32_cuda_max_examples_apart"] = max(
        abs(rows["gpu bfloat16"][name][task] - rows["gpu float32"][name][task]) * sizes[task]
        for name in rows["cpu float32"] for task in sizes)

    # merge --lambda auto
    tuning = {}
    for role, device in DEVICES.items():
        out = work / f"lambda_{role}"
        _, seconds, peak = cli(["merge", *common, "--merger", "ta", "--lambda", "auto", *limit, "--device", device,
                                "--out", out, "--quiet"])
        tuning[role] = json.loads((out / "loramerge.json").read_text())["lambda_tuning"]
        record("merge --lambda auto", device, seconds, peak if role == "gpu" else 0.0, best=tuning[role]["best"])
    checks["lambda auto: the same λ"] = tuning["cpu"]["best"] == tuning["gpu"]["best"]
    checks["lambda auto: grid accuracies within one example per task"] = all(
        within_one_example(a["accuracy"], b["accuracy"], sizes)
        for a, b in zip(tuning["cpu"]["grid"], tuning["gpu"]["grid"]))

    # search-mask enmp and nsc
    tables = {}
    for strategy in ("enmp", "nsc"):
        for role, device in DEVICES.items():
            run_dir = work / f"{strategy}_{role}"
            out = run_dir.with_suffix(".json")
            flags = (["--merger", "ties", "--popsize", str(args.popsize), "--generations", str(args.generations),
                      "--seed", "1"] if strategy == "enmp" else ["--steps", str(args.nsc_steps)])
            stdout, seconds, peak = cli(["search-mask", *common, "--strategy", strategy, *flags, *limit,
                                         "--device", device, "--threads", str(args.threads), "--run-dir", run_dir,
                                         "--out", out, "--json"])
            tables[f"{strategy} {role}"] = json.loads(stdout)
            history = [json.loads(line) for line in (run_dir / "trajectory.jsonl").read_text().splitlines()]
            per = sum(item["seconds"] for item in history) / len(history)
            record(f"search-mask {strategy}", device, seconds, peak if role == "gpu" else 0.0,
                   **{("seconds_per_generation" if strategy == "enmp" else "seconds_per_step"): round(per, 3)})
    checks["enmp: the same table"] = tables["enmp cpu"]["weights"] == tables["enmp gpu"]["weights"]
    nsc_cpu = torch.tensor(tables["nsc cpu"]["weights"])
    nsc_gpu = torch.tensor(tables["nsc gpu"]["weights"])
    report["nsc_max_coefficient_difference"] = float((nsc_cpu - nsc_gpu).abs().max())
    checks[f"nsc: coefficients within {args.nsc_tolerance:g}"] = report["nsc_max_coefficient_difference"] <= \
        args.nsc_tolerance
    return report


def render(report: dict) -> None:
    print(f"GPU: {report['gpu']}, torch {report['torch']}")
    print(f"{'step':<42}{'seconds':>9}{'s/gen or s/step':>17}{'peak GPU MB':>13}")
    for name, step in report["steps"].items():
        per = step.get("seconds_per_generation", step.get("seconds_per_step", ""))
        print(f"{name:<42}{step['seconds']:>9.2f}{per!s:>17}{step['peak_gpu_mb']:>13.1f}")
    print(f"bfloat16 vs float32 on cuda: at most {report['bfloat16_vs_float32_cuda_max_examples_apart']:.0f} "
          f"example(s) apart per task; NSC coefficients: max |cpu - cuda| = "
          f"{report['nsc_max_coefficient_difference']:.2e}")
    for check, passed in report["checks"].items():
        print(f"{'PASS' if passed else 'FAIL'}  {check}")


def main(argv: list[str] | None = None) -> int:
    from examples.bundled.build import DEFAULT_OUT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", type=Path, default=ROOT / DEFAULT_OUT, help="bundled example folder")
    parser.add_argument("--work", type=Path, required=True, help="folder for merged adapters and run directories")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--val-limit", type=int, default=256)
    parser.add_argument("--popsize", type=int, default=8)
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--nsc-steps", type=int, default=30)
    parser.add_argument("--nsc-tolerance", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=4, help="torch CPU threads of the cpu runs")
    parser.add_argument("--device", default="cuda:0", help="device compared with cpu (default cuda:0; cpu: dry run)")
    args = parser.parse_args(argv)
    DEVICES["gpu"] = args.device
    if args.device != "cpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is false)", file=sys.stderr)
        return 2
    report = run(args)
    render(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
