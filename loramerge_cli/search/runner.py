"""search-mask, end to end: one driver for every fitness (labelled accuracy, label-free loss): build the
fitness, run a strategy from the registry (search/strategies.py) on it, and return the weight table with
provenance. The request is checked first (search/plan.py), before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from loramerge_cli import __version__
from loramerge_cli.events import stage
from loramerge_cli.search.plan import SearchRequest, check_request, prepare_run_dir, with_shared_threads
from loramerge_cli.search.problem import Problem, build_problem  # noqa: F401  (imported from here by callers)
from loramerge_cli.atomic import write_text
from loramerge_cli.search.rundir import BEST_NAME, forget_refused_run, record_finished, state_names
from loramerge_cli.search.state_io import RunClock, hub_base_record, searched_data, started_command
from loramerge_cli.search.strategies import STRATEGIES, SearchSpace  # noqa: F401


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


@dataclass
class Scored:
    """A fitness ready for a strategy, and what the search records about it."""

    fitness: object  # AccuracyFitness or NscFitness: adapters, template, unit_settings, base_lambda, reference
    start: dict  # the "start" event's data
    workers: Callable[[str], object]  # picklable: builds the same fitness on a device
    provenance: dict  # recorded before the validation figures
    validation: Callable[[object], dict]  # best Evaluation -> the provenance's "validation" figures


def _labelled(request: SearchRequest, run_dir: Path | None, on_event) -> Scored:
    """Mean normalized validation accuracy over the unpruned merge (labels read)."""
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.evaluation.metrics import check_experts
    from loramerge_cli.search.fitness import AccuracyFitness

    problem = build_problem(request, _first_device(request), report=on_event)
    lam, tuning = problem.settings.lam, None
    experts = expert_scores(problem.engine, ScoreCache(run_dir), on_event)
    warnings = problem.engine.data_warnings() + check_experts(experts, "λ and the table" if request.lambda_auto
                                                             else "the table")
    if request.lambda_auto:
        search = _search_lambda(request, problem, experts, run_dir, on_event)
        lam, tuning = search.best, search.describe()
        problem.settings = replace(problem.settings, lam=lam)
        on_event("lambda", {"lambda": lam, "points": len(search.records), "warnings": search.warnings})
    with stage(on_event, "scoring the unpruned merge", 1) as step:
        fitness = AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, experts)
        step(f"{fitness.reference:.2f}")
    return Scored(
        fitness, {"lambda": lam, "reference": fitness.reference, "experts": experts, "warnings": warnings},
        WorkerBuilder(request, lam, experts, fitness.reference),
        {"experts_validation_accuracy": experts, "lambda_tuning": tuning,
         "max_length": dict(problem.engine.max_lengths), "eval_dtype": problem.engine.settings.dtype,
         **({"warnings": warnings} if warnings else {})},
        lambda best: {"unpruned_mean_normalized_accuracy": fitness.reference,
                      "best_mean_normalized_accuracy": fitness.reference + best.fitness, "fitness": best.fitness},
    )


def _label_free(request: SearchRequest, run_dir: Path | None, on_event) -> Scored:
    """% reduction of the label-free objective's loss over the unpruned merge (no labels read)."""
    from loramerge_cli.search.nsc_fitness import NscWorkerBuilder, build_nsc_fitness

    fitness = build_nsc_fitness(request, _first_device(request))
    objective = request.nsc.objective
    return Scored(
        fitness, {"lambda": fitness.base_lambda, "reference_loss": fitness.reference, "objective": objective,
                  "targets": fitness.objective.targets if objective == "nsc" else []},
        NscWorkerBuilder(request, fitness.base_lambda, fitness.reference),
        {"fitness": "nsc", "objective": objective, "max_length": dict(fitness.engine.max_lengths),
         "eval_dtype": fitness.engine.settings.dtype,
         **({"warnings": warnings} if (warnings := fitness.engine.data_warnings()) else {})},
        lambda best: {"unpruned_loss": fitness.reference, "best_loss": fitness.reference * (1 - best.fitness / 100),
                      "fitness": best.fitness},
    )


FITNESSES: dict[str, Callable] = {"accuracy": _labelled, "nsc": _label_free}


def resume_command(request: SearchRequest) -> str:
    """The command that resumes this run as it ran (its threads, devices and backend; not saved in the run)."""
    from loramerge_cli.errors import shell_words
    from loramerge_cli.search.rundir import HOW_IT_RUNS

    words = ["loramerge", "search-mask", "--run-dir", str(request.run_dir), "--resume"]
    flags = request.flags or {}
    for name, default in HOW_IT_RUNS.items():
        if flags.get(name) not in (None, default):
            words += [f"--{name.replace('_', '-')}", str(flags[name])]
    if flags.get("force"):  # (the --out it was allowed to replace is still there)
        words.append("--force")
    return shell_words(words)  # (one line, whatever the run dir's name holds)


def run_search(request: SearchRequest, on_event: Callable[[str, dict], None] = lambda kind, data: None):
    """Returns (WeightTable, provenance). Checks the request first (plan_search) unless it was planned. The
    run directory, if any, is locked for the whole search (one search per folder at a time); it ends holding
    the table (best.json) and, written last, finished.json."""
    if request.run_dir is None:
        return _run_search(request, on_event)
    from loramerge_cli.search.rundir import RunDirLock

    run_dir = Path(request.run_dir)
    before = {path.name for path in run_dir.iterdir()} if run_dir.is_dir() else None
    held = False
    try:
        with RunDirLock(run_dir):
            held = True
            table, provenance = _run_search(request, on_event)
            text = table.text()  # the run's table, then the mark that it finished (still holding the lock)
            write_text(run_dir / BEST_NAME, text)
            record_finished(run_dir, text)
            from loramerge_cli import interrupts

            interrupts.set_hint(f"the search had finished; its table: {resume_command(request)}", resumable=True)
            return table, provenance
    except Exception:  # refused, or failed, before saving any state (Ctrl-C keeps the run dir: it resumes)
        if held:  # (a run refused the lock leaves the folder to the search that holds it)
            forget_refused_run(run_dir, before)
            if not any((run_dir / name).exists() for name in state_names()):  # nothing left to resume
                from loramerge_cli import interrupts

                interrupts.set_hint(None)
        raise


def _run_search(request: SearchRequest, on_event: Callable[[str, dict], None]):
    from loramerge_cli.search.fitness import pruned_table

    strategy = check_request(request)
    request = with_shared_threads(request)
    run_dir = Path(request.run_dir) if request.run_dir else None
    prepare_run_dir(request)
    if run_dir is not None:  # from now on the run dir holds what --resume reads (before: rerun the command)
        from loramerge_cli import interrupts

        if strategy.resumable:
            interrupts.set_hint(f"resume with: {resume_command(request)}", resumable=True)
        else:  # (--resume would be refused)
            interrupts.set_hint(f"--strategy {strategy.name} keeps no state to resume: rerun the command to start "
                                "it over")
    if strategy.kind == "coefficients":
        from loramerge_cli.search.nsc import run_nsc

        return run_nsc(request, on_event)
    clock = RunClock(run_dir, request.resume)
    scored = FITNESSES[request.fitness](request, run_dir, on_event)
    fitness, template = scored.fitness, scored.fitness.template
    lam = fitness.base_lambda
    on_event("start", {**scored.start, "units": len(template.units), "tasks": len(fitness.adapters)})

    def on_progress(kind: str, data: dict) -> None:
        if run_dir is not None and "best_pruned" in data:  # the best table so far, every generation
            pruned_table(template, tuple(data["best_pruned"])).save(run_dir / BEST_NAME)
        clock.tick()
        on_event(kind, data)

    space = SearchSpace(len(template.units), len(fitness.adapters), lam, run_dir, request.resume)
    evaluate, workers = fitness, scored.workers
    if strategy.scoring is not None:  # e.g. the screened search's validation subsets
        evaluate, workers = strategy.scoring(request, fitness, workers)
    with _worker_pool(workers, request) as parallel:
        if parallel is not None:
            parallel.reside(fitness.engine)  # one model on the workers' first device
            with stage(on_event, "starting the workers", 1) as step:  # before the first step (its time)
                parallel.start()
                step()
            evaluate = parallel if strategy.scoring is None else replace(evaluate, backend=parallel)
        outcome = strategy.run(request, evaluate, space, on_progress)
    best = outcome.best
    best_lambda = best.lam if best.lam is not None else lam
    provenance = _provenance(request, fitness, outcome, clock)
    # whether the search scored every table the ρ cap allows (a larger budget buys nothing; with λ searched
    # too, tables are without number)
    provenance["every_allowed_table_scored"] = not request.enmp.addscale and outcome.evaluations >= allowed_tables(
        space.unit_count * space.task_count, request.enmp.max_prune)
    if outcome.every_table_seen and not provenance["every_allowed_table_scored"]:  # (why a search ended early)
        provenance["every_allowed_table_seen"] = True  # some on a validation subset only: halving left them there
    provenance.update(scored.provenance)
    provenance["validation"] = scored.validation(best)
    merger = {**fitness.unit_settings.describe(), "lambda": best_lambda}
    if request.report_test:  # the validation engine (its model on the device) goes before the test one loads
        from loramerge_cli.evaluation.engine import release_device_memory

        del scored, fitness, evaluate, on_progress
        release_device_memory()
        provenance["test"] = _test_report(request, lam, best_lambda, best.pruned, on_event)
    table = replace(pruned_table(template, best.pruned), scale=best.lam if request.enmp.addscale else None,
                    merger=merger, provenance=provenance)
    return table, provenance


def _first_device(request: SearchRequest) -> str | None:
    """The driver scores the experts and the unpruned merge on the workers' first device (the reference
    every worker's fitness is measured against)."""
    return request.devices[0] if request.devices else None


def _worker_pool(build, request: SearchRequest):
    """The search's workers (search/backends.py) as a context: yields None for a serial search."""
    from loramerge_cli.search.backends import Backend, worker_pool

    backend = Backend(request.backend, request.devices, request.ray_address)
    return worker_pool(build, backend, request.eval.device, request.eval.threads)


def _search_lambda(request: SearchRequest, problem: Problem, experts: dict, run_dir: Path | None, on_event):
    """--lambda auto before the search, each stage of its grid on the search's workers."""
    from loramerge_cli.evaluation.tuning import search_lambda
    from loramerge_cli.evaluation.workers import EngineSource, LambdaScorer

    config = replace(request.merge, lam=None)
    source = EngineSource(request.tasks, request.adapters, request.eval, request.base, request.allow_pickle)
    scorer = LambdaScorer(source, config, None, request.allow_base_mismatch)
    with _worker_pool(scorer, request) as pool:
        return search_lambda(problem.adapters, config, None, request.tasks, evaluator=problem.engine, run_dir=run_dir,
                             allow_base_mismatch=request.allow_base_mismatch, report=on_event, pool=pool,
                             experts=experts)


def allowed_tables(flat_size: int, max_prune: float) -> int:
    """The pruned tables (the unpruned one left out) that the --max-prune cap allows over `flat_size` units."""
    from loramerge_cli.search.decode import feasible_tables, max_pruned

    return feasible_tables(flat_size, max_pruned(max_prune, flat_size, 1)) - 1


def _provenance(request, fitness, outcome, clock: RunClock) -> dict:
    """What every search records about itself (the fitness's own figures are added by the caller); the budget
    both as distinct full-set evaluations and as forward examples (examples run through the model)."""
    from loramerge_cli.search.fidelity import examples_per_evaluation

    search = outcome.settings
    if search is None:
        search = asdict(request.enmp) if request.strategy == "enmp" else {
            "budget": request.budget or request.enmp.popsize * request.enmp.generations,
            "sparsity": request.sparsity}
    forward = outcome.forward_examples
    return {
        "loramerge": __version__,
        **started_command(request),
        **searched_data(request),
        **hub_base_record(fitness.engine.base),
        "strategy": request.strategy,
        "seed": request.enmp.seed,
        "search": search,
        "evaluations": outcome.evaluations,
        "full_evaluations": outcome.evaluations,
        "forward_examples": forward if forward is not None else outcome.evaluations * examples_per_evaluation(fitness),
        # forward passes over the validation set(s), the whole run's (a resumed run's too, workers' included)
        "forward_passes": outcome.forward_passes if outcome.forward_passes is not None else outcome.evaluations + 1,
        "pruned_flat_indices": list(outcome.best.pruned),
        **clock.provenance(),
        "history": outcome.history,
    }


def _test_report(request: SearchRequest, lam: float, best_lambda: float, pruned: tuple[int, ...],
                 on_event=None) -> dict:
    """Mean normalized test accuracy of the unpruned merge and of the best table (--report-test)."""
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.search.fitness import AccuracyFitness

    test_request = replace(request, eval=replace(request.eval, split="test", val_limit=None))
    problem = build_problem(test_request, lam=lam, report=on_event)
    experts = expert_scores(problem.engine, ScoreCache(request.run_dir), on_event)
    fitness = AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, experts)
    best = fitness.score(pruned, best_lambda)
    return {"unpruned_mean_normalized_accuracy": fitness.reference, "best_mean_normalized_accuracy": best,
            "experts_test_accuracy": experts}


