"""The Ray backend (`--backend ray`): one actor per device, each building its worker once (base model,
adapters, data), and the driver handing out items (search candidates, merged adapters, λ values) one at a
time to whichever actor is free. Results are put back in item order, so a run equals a serial one.

An actor that dies (its process killed, its node lost) is dropped and its item handed to another; the
run fails only when no actor is left. A worker that raises fails the run (the same item would fail
again anywhere). Ray is imported only here: `pip install "loramerge[ray]"`.
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from collections import deque
from contextlib import contextmanager, nullcontext
from typing import Callable

from loramerge_cli import interrupts
from loramerge_cli.errors import LoramergeError, WorkerLost, first_line

LOGGER = logging.getLogger(__name__)
ACTOR_PREFIX = "loramerge-worker-"
# Passed on to the actors, which may run on other machines (a cluster) with other environments (no tokens: Ray
# stores these).
FORWARDED_ENVIRONMENT = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE")


def import_ray():
    """Ray, imported with its C++ failure-signal handler switched off for this process (unless the environment
    says otherwise): absl's handler takes SIGTERM from loramerge's while the driver connects, and ends the run
    with a crash dump instead of 143 and the resume line. Ray reads the switch when it is first imported; its
    worker processes, started later, keep their handlers."""
    try:
        with _environment(RAY_DISABLE_FAILURE_SIGNAL_HANDLER="1"):
            import ray
    except ImportError:
        raise LoramergeError('--backend ray needs Ray: pip install "loramerge[ray]"') from None
    return ray


def connect(address: str | None = None):
    """Ray, initialised once per process: `address` None starts a new local cluster on this machine (never one
    that RAY_ADDRESS or an earlier `ray start` names: Ray's own default would join those), "auto" joins the one
    `ray start` runs here (or RAY_ADDRESS's), HOST:PORT a remote one. Ray shuts it down when the process ends.
    loramerge's SIGINT and SIGTERM handlers stay in place (ray.init installs its own)."""
    ray = import_ray()
    if not ray.is_initialized():
        # Starting a local cluster runs shielded: interrupted inside ray.init, Ray has not yet recorded the
        # processes it started, so ray.shutdown (at exit) could not stop them; the raylet then dies with us
        # (SIGKILL) and its agents wait about a minute on the dead GCS before they exit. Ctrl-C takes effect
        # once ray.init returns.
        # ray.init also replaces the SIGTERM handler: in Python (its handler calls sys.exit(15), read back here
        # as the SIGTERM it is) and, as the driver connects, in C++ (switched off by import_ray); loramerge's
        # handlers are put back once it returns.
        with interrupts.shielded() if address is None else nullcontext(), interrupts.handlers_kept():
            try:
                ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
            except SystemExit as exit:  # Ray's SIGTERM handler, during ray.init
                if exit.code != signal.SIGTERM:
                    raise
                interrupts.record(signal.SIGTERM)
                raise KeyboardInterrupt from None
            except (ConnectionError, ValueError, RuntimeError) as error:
                where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
                raise LoramergeError(f"cannot connect to {where} ({_first_line(error)})") from None
        raylet_messages_logged()
        interrupts.check()
    return ray


def raylet_messages_logged() -> None:
    """The raylet's error messages (a worker died, a node ran out of memory) go to this module's log, not to
    stdout, where Ray's driver prints them whatever `log_to_driver` says: stdout holds a command's result (its
    --json document), and loss of a worker is said by loramerge in one line. Other output Ray prints is left."""
    from ray._private import worker as ray_worker

    printing = getattr(ray_worker, "print_to_stdstream", None)
    if printing is None or getattr(printing, "raylet_logged", False):
        return

    def logged(data, ignore_prefix: bool):
        if data.get("pid") != "raylet":
            return printing(data, ignore_prefix)
        for line in data.get("lines", []):
            LOGGER.info("raylet: %s", line)

    logged.raylet_logged = True
    ray_worker.print_to_stdstream = logged


@contextmanager
def _environment(**defaults: str):
    """Environment variables set while the block runs, where the environment does not set them already."""
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def probe(address: str, timeout: float = 5.0) -> None:
    """Refuse, in seconds and before any model loads, a cluster address no Ray cluster answers at: "auto" with
    no cluster started on this machine, a HOST:PORT that accepts no connection, or one whose server does not
    speak gRPC, as Ray's GCS does (a web server, a proxy's error page; with RAY_USE_TLS the connection only):
    ray.init would retry for minutes, its log lines on stderr. A Ray client address (ray://HOST[:PORT], port
    10001 by default) needs Ray Client's package (grpcio, in `ray[client]`) and a server that speaks gRPC."""
    import importlib.util
    import socket

    import_ray()
    from ray._private.services import canonicalize_bootstrap_address

    client = address.startswith("ray://")
    if client and importlib.util.find_spec("grpc") is None:
        raise LoramergeError(f"cannot connect to the Ray cluster at {address}: a ray:// address needs Ray Client "
                             "(pip install 'ray[client]'); or give the cluster's GCS address, HOST:6379")
    try:
        if client:
            resolved = address.removeprefix("ray://")
            resolved = resolved if ":" in resolved else f"{resolved}:10001"
        else:
            with _ray_log_silenced("ray._private.services"):  # it logs a traceback before raising (":6379")
                resolved = canonicalize_bootstrap_address(address) or address
        host, _, port = resolved.rpartition(":")
        if not (port.isdigit() and 0 < int(port) < 65536):  # "local", "host:notaport", "host:99999"
            raise ValueError("no port in 1..65535 after the host: give auto, HOST:PORT or ray://HOST:PORT")
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout) as connection:
            # (a cluster with RAY_USE_TLS speaks TLS first: only the connection is checked)
            speaks = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true") or _speaks_http2(connection)
    except (ConnectionError, OSError, ValueError) as error:
        raise LoramergeError(f"cannot connect to the Ray cluster at {address} ({_first_line(error)})") from None
    if not speaks:
        server, port = ("Ray Client's server", "10001") if client else ("Ray's GCS", "6379")
        raise LoramergeError(f"cannot connect to the Ray cluster at {address} (the port accepts connections but does "
                             f"not answer as {server} does, with gRPC: is it {server}'s port, {port} by default?)")


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame


def _speaks_http2(connection) -> bool:
    """Whether the server at the other end answers an HTTP/2 (gRPC) client's preface with the server's own: a
    SETTINGS frame on stream 0 (RFC 9113, 3.4). A web server answers HTTP/1 ("HTTP/1.0 400") or hangs up."""
    connection.sendall(HTTP2_PREFACE)
    header = b""
    try:
        while len(header) < 9:
            chunk = connection.recv(9 - len(header))
            if not chunk:
                return False
            header += chunk
    except TimeoutError:  # (socket.timeout) it accepted and says nothing
        return False
    return header[3] == 4 and header[5:9] == bytes(4)


@contextmanager
def _ray_log_silenced(name: str):
    """Ray's logger `name` quiet while the block runs (its errors reach the user as loramerge's one line)."""
    logger = logging.getLogger(name)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def slots(device: str, threads: int | None, address: str | None = None) -> list[str]:
    """One device per actor when none is given: every GPU of the cluster for a cuda device, else one actor
    per `threads` CPUs."""
    ray = connect(address)
    resources = ray.cluster_resources()
    if device.startswith("cuda"):
        count = int(resources.get("GPU", 0))
        if count < 1:
            raise LoramergeError("--device cuda --backend ray: the Ray cluster has no GPU")
        return ["cuda"] * count
    return [device] * max(1, int(resources.get("CPU", 1)) // (threads or 1))


def check_capacity(ray, devices: list[str], threads: int | None) -> None:
    """The cluster can place every actor (one that cannot be placed would wait for ever)."""
    resources = ray.cluster_resources()
    for kind in ("GPU", "CPU"):
        needed = sum(actor_resources(device, threads)[f"num_{kind.lower()}s"] for device in devices)
        available = int(resources.get(kind, 0))
        if needed > available:
            raise LoramergeError(f"--backend ray: the workers need {needed} {kind}s, the Ray cluster has {available}")


def actor_resources(device: str, threads: int | None) -> dict:
    """What one actor reserves: a whole GPU (and one CPU), or `threads` CPUs."""
    if device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": threads or 1}


class Worker:
    """A Ray actor: builds `build(device)` once, then maps items through it one at a time."""

    def __init__(self, build, device: str, cwd: str):
        if os.path.isdir(cwd):  # relative paths of the request mean what they mean on the driver
            os.chdir(cwd)
        self.error = None
        try:
            # Ray hands a GPU actor its GPU as the only visible one: "cuda" (cuda:0) is that GPU.
            self.work = build("cuda" if device.startswith("cuda") else device)
        except Exception as error:  # noqa: BLE001 - reported to the driver as one line
            self.error = f"worker on {device} failed to start: {_first_line(error)}"

    def ready(self) -> str | None:
        return self.error

    def run(self, item):
        return self.work([item])[0]

    def pid(self) -> int:
        return os.getpid()


class RayPool:
    """Callable like a fitness: `pool(items)` is `[build(device)([item])[0] for item in items]`, computed by
    one actor per entry of `devices`."""

    def __init__(self, build, devices: list[str], address: str | None = None, threads: int | None = None,
                 start_timeout: float = 600.0, timeout: float = 3600.0):
        ray = self.ray = connect(address)
        self.timeout = timeout
        check_capacity(ray, devices, threads)
        environment = {name: os.environ[name] for name in FORWARDED_ENVIRONMENT if name in os.environ}
        remote = ray.remote(Worker)
        run = uuid.uuid4().hex[:8]
        self.devices = {}
        for index, device in enumerate(devices):  # named, so that `ray list actors` says whose they are
            actor = remote.options(name=f"{ACTOR_PREFIX}{run}-{index}", max_restarts=0, max_task_retries=0,
                                   runtime_env={"env_vars": environment},
                                   **actor_resources(device, threads)).remote(build, device, os.getcwd())
            self.devices[actor] = device
        self.actors = list(self.devices)
        try:
            errors = ray.get([actor.ready.remote() for actor in self.actors], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise LoramergeError(f"the Ray workers did not start within {start_timeout:g} s (is the cluster "
                                 f"short of CPUs or GPUs?)") from None
        except ray.exceptions.RayError as error:
            self.close()
            raise LoramergeError(f"a Ray worker failed to start ({_first_line(error)})") from None
        failed = [error for error in errors if error]
        if failed:
            self.close()
            raise LoramergeError(failed[0])

    def __call__(self, items: list, on_result: Callable[[int, object], None] | None = None) -> list:
        """Each item's result, in order; `on_result(index, result)` as each arrives (progress)."""
        ray = self.ray
        pending = deque(enumerate(items))
        idle = list(self.actors)
        running: dict = {}  # object ref -> (actor, index, item)
        results: dict = {}
        while pending or running:
            while pending and idle:
                actor = idle.pop(0)
                index, item = pending.popleft()
                running[actor.run.remote(item)] = (actor, index, item)
            done, _ = ray.wait(list(running), num_returns=1, timeout=self.timeout)
            if not done:
                self.close()
                raise LoramergeError("a Ray worker stopped answering")
            for ref in done:
                actor, index, item = running.pop(ref)
                try:
                    results[index] = ray.get(ref)
                    idle.append(actor)
                    if on_result is not None:
                        on_result(index, results[index])
                except ray.exceptions.RayActorError as error:  # the actor is gone: another takes its item
                    self._drop(actor, error)
                    pending.appendleft((index, item))
                except ray.exceptions.RayTaskError as error:
                    self.close()
                    raise LoramergeError(f"worker on {self.devices[actor]}: "
                                         f"{_first_line(getattr(error, 'cause', None) or error)}") from None
        return [results[index] for index in range(len(items))]

    def _drop(self, actor, error) -> None:
        self.actors.remove(actor)
        self.ray.kill(actor)
        if not self.actors:
            raise WorkerLost(f"every Ray worker died (the last: {_first_line(error)})")
        LOGGER.warning("a Ray worker on %s died (%s); the %d left take its candidates", self.devices[actor],
                       _first_line(error), len(self.actors))

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.close()

    def close(self) -> None:
        """Kill the actors (at once: the driver holds every state, an actor holds none worth waiting for)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def _first_line(error) -> str:
    """Ray's first line, in loramerge's words (Ray names its own CLI's `--address`, here `--ray-address`)."""
    return first_line(error).replace("'--address'", "--ray-address").replace("--address", "--ray-address")
