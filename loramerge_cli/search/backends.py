"""Where the workers of a search or an evaluation run: this process (serial), worker processes on this
machine (`process`, the default), or Ray actors on this machine or a cluster (`ray`).

Every backend offers the same small interface: `pool(items)` returns `[work([item])[0] for item in items]`
in item order, where each worker built `work = build(device)` once; `pool.close()` (or leaving `with pool:`)
ends the workers.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from loramerge_cli.errors import LoramergeError, UsageError

BACKENDS = ("process", "ray")


@dataclass
class Backend:
    """How to spread work. `devices`: one worker each (None: serial for `process`; for `ray`, one actor per
    GPU of the cluster with a cuda `device`, else one per `threads` CPUs)."""

    name: str = "process"
    devices: list[str] | None = None
    address: str | None = None  # ray: None (a local cluster), "auto" or HOST:PORT

    def check(self) -> None:
        """The choice itself, before any model loads: Ray's presence, and that a cluster answers at `address`."""
        if self.name not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)} (got {self.name!r})")
        if self.address is not None and self.name != "ray":
            raise UsageError("--ray-address needs --backend ray")
        if self.name == "ray":
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise LoramergeError('--backend ray needs Ray: pip install "loramerge[ray]"')
            if self.address is not None:
                from loramerge_cli.search.ray_backend import probe

                probe(self.address)


def open_pool(build, backend: Backend, device: str = "cpu", threads: int | None = None):
    """Workers running `build(device)`, or None when the work stays in this process."""
    backend.check()
    if backend.name == "ray":
        from loramerge_cli.search.ray_backend import RayPool, slots

        devices = backend.devices or slots(device, threads, backend.address)
        return RayPool(build, devices, backend.address, threads)
    if backend.devices and len(backend.devices) > 1:
        from loramerge_cli.search.parallel import ParallelFitness

        return ParallelFitness(build, backend.devices)
    return None



@contextmanager
def worker_pool(build, backend: Backend | None, device: str = "cpu", threads: int | None = None):
    """`open_pool` as a context: yields the pool (or None) and ends its workers on the way out."""
    pool = open_pool(build, backend, device, threads) if backend is not None else None
    with pool or nullcontext():  # stopped at the end; at once after an error or Ctrl-C
        yield pool
