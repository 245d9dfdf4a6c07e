"""Backends (search/backends.py): searches, `eval` and `--lambda auto` on worker processes and on a real local
Ray cluster (2 CPUs, loopback only) give the serial results; a killed actor's candidates go to the others; a
search whose driver is killed with SIGKILL resumes to the undisturbed table."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Before Ray is imported: bind every Ray process to 127.0.0.1 (Ray reads this once) and send no usage stats.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

from eval_fixtures import build_text_setting  # noqa: E402
from factories import invoke_cli  # noqa: E402
from test_search_mask import request  # noqa: E402 - the same small search (ties, popsize 6, 4 generations)

from loramerge_cli.search.enmp import EnmpSettings  # noqa: E402
from loramerge_cli.search.runner import run_search  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("backends"))


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: 2 CPUs, no dashboard, loopback only; shut down afterwards."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    yield ray
    import psutil  # installed with peft

    started = [process for process in psutil.Process().children(recursive=True) if _is_ray(process)]
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not ray.is_initialized() and not alive, f"processes left behind: {[p.cmdline() for p in alive]}"


def _is_ray(process) -> bool:
    """A process of the Ray cluster (GCS, raylet, actors, agents), not e.g. multiprocessing's resource tracker."""
    try:
        name, command = process.name(), " ".join(process.cmdline())
    except Exception:  # noqa: BLE001 - gone already
        return False
    return name in ("raylet", "gcs_server") or name.startswith("ray::") or "/site-packages/ray/" in command


def trajectory(run_dir: Path) -> list[tuple]:
    """The fitness values a search recorded, generation by generation."""
    records = [json.loads(line) for line in (run_dir / "trajectory.jsonl").read_text().splitlines()]
    return [(r["best_fitness"], r["mean_fitness"], r["best_pruned"], r["distinct_evaluated"]) for r in records]


def ray_workers(ray) -> list:
    """Handles of loramerge's live actors on the cluster (one that dies between listing and lookup is gone)."""
    from loramerge_cli.search.ray_backend import ACTOR_PREFIX

    handles = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(ACTOR_PREFIX):
            try:
                handles.append(ray.get_actor(entry["name"], namespace=entry["namespace"]))
            except ValueError:  # died after the listing
                continue
    return handles


def test_ray_search_equals_serial(setting, cluster, tmp_path):
    """Same seed: the same table, λ and fitness values in trajectory.jsonl as a serial run (λ auto included)."""
    serial, serial_provenance = run_search(request(setting, lambda_auto=True, run_dir=tmp_path / "serial"))
    spread, provenance = run_search(request(setting, lambda_auto=True, run_dir=tmp_path / "ray", backend="ray",
                                            devices=["cpu", "cpu"]))
    assert spread.weights == serial.weights
    assert provenance["lambda_tuning"] == serial_provenance["lambda_tuning"]
    assert provenance["validation"] == serial_provenance["validation"]
    assert trajectory(tmp_path / "ray") == trajectory(tmp_path / "serial")
    assert not ray_workers(cluster)  # the actors are gone with the search


def test_ray_surrogate_search_equals_serial(setting, cluster, tmp_path):
    """The surrogate search proposing 3 tables per step, scored by two actors: the same tables as serial."""
    def surrogate(**changes):
        return request(setting, strategy="surrogate", options={"proposals": 3}, **changes)

    serial, _ = run_search(surrogate(run_dir=tmp_path / "serial"))
    spread, provenance = run_search(surrogate(run_dir=tmp_path / "ray", backend="ray", devices=["cpu", "cpu"]))
    assert spread.weights == serial.weights

    def steps(run_dir):
        return [(r["tables"], r["scores"], r["forward_examples"])
                for r in map(json.loads, (run_dir / "trajectory.jsonl").read_text().splitlines())]

    assert steps(tmp_path / "ray") == steps(tmp_path / "serial")
    assert [len(tables) for tables, _, _ in steps(tmp_path / "ray")] == [6, 3, 3]
    assert not ray_workers(cluster)


def test_a_killed_actor_is_replaced_by_the_others(setting, cluster, tmp_path, caplog):
    serial, _ = run_search(request(setting, run_dir=tmp_path / "serial"))
    killed = []

    def kill_one(kind, data):
        if kind in ("generation", "greedy") and data["generation"] == 1:  # a step (a greedy round too)
            actor = ray_workers(cluster)[0]
            killed.append(cluster.get(actor.pid.remote()))
            os.kill(killed[0], signal.SIGKILL)

    table, _ = run_search(request(setting, run_dir=tmp_path / "ray", backend="ray", devices=["cpu", "cpu"]),
                          on_event=kill_one)
    assert killed
    assert "a Ray worker on cpu died" in caplog.text
    assert table.weights == serial.weights
    assert trajectory(tmp_path / "ray") == trajectory(tmp_path / "serial")


DRIVER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from loramerge_cli.evaluation.engine import EvalSettings
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.enmp import EnmpSettings
from loramerge_cli.search.runner import SearchRequest, run_search

def die(kind, data):
    if kind in ("generation", "greedy") and data["generation"] == 2:  # a step (a greedy round too)
        os.kill(os.getpid(), signal.SIGKILL)

run_search(SearchRequest(strategy="screened",
                         adapters={adapters!r}, merge=MergeConfig(merger="ties"), tasks=Path({tasks!r}),
                         eval=EvalSettings(threads=1, batch_size=8),
                         enmp=EnmpSettings(popsize=6, generations=4, max_prune=0.5, seed=3),
                         options={{"min_examples": 8}},  # as test_search_mask.request
                         run_dir=Path({run_dir!r}), backend="ray", devices=["cpu"], ray_address={address!r}),
           on_event=die)
"""


def test_a_driver_killed_with_sigkill_resumes(setting, cluster, tmp_path):
    serial, _ = run_search(request(setting, run_dir=tmp_path / "serial"))
    script = DRIVER.format(tests=str(ROOT / "tests"), adapters=setting.adapter_args(), tasks=str(setting.tasks_file),
                           run_dir=str(tmp_path / "ray"), address=cluster.get_runtime_context().gcs_address)
    driver = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert driver.returncode == -signal.SIGKILL, driver.stderr[-2000:]
    assert 0 < len(trajectory(tmp_path / "ray")) < len(trajectory(tmp_path / "serial"))  # killed mid-search
    assert _eventually(lambda: not ray_workers(cluster))  # the killed driver's actors die with its job
    resumed, _ = run_search(request(setting, run_dir=tmp_path / "ray", resume=True, backend="ray",
                                    devices=["cpu", "cpu"]))
    assert resumed.weights == serial.weights
    assert trajectory(tmp_path / "ray") == trajectory(tmp_path / "serial")


def test_ctrl_c_on_ray_exits_130_and_the_search_resumes(setting, cluster, tmp_path):
    """Ctrl-C (SIGINT to the command's process group) during a Ray search: exit 130 with one line, the run
    directory keeps the finished generations, no actor outlives the command, and --resume ends with the
    serial table and trajectory."""
    def search_mask(run_dir: Path, *flags: str) -> list[str]:
        return [sys.executable, "-m", "loramerge_cli", "search-mask", "--strategy", "screened",
                                                       "--adapters", *setting.adapter_args(),
                "--tasks", str(setting.tasks_file), "--merger", "ties", "--popsize", "6", "--generations", "8",
                "--max-prune", "0.5", "--seed", "3", "--threads", "1", "--batch-size", "8", "--quiet",
                "--run-dir", str(run_dir), "--out", str(run_dir / "mask.json"), *flags]

    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    serial, _ = run_search(request(setting, run_dir=tmp_path / "serial", options={},  # the CLI's defaults
                                   enmp=EnmpSettings(popsize=6, generations=8, max_prune=0.5, seed=3)))
    run_dir = tmp_path / "ray"
    on_ray = search_mask(run_dir, "--backend", "ray", "--workers", "2", "--ray-address",
                         cluster.get_runtime_context().gcs_address)
    driver = subprocess.Popen(on_ray, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "trajectory.jsonl").is_file() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted"), stderr[-2000:]
    assert not (run_dir / "mask.json").exists()
    assert 1 <= len(trajectory(run_dir)) < 8
    assert _eventually(lambda: not ray_workers(cluster))  # the command's actors ended with it
    resumed = subprocess.run([*on_ray, "--resume"], cwd=ROOT, env=environment, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "mask.json").read_text())["weights"] == serial.weights
    assert trajectory(run_dir) == trajectory(tmp_path / "serial")


def test_ctrl_c_while_ray_starts_its_local_cluster_leaves_no_process(setting, tmp_path):
    """Ctrl-C while `--backend ray` (no --ray-address) is still inside ray.init: Ray had not yet recorded the
    processes it started, so ray.shutdown at exit stopped none; the raylet died with the driver (SIGKILL) and its
    dashboard and runtime-env agents waited about 60 s on the dead GCS. Now every process of the cluster ends
    within seconds of the command."""
    import psutil

    run_dir = tmp_path / "ray"
    command = [sys.executable, "-m", "loramerge_cli", "search-mask", "--strategy", "screened",
               "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger", "ties",
               "--popsize", "6", "--generations", "8", "--max-prune", "0.5", "--seed", "3", "--threads", "1",
               "--batch-size", "8", "--quiet", "--run-dir", str(run_dir), "--out", str(run_dir / "mask.json"),
               "--backend", "ray", "--workers", "2"]
    driver = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    started: list = []
    try:
        deadline = time.monotonic() + 120
        while driver.poll() is None and time.monotonic() < deadline:  # until the raylet has started an agent
            try:
                started = [p for p in psutil.Process(driver.pid).children(recursive=True) if _is_ray(p)]
            except psutil.Error:
                break
            if any(_is_agent(p) for p in started):
                break
            time.sleep(0.02)
        assert any(_is_agent(p) for p in started), "no Ray agent started"
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, stderr = driver.communicate(timeout=60)
        assert driver.returncode == 130, stderr[-2000:]
        started = [p for p in started if p.is_running()] + [p for p in _session(driver.pid) if p not in started]
        _, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, f"processes left behind: {[p.name() for p in alive]}"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        for process in _session(driver.pid):  # (before the fix: the agents, for a minute)
            process.kill()


def _is_agent(process) -> bool:
    try:
        command = " ".join(process.cmdline())
    except Exception:  # noqa: BLE001 - gone already
        return False
    return "dashboard/agent.py" in command or "runtime_env/agent/main.py" in command or "Agent" in command


def _session(session: int) -> list:
    """The live processes of a session (the command's, started with start_new_session)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):
            continue
    return found


def _eventually(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def merged_folders(setting, tmp_path) -> list[str]:
    folders = []
    for merger in ("ta", "ties"):
        result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", merger,
                             "--out", str(tmp_path / merger)])
        assert result.exit_code == 0, result.stderr
        folders.append(f"{merger}={tmp_path / merger}")
    return folders


def eval_json(setting, merged, *flags) -> dict:
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file),
                         "--merged", *merged, "--threads", "1", "--batch-size", "8", "--json", *flags])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def lambda_tuning(setting, out: Path, *flags, merger: str = "ta") -> dict:
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", merger, "--lambda", "auto",
                         "--tasks", str(setting.tasks_file), "--batch-size", "8", "--out", str(out), *flags])
    assert result.exit_code == 0, result.stderr
    return json.loads((out / "loramerge.json").read_text())["lambda_tuning"]


def test_eval_and_lambda_auto_on_worker_processes_equal_serial(setting, tmp_path):
    merged = merged_folders(setting, tmp_path)
    flags = ["--workers", "2"]
    assert eval_json(setting, merged, *flags) == eval_json(setting, merged)
    assert lambda_tuning(setting, tmp_path / "spread", *flags) == lambda_tuning(setting, tmp_path / "serial")
    # a data-reading method: the workers merge with the driver's input statistics
    regmean = [lambda_tuning(setting, tmp_path / f"regmean-{name}", "--val-limit", "8", *extra, merger="regmean")
               for name, extra in (("spread", flags), ("serial", []))]
    assert regmean[0] == regmean[1]


def test_eval_on_ray_actors_equals_serial(setting, cluster, tmp_path):
    """(--lambda auto on Ray: test_ray_search_equals_serial.)"""
    merged = merged_folders(setting, tmp_path)
    assert eval_json(setting, merged, "--backend", "ray", "--workers", "2") == eval_json(setting, merged)


def test_backend_flags_are_checked_before_any_work(setting, tmp_path):
    common = ["search-mask", "--strategy", "screened",
              "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file),
              "--out", str(tmp_path / "mask.json")]
    result = invoke_cli([*common, "--ray-address", "auto"])
    assert result.exit_code == 2 and "--ray-address needs --backend ray" in result.stderr
    result = invoke_cli([*common, "--backend", "dask"])
    assert result.exit_code == 2
    result = invoke_cli([*common, "--backend", "ray", "--strategy", "nsc", "--workers", "2"])
    assert result.exit_code == 2 and "--strategy nsc" in result.stderr
    assert not (tmp_path / "mask.json").exists()


def test_the_plans_refuse_a_bad_backend_before_any_model_loads(setting, monkeypatch):
    """The library API too: plan_search and LambdaTuning check the backend before anything is read."""
    import importlib.util

    from loramerge_cli.errors import LoramergeError, UsageError
    from loramerge_cli.plan import LambdaTuning
    from loramerge_cli.search.backends import Backend
    from loramerge_cli.search.plan import plan_search

    with pytest.raises(UsageError, match="--backend must be one of"):
        plan_search(request(setting, backend="dask"))
    with pytest.raises(UsageError, match="--ray-address needs --backend ray"):
        plan_search(request(setting, ray_address="auto"))
    with pytest.raises(UsageError, match="--strategy nsc trains on one device"):
        plan_search(request(setting, strategy="nsc", devices=["cpu", "cpu"]))
    with pytest.raises(UsageError, match="--ray-address needs --backend ray"):
        LambdaTuning(setting.tasks_file, backend=Backend("process", None, "auto"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "ray" else find_spec(name))
    with pytest.raises(LoramergeError, match="needs Ray"):
        plan_search(request(setting, backend="ray"))


@pytest.mark.parametrize("when", ["cluster starting", "searching"])
def test_a_ray_run_starts_its_own_cluster_and_ends_on_sigterm_with_143(setting, tmp_path, when):
    """With RAY_ADDRESS naming a dead cluster (or an earlier `ray start` on the machine), `--backend ray` without
    --ray-address joined it: retried for minutes after the model had loaded, deaf to Ctrl-C and SIGTERM. A
    SIGTERM during a Ray run ended it by Ray's handlers (exit 15 while ray.init ran, 134 and a C++ crash dump
    after), not with the resume line and 143. The run now starts a cluster of its own and keeps loramerge's
    handlers. (The signal comes a second after the reference is scored, as the cluster starts, or once a
    search step is written.)"""
    import psutil

    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "loramerge_cli", "search-mask", "--strategy", "enmp", "--adapters",
               *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger", "ties", "--popsize", "4",
               "--generations", "500", "--max-prune", "0.5", "--threads", "1", "--backend", "ray", "--workers", "2",
               "--run-dir", str(run_dir), "--out", str(tmp_path / "t.json")]
    environment = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as stderr:
        driver = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=stderr,
                                  start_new_session=True)
    try:
        ready = ((lambda: "unpruned merge:" in log.read_text()) if when == "cluster starting" else
                 (lambda: (run_dir / "trajectory.jsonl").is_file()))
        assert _eventually(lambda: ready() or driver.poll() is not None, 240) and driver.poll() is None, \
            log.read_text()[-2000:]
        time.sleep(1.0 if when == "cluster starting" else 0.0)
        family = [driver.pid, *(child.pid for child in psutil.Process(driver.pid).children(recursive=True))]
        os.killpg(driver.pid, signal.SIGTERM)  # as `timeout` or a cancelled CI job does
        code = driver.wait(120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    # The one exception the README (Scale) states: the group's SIGTERM also stops the cluster the driver is
    # registering with, and Ray's driver ends with 1 (it failed to register with the raylet, or after a minute
    # without the GCS); `--resume` works as after any interrupt.
    registering = when == "cluster starting" and code == 1 and any(
        line in text for line in ("Failed to register worker", "Failed to connect to GCS"))
    assert (code == 143 and last.startswith("terminated; resume with:")) or registering, (code, text[-2000:])
    assert not (tmp_path / "t.json").exists()
    assert _eventually(lambda: not [pid for pid in family if psutil.pid_exists(pid)
                                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE], 60)


def test_a_cluster_without_room_for_the_workers_is_refused_before_any_model_loads(setting, cluster, monkeypatch):
    """`--ray-address` of a 2-CPU cluster with 3 workers scored the experts and the unpruned merge first."""
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.search import problem as problem_module
    from loramerge_cli.search.plan import plan_search

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(problem_module, "build_problem", no_model)
    address = cluster.get_runtime_context().gcs_address
    with pytest.raises(LoramergeError, match=r"^--backend ray: the workers need 3 CPUs, the Ray cluster has 2$"):
        plan_search(request(setting, backend="ray", devices=["cpu"] * 3, ray_address=address))
    plan_search(request(setting, backend="ray", devices=["cpu"] * 2, ray_address=address))  # (room for two)
