"""Parallel fitness: one worker process per device, each with its own model; candidates are handed
out dynamically and the results put back in candidate order, so a run equals a serial one."""

from __future__ import annotations

import multiprocessing
import queue as queue_module

from loramerge_cli.errors import LoramergeError


def _worker(build, device: str, tasks, results) -> None:
    """Build a fitness on `device` (via the picklable `build(device)`), then serve candidates."""
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
        self.tasks, self.results = context.Queue(), context.Queue()
        self.processes = [
            context.Process(target=_worker, args=(build, device, self.tasks, self.results), daemon=True)
            for device in devices
        ]
        for process in self.processes:
            process.start()
        for _ in devices:
            status, payload = self._next(start_timeout)
            if status == -1:
                self.close()
                raise LoramergeError(payload)

    def _next(self, timeout: float):
        try:
            return self.results.get(timeout=timeout)
        except queue_module.Empty:
            self.close()
            raise LoramergeError("a search worker stopped answering") from None

    def __call__(self, candidates: list) -> list[float]:
        for index, candidate in enumerate(candidates):
            self.tasks.put((index, candidate))
        values: dict[int, float] = {}
        while len(values) < len(candidates):
            index, value = self._next(3600.0)
            if index == -1:
                self.close()
                raise LoramergeError(value)
            values[index] = value
        return [values[index] for index in range(len(candidates))]

    def close(self) -> None:
        for _ in self.processes:
            self.tasks.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
