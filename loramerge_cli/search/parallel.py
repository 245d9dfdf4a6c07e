"""Parallel fitness: one worker process per device, each with its own model; candidates are handed
out dynamically and the results put back in candidate order, so a run equals a serial one."""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import time
from typing import Callable

from loramerge_cli.errors import LoramergeError, WorkerLost
from loramerge_cli.search.lifetime import become_worker, signals_blocked


def _worker(build, device: str, tasks, results, parent_pid: int) -> None:
    """Build a fitness on `device` (via the picklable `build(device)`), then serve candidates; the worker
    ignores Ctrl-C (the parent ends it) and dies with its parent."""
    become_worker(parent_pid)
    try:
        fitness = build(device)
    except BaseException as error:  # noqa: BLE001 - reported to the parent as one line
        results.put((-1, f"worker on {device} failed to start: {error}"))
        return
    results.put((-2, device))
    while True:
        item = tasks.get()
        if item is None:
            return
        index, candidate = item
        try:
            results.put((index, fitness([candidate])[0]))
        except BaseException as error:  # noqa: BLE001
            results.put((-1, f"worker on {device}: {error}"))
            return


class ParallelFitness:
    """Callable like a fitness; evaluates a batch of candidates across worker processes."""

    def __init__(self, build, devices: list[str], start_timeout: float = 600.0):
        context = multiprocessing.get_context("spawn")
        with signals_blocked():  # the queues' locks start multiprocessing's resource tracker: with SIGHUP blocked,
            self.tasks, self.results = context.Queue(), context.Queue()  # as the workers (a closed terminal
            # signals the whole group: the tracker died of it and its successor printed tracebacks)
        self.processes = [
            context.Process(target=_worker, args=(build, device, self.tasks, self.results, os.getpid()), daemon=True)
            for device in devices
        ]
        try:
            with signals_blocked():
                for process in self.processes:
                    process.start()
            for _ in devices:
                status, payload = self._next(start_timeout)
                if status == -1:
                    raise LoramergeError(payload)
        except BaseException:
            self.close(wait=False)
            raise

    def _next(self, timeout: float):
        """The next result; a worker that died without a word (killed, out of memory) is one line."""
        deadline = time.monotonic() + timeout
        while True:
            dead = [p for p in self.processes if p.exitcode is not None]
            if dead:
                self.close(wait=False)
                raise WorkerLost(f"a search worker died (exit code {dead[0].exitcode})")
            try:
                return self.results.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except queue_module.Empty:
                pass
            if time.monotonic() >= deadline:
                self.close(wait=False)
                raise WorkerLost("a search worker stopped answering")

    def __call__(self, candidates: list, on_result: Callable[[int, object], None] | None = None) -> list[float]:
        """Each candidate's value, in order; `on_result(index, value)` as each arrives (progress)."""
        for index, candidate in enumerate(candidates):
            self.tasks.put((index, candidate))
        values: dict[int, float] = {}
        while len(values) < len(candidates):
            index, value = self._next(3600.0)
            if index == -1:
                self.close(wait=False)
                raise LoramergeError(value)
            values[index] = value
            if on_result is not None:
                on_result(index, value)
        return [values[index] for index in range(len(candidates))]

    def __enter__(self) -> "ParallelFitness":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.close(wait=error_type is None)

    def close(self, wait: bool = True) -> None:
        """Stop the workers: politely (`wait`), else at once (after an error or an interrupt), by SIGKILL (they
        ignore SIGTERM, which is the parent's to handle); shielded, so a second Ctrl-C cannot leave one behind."""
        from loramerge_cli import interrupts

        with interrupts.shielded():
            if wait:
                for _ in self.processes:
                    self.tasks.put(None)
            else:  # items no worker will read may fill the pipe: the exit must not wait to send them
                self.tasks.cancel_join_thread()
                self.results.cancel_join_thread()
            for process in self.processes:
                if process.pid is None:
                    continue
                process.join(timeout=10 if wait else 0)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=5)
