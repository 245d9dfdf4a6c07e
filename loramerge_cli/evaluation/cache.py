"""Scores that never change within a run (experts, the base) stored in the run directory.

A score is keyed by the candidate's weights (adapter sha256) and the engine's task fingerprint
(base model, data selection, head, settings), so a changed input is not served from the cache; the base
model's weight files, gigabytes, are known by name, size and mtime (loading.base_identity), so a new file
copied over one with all three kept (`cp -p`, `rsync -t`) is not seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loramerge_cli.atomic import write_text
from loramerge_cli.errors import LoramergeError

CACHE_NAME = "scores.json"
CACHE_LOCK_NAME = ".scores.lock"  # held only while the cache is re-read and replaced
CACHE_LOCK_SECONDS = 10


class ScoreCache:
    """A JSON file of {key: accuracy}; without a run directory it only lives in memory."""

    def __init__(self, run_dir: str | Path | None = None):
        self.file = Path(run_dir) / CACHE_NAME if run_dir is not None else None
        self.scores: dict[str, float] = read_cache(self.file) if self.file is not None else {}

    def get(self, key: str) -> float | None:
        return self.scores.get(key)

    def put(self, entries: dict[str, float]) -> None:
        self.scores.update(entries)
        if self.file is None:
            return
        # what another command sharing the run dir added since this one read it is kept: the file is re-read
        # and replaced under a lock that every writer takes (without it, two commands could both re-read, and
        # the second rename lose the first's scores); a file that is no longer a score cache is not written over
        with cache_lock(self.file.with_name(CACHE_LOCK_NAME)):
            self.scores = {**read_cache(self.file), **self.scores}
            write_text(self.file, json.dumps(self.scores, indent=1, sort_keys=True))
        from loramerge_cli import interrupts

        if interrupts.hint() is None:  # (a search's own line says how to resume it, or to rerun it)
            interrupts.set_hint(f"{self.file} keeps the scores computed so far: the same command reuses them")


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """The score cache's lock for the block, at best: one that cannot be taken (another user's lock file in a
    shared run dir, one held past CACHE_LOCK_SECONDS) leaves the block unlocked, as before there was a lock (two
    writers at that moment can lose a score, computed again next time), never the command's work."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), timeout=CACHE_LOCK_SECONDS)
    try:
        lock.acquire()
    except (Timeout, OSError):
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def read_cache(file: Path) -> dict[str, float]:
    """A score cache's scores ({} when there is none); a file that is not one (a user's scores.json, an eval
    report) is refused in one line and never written."""
    if not file.is_file():
        if os.path.lexists(file):
            raise LoramergeError(f"{file} is not a file; give --run-dir a folder of its own")
        return {}
    try:
        scores = json.loads(file.read_bytes())
    except (OSError, ValueError):
        scores = None
    if not isinstance(scores, dict) or not all(
            isinstance(key, str) and len(key) == 64 and set(key) <= set("0123456789abcdef")
            and isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
            for key, value in scores.items()):
        raise LoramergeError(f"{file} is not a score cache loramerge wrote (it is never written over): if it was "
                             "one, damaged, delete it (its scores are computed again); else give --run-dir a folder "
                             "of its own")
    return scores


def check_run_dir(run_dir, inputs: list) -> None:
    """`eval --run-dir`: not the working folder, not over, holding or inside an input, a folder it can write
    (or make), and any scores.json in it a score cache loramerge wrote."""
    from loramerge_cli.outputs import check_creatable, check_not_an_input, check_not_working_folder

    check_not_working_folder(run_dir, "--run-dir")
    check_not_an_input(run_dir, inputs, "--run-dir")
    check_creatable(run_dir, f"--run-dir {run_dir}: cannot write scores there")
    check_cache_files(Path(run_dir))


def check_cache_files(run_dir: Path) -> None:
    """A run dir's score cache is one loramerge wrote (or none), and its lock, if there, a file (not a folder or
    a link, which the lock would fail on, or write through, once the scores are computed)."""
    read_cache(run_dir / CACHE_NAME)
    lock = run_dir / CACHE_LOCK_NAME
    if lock.is_symlink() or (lock.exists() and lock.is_dir()):
        raise LoramergeError(f"{lock} is not a file loramerge wrote (a {'link' if lock.is_symlink() else 'folder'}); "
                             "give --run-dir a folder of its own")


def score_key(kind: str, weights_sha256: str, fingerprint: str) -> str:
    return hashlib.sha256(f"{kind}|{weights_sha256}|{fingerprint}".encode()).hexdigest()


def expert_scores(engine, cache: ScoreCache, report=None) -> dict[str, float]:
    """Each expert's accuracy on its own task, computed once per (weights, data, settings); `report`
    receives a progress stage (loramerge_cli.events)."""
    from loramerge_cli.adapters.model import content_sha256
    from loramerge_cli.events import stage

    out, fresh = {}, {}
    with stage(report, "experts", len(engine.task_file.names)) as step:
        for task in engine.task_file.names:
            adapter = engine.experts[task]
            key = score_key("expert", content_sha256(adapter), engine.fingerprint(task))
            value = cache.get(key)
            if value is None:
                value = fresh[key] = engine.score_adapter(adapter, [task])[task]
            out[task] = value
            step(f"{task} {100 * value:.1f}%")
    if fresh:
        cache.put(fresh)
    return out


def base_scores(engine, cache: ScoreCache, report=None) -> dict[str, float]:
    """The base model's accuracy on every task (with each task's head); `report` receives a progress stage, a
    step per task."""
    from loramerge_cli.events import stage

    out, fresh = {}, {}
    with stage(report, "base model", len(engine.task_file.names)) as step:
        for task in engine.task_file.names:
            key = score_key("base", "", engine.fingerprint(task))
            value = cache.get(key)
            if value is None:
                value = fresh[key] = engine.score_base([task])[task]
            out[task] = value
            step(f"{task} {100 * value:.1f}%")
    if fresh:
        cache.put(fresh)
    return out
