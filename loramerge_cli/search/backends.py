"""Where the workers of a search or an evaluation run: this process (serial), worker processes on this
machine (`process`, the default), or Ray actors on this machine or a cluster (`ray`).

Every backend offers the same small interface: `pool(items)` returns `[work([item])[0] for item in items]`
in item order, where each worker built `work = build(device)` once; `pool.close()` (or leaving `with pool:`)
ends the workers. `worker_pool` starts them at the first call, and `pool.reside(engine)` parks an engine of
this process in host memory when they start: a search's driver scores the experts and the unpruned merge on
the workers' first device, and no device holds two models.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from loramerge_cli.errors import LoramergeError, UsageError

BACKENDS = ("process", "ray")


CPU_OVERSUBSCRIPTION = 4  # the most CPU worker processes per CPU this process may use


@dataclass
class Backend:
    """How to spread work. `devices`: one worker each (None: serial for `process`; for `ray`, one actor per
    GPU of the cluster with a cuda `device`, else one per `threads` CPUs)."""

    name: str = "process"
    devices: list[str] | None = None
    address: str | None = None  # ray: None (a local cluster), "auto" or HOST:PORT

    @property
    def spreads(self) -> bool:
        """Whether the work goes to workers (Ray actors, or more than one worker process), not this process."""
        return self.name == "ray" or bool(self.devices and len(self.devices) > 1)

    def threads_each(self, device: str, threads: int | None) -> int | None:
        """Torch threads for every process of the run (the same count everywhere): `threads` when given; with
        a worker per listed device on this machine (worker processes, or a local Ray cluster), its CPUs shared
        among them (not each taking min(8, CPUs)); with Ray choosing the actors on CPUs, one each (one actor
        per CPU); else None, each process's default. An actor of a cluster named by `address` reserves what
        it uses, on a node whose CPUs this machine cannot count: none are shared out from here."""
        if threads is not None or not self.spreads:
            return threads
        if self.name == "ray" and not self.devices:
            return None if device.startswith("cuda") else 1
        if self.devices and (self.name == "process" or self.address is None):
            return max(1, (os.cpu_count() or 1) // len(self.devices))
        return None

    def check_devices(self, device: str) -> None:
        """The devices this machine must have, said before any work: every worker's when they are processes
        here (or this process's own when none spreads), and with Ray the first worker's kind, on which this
        process scores the experts and the unpruned merge (the reference of every worker's score)."""
        from loramerge_cli.evaluation.loading import torch_device

        flag = "--devices" if self.devices and set(self.devices) != {device} else "--device"  # (--workers: --device)
        if self.name == "ray":  # this process: the first worker's device, as given
            first = (self.devices or [device])[0]
            if first.startswith("cuda"):
                import torch

                if not torch.cuda.is_available():
                    raise LoramergeError(f"{flag} {first} --backend ray: loramerge scores the experts and the "
                                         "unpruned merge itself, on the workers' kind of device, and this machine "
                                         "has no CUDA GPU; run it on a GPU node of the cluster (with --ray-address "
                                         "auto, or through `ray job submit`)")
            local_devices = [first]
        else:
            local_devices = list(dict.fromkeys(self.devices or [device]))
        for local in local_devices:
            if local != "cpu":  # (the CPU is always there: no torch import for it)
                torch_device(local, flag)

    def check_worker_count(self, flag: str = "devices") -> None:
        """Worker processes on the CPU: at most CPU_OVERSUBSCRIPTION per CPU this process may use; Ray actors on a
        local cluster: at most one per CPU of the machine."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        on_cpu = [name for name in self.devices or () if (name or "cpu").split(":")[0] == "cpu"]
        if self.name == "process" and len(on_cpu) > CPU_OVERSUBSCRIPTION * cpus:  # (a few more than the CPUs: fine)
            raise UsageError(f"{flag}: {len(on_cpu)} worker processes on the CPU, where this process may use {cpus} "
                             f"CPUs (at most {CPU_OVERSUBSCRIPTION * cpus} workers: each holds a model, and workers "
                             "beyond the CPUs only compete for them)")
        machine = os.cpu_count() or 1  # what Ray's local cluster counts
        if self.name == "ray" and self.address is None and len(on_cpu) > machine:  # known before any model loads
            raise UsageError(f"{flag}: {len(on_cpu)} Ray actors on the CPU, and the local Ray cluster started for the "
                             f"run has this machine's {machine} CPUs (each actor reserves at least one)")

    def check(self) -> None:
        """The choice itself, before any model loads: Ray's presence, that a cluster answers at `address` (and, the
        workers given, has room for them), and no more worker processes than the CPUs can run."""
        if self.name not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)} (got {self.name!r})")
        if self.devices is not None and (not isinstance(self.devices, (list, tuple))
                                         or not all(isinstance(d, str) and d for d in self.devices)):
            raise UsageError(f"devices must be a list of device names (got {self.devices!r})")
        self.check_worker_count()
        if self.address is not None and self.name != "ray":
            raise UsageError("--ray-address needs --backend ray")
        if self.name == "ray":
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise LoramergeError('--backend ray needs Ray: pip install "loramerge[ray]"')
            if self.address is not None:
                from loramerge_cli.search.ray_backend import check_capacity, connect, probe

                probe(self.address)
                if self.devices:  # a cluster of too few CPUs or GPUs, known before any model loads (each actor
                    check_capacity(connect(self.address), list(self.devices), None)  # takes a CPU at least)


def open_pool(build, backend: Backend, device: str = "cpu", threads: int | None = None):
    """Workers running `build(device)`, or None when the work stays in this process."""
    backend.check()
    if backend.name == "ray":
        from loramerge_cli.search.ray_backend import RayPool, slots

        devices = backend.devices or slots(device, threads, backend.address)
        return RayPool(build, devices, backend.address, threads)
    if backend.spreads:
        from loramerge_cli.search.parallel import ParallelFitness

        return ParallelFitness(build, backend.devices)
    return None



class LazyPool:
    """A backend's workers, started at the first call (or `start`); the engines of this process given to
    `reside` are parked in host memory when they start (`Evaluator.park`: back at their next use)."""

    def __init__(self, build, backend: Backend, device: str, threads: int | None):
        self.open_workers = lambda base: open_pool(at_base(build, base), backend, device, threads)
        self.workers = None
        self.residents: list = []

    def reside(self, engine) -> None:
        """Park `engine` while the workers run (at once if they already do)."""
        self.residents.append(engine)
        if self.workers is not None:
            engine.park()

    def start(self) -> None:
        if self.workers is None:
            for engine in self.residents:
                engine.park()
            base = next((engine.base for engine in self.residents if isinstance(getattr(engine, "base", None), str)),
                        None)
            self.workers = self.open_workers(base)

    def __call__(self, items: list, on_result: Callable[[int, object], None] | None = None) -> list:
        self.start()
        return self.workers(items, on_result)

    def __enter__(self) -> "LazyPool":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if self.workers is not None:
            self.workers.__exit__(error_type, error, traceback)

    def close(self) -> None:
        self.__exit__(None, None, None)


def at_base(build, base: str | None):
    """`build` with the request or engine source it holds (in nested builders too) reading `base`, the base the
    driver's engine read (a Hub base pinned to its commit): a worker loads that commit, not the one the branch
    names when it starts, or the one its own machine's cache names. Builders are dataclasses."""
    from dataclasses import fields, is_dataclass, replace

    if base is None or not is_dataclass(build) or isinstance(build, type):
        return build
    names = {field.name for field in fields(build)}
    if "base" in names and "tasks" in names:  # a SearchRequest or an EngineSource
        return replace(build, base=base)
    changes = {}
    for name in names:
        value = getattr(build, name)
        pinned = at_base(value, base)
        if pinned is not value:
            changes[name] = pinned
    return replace(build, **changes) if changes else build


@contextmanager
def worker_pool(build, backend: Backend | None, device: str = "cpu", threads: int | None = None):
    """The backend's workers as a context: yields a `LazyPool`, or None when the work stays in this process
    (the choice is checked here, before any work); the workers end on the way out, at once after an error or
    Ctrl-C."""
    if backend is None:
        yield None
        return
    backend.check()
    if not backend.spreads:
        yield None
        return
    with LazyPool(build, backend, device, threads) as pool:
        yield pool
