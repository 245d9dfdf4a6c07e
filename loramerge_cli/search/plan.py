"""Plan a search before any work: `plan_search` checks the strategy, the fitness, every setting, the output's
folder, the run directory and --resume, the splits the search will read and the extras it will import, and
refuses a bad request in one line before a model loads. `runner.run_search` then does the work."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loramerge_cli.adapters.sources import check_base_given
from loramerge_cli.errors import LoramergeError, UsageError, check_integer, check_seed, expect
from loramerge_cli.search.backends import Backend
from loramerge_cli.search.enmp_settings import EnmpSettings
from loramerge_cli.search.nsc_settings import NscSettings
from loramerge_cli.search.rundir import (CONFIG_NAME, RunDirLock, flag_name, protected_paths, run_dir_files,
                                         state_names)
from loramerge_cli.search.strategies import (
    DEFAULT_STRATEGY,
    Strategy,
    check_needs,
    check_options,
    check_unused,
    strategy_named,
)

FITNESSES = ("accuracy", "nsc")


@dataclass
class SearchRequest:
    """What `search-mask` is asked: the adapters, the merge, the task spec, evaluation and strategy settings,
    and the run's files; `plan_search` checks it all before any model loads."""

    adapters: list  # sources (str), or loaded Adapters (the library API: nothing is read twice)
    merge: object  # MergeConfig; lam None = the merger's default
    tasks: Path
    eval: object  # EvalSettings
    lambda_auto: bool = False
    base: str | None = None
    allow_base_mismatch: bool = False
    allow_pickle: bool = False
    strategy: str = DEFAULT_STRATEGY
    enmp: EnmpSettings = field(default_factory=EnmpSettings)  # the CMA-ES budget, shared by the mask strategies
    options: dict = field(default_factory=dict)  # the strategy's own settings (its `parameters`), by name
    fitness: str = "accuracy"  # or "nsc": label-free (docs/algorithms.md, "NSC"), for the mask strategies
    nsc: NscSettings = field(default_factory=NscSettings)  # --strategy nsc, and --fitness nsc's objective
    budget: int | None = None  # distinct evaluations for greedy/random; default popsize·generations
    sparsity: float | None = None  # random: fraction of units pruned; default max_prune / 2
    run_dir: Path | None = None
    resume: bool = False
    report_test: bool = False
    devices: list[str] | None = None  # one worker per entry; None: serial in this process
    backend: str = "process"  # or "ray" (search/backends.py)
    ray_address: str | None = None
    command: str = ""
    flags: dict | None = None  # the CLI's flags, saved in the run dir so that --resume alone can continue

    def __post_init__(self) -> None:
        """Paths and numbers as the command line gives them: `pathlib.Path`s as text (the run dir as a Path),
        numpy numbers as Python's."""
        import os

        from loramerge_cli.adapters.sources import as_sources
        from loramerge_cli.errors import plain_value

        if self.adapters is not None:
            self.adapters = as_sources(self.adapters)
        if isinstance(self.base, (bytes, os.PathLike)):
            self.base = os.fsdecode(self.base)
        if isinstance(self.run_dir, (str, bytes, os.PathLike)):
            self.run_dir = Path(os.fsdecode(self.run_dir))
        self.budget, self.sparsity = plain_value(self.budget), plain_value(self.sparsity)
        if isinstance(self.options, dict):
            self.options = {name: plain_value(value) for name, value in self.options.items()}


@dataclass
class SearchPlan:
    """A checked search: `api.search(plan)` runs it and writes `out` (and `plot`) when given."""

    request: SearchRequest
    strategy: Strategy
    out: Path | None = None
    force: bool = False
    plot: Path | None = None
    finished: str | None = None  # --resume of a run that finished: its table's text (nothing is searched again)


def check_request(request: SearchRequest, finished: bool = False) -> Strategy:
    """Every setting of the request, without reading a file; returns the strategy. `finished`: --resume gives
    back the table of a run that finished (any strategy's, those that cannot resume included)."""
    from loramerge_cli.evaluation.settings import EvalSettings
    from loramerge_cli.merging.config import MergeConfig

    for name, kind in (("merge", MergeConfig), ("eval", EvalSettings), ("enmp", EnmpSettings), ("nsc", NscSettings)):
        expect(getattr(request, name), kind, f"SearchRequest.{name} must be a {kind.__name__}")
    strategy = strategy_named(request.strategy)
    if not request.adapters:
        raise UsageError("no adapters to search")
    from loramerge_cli.merging.registry import METHODS

    method = METHODS.get(request.merge.method or request.merge.merger or "")
    if method is not None and method.needs_inputs:
        raise UsageError(f"search-mask does not search {method.name} merges yet (it reads each task's inputs); "
                         "merge with it after the search: loramerge merge --mask TABLE --tasks FILE")
    if request.fitness not in FITNESSES:
        raise UsageError(f"--fitness must be one of {', '.join(FITNESSES)} (got {request.fitness!r})")
    check_seed(request.enmp.seed)
    request.eval.check()
    if request.resume and not strategy.resumable and not finished:
        raise UsageError(f"--strategy {strategy.name} cannot resume a run (it keeps no state); rerun its command "
                         "without --resume to start it over")
    if request.resume and request.run_dir is None:
        raise UsageError("--resume needs --run-dir")
    Backend(request.backend, request.devices, request.ray_address).check()
    if strategy.kind == "coefficients" and (request.devices or request.backend == "ray"):
        raise UsageError(f"--strategy {strategy.name} trains on one device (--device); --devices, --workers and "
                         "--backend ray spread the tables a mask search scores (eval's merges, --lambda auto's "
                         "grid)")
    label_free = strategy.kind == "coefficients" or request.fitness == "nsc"
    if label_free:
        request.nsc.check()
        if request.eval.block_cache_mb != EvalSettings.block_cache_mb:  # the accuracy fitness's replay only
            how = f"--strategy {strategy.name}" if strategy.kind == "coefficients" else "--fitness nsc"
            raise UsageError(f"--block-cache-mb does nothing with {how}")
        if request.lambda_auto:
            raise UsageError("--lambda auto tunes λ on labelled validation data; give a number with a label-free "
                             "search")
    if strategy.kind == "mask":
        request.enmp.check()
        check_integer(request.budget, 1, "--budget")
        if request.sparsity is not None and not 0 < request.sparsity <= request.enmp.max_prune:
            raise UsageError(f"--sparsity must be in (0, --max-prune {request.enmp.max_prune:g}] (got "
                             f"{request.sparsity:g})")
    if not request.resume:  # a saved run's settings stand as they were saved (this check came later)
        check_unused(strategy, request)
        check_merger_unused(strategy, request)
    check_options(strategy, request.options)
    check_needs(strategy, request.options)
    if strategy.check is not None:
        strategy.check(request)
    return strategy


def check_merger_unused(strategy, request: SearchRequest) -> None:
    """A coefficient strategy (NSC) learns the coefficients of a task-arithmetic sum itself: merger settings
    (bar `merger="ta"`, and the seed, which is the search's) would be ignored, so they are refused."""
    given = {name: value for name, value in request.merge.given().items()
             if not (name == "merger" and value == "ta") and name not in ("compute_dtype", "seed")}
    if strategy.kind == "coefficients" and given:
        name = sorted(given)[0]
        raise UsageError(f"{flag_name(name)} does nothing with --strategy "
                         f"{strategy.name}: it learns the coefficients of a task-arithmetic sum itself (merge --mask "
                         "applies them)")


def check_splits(request: SearchRequest) -> None:
    """The task spec names a task for every adapter and the splits the search reads (test: --report-test)."""
    from loramerge_cli.adapters.sources import source_names
    from loramerge_cli.evaluation.model_fit import check_model_fit
    from loramerge_cli.evaluation.specs import load_task_file

    task_file = load_task_file(request.tasks)
    task_file.check_covers(source_names(request.adapters))
    needed = [request.eval.split] + (["test"] if request.report_test else [])
    for task in task_file.tasks:
        for split in needed:
            reason = " (--report-test scores it)" if split == "test" else ""
            if split not in task.data:
                raise task_file.error(f"{task.where}.data", f"no {split!r} split{reason} (has: {', '.join(task.data)})")
            if not Path(task.data[split]).exists():
                raise task_file.error(f"{task.where}.data.{split}", f"no such file {task.data[split]}{reason}")
    from loramerge_cli.evaluation.data import check_data

    label_free = request.fitness == "nsc" or strategy_named(request.strategy).kind == "coefficients"
    if label_free:  # the search reads no label (unlabelled or GLUE-test data is fine); --report-test's split does
        from loramerge_cli.search.nsc import without_labels

        rows = check_data(without_labels(task_file), [request.eval.split], labelled=False)
        rows.update(check_data(task_file, needed[1:]) if needed[1:] else {})
    else:
        rows = check_data(task_file, needed)  # every row's inputs and labels, before any adapter or model loads
    check_model_fit(task_file, request.adapters, request.base, request.eval.max_length, request.allow_pickle)
    strategy = strategy_named(request.strategy)
    if strategy.check_data is not None:  # what the strategy needs of the data (the examples it will score)
        split = request.eval.split
        limits = {task.name: request.eval.val_limit if split == "validation" and request.eval.val_limit is not None
                  else task.limit for task in task_file.tasks}
        strategy.check_data(request, {name: min(count, limits[name] or count)
                                      for (name, read), count in rows.items() if read == split})


def check_extras(request: SearchRequest, plot: Path | None) -> None:
    """The optional libraries the search will import, imported now rather than after the work: matplotlib
    for --plot, pyarrow for parquet data."""
    from loramerge_cli.evaluation.data import require_module
    from loramerge_cli.evaluation.specs import load_task_file

    task_file = load_task_file(request.tasks)
    splits = [request.eval.split] + (["test"] if request.report_test else [])
    files = [str(task.data.get(split, "")) for task in task_file.tasks for split in splits]
    needed = [("matplotlib", "plot", "--plot")] if plot is not None else []  # (the task type's: check_data)
    if any(name.endswith(".parquet") for name in files):
        needed.append(("pyarrow", "parquet", "parquet data"))
    for module, extra, reason in needed:
        load = None
        if module == "matplotlib":
            from loramerge_cli.search.plots import import_matplotlib as load
        try:
            require_module(module, extra, reason, load)
        except ValueError as error:  # matplotlib refuses its environment (MPLBACKEND=nonsense) as it imports
            reason_line = str(error).split(";")[0]
            raise LoramergeError(f"{reason}: {module} does not start ({reason_line}; check MPLBACKEND and "
                                 "matplotlibrc)") from None


def prepare_run_dir(request: SearchRequest, write: bool = True, finished: bool = False) -> None:
    """The run directory remembers the resolved request, its flags and its inputs' sha256; --resume refuses a
    different request or a changed input (one line naming it), a damaged state or an old pickle, and starts
    over when the killed run saved no state yet. Nothing in a run directory is ever unpickled. `write`:
    record this run's configuration (the runner does, holding the run dir's lock). `finished`: the run is over
    and only its table is given back, on any kind of device."""
    if request.run_dir is None:
        return
    from loramerge_cli.search import rundir
    from loramerge_cli.search.state_io import check_state_run
    from loramerge_cli.search.strategies import STRATEGIES

    run_dir = Path(request.run_dir)
    config = json.loads(json.dumps(run_config(request)))
    digests = rundir.input_digests(request)
    saved = rundir.read_config(run_dir)
    if request.resume:
        rundir.refuse_pickle_state(run_dir)
        if saved is None and (not run_dir.is_dir() or any(not p.name.startswith(".") for p in run_dir.iterdir())):
            raise LoramergeError(f"--resume: {run_dir} holds no search to resume")
        if saved is None:  # killed before its configuration was saved (only hidden files): start over
            if write:
                rundir.write_config(run_dir, config, request.flags, digests, request.command)
            return
        saved_settings = with_settings_added_since(saved["settings"])
        if isinstance(saved_settings, dict) and (finished or "device_kind" not in saved_settings):
            saved_settings = {**saved_settings, "device_kind": config["device_kind"]}  # (before: as it runs now)
        if comparable(saved_settings) != comparable(config):
            raise LoramergeError(f"--resume: the settings differ from the saved run's "
                                 f"({'; '.join(setting_changes(comparable(config), comparable(saved_settings)))})")
        rundir.check_inputs(saved.get("inputs") or {}, digests, rundir.listed_inputs(request),
                            set() if finished else rundir.unscored_inputs(request))
        space = unit_space(request)  # a damaged state, or one of another search, is one line before any work
        for strategy in STRATEGIES.values():
            if strategy.state_file and (run_dir / strategy.state_file).is_file():
                strategy.check_state(request, run_dir / strategy.state_file, space)  # (a damaged one: said first)
                check_state_run(run_dir / strategy.state_file, saved.get("run_id"))
        return
    held = [name for name in state_names() if (run_dir / name).exists()]
    if (run_dir / rundir.FINISHED_NAME).exists():
        raise LoramergeError(f"{run_dir} already holds a finished search: pass --resume to get its table, or give "
                             "another --run-dir")
    states = [name for name in held if name in rundir.strategy_states()]
    if states:
        raise LoramergeError(f"{run_dir} already holds a search ({states[0]}); pass --resume to continue it, or give "
                             "another --run-dir")
    if held:  # an unfinished run that saved no state (greedy, random, or killed early): the same command restarts
        odd = next((name for name in held if not (run_dir / name).is_file()), None)
        if odd is not None:
            raise LoramergeError(f"{run_dir / odd} is not a file; give --run-dir a folder of its own")
        changes = _changes_from_saved(saved, config, digests)
        if changes:
            raise LoramergeError(f"{run_dir} already holds an unfinished search with other settings ({changes}); "
                                 "give another --run-dir")
        if write:
            for name in held:  # its partial record, which the restarted run writes again
                (run_dir / name).unlink(missing_ok=True)
    if write:
        rundir.write_config(run_dir, config, request.flags, digests, request.command)


def _changes_from_saved(saved: dict | None, config: dict, digests: dict) -> str | None:
    """How a run directory's saved configuration differs from this run's (settings, then inputs), or None."""
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        return "no readable config.json"
    saved_settings = with_settings_added_since(saved["settings"])
    if "device_kind" not in saved_settings:
        saved_settings = {**saved_settings, "device_kind": config["device_kind"]}
    if comparable(saved_settings) != comparable(config):
        return "; ".join(setting_changes(comparable(config), comparable(saved_settings)))
    changed = sorted(path for path in set(saved.get("inputs") or {}) | set(digests)
                     if (saved.get("inputs") or {}).get(path) != digests.get(path))
    return f"{changed[0]} is not the input it ran on" if changed else None


def run_config(request: SearchRequest) -> dict:
    """The settings a resumed run must share with the saved one (not the device, threads or block cache,
    which give the same scores; the kind of device, which does not)."""
    from loramerge_cli.search.rundir import HOW_IT_RUNS, normal_path

    eval_settings = {key: value for key, value in _plain(asdict(request.eval)).items() if key not in HOW_IT_RUNS}
    config = {
        "adapters": [_run_adapter(a) for a in request.adapters],
        "merge": _plain(asdict(request.merge)), "tasks": normal_path(request.tasks), "eval": eval_settings,
        "strategy": request.strategy, "enmp": asdict(request.enmp), "lambda_auto": request.lambda_auto,
        "base": request.base, "budget": request.budget, "sparsity": request.sparsity, "options": request.options,
    }
    if strategy_named(request.strategy).kind == "coefficients" or request.fitness == "nsc":
        config.update(fitness=request.fitness, nsc=asdict(request.nsc))
    config["device_kind"] = device_kind(request)
    return config


def _run_adapter(adapter) -> str:
    """An adapter as a run directory records it: `name=source` (local paths absolute), and for a loaded adapter
    changed in memory (a weight table applied), the sha256 of its tensors: not the file's weights."""
    from loramerge_cli.search.rundir import normal_adapter

    if isinstance(adapter, str):
        return normal_adapter(adapter)
    named = normal_adapter(f"{adapter.name}={adapter.source.spec}")
    return f"{named} (modified in memory, sha256 {adapter.source.identity})" if adapter.source.modified else named


def device_kind(request: SearchRequest) -> str:
    """The kind of device that scores (cpu, cuda, mps; several: joined by +): scores agree across devices of
    one kind, and differ in their last digits from another's, so a resumed run keeps the kind."""
    devices = request.devices or [request.eval.device or "cpu"]
    return "+".join(sorted({str(device).split(":", 1)[0] for device in devices}))


def _plain(data: dict) -> dict:
    return {key: (str(value) if not isinstance(value, (int, float, str, bool, list, dict, type(None))) else value)
            for key, value in data.items()}


def check_outputs(request: SearchRequest, out, force: bool, plot, inputs: list[Path],
                  finished: str | None = None) -> None:
    """--out (a file), --plot (a folder for PLOT_NAMES) and --run-dir (a folder): none over, holding or inside
    an input, the working folder, or each other; nothing of the user's replaced (--force: only what
    loramerge wrote). An --out that already holds a finished run's table (`finished`) is left as it is."""
    from loramerge_cli.evaluation.cache import check_cache_files
    from loramerge_cli.outputs import check_creatable, check_not_an_input, check_not_working_folder, guard_output, holds
    from loramerge_cli.search.plots import PLOT_NAMES, drawn_digest, plots_digest

    run_files = run_dir_files(request.run_dir)
    if out is not None:
        check_not_an_input(out, run_files, role="run-directory file")
        if finished is not None and not holds(out, finished):  # as the file holds it (its sources relative to it)
            from loramerge_cli.adapters.writer import table_file_text

            finished = table_file_text(finished, out)
        if finished is None or not holds(out, finished):
            guard_output(out, inputs=inputs, force=force, kind="file")
    for flag, path in (("--plot", plot), ("--run-dir", request.run_dir)):
        if path is not None and str(path) == "-":  # the Unix spelling of standard output, not a folder
            raise UsageError(f"{flag} -: give a folder's path (./- names one called '-')")
    if plot is not None:
        plot = Path(plot)
        check_not_working_folder(plot, "--plot")
        check_not_an_input(plot, inputs, "--plot")
        check_not_an_input(plot, run_files, "--plot", role="run-directory file")
        if plot.exists() and not plot.is_dir():
            raise LoramergeError(f"--plot {plot} exists and is not a folder; give a folder for "
                                 f"{' and '.join(PLOT_NAMES)}")
        pictures = [plot / name for name in PLOT_NAMES]
        linked = [picture for picture in pictures if picture.is_symlink()]
        if linked:  # (as every output: never written through, even with --force)
            raise LoramergeError(f"--plot {plot}: {linked[0].name} there is a symbolic link; it is never written "
                                 "through: give another --plot folder")
        odd = [picture for picture in pictures if picture.exists() and not picture.is_file()]
        if odd:  # (a folder of that name: the pictures would fail only after the search)
            raise LoramergeError(f"--plot {plot}: {odd[0].name} there is not a file; give another --plot folder")
        if out is not None and any(_same(out, path) for path in (plot, *pictures)):
            raise UsageError(f"--out {out} is where --plot draws; give the table another name")
        existing = [picture for picture in pictures if picture.exists()]
        drawn = {picture: drawn_digest(picture) for picture in existing}
        foreign = [picture for picture, digest in drawn.items() if digest is None]
        if foreign:  # a user's file, or one an older version drew: not replaced, even with --force
            raise LoramergeError(f"--plot {plot}: {foreign[0].name} there is not a picture loramerge drew; it is never "
                                 "written over: give another --plot folder (or move it away)")
        if finished is not None:  # a finished run's pictures are left as they are; another search's are not
            from loramerge_cli.masks import table_from_text

            done = table_from_text(finished, "the finished run's table")
            expected = plots_digest(done, (done.provenance or {}).get("history") or [])
            existing = [picture for picture, digest in drawn.items() if digest != expected]
        if existing and not force:
            raise LoramergeError(f"--plot {plot} already holds {existing[0].name}"
                                 f"{' of another search' if finished is not None else ''}; pass --force to replace it")
        if existing or len(drawn) < len(pictures):  # some picture will be written
            check_creatable(plot, f"--plot {plot}: cannot write the plots there")  # not after the search
    if request.run_dir is not None:
        run_dir = Path(request.run_dir)
        check_not_working_folder(run_dir, "--run-dir")
        check_not_an_input(run_dir, inputs, "--run-dir")
        if out is not None and _same(out, run_dir):
            raise UsageError("--out and --run-dir name the same path; the table goes in a file, the run in a folder")
        if not request.resume and run_dir.is_dir() and not (run_dir / CONFIG_NAME).exists():
            foreign = [name for name in state_names() if (run_dir / name).exists()]
            if foreign:
                raise LoramergeError(f"--run-dir {run_dir} holds {foreign[0]}, which no search of loramerge wrote "
                                     "there; give a new folder")
        if finished is None:  # (a finished run's table is only read: from a read-only copy too)
            RunDirLock(run_dir).check_free()
            check_creatable(run_dir, f"--run-dir {run_dir}: cannot write in it")  # a resume too, before any work
        check_cache_files(run_dir)  # a scores.json loramerge did not write is refused, not written into


# Strategy options added after runs were saved, with the value that reproduces such a run.
ADDED_SETTINGS = {("surrogate", "same_unit_ratio"): 1.0, ("surrogate", "exploit_every"): 0}


def with_settings_added_since(settings: dict) -> dict:
    """A saved run configuration with the options it predates set as that run used them (so that a run saved
    before `--same-unit-ratio` resumes with `--same-unit-ratio 1`, and only with it). The command line saves
    every option of its strategy: a run that has all of them but the new one predates it (the library saves
    the options given, and the defaults stand for the others)."""
    from loramerge_cli.search.strategies import STRATEGIES

    options = settings.get("options") if isinstance(settings, dict) else None
    name = settings.get("strategy") if isinstance(options, dict) else None
    strategy = STRATEGIES.get(name) if isinstance(name, str) else None
    if strategy is None:
        return settings
    declared = {parameter.name for parameter in strategy.parameters}
    missing = declared - set(options)
    added_since = {option: value for (owner, option), value in ADDED_SETTINGS.items() if owner == strategy.name}
    if not missing or not missing <= set(added_since):  # the library's saved options: the defaults stand
        return settings
    return {**settings, "options": {**options, **{option: added_since[option] for option in missing}}}


def comparable(settings: dict) -> dict:
    """A run configuration as the search acts on it, so that a run started by the command line resumes from the
    library and back: strategy options not given take their defaults (the command line saves every one), method
    parameters not given (None) are left out, and the merge's seed is its default when not given and left out
    for methods that draw nothing (the command line hands --seed to the merge as well)."""
    import ast

    from loramerge_cli.merging.config import DEFAULT_MERGER, DEFAULT_SEED
    from loramerge_cli.merging.registry import randomized_methods
    from loramerge_cli.search.strategies import STRATEGIES

    if not isinstance(settings, dict):
        return settings
    out = dict(settings)
    strategy = STRATEGIES.get(out.get("strategy")) if isinstance(out.get("strategy"), str) else None
    if strategy is not None and isinstance(out.get("options"), dict):
        out["options"] = {**{p.name: p.default for p in strategy.parameters}, **out["options"]}
    merge = out.get("merge")
    if isinstance(merge, dict):
        merge = dict(merge)
        params = merge.get("params")
        if isinstance(params, str):  # saved before params were kept as a mapping: its repr
            try:
                params = ast.literal_eval(params)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
        if isinstance(params, dict):
            merge["params"] = {name: value for name, value in params.items() if value is not None}
        method = merge.get("method") or merge.get("merger") or DEFAULT_MERGER
        if method in randomized_methods():
            merge["seed"] = DEFAULT_SEED if merge.get("seed") is None else merge["seed"]
        else:
            merge.pop("seed", None)
        out["merge"] = merge
    return out


def setting_changes(now: dict, saved: dict, prefix: str = "") -> list[str]:
    """What differs between two run configurations, one entry per leaf, a strategy option by its flag
    (`--noise: 0.3 now, 0.5 saved`), any other by its place in the configuration (`eval.val_limit: …`)."""
    from loramerge_cli.search.rundir import flag_name

    changes = []
    for key in sorted(set(now) | set(saved)):
        name = flag_name(key) if prefix == "options." else f"{prefix}{key}"
        here, there = now.get(key), saved.get(key)
        if isinstance(here, dict) and isinstance(there, dict):
            changes += setting_changes(here, there, f"{name}.")
        elif key not in saved:
            changes.append(f"{name}: {here!r} now, not in the saved run")
        elif key not in now:
            changes.append(f"{name}: not a setting now, {there!r} saved")
        elif here != there:
            changes.append(f"{name}: {here!r} now, {there!r} saved")
    return changes


def unit_space(request: SearchRequest) -> tuple[int, int] | None:
    """(units × tasks, the most units --max-prune lets a table prune), with blocks read from the adapters'
    safetensors headers; None where they cannot tell (a pickled adapter)."""
    from loramerge_cli.adapters.sources import header_module_paths
    from loramerge_cli.adapters.units import unit_of
    from loramerge_cli.search.decode import max_pruned

    paths = header_module_paths(request.adapters, request.allow_pickle)
    blocks = {unit_of(path) for path in paths or ()} - {None}
    if not blocks:
        return None
    return len(blocks) * len(request.adapters), max_pruned(request.enmp.max_prune, len(blocks), len(request.adapters))


def smallest_max_prune(units: int) -> float:
    """The smallest --max-prune of three decimals that lets one of `units` units be pruned."""
    return math.ceil(1000 / units) / 1000


def check_prunable(request: SearchRequest, strategy: Strategy) -> None:
    """--max-prune lets at least one (block, task) unit of these adapters be pruned, and the strategy has what it
    needs of their space (the surrogate: a budget that holds its screen)."""
    space = unit_space(request)
    if space is not None and space[1] < 1:
        units = space[0]
        raise LoramergeError(f"--max-prune {request.enmp.max_prune:g}: none of the {units} (block, task) units may "
                             f"be pruned (⌊ρ·{units}⌋ = 0); give at least {smallest_max_prune(units):g}")
    if space is not None and strategy.check_space is not None:
        strategy.check_space(request, *space)


def check_merge_settings(request: SearchRequest) -> None:
    """The merger's settings, resolved as the search will (parameter bounds, weights per adapter, λ, space):
    refused here, not after the adapters load. Imports torch, so it follows the torch-free checks."""
    from loramerge_cli.merging.config import zero_by_settings
    from loramerge_cli.merging.merge import resolve_config

    resolve_config(request.merge, len(request.adapters))
    empty = zero_by_settings(request.merge.lam, request.merge.weights)
    if empty:  # (merge refuses to write such a merge; a search would score every table the same)
        raise UsageError(f"{empty}: every merge is empty, so each table would score the same; nothing to search")


def _same(first, second) -> bool:
    return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()


def finished_run(request: SearchRequest) -> str | None:
    """With --resume, the table of a run that finished (rundir.finished_table), unless --report-test now asks
    for test figures it does not hold."""
    from loramerge_cli.search.rundir import finished_table

    if not request.resume or request.run_dir is None:
        return None
    text = finished_table(Path(request.run_dir))
    try:
        tested = text is not None and "test" in (json.loads(text).get("provenance") or {})
    except (ValueError, AttributeError):  # not a table: api.search says so in one line
        tested = False
    return None if text is not None and request.report_test and not tested else text


def with_shared_threads(request: SearchRequest) -> SearchRequest:
    """The request with the torch threads of its processes decided where workers run (`Backend.threads_each`:
    this machine's CPUs shared among them)."""
    threads = Backend(request.backend, request.devices, request.ray_address).threads_each(request.eval.device,
                                                                                        request.eval.threads)
    return request if threads == request.eval.threads else replace(request, eval=replace(request.eval,
                                                                                         threads=threads))


def plan_search(request: SearchRequest, out: str | Path | None = None, force: bool = False,
                plot: str | Path | None = None) -> SearchPlan:
    """Check everything a search needs before any model loads (torch is imported only for the output check);
    the run directory is prepared last."""
    finished = finished_run(request)
    strategy = check_request(request, finished is not None)
    request = with_shared_threads(request)
    if plot is not None and strategy.kind == "coefficients":
        raise UsageError("--plot draws search curves and masks; --strategy nsc has neither")
    check_splits(request)
    check_extras(request, plot)
    check_base_given(request.base)
    check_outputs(request, out, force, plot, protected_paths(request), finished)
    check_merge_settings(request)
    if finished is None:  # (a finished run's table is given back on any machine)
        Backend(request.backend, request.devices, request.ray_address).check_devices(request.eval.device)
    if strategy.kind == "mask":
        check_prunable(request, strategy)
    if request.fitness == "nsc" or strategy.kind == "coefficients":
        from loramerge_cli.search.nsc_targets import check_target_blocks

        check_target_blocks(request)
    prepare_run_dir(request, write=False, finished=finished is not None)  # the same settings and inputs
    return SearchPlan(request, strategy, Path(out) if out is not None else None, force,
                      Path(plot) if plot is not None else None, finished)
