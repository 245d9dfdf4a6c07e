"""search-mask, end to end: load and check everything, score experts and the unpruned merge once,
run a strategy (ENMP, greedy, random) on one fitness, and return the weight table with provenance."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from loramerge_cli import __version__
from loramerge_cli.errors import LoramergeError
from loramerge_cli.search.enmp import EnmpSearch, EnmpSettings
from loramerge_cli.search.nsc import NscSettings
from loramerge_cli.search.screened import ScreenedSettings

STRATEGIES = ("screened", "enmp", "greedy", "random", "nsc")
FITNESSES = ("accuracy", "nsc")


@dataclass
class SearchRequest:
    adapters: list[str]
    merge: object  # MergeConfig; lam None = the merger's default
    tasks: Path
    eval: object  # EvalSettings
    lambda_auto: bool = False
    base: str | None = None
    allow_base_mismatch: bool = False
    allow_pickle: bool = False
    strategy: str = "screened"
    enmp: EnmpSettings = field(default_factory=EnmpSettings)
    screened: ScreenedSettings | None = None  # None: ENMP's budget flags, every part on
    fitness: str = "accuracy"  # or "nsc": label-free (Part A §A6), for enmp, greedy and random
    nsc: NscSettings = field(default_factory=NscSettings)  # --strategy nsc, and --fitness nsc's objective
    budget: int | None = None  # distinct evaluations for greedy/random; default popsize·generations
    sparsity: float | None = None  # random: fraction of units pruned; default max_prune / 2
    run_dir: Path | None = None
    resume: bool = False
    report_test: bool = False
    devices: list[str] | None = None  # one worker per entry; None: serial in this process
    command: str = ""


@dataclass
class Problem:
    """Everything a fitness needs, built identically in the parent and in every worker."""

    adapters: list
    settings: object  # ResolvedMerge at the base λ
    template: object  # WeightTable (all ones)
    engine: object  # Evaluator


def build_problem(request: SearchRequest, device: str | None = None, lam: float | None = None) -> Problem:
    from loramerge_cli.adapters.compat import check_compatible
    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.evaluation.engine import Evaluator
    from loramerge_cli.evaluation.specs import load_task_file
    from loramerge_cli.masks import ones_table
    from loramerge_cli.merging.merge import resolve_config

    adapters = load_adapters(request.adapters, request.allow_pickle)
    check_compatible(adapters, request.allow_base_mismatch)
    merge_config = replace(request.merge, lam=lam if lam is not None else request.merge.lam)
    settings = resolve_config(merge_config, len(adapters))
    task_file = load_task_file(request.tasks)
    eval_settings = replace(request.eval, device=device) if device else request.eval
    engine = Evaluator(task_file, adapters, eval_settings, base=request.base, allow_pickle=request.allow_pickle)
    if engine.task_file.names != [a.name for a in adapters]:
        missing = [a.name for a in adapters if a.name not in engine.task_file.names]
        if missing:
            raise LoramergeError(f"{request.tasks}: no task for adapter(s) {', '.join(missing)}")
    return Problem(adapters, settings, ones_table(adapters), engine)


@dataclass
class WorkerBuilder:
    """Picklable: builds a worker's fitness on its device."""

    request: SearchRequest
    lam: float
    experts: dict
    reference: float

    def __call__(self, device: str):
        from loramerge_cli.search.fitness import AccuracyFitness

        problem = build_problem(self.request, device, self.lam)
        return AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, self.experts,
                               self.reference)


def run_search(request: SearchRequest, on_event: Callable[[str, dict], None] = lambda kind, data: None):
    """Returns (WeightTable, summary dict)."""
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.evaluation.tuning import tune_lambda
    from loramerge_cli.search.fitness import AccuracyFitness, pruned_table
    from loramerge_cli.search.parallel import ParallelFitness

    if request.strategy not in STRATEGIES:
        raise LoramergeError(f"--strategy must be one of {', '.join(STRATEGIES)} (got {request.strategy!r})")
    if request.fitness not in FITNESSES:
        raise LoramergeError(f"--fitness must be one of {', '.join(FITNESSES)} (got {request.fitness!r})")
    if not 0 <= request.eval.block_cache_mb < float("inf"):
        raise LoramergeError("--block-cache-mb must be a number >= 0")
    run_dir = Path(request.run_dir) if request.run_dir else None
    if request.strategy == "nsc":
        from loramerge_cli.search.nsc import run_nsc

        request.nsc.check()
        _check_run_dir(request, run_dir)
        return run_nsc(request, on_event)
    if request.fitness == "nsc":
        return _run_label_free(request, run_dir, on_event)
    request.enmp.check()
    if request.strategy == "screened":
        from loramerge_cli.search.screened import screened_settings

        screened_settings(request).check()
    started = time.perf_counter()
    _check_run_dir(request, run_dir)
    problem = build_problem(request)
    lam = problem.settings.lam
    tuning = None
    if request.lambda_auto:
        lam, grid = tune_lambda(problem.adapters, replace(request.merge, lam=None), None, request.tasks,
                                evaluator=problem.engine, run_dir=run_dir,
                                allow_base_mismatch=request.allow_base_mismatch)
        tuning = {"best": lam, "grid": grid}
        problem.settings = replace(problem.settings, lam=lam)
        on_event("lambda", {"lambda": lam})
    experts = expert_scores(problem.engine, ScoreCache(run_dir))
    fitness = AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, experts)
    on_event("start", {"lambda": lam, "reference": fitness.reference, "experts": experts,
                       "units": len(problem.template.units), "tasks": len(problem.adapters)})
    evaluate = fitness
    parallel = None
    if request.strategy == "screened":
        from loramerge_cli.search.screened import screened_ladder

        evaluate, parallel = screened_ladder(request, fitness, WorkerBuilder(request, lam, experts, fitness.reference))
    elif request.devices and len(request.devices) > 1:
        parallel = ParallelFitness(WorkerBuilder(request, lam, experts, fitness.reference), request.devices)
        evaluate = parallel
    unit_count, task_count = len(problem.template.units), len(problem.adapters)

    def on_progress(kind: str, data: dict) -> None:
        if run_dir is not None and "best_pruned" in data:  # the best table so far, every generation
            pruned_table(problem.template, tuple(data["best_pruned"])).save(run_dir / "best.json")
        on_event(kind, data)

    try:
        best, evaluations, history = _run_strategy(request, evaluate, unit_count, task_count, lam, run_dir,
                                                   on_progress)
    finally:
        if parallel is not None:
            parallel.close()
    table = pruned_table(problem.template, best.pruned)
    best_lambda = best.lam if best.lam is not None else lam
    merger = {**problem.settings.describe(), "lambda": best_lambda}
    provenance = _provenance(request, fitness, parallel, best, evaluations, history, started)
    provenance["validation"] = {
        "unpruned_mean_normalized_accuracy": fitness.reference,
        "best_mean_normalized_accuracy": fitness.reference + best.fitness,
        "fitness": best.fitness,
    }
    provenance.update(experts_validation_accuracy=experts, lambda_tuning=tuning)
    if request.report_test:
        provenance["test"] = _test_report(request, lam, best_lambda, best.pruned)
    table = replace(table, scale=best.lam if request.enmp.addscale else None, merger=merger, provenance=provenance)
    return table, provenance


def _run_label_free(request: SearchRequest, run_dir: Path | None, on_event):
    """ENMP (or greedy/random) with the label-free NSC fitness: no expert scores, no labels."""
    from loramerge_cli.search.fitness import pruned_table
    from loramerge_cli.search.nsc_fitness import NscWorkerBuilder, build_nsc_fitness
    from loramerge_cli.search.parallel import ParallelFitness

    if request.lambda_auto:
        raise LoramergeError("--lambda auto tunes λ on labelled validation data; give a number with --fitness nsc")
    request.enmp.check()
    request.nsc.check()
    started = time.perf_counter()
    _check_run_dir(request, run_dir)
    fitness = build_nsc_fitness(request)
    lam = fitness.base_lambda
    template = fitness.template
    on_event("start", {"lambda": lam, "reference_loss": fitness.reference, "objective": request.nsc.objective,
                       "targets": fitness.objective.targets if request.nsc.objective == "nsc" else [],
                       "units": len(template.units), "tasks": len(fitness.adapters)})
    evaluate, parallel = fitness, None
    if request.strategy == "screened":
        from loramerge_cli.search.screened import screened_ladder

        evaluate, parallel = screened_ladder(request, fitness, NscWorkerBuilder(request, lam, fitness.reference))
    elif request.devices and len(request.devices) > 1:
        parallel = ParallelFitness(NscWorkerBuilder(request, lam, fitness.reference), request.devices)
        evaluate = parallel

    def on_progress(kind: str, data: dict) -> None:
        if run_dir is not None and "best_pruned" in data:
            pruned_table(template, tuple(data["best_pruned"])).save(run_dir / "best.json")
        on_event(kind, data)

    try:
        best, evaluations, history = _run_strategy(request, evaluate, len(template.units), len(fitness.adapters),
                                                    lam, run_dir, on_progress)
    finally:
        if parallel is not None:
            parallel.close()
    best_lambda = best.lam if best.lam is not None else lam
    provenance = _provenance(request, fitness, parallel, best, evaluations, history, started)
    provenance.update(fitness="nsc", objective=request.nsc.objective)
    provenance["validation"] = {
        "unpruned_loss": fitness.reference,
        "best_loss": fitness.reference * (1.0 - best.fitness / 100.0),
        "fitness": best.fitness,
    }
    if request.report_test:
        provenance["test"] = _test_report(request, lam, best_lambda, best.pruned)
    merger = {**fitness.unit_settings.describe(), "lambda": best_lambda}
    table = replace(pruned_table(template, best.pruned), scale=best.lam if request.enmp.addscale else None,
                    merger=merger, provenance=provenance)
    return table, provenance


def _provenance(request, fitness, parallel, best, evaluations, history, started) -> dict:
    """What every search records about itself (the validation figures are added by the caller)."""
    from loramerge_cli.search.fidelity import examples_per_evaluation
    from loramerge_cli.search.screened import screened_settings

    search = {"budget": _budget(request), "sparsity": request.sparsity}
    if request.strategy in ("enmp", "screened"):
        search = asdict(request.enmp if request.strategy == "enmp" else screened_settings(request))
    spent = history[-1] if history and "forward_examples" in history[-1] else {}
    return {
        "loramerge": __version__,
        "command": request.command,
        "strategy": request.strategy,
        "seed": request.enmp.seed,
        "search": search,
        "evaluations": evaluations,
        "full_evaluations": evaluations,  # distinct tables scored on the full validation set
        "forward_examples": spent.get("forward_examples", evaluations * examples_per_evaluation(fitness)),
        "forward_passes": fitness.forward_passes if parallel is None else None,
        "pruned_flat_indices": list(best.pruned),
        "seconds": round(time.perf_counter() - started, 3),
        "history": history,
    }


def _budget(request: SearchRequest) -> int:
    return request.budget or request.enmp.popsize * request.enmp.generations


def _run_strategy(request, evaluate, unit_count, task_count, lam, run_dir, on_event):
    from loramerge_cli.search.baselines import greedy_search, random_search
    from loramerge_cli.search.decode import max_pruned

    settings = request.enmp
    k_max = max_pruned(settings.max_prune, unit_count, task_count)
    if request.strategy == "screened":
        from loramerge_cli.search.screened import run_screened, screened_settings

        best, spent = run_screened(screened_settings(request), evaluate, unit_count, task_count, run_dir,
                                   request.resume, on_event)
        return best, spent["full_evaluations"], spent["history"]
    if request.strategy == "enmp":
        search = EnmpSearch(settings, unit_count, task_count, evaluate, base_lambda=lam, run_dir=run_dir,
                            on_generation=lambda record: on_event("generation", record))
        best = search.run(resume=request.resume)
        return best, len(search.state.memo) - 1, search.state.history
    flat = unit_count * task_count
    history: list[dict] = []

    def on_round(record):
        history.append(record)
        on_event("round", record)

    if request.strategy == "greedy":
        ledger = greedy_search(evaluate, flat, k_max, _budget(request), on_round)
    else:
        sparsity = request.sparsity if request.sparsity is not None else settings.max_prune / 2
        count = max(1, min(flat, round(sparsity * flat)))
        ledger = random_search(evaluate, flat, count, _budget(request), settings.seed, on_round)
    return ledger.best(), len(ledger.memo) - 1, history


def _check_run_dir(request: SearchRequest, run_dir: Path | None) -> None:
    """The run directory remembers the resolved request; --resume refuses a different one."""
    if run_dir is None:
        if request.resume:
            raise LoramergeError("--resume needs --run-dir")
        return
    config = {
        "adapters": request.adapters, "merge": _plain(asdict(request.merge)), "tasks": str(request.tasks),
        "eval": _plain(asdict(request.eval)), "strategy": request.strategy, "enmp": asdict(request.enmp),
        "lambda_auto": request.lambda_auto, "base": request.base, "budget": request.budget,
        "sparsity": request.sparsity,
    }
    if request.strategy == "nsc" or request.fitness == "nsc":
        config.update(fitness=request.fitness, nsc=asdict(request.nsc))
    if request.strategy == "screened":
        from loramerge_cli.search.screened import screened_settings

        config["screened"] = asdict(screened_settings(request))
    path = run_dir / "config.json"
    if request.resume:
        if not path.is_file():
            raise LoramergeError(f"--resume: {run_dir} holds no search to resume")
        saved = json.loads(path.read_text())
        if saved != json.loads(json.dumps(config)):
            changed = sorted(key for key in config if json.loads(json.dumps(config[key])) != saved.get(key))
            raise LoramergeError(f"--resume: the settings differ from the saved run's ({', '.join(changed)})")
        return
    from loramerge_cli.search.nsc import STATE_NAME

    if (run_dir / "state.pkl").exists() or (run_dir / STATE_NAME).exists():
        raise LoramergeError(f"{run_dir} already holds a search; pass --resume to continue it, or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _plain(data: dict) -> dict:
    return {key: (str(value) if not isinstance(value, (int, float, str, bool, list, type(None))) else value)
            for key, value in data.items()}


def _test_report(request: SearchRequest, lam: float, best_lambda: float, pruned: tuple[int, ...]) -> dict:
    """Mean normalized test accuracy of the unpruned merge and of the best table (--report-test)."""
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.search.fitness import AccuracyFitness

    test_request = replace(request, eval=replace(request.eval, split="test", val_limit=None))
    problem = build_problem(test_request, lam=lam)
    experts = expert_scores(problem.engine, ScoreCache(request.run_dir))
    fitness = AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, experts)
    best = fitness.score(pruned, best_lambda)
    return {"unpruned_mean_normalized_accuracy": fitness.reference, "best_mean_normalized_accuracy": best,
            "experts_test_accuracy": experts}


