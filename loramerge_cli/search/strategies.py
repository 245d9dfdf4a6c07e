"""The search strategies: the one place to add one (docs/contributing.md, "Adding a search strategy").

A mask strategy gets the fitness (a batch of candidates -> fitness values), the search space and an event
callback, and returns its best evaluation, how many distinct candidates it scored, and its history. It says
whether it can resume a run directory; one that cannot is refused with --resume (never silently restarted).
`nsc` is a coefficient strategy: it learns real weights by gradient descent (search/nsc.py), not masks.
A strategy declares its own settings as `StrategyParameter`s (search/parameters.py: type, default, range):
search-mask's options are generated from them, the range is checked before any work, and the request
carries their values in `request.options`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loramerge_cli.errors import LoramergeError, UsageError
from loramerge_cli.merging.counts import exact_product
from loramerge_cli.merging.registry import randomized_methods
from loramerge_cli.search.enmp_settings import EnmpSettings
from loramerge_cli.search.parameters import SCREENED_PARAMETERS, SURROGATE_PARAMETERS, StrategyParameter


@dataclass
class SearchSpace:
    """What a mask strategy searches: the flat index i = u·T + t over units × tasks, and where to keep state."""

    unit_count: int
    task_count: int
    base_lambda: float
    run_dir: Path | None = None
    resume: bool = False


@dataclass
class Outcome:
    best: object  # enmp.Evaluation
    evaluations: int  # distinct candidates scored (the unpruned reference not counted)
    history: list[dict]
    forward_examples: int | None = None  # examples run through the model (None: evaluations × the set's size)
    settings: dict | None = None  # the resolved settings the provenance records (None: ENMP's or the budget)
    forward_passes: int | None = None  # evaluations run, references included (None: each distinct table once)
    every_table_seen: bool = False  # it stopped because every table the ρ cap allows was scored, some on a subset


@dataclass(frozen=True)
class Strategy:
    name: str
    help: str
    resumable: bool
    run: Callable | None  # (request, fitness, SearchSpace, on_event) -> Outcome; None for `nsc`
    kind: str = "mask"  # "mask" (0/1 tables scored by a fitness) or "coefficients" (nsc)
    parameters: tuple[StrategyParameter, ...] = ()
    check: Callable | None = None  # (request) -> None: its settings, before any work
    check_data: Callable | None = None  # (request, {task: examples it scores}) -> None, before any model loads
    check_space: Callable | None = None  # (request, units × tasks, most units a table prunes) -> None: what it
    # needs of the search space, read from the adapters' headers before any model loads
    scoring: Callable | None = None  # (request, fitness, workers) -> (what `run` gets as its fitness, the
    # picklable builder of the same in a worker process): a strategy that scores more than the plain fitness
    uses: frozenset[str] = frozenset()  # the SHARED_SETTINGS it reads (the others are refused if changed)
    draws: bool = True  # it reads the seed (greedy does not: its seed serves a randomized merger only)
    budget_from: frozenset[str] = frozenset()  # those of `uses` it reads only to make the default --budget
    library_options: tuple[str, ...] = ()  # `request.options` names it reads besides its parameters, with no flag
    state_file: str | None = None  # where a resumable strategy keeps its state in the run dir (search/rundir.py)
    check_state: Callable | None = None  # (request, path of its state, (units × tasks, ρ cap's units) or None) ->
    # None: a saved state is readable and one of this search (one line otherwise), before any model loads


def check_options(strategy: Strategy, options: dict) -> None:
    """`options` holds the strategy's own settings, each of its declared type and range, and its
    `library_options` (checked by its `check`); any other name is refused."""
    own = {parameter.name: parameter for parameter in strategy.parameters}
    for name, value in options.items():
        parameter = own.get(name)
        if parameter is None and name not in strategy.library_options:
            known = [*own, *strategy.library_options]
            raise UsageError(f"--strategy {strategy.name} has no setting {name}"
                             + (f" (it has: {', '.join(known)})" if known else ""))
        if parameter is not None:
            parameter.check(value)


def check_needs(strategy: Strategy, options: dict) -> None:
    """A setting changed from its default while a switch it `needs` is off does nothing: a usage error."""
    value = {parameter.name: options.get(parameter.name, parameter.default) for parameter in strategy.parameters}
    for parameter in strategy.parameters:
        for switch in parameter.needs:
            if value[parameter.name] not in (parameter.default, *parameter.off) and not value[switch]:
                raise UsageError(f"--{parameter.name.replace('_', '-')} does nothing with "
                                 f"--no-{switch.replace('_', '-')}")


# Settings several strategies share, by the request field that holds them (the others are the request's own).
SHARED_SETTINGS = {"enmp": ("max_prune", "popsize", "generations", "sigma0", "threshold", "addscale"),
                   "nsc": ("steps", "lr", "init", "objective", "target_blocks", "target_modules"),
                   None: ("budget", "sparsity")}
TARGETS = frozenset({"target_blocks", "target_modules"})  # read by the nsc objective only (not by entropy)
NSC_OBJECTIVE = frozenset({"objective"}) | TARGETS  # what --fitness nsc reads of NSC's settings


def read_by(name: str) -> str:
    """" (it is read by --strategy enmp, screened)": the strategies that read a shared setting, for a message
    refusing it elsewhere ('' when none does)."""
    readers = [strategy.name for strategy in STRATEGIES.values() if name in strategy.uses]
    return f" (it is read by --strategy {', '.join(readers)})" if readers else ""


def check_unused(strategy: Strategy, request) -> None:
    """A shared setting changed from its default that the strategy (and its fitness) never reads does nothing:
    a usage error, as the CLI's other strategies' options are."""
    from dataclasses import fields

    if strategy.kind == "coefficients" and request.fitness != "accuracy":  # (it is its own label-free fitness)
        raise UsageError(f"--fitness does nothing with --strategy {strategy.name}: it learns its coefficients from "
                         "unlabeled inputs (--fitness picks how mask strategies score tables)")
    uses = strategy.uses | (NSC_OBJECTIVE if request.fitness == "nsc" else frozenset())
    if request.budget is not None:  # given: what would make the default budget does nothing
        uses -= strategy.budget_from
    if request.nsc.objective != "nsc":  # the entropy objective measures no targets
        uses -= TARGETS
    if not strategy.draws and request.enmp.seed != EnmpSettings.seed and request.fitness == "accuracy" \
            and not request.merge.draws():
        raise UsageError(f"--seed does nothing with --strategy {strategy.name} and method "
                         f"{request.merge.method_name()}: neither draws anything (the seed serves the methods "
                         f"{', '.join(randomized_methods())})")
    for holder, names in SHARED_SETTINGS.items():
        given = getattr(request, holder) if holder else request
        defaults = {f.name: f.default for f in fields(given)}
        for name in names:
            if name not in uses and getattr(given, name) != defaults[name]:
                entropy = name in TARGETS and request.nsc.objective != "nsc"
                objective = f" --objective {request.nsc.objective}" if entropy else ""
                why = (" --budget (it only sets the default budget)" if name in strategy.budget_from
                       else "" if entropy else read_by(name))
                raise UsageError(f"--{name.replace('_', '-')} does nothing with --strategy {strategy.name}"
                                 + (f" --fitness {request.fitness}" if request.fitness != "accuracy" else "")
                                 + objective + why)


def _budget(request) -> int:
    return request.budget or request.enmp.popsize * request.enmp.generations


def _check_enmp_state(request, path: Path, space) -> None:
    from loramerge_cli.search.enmp import read_state

    read_state(path, space)


def _run_enmp(request, fitness, space: SearchSpace, on_event) -> Outcome:
    from loramerge_cli.search.enmp import EnmpSearch

    search = EnmpSearch(request.enmp, space.unit_count, space.task_count, fitness, base_lambda=space.base_lambda,
                        run_dir=space.run_dir, on_generation=lambda record: on_event("generation", record))
    best = search.run(resume=space.resume)
    return Outcome(best, len(search.state.memo) - 1, search.state.history)


def _rounds(on_event, run_dir: Path | None) -> tuple[list[dict], Callable[[dict], None]]:
    """The history of a search of rounds (greedy, random), sent as "round" events and, with a run directory,
    written to its trajectory.jsonl after every round (they keep no state to resume from)."""
    from loramerge_cli.search.state_io import write_progress

    history: list[dict] = []

    def on_round(record: dict) -> None:
        history.append(record)
        if run_dir is not None:
            write_progress(run_dir, None, None, history)
        on_event("round", record)

    return history, on_round


def _run_greedy(request, fitness, space: SearchSpace, on_event) -> Outcome:
    from loramerge_cli.search.baselines import greedy_search
    from loramerge_cli.search.decode import max_pruned

    history, on_round = _rounds(on_event, space.run_dir)
    k_max = max_pruned(request.enmp.max_prune, space.unit_count, space.task_count)
    ledger = greedy_search(fitness, space.unit_count * space.task_count, k_max, _budget(request), on_round)
    return Outcome(ledger.best(), len(ledger.memo) - 1, history, settings={
        "budget": _budget(request), "max_prune": request.enmp.max_prune, "max_pruned": k_max})


def _run_random(request, fitness, space: SearchSpace, on_event) -> Outcome:
    from loramerge_cli.search.baselines import random_search
    from loramerge_cli.search.decode import max_pruned

    history, on_round = _rounds(on_event, space.run_dir)
    flat = space.unit_count * space.task_count
    sparsity = request.sparsity if request.sparsity is not None else request.enmp.max_prune / 2
    count = max(1, min(max_pruned(request.enmp.max_prune, space.unit_count, space.task_count),
                       round(exact_product(sparsity, flat))))
    ledger = random_search(fitness, flat, count, _budget(request), request.enmp.seed, on_round)
    return Outcome(ledger.best(), len(ledger.memo) - 1, history, settings={
        "budget": _budget(request), "max_prune": request.enmp.max_prune, "sparsity": sparsity, "pruned": count})


def _run_screened(request, fitness, space: SearchSpace, on_event) -> Outcome:
    from dataclasses import asdict

    from loramerge_cli.search.screened import run_screened, screened_settings

    settings = screened_settings(request)
    best, spent = run_screened(settings, fitness, space.unit_count, space.task_count, space.run_dir, space.resume,
                               on_event)
    return Outcome(best, spent["full_evaluations"], spent["history"], spent["forward_examples"], asdict(settings),
                   spent["forward_passes"], spent["every_table_seen"])


def _check_screened(request) -> None:
    from loramerge_cli.search.screened import ScreenedSettings, screened_settings

    settings = screened_settings(request)
    settings.check()
    defaults = ScreenedSettings()
    if request.fitness != "accuracy":  # successive halving needs labelled accuracy: its settings would do nothing
        for parameter in SCREENED_PARAMETERS:  # (--no-halving is halving's off: runs saved with it resume)
            if parameter.labelled and parameter.type is not bool \
                    and getattr(settings, parameter.name) != getattr(defaults, parameter.name):
                raise UsageError(labelled_only(parameter, getattr(settings, parameter.name), request.fitness))


def labelled_only(parameter, value, fitness: str) -> str:
    """The message for a setting read with labelled accuracy only, given with a label-free fitness."""
    flag = parameter.name.replace("_", "-")
    flag = f"--no-{flag}" if value is False else f"--{flag}"
    return f"{flag} does nothing with --fitness {fitness} (successive halving scores labelled accuracy only)"


def _check_screened_data(request, examples: dict[str, int]) -> None:
    """`--screen-rungs` asks for no more rungs than the validation set gives (small subsets are left out)."""
    from loramerge_cli.search.screened import screened_settings

    settings = screened_settings(request)
    if request.fitness != "accuracy" or not settings.halving or not settings.screen or not examples:
        return
    rungs = len(settings.rung_sizes(max(examples.values())))
    if settings.screen_rungs > rungs:
        raise LoramergeError(f"--screen-rungs {settings.screen_rungs}: {max(examples.values())} validation examples "
                             f"per task give {rungs} rung(s) (subsets under {settings.min_examples} examples are left "
                             f"out); use at most {rungs}")


def _check_screened_state(request, path: Path, space) -> None:
    from loramerge_cli.search.screened import read_state

    read_state(path, space)


def _screened_scoring(request, fitness, workers):
    from loramerge_cli.search.screened import screened_ladder

    return screened_ladder(request, fitness, workers)


SCREENED = Strategy(
    "screened", "every single-unit pruning scored on the full validation set, greedy over the best "
    "of them, CMA-ES started from its table, new tables only, each generation's scored on seeded validation "
    "subsets first (successive halving)",
    True, _run_screened,
    parameters=SCREENED_PARAMETERS,
    check=_check_screened, check_data=_check_screened_data, scoring=_screened_scoring,
    uses=frozenset({"max_prune", "popsize", "generations", "sigma0", "threshold", "budget"}),
    library_options=("rungs", "min_examples", "noise_examples"), state_file="screened_state.json",
    check_state=_check_screened_state)


def _run_surrogate(request, fitness, space: SearchSpace, on_event) -> Outcome:
    from dataclasses import asdict

    from loramerge_cli.search.surrogate import run_surrogate, surrogate_settings

    settings = surrogate_settings(request)
    best, spent = run_surrogate(settings, fitness, space.unit_count, space.task_count, space.run_dir, space.resume,
                                on_event)
    return Outcome(best, spent["full_evaluations"], spent["history"], spent["forward_examples"], asdict(settings))


def _check_surrogate(request) -> None:
    from loramerge_cli.search.surrogate import surrogate_settings

    surrogate_settings(request).check()


def _check_surrogate_space(request, dimension: int, k_max: int) -> None:
    from loramerge_cli.search.surrogate import check_budget

    check_budget(request.budget, dimension, k_max)


def _check_surrogate_state(request, path: Path, space) -> None:
    from loramerge_cli.search.surrogate import default_budget, read_state

    budget = request.budget if request.budget is not None or space is None else default_budget(space[0])
    read_state(path, space, budget)


def _check_nsc_state(request, path: Path, space) -> None:
    from loramerge_cli.search.nsc import read_state

    step = read_state(path)[1]
    if step > request.nsc.steps:  # it would be written as the table of a run of that many steps
        raise LoramergeError(f"--resume: {path} was saved at step {step}, past this run's {request.nsc.steps} "
                             "steps: start a new run")


def _surrogate_scoring(request, fitness, workers):
    from loramerge_cli.search.fidelity import examples_per_evaluation
    from loramerge_cli.search.surrogate import CountedFitness

    return CountedFitness(fitness, examples_per_evaluation(fitness)), workers


SURROGATE = Strategy(
    "surrogate", "the default: every single-unit pruning scored, then Thompson sampling on a Bayesian model of the "
    "fitness over units and unit pairs: each new table is the best of one posterior draw, never one already scored",
    True, _run_surrogate,
    parameters=SURROGATE_PARAMETERS,
    check=_check_surrogate, check_space=_check_surrogate_space, scoring=_surrogate_scoring,
    uses=frozenset({"max_prune", "budget"}), library_options=("restarts",), state_file="surrogate_state.json",
    check_state=_check_surrogate_state)

DEFAULT_STRATEGY = SURROGATE.name

STRATEGIES: dict[str, Strategy] = {
    "screened": SCREENED,
    "surrogate": SURROGATE,
    "enmp": Strategy("enmp", "CMA-ES over the binary table (ENMP)", True, _run_enmp,
                     uses=frozenset({"max_prune", "popsize", "generations", "sigma0", "threshold", "addscale"}),
                     state_file="state.json", check_state=_check_enmp_state),
    "greedy": Strategy("greedy", "leave-one-out: prune the unit that helps most, while it helps", False,
                       _run_greedy, uses=frozenset({"max_prune", "popsize", "generations", "budget"}), draws=False,
                       budget_from=frozenset({"popsize", "generations"})),  # popsize ×
    # generations: the budget when --budget is not given
    "random": Strategy("random", "best of N random masks of a fixed sparsity", False, _run_random,
                       uses=frozenset({"max_prune", "popsize", "generations", "budget", "sparsity"}),
                       budget_from=frozenset({"popsize", "generations"})),
    "nsc": Strategy("nsc", "learn one coefficient per task and module by gradient descent on unlabeled inputs",
                    True, None, kind="coefficients",
                    uses=frozenset({"steps", "lr", "init", "objective", "target_blocks", "target_modules"}),
                    state_file="nsc_state.safetensors", check_state=_check_nsc_state),
}


def strategy_named(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)} (got {name!r})")
    return STRATEGIES[name]
