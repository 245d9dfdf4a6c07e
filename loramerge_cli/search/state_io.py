"""Reading and writing a search's state files in its run directory (JSON, atomically; nothing is pickled).
The strategies' modules use these; `search/rundir.py` manages the folder itself."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, TypeVar

from loramerge_cli.errors import LoramergeError

T = TypeVar("T")
TRAJECTORY_NAME = "trajectory.jsonl"
CONFIG_NAME = "config.json"  # the run's configuration (search/rundir.py), with its run_id
ELAPSED_NAME = "elapsed.json"  # the seconds the run's processes have spent on it so far
ELAPSED_FORMAT = "loramerge.elapsed/v1"
SAVE_EVERY_SECONDS = 1.0


def _config_string(run_dir: Path, key: str) -> str | None:
    """A string config.json records (None: not there, not a string, or no readable config.json)."""
    try:
        value = json.loads((Path(run_dir) / CONFIG_NAME).read_bytes()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def run_id(run_dir: Path) -> str | None:
    """The id config.json gives this run directory's search (None: none, or a run saved before ids)."""
    return _config_string(run_dir, "run_id")


def started_command(request) -> dict:
    """{"command": the command line that started the search}, and for a resumed one the command that resumed
    it ("resumed_with"): `--run-dir R --resume` alone would not say what was searched."""
    resumed = request.resume and request.run_dir is not None
    first = _config_string(request.run_dir, "command") if resumed else None
    if not first or first == request.command:
        return {"command": request.command}
    return {"command": first, "resumed_with": request.command}


class RunClock:
    """The seconds a search has run over every process that ran it: those before a --resume (elapsed.json,
    saved as it goes by `tick`, so a killed process loses at most its last second or step) and this one's."""

    def __init__(self, run_dir: Path | None, resume: bool):
        self.run_dir, self.started, self.before = run_dir, time.perf_counter(), 0.0
        self.saved_at = -float("inf")
        self.run_id = run_id(run_dir) if run_dir is not None else None
        if run_dir is not None and resume:
            try:
                data = loads_finite((Path(run_dir) / ELAPSED_NAME).read_bytes())
                if data.get("format") == ELAPSED_FORMAT and data.get("run_id") == self.run_id:
                    self.before = max(0.0, _finite(data["seconds"]))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # none saved (a run from before this file), or unreadable: this process's seconds only

    def this_process(self) -> float:
        return time.perf_counter() - self.started

    def seconds(self) -> float:
        return self.before + self.this_process()

    def tick(self) -> None:
        """Save the seconds so far in the run directory (atomically, at most once a second: a step of NSC takes
        milliseconds; nothing without one)."""
        now = time.perf_counter()
        if self.run_dir is not None and now - self.saved_at >= SAVE_EVERY_SECONDS:
            self.saved_at = now
            from loramerge_cli.atomic import write_text

            write_text(Path(self.run_dir) / ELAPSED_NAME, json.dumps(
                {"format": ELAPSED_FORMAT, "seconds": round(self.seconds(), 3), "run_id": self.run_id}) + "\n")

    def provenance(self) -> dict:
        """"seconds": the whole run's; "seconds_this_process" where a resume split it."""
        total = {"seconds": round(self.seconds(), 3)}
        return total if self.before == 0 else {**total, "seconds_this_process": round(self.this_process(), 3)}


def hub_base_record(base: str) -> dict:
    """{"base_model": `org/name@commit`} for a Hub base (the commit the search read), else {} (a local base's path
    is this machine's: a table's provenance names no absolute path)."""
    from loramerge_cli.adapters.sources import base_reference

    return {"base_model": base} if base_reference(base)[1] else {}


def searched_data(request) -> dict:
    """{"data": the task spec and which of its examples the search scored}: a table searched from a recipe
    (`--config`) records what it read, not only the recipe's name."""
    settings = request.eval
    return {"data": {"tasks": str(request.tasks), "split": settings.split, "val_limit": settings.val_limit,
                     "sample_seed": settings.sample_seed}}


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is not a finite number")
    return number


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def loads_finite(text: str | bytes):
    """JSON a run directory holds: every number finite (loramerge writes no NaN, Infinity or 1e999; a damaged
    file would carry them into the table it writes, which is then no JSON)."""
    return json.loads(text, parse_float=_finite, parse_constant=_no_constant)


def read_json_file(path: Path, expected: str, what: str, parse: Callable[[dict], T]) -> T:
    """`parse` of a run directory's JSON file whose "format" is `expected`; anything malformed is one line."""
    try:
        data = loads_finite(path.read_bytes())
        if not isinstance(data, dict) or data.get("format") != expected:
            raise ValueError(f'expected a JSON object with "format": "{expected}"')
        return parse(data)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise LoramergeError(f"{path}: not a readable {what} ({error}); give another --run-dir to start "
                             "over") from None


def write_progress(run_dir: Path, state_name: str | None, state: dict | None, history: list[dict]) -> None:
    """A strategy's JSON state (none: it wrote its own), marked with the run's id, and `trajectory.jsonl`, one
    line per record, each atomically, the state first (a resume rewrites the trajectory from it)."""
    from loramerge_cli.atomic import write_text

    if state_name is not None:  # marked with its run's id: a state copied into another run dir is refused
        write_text(run_dir / state_name, json.dumps({**state, "run_id": run_id(run_dir)}) + "\n")
    write_text(run_dir / TRAJECTORY_NAME, "".join(json.dumps(record) + "\n" for record in history))


def check_state_units(path: Path, tables, space: tuple[int, int] | None) -> None:
    """A saved state's tables lie within this search: unit indices below units × tasks, at most the ρ cap's
    units pruned (`space`; None where the adapters cannot tell before loading)."""
    if space is not None and any(len(t) > space[1] or (t and (min(t) < 0 or max(t) >= space[0])) for t in tables):
        raise LoramergeError(f"--resume: {path} does not match this search (a table outside its {space[0]} units "
                             f"or beyond its ρ cap of {space[1]}); start a new run")


def state_run_id(path: Path) -> str | None:
    """The run id a saved state was marked with (JSON, or a safetensors file's metadata); None if none."""
    try:
        if path.suffix == ".safetensors":
            from loramerge_cli.atomic import safetensors_metadata

            value = safetensors_metadata(path).get("run_id")
        else:
            value = json.loads(path.read_bytes()).get("run_id")
    except Exception:  # noqa: BLE001 - a damaged state is reported by its strategy's own check
        return None
    return value if isinstance(value, str) else None


def check_state_run(path: Path, saved_run_id: str | None) -> None:
    """A state saved by this run directory's search, not one copied from another run: its run id is the one
    config.json records (runs saved before ids carry none and are not checked)."""
    if saved_run_id is not None and state_run_id(path) != saved_run_id:
        raise LoramergeError(f"--resume: {path} was saved by another search than the one {path.parent / CONFIG_NAME} "
                             "describes (copied from another run directory?); start a new run")
