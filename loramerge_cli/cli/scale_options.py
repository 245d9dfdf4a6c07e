"""The options that spread a command's work over workers (search-mask, eval, merge --lambda auto), and
how they resolve to a backend (search/backends.py). Nothing here imports torch or Ray."""

from __future__ import annotations

import os

from loramerge_cli.cli.options import choice, option
from loramerge_cli.errors import LoramergeError, UsageError


def scale_options() -> list:
    """--devices, --workers, --backend, --ray-address (the device itself is each command's --device)."""
    return [
        option("devices", str | None, None, help="Comma-separated devices, one worker each (cuda:0,cuda:1)."),
        option("workers", int | None, None, help="Workers on --device (processes, or Ray actors with --backend "
               "ray)."),
        option("backend", choice(("process", "ray")), "process", help="process: worker processes on this machine "
               "(serial without --workers/--devices); ray: one Ray actor per device, on this machine or a cluster "
               "(needs the ray extra; without --workers/--devices, one per GPU of the cluster with --device cuda, "
               "else one per --threads CPUs)."),
        option("ray_address", str | None, None, show_default=False, help="--backend ray: 'auto' (the cluster "
               "`ray start` runs on this machine) or HOST:PORT. [default: a local Ray cluster for this run]"),
    ]


def resolve_backend(device: str, devices: str | None, workers: int | None, threads: int | None, backend: str,
                    ray_address: str | None):
    """(Backend, threads per worker): the devices of the workers, and the torch threads every process uses
    (CPUs / workers with --workers; one per Ray CPU actor when the cluster decides the count)."""
    from loramerge_cli.search.backends import Backend

    if devices and workers:
        raise UsageError("give --devices or --workers, not both")
    if ray_address is not None and backend != "ray":
        raise UsageError("--ray-address needs --backend ray")
    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise LoramergeError('--backend ray needs Ray: pip install "loramerge[ray]"')
    device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
    if devices is not None and not device_list:
        raise UsageError("--devices: give at least one device")
    if workers is not None:
        if workers < 1:
            raise UsageError("--workers must be >= 1")
        device_list = [device] * workers
        if threads is None:  # share the cores instead of oversubscribing them; every process uses the same count
            threads = max(1, (os.cpu_count() or 1) // workers)
    elif backend == "ray" and device_list is None and threads is None and not device.startswith("cuda"):
        threads = 1  # one actor per CPU of the cluster
    return Backend(backend, device_list, ray_address), threads
