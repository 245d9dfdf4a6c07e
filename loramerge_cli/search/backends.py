"""Where the workers of a search or an evaluation run: this process (serial), worker processes on this
machine (`process`, the default), or Ray actors on this machine or a cluster (`ray`).

Every backend offers the same small interface: `pool(items)` returns `[work([item])[0] for item in items]`
in item order, where each worker built `work = build(device)` once; `pool.close()` ends the workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from loramerge_cli.errors import LoramergeError

BACKENDS = ("process", "ray")


@dataclass
class Backend:
    """How to spread work. `devices`: one worker each (None: serial for `process`; for `ray`, one actor per
    GPU of the cluster with a cuda `device`, else one per `threads` CPUs)."""

    name: str = "process"
    devices: list[str] | None = None
    address: str | None = None  # ray: None (a local cluster), "auto" or HOST:PORT

    def check(self) -> None:
        if self.name not in BACKENDS:
            raise LoramergeError(f"--backend must be one of {', '.join(BACKENDS)} (got {self.name!r})")
        if self.address is not None and self.name != "ray":
            raise LoramergeError("--ray-address needs --backend ray")


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

