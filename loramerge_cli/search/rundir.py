"""The run directory of a search: one search at a time (a lock), the settings it was started with, and
the sha256 of every input it reads, so `--resume` continues that search or refuses in one line.

Files (all written atomically; none is a pickle): `config.json` (settings, the command's flags, input
digests), the strategy's state (the file its registry entry names: `surrogate_state.json`, `state.json` for
enmp, …), `trajectory.jsonl`, `elapsed.json` (the seconds spent so far), `best.json`, `scores.json`,
`.lock` (held while a search runs) and `.scores.lock` (held while `scores.json` is replaced).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.settings import EvalSettings
from loramerge_cli.outputs import clean_temporaries
from loramerge_cli.search.backends import BACKENDS
from loramerge_cli.search.state_io import CONFIG_NAME, ELAPSED_NAME, TRAJECTORY_NAME, read_json_file, run_id
from loramerge_cli.search.strategies import STRATEGIES

CONFIG_FORMAT = "loramerge.run/v1"
LOCK_NAME = ".lock"
LEGACY_PICKLE = "state.pkl"


def strategy_states() -> tuple[str, ...]:
    """Each registered strategy's state file, and the old pickle (refused): a run dir holding one holds a search."""
    return (*(strategy.state_file for strategy in STRATEGIES.values() if strategy.state_file), LEGACY_PICKLE)


def state_names() -> tuple[str, ...]:
    """What a search saves as it goes."""
    return (*strategy_states(), TRAJECTORY_NAME, BEST_NAME, FINISHED_NAME, ELAPSED_NAME)


BEST_NAME = "best.json"  # the best table so far; the finished run's table, provenance and all
FINISHED_NAME = "finished.json"  # written last: the run is over, and best.json is its table
FINISHED_FORMAT = "loramerge.finished/v1"


def record_finished(run_dir: Path, table_text: str) -> None:
    """Mark the run over, once its table is written (best.json holds `table_text`): --resume gives it back."""
    import hashlib

    from loramerge_cli.atomic import write_text

    digest = hashlib.sha256(table_text.encode()).hexdigest()
    write_text(Path(run_dir) / FINISHED_NAME, json.dumps({"format": FINISHED_FORMAT, "best_sha256": digest,
                                                          "run_id": run_id(run_dir)}) + "\n")


def finished_table(run_dir: Path) -> str | None:
    """The table of a run that finished (best.json's text, when it is still the one the run wrote); None for a
    run still to finish, or whose files do not agree (it is then resumed as any other, to the same table). A
    finished.json of another run (its run_id) is refused."""
    import hashlib

    try:
        marker = json.loads((Path(run_dir) / FINISHED_NAME).read_text(encoding="utf-8"))
        text = (Path(run_dir) / BEST_NAME).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != FINISHED_FORMAT:
        return None
    saved = run_id(run_dir)
    if saved is not None and marker.get("run_id") != saved:  # a finished table copied in from another run
        raise LoramergeError(f"--resume: {Path(run_dir) / FINISHED_NAME} was written by another search than the "
                             f"one {Path(run_dir) / CONFIG_NAME} describes (copied from another run directory?); "
                             "start a new run")
    return text if marker.get("best_sha256") == hashlib.sha256(text.encode()).hexdigest() else None

# Flags that say where and how fast a search runs, with their defaults: the same scores on any of them (bar the
# kind of device, saved apart), so they are not saved with the run; its resume command repeats those given.
HOW_IT_RUNS = {"threads": None, "device": EvalSettings.device, "devices": None, "workers": None,
               "backend": BACKENDS[0], "ray_address": None, "block_cache_mb": EvalSettings.block_cache_mb}
# Flags that say how a search runs or where its table goes, not what it searches: --resume may change them.
RUN_ONLY_FLAGS = {"out", "force", "json_output", "quiet", "debug", "plot", "resume", "config", "run_dir",
                  "report_test", *HOW_IT_RUNS}


class RunDirLock:
    """An exclusive, non-blocking lock on `run_dir/.lock` for as long as a search uses the folder; the
    operating system drops it when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        from filelock import FileLock

        self.run_dir = run_dir
        self.lock = FileLock(str(run_dir / LOCK_NAME), timeout=0)

    def __enter__(self):
        from filelock import Timeout

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            clean_temporaries(self.run_dir)  # a killed run's half-written files (the lock says it is gone)
        except Timeout:
            raise LoramergeError(f"--run-dir {self.run_dir} is in use by another search; wait for it to end "
                                 "or give another --run-dir") from None
        except OSError as error:
            reason = "a file, not a folder" if self.run_dir.is_file() else error.strerror or error
            raise LoramergeError(f"--run-dir {self.run_dir}: cannot use it ({reason})") from None
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def check_free(self) -> None:
        """Refuse now, in one line, a run dir another search holds (creates nothing)."""
        if (self.run_dir / LOCK_NAME).exists():
            with self:
                pass


def forget_refused_run(run_dir: Path, before: set[str] | None) -> None:
    """After a search was refused before it saved any state, remove what it wrote (the folder if it made it,
    else its config.json and .lock): a refused run leaves nothing to resume. `before`: the folder's entries
    when the command started (None: it did not exist). A run with saved state is never touched."""
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in state_names()):
        return
    if before is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in (CONFIG_NAME, LOCK_NAME):
        if name not in before:
            (run_dir / name).unlink(missing_ok=True)


# --- configuration ----------------------------------------------------------------------------------

def read_config(run_dir: Path) -> dict | None:
    """The saved configuration, None when there is none; a damaged one is one line."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return None
    def parse(data: dict) -> dict:
        if not isinstance(data.get("settings"), dict):
            raise ValueError('no "settings" object')
        for key in ("flags", "inputs"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise ValueError(f'"{key}" is not an object')
        inputs = data.get("inputs") or {}
        if not all(isinstance(path, str) and isinstance(digest, str) for path, digest in inputs.items()):
            raise ValueError('"inputs" maps a path to something other than a sha256')
        return data

    return read_json_file(path, CONFIG_FORMAT, "run configuration", parse)


def write_config(run_dir: Path, settings: dict, flags: dict | None, inputs: dict, command: str = "") -> None:
    """config.json: the run's settings, flags, inputs' sha256 and command line (what its table's provenance
    names after a resume), and its id (kept if it has one), with which every state it saves is marked."""
    import uuid

    from loramerge_cli.atomic import write_text

    data = {"format": CONFIG_FORMAT, "settings": settings, "flags": flags, "inputs": inputs, "command": command,
            "run_id": run_id(run_dir) or uuid.uuid4().hex}
    write_text(run_dir / CONFIG_NAME, json.dumps(data, indent=2, default=str) + "\n")


def normal_path(value) -> str:
    """A path as an absolute one (symlinks followed), so relative and absolute spellings compare equal."""
    return str(Path(value).expanduser().resolve())


def normal_adapter(argument: str) -> str:
    """`[name=]source` with a local source made absolute; Hub ids unchanged. An unnamed source whose name the
    absolute path would change (a symlink `a` to `adapters/rte`) keeps it, as `a=/…/adapters/rte`."""
    from loramerge_cli.adapters.sources import default_name, split_name

    named = split_name(argument)
    if not Path(named.spec).expanduser().exists():
        return argument
    path = normal_path(named.spec)
    name = named.name
    if name is None:
        def name_of(spec: str) -> str | None:
            try:
                return default_name(spec)
            except LoramergeError:  # (not a task name: the spelling given is refused where it is named)
                return None

        given = name_of(named.spec)
        name = given if given != name_of(path) else None
    return f"{name}={path}" if name else path


def normal_flags(flags: dict) -> dict:
    """The command's flag values in the form they are saved and compared in."""
    out = {}
    for name, value in flags.items():
        if name == "adapters" and value is not None:
            value = [normal_adapter(str(v)) for v in value]
        elif isinstance(value, Path) or (name in ("tasks", "out", "plot", "run_dir", "config") and value):
            value = normal_path(value)
        out[name] = value
    return out


def resumed_flags(run_dir: Path, given: dict, values: dict) -> dict | None:
    """The flags of a resumed search: the saved ones, with the run-only flags given now. A setting given
    now must equal the saved one (after normalising paths); a difference names the flag and both values.
    None when the run dir holds no saved search (the caller starts one)."""
    config = read_config(run_dir)
    saved = config.get("flags") if config else None
    if not isinstance(saved, dict):
        return None
    _check_saved_flags(run_dir / CONFIG_NAME, saved)
    now = normal_flags({name: values[name] for name in given})
    def differs(name: str) -> bool:
        if name == "adapters":  # a name given or left to the source: the same task
            return not _same_value(_named(now[name]), _named(saved[name]))
        return not _same_value(now[name], saved[name])

    changed = [name for name in given if name not in RUN_ONLY_FLAGS and name in saved and differs(name)]
    if changed:
        differences = "; ".join(f"{flag_name(name)} is {_shown(now[name])} but the saved run " + (
            "did not give it" if saved[name] is None else f"used {_shown(saved[name])}") for name in changed)
        raise LoramergeError(f"--resume: {differences}; drop {'the flag' if len(changed) == 1 else 'these flags'}, "
                             "or start a new run")
    merged = {**values, **{name: value for name, value in saved.items() if name in values and name not in
                           RUN_ONLY_FLAGS}}
    if "out" not in given and saved.get("out"):  # where the table goes: the saved place unless given now
        merged["out"] = saved["out"]
    for name in ("tasks", "out", "plot"):
        if isinstance(merged.get(name), str):
            merged[name] = Path(merged[name])
    return merged


def _check_saved_flags(path: Path, saved: dict) -> None:
    """The saved flags are what a command line gives: text, numbers, booleans, lists of text (a hand-edited
    file is one line here, not an error deep in the search)."""
    for name, value in saved.items():
        scalar = value is None or isinstance(value, (str, int, float, bool))
        listed = isinstance(value, list) and all(isinstance(item, str) for item in value)
        fits = (value is None or isinstance(value, str) if name in ("tasks", "out", "plot", "base", "strategy")
                else value is None or listed if name in ("adapters", "merged") else scalar or listed)
        if not fits:
            raise LoramergeError(f"--resume: {path}: the saved flag {name} is {value!r}, which no command line gives; "
                                 "give another --run-dir to start over")


def _named(adapters):
    """Adapter arguments each with its task name (`a/rte` is `rte=a/rte`), so a name given or left to the source
    compares equal."""
    from loramerge_cli.adapters.sources import source_names, split_name

    if not isinstance(adapters, list):
        return adapters
    try:
        names = source_names(adapters)
    except LoramergeError:  # no names can be made of them: compared as given
        return adapters
    return [f"{name}={split_name(argument).spec}" for name, argument in zip(names, adapters)]


def _same_value(now, saved) -> bool:
    """Equal, or the same number written two ways (`--lambda 0.2750` and the saved `0.275`)."""
    if now == saved:
        return True
    try:
        return isinstance(now, str) and isinstance(saved, str) and float(now) == float(saved)
    except ValueError:
        return False


def flag_name(name: str) -> str:
    """The command-line flag of a setting's name."""
    return "--" + ("lambda" if name == "lam" else "json" if name == "json_output" else name.replace("_", "-"))


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# --- inputs -----------------------------------------------------------------------------------------

def input_paths(request) -> list[Path]:
    """Every local file the search reads: adapter weights and configs, the task spec, its data and head
    files, and a local base model's files."""
    return _inputs(request)[0]


def protected_paths(request) -> list[Path]:
    """input_paths and the folders they were named by: adapter folders, data folders, a local base model's
    folder. No output of the search (--out, --plot, --run-dir) may go over, hold or lie inside one."""
    files, folders = _inputs(request)
    return files + folders


def _inputs(request) -> tuple[list[Path], list[Path]]:
    from loramerge_cli.outputs import read_inputs

    return read_inputs(request.adapters, request.tasks, request.base, request.allow_pickle)


def input_digests(request) -> dict[str, str]:
    """{absolute path: sha256} of every input (input_paths). A large file of the Hugging Face cache is stored
    under its sha256 (`blobs/<sha256>`, as the Hub names it): that name is its digest, not gigabytes read again."""
    import re

    from loramerge_cli.adapters.sources import sha256_file

    def digest(path: str) -> str:
        name = Path(path).name
        if Path(path).parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", name):
            return name
        return sha256_file(Path(path))

    return {path: digest(path) for path in dict.fromkeys(normal_path(path) for path in input_paths(request))}


def unscored_inputs(request) -> set[str]:
    """The data files (and the files their listings name) of the splits a search scores no table on: the test
    split, which --report-test scores once the search is over. No score of an unfinished run depends on them, so
    resuming one does not refuse when they changed (a finished run's table may hold test scores: it does). A
    file the searched split reads too is not among them."""
    from loramerge_cli.evaluation.data import listed_files
    from loramerge_cli.evaluation.specs import load_task_file
    from loramerge_cli.outputs import files_under

    task_file = load_task_file(request.tasks)
    searched = request.eval.split

    def read_by(splits) -> set[str]:
        data = [Path(task.data[split]) for task in task_file.tasks for split in splits & task.data.keys()]
        return {normal_path(path) for path in [*(file for item in data for file in files_under(item)),
                                               *listed_files(task_file, splits)]}

    others = {split for task in task_file.tasks for split in task.data} - {searched}
    return read_by(others) - read_by({searched})


def check_inputs(saved: dict, current: dict, listed: set[str] = frozenset(), unscored: set[str] = frozenset()) -> None:
    """Refuse to resume when an input changed, was removed, or a new one appeared, naming the file. A new file
    among `listed` (the images a listing names) is no refusal: with the listing unchanged, it is one a run saved by
    an earlier loramerge did not record (it recorded the listing only); nor is one of a Hub repository the run
    recorded no file of (a Hub base, which earlier runs did not record). A file among `unscored` (unscored_inputs:
    an unfinished run's test split, whose digest is recorded all the same) is not compared."""
    for path, digest in saved.items():
        if path not in unscored and current.get(path) != digest:
            moved = _moved_hub_input(path) if path not in current else None
            if moved:
                raise LoramergeError(f"--resume: since the run started, {moved}; the saved scores are for the old "
                                     "files: start a new run (another --run-dir)")
            state = "is gone" if path not in current else "changed (its sha256 differs)"
            raise LoramergeError(f"--resume: {path} {state} since the run started; the saved scores are for "
                                 "the old inputs: start a new run (another --run-dir)")
    from loramerge_cli.adapters.sources import hub_repo_folder

    recorded_repositories = {hub_repo_folder(path) for path in saved} - {None}
    for path in current:
        if path not in saved and path not in listed:
            repository = hub_repo_folder(path)
            if repository is not None and repository not in recorded_repositories:
                continue  # a Hub base's files, which a run saved by an earlier loramerge did not record
            raise LoramergeError(f"--resume: {path} is a new input since the run started; start a new run")


def _moved_hub_input(path: str) -> str | None:
    """What happened to a file of the Hub cache that a run read and the same arguments no longer read: its
    repository's revision now names other files (a branch or tag moved), said with the repository's id and the
    commit the run read where a snapshot still links to the file; None for a file outside the cache."""
    from loramerge_cli.adapters.sources import hub_repo_folder

    repository = hub_repo_folder(path)
    if repository is None or not repository.name.startswith("models--"):
        return None
    repo_id = repository.name.removeprefix("models--").replace("--", "/")
    commits = sorted(link.parent.name for link in (repository / "snapshots").glob("*/*")
                     if link.is_symlink() and os.path.realpath(link) == os.path.realpath(path))
    read = f"; the run read commit {commits[0]}" if len(commits) == 1 else ""
    return f"the Hub repository {repo_id} resolves to other files (a branch or tag moved{read})"


def listed_inputs(request) -> set[str]:
    """The files the task spec's listings name (data.listed_files), as input_digests names them."""
    from loramerge_cli.evaluation.data import listed_files
    from loramerge_cli.evaluation.specs import load_task_file

    return {normal_path(path) for path in listed_files(load_task_file(request.tasks))}


def run_dir_files(run_dir: Path | None) -> list[Path]:
    """The run directory's own state files (an --out must not replace them)."""
    if run_dir is None:
        return []
    from loramerge_cli.evaluation.cache import CACHE_LOCK_NAME, CACHE_NAME

    return [Path(run_dir) / name for name in (CONFIG_NAME, LOCK_NAME, CACHE_NAME, CACHE_LOCK_NAME, *state_names())]


def refuse_pickle_state(run_dir: Path) -> None:
    if (run_dir / LEGACY_PICKLE).exists():
        raise LoramergeError(f"--resume: {run_dir / LEGACY_PICKLE} is a pickle from an older loramerge; it is never "
                             "read (unpickling can run code): start a new run")
