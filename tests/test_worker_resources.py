"""What workers take from the machine. One model per device: the driver's engine (which scored the experts and
the unpruned merge on the workers' first device) waits in host memory while the workers run (on the CPU
parking moves nothing; tests/test_cuda.py checks the device memory itself where a GPU is present). The CPUs
shared: every process of a spread run uses the same torch thread count, the machine's CPUs over the workers,
in the library as on the command line."""

from dataclasses import replace

import pytest
import torch

from eval_fixtures import build_text_setting
from factories import invoke_cli
from loramerge_cli.evaluation.engine import EvalSettings, Evaluator
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.backends import Backend, LazyPool
from loramerge_cli.search.enmp import EnmpSettings
from loramerge_cli.search.parallel import ParallelFitness
from loramerge_cli.search.runner import SearchRequest, run_search

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("driver"))


def request(setting, **changes) -> SearchRequest:
    base = SearchRequest(strategy="surrogate", adapters=setting.adapter_args(), merge=MergeConfig(merger="ta"),
                         tasks=setting.tasks_file, eval=EvalSettings(threads=1, batch_size=8),
                         enmp=EnmpSettings(max_prune=0.5, seed=3), budget=8)
    return replace(base, **changes)


@pytest.fixture
def events(monkeypatch):
    """What happened, in order: the driver's engine parked / back on its device, workers started / stopped."""
    happened = []
    park, ready = Evaluator.park, Evaluator._ready

    def parking(self):
        happened.append("park")
        self._placement["test_parked"] = True  # (on the CPU nothing moves)
        park(self)

    def readying(self):
        if self._placement.pop("test_parked", False):  # the first use after parking
            happened.append("back")
        ready(self)

    def started(self, *args, **kwargs):
        happened.append("start")
        return start(self, *args, **kwargs)

    def stopped(self, *args, **kwargs):
        if "stop" not in happened[-1:]:
            happened.append("stop")
        return stop(self, *args, **kwargs)

    start, stop = ParallelFitness.__init__, ParallelFitness.close
    monkeypatch.setattr(Evaluator, "park", parking)
    monkeypatch.setattr(Evaluator, "_ready", readying)
    monkeypatch.setattr(ParallelFitness, "__init__", started)
    monkeypatch.setattr(ParallelFitness, "close", stopped)
    return happened


def test_the_driver_parks_its_engine_for_as_long_as_workers_run(setting, events):
    serial, _ = run_search(request(setting, lambda_auto=True))
    assert events == []  # nothing spread, nothing parked
    spread, _ = run_search(request(setting, lambda_auto=True, devices=["cpu", "cpu"]))
    # the λ grid's workers; the driver scores the unpruned merge at the chosen λ; the search's workers
    assert events == ["park", "start", "stop", "back", "park", "start", "stop"]
    assert spread.weights == serial.weights and spread.merger == serial.merger


def test_a_forgotten_replay_records_the_reference_again_and_scores_the_same(setting):
    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.evaluation.specs import load_task_file
    from loramerge_cli.masks import ones_table
    from loramerge_cli.merging.merge import resolve_config
    from loramerge_cli.search.fitness import AccuracyFitness

    adapters = load_adapters(setting.adapter_args())
    engine = Evaluator(load_task_file(setting.tasks_file), adapters, EvalSettings(threads=1, batch_size=8))
    fitness = AccuracyFitness(adapters, resolve_config(MergeConfig(merger="ties"), len(adapters)),
                              ones_table(adapters), engine, expert_scores(engine, ScoreCache()))
    candidates = [((1,), None), ((4,), None)]
    before = fitness(candidates)
    assert fitness.replay in engine.device_caches and fitness.replay.outputs
    fitness.replay.forget()
    assert not fitness.replay.recorded and not fitness.replay.outputs
    assert fitness(candidates) == before and fitness.replay.recorded and fitness.replay.enabled


def test_eval_and_merge_lambda_auto_park_the_driver_while_their_workers_run(setting, tmp_path, events):
    merged = tmp_path / "merged"
    common = ["--adapters", *setting.adapter_args(), "--threads", "1", "--batch-size", "8"]
    tuned = invoke_cli(["merge", *common, "--merger", "ta", "--lambda", "auto", "--tasks", str(setting.tasks_file),
                        "--workers", "2", "--out", str(merged)])
    assert tuned.exit_code == 0, tuned.stderr
    assert events == ["park", "start", "stop"]
    scored = invoke_cli(["eval", *common, "--tasks", str(setting.tasks_file), "--merged", f"one={merged}",
                         f"two={merged}", "--workers", "2", "--json"])
    assert scored.exit_code == 0, scored.stderr
    assert events == ["park", "start", "stop"] * 2


def test_workers_share_the_cpus_in_the_library_as_on_the_command_line(setting, monkeypatch):
    """Before, only --workers N shared them: --devices cpu,cpu and every library call let each worker take
    min(8, CPUs) threads (four workers on 8 CPUs: 32 threads)."""
    import os

    from loramerge_cli import api
    from loramerge_cli.cli.options import resolve_backend
    from loramerge_cli.plan import TaskData
    from loramerge_cli.search.plan import plan_search

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    settings = EvalSettings(batch_size=8)
    assert plan_search(request(setting, eval=settings, devices=["cpu"] * 4)).request.eval.threads == 2
    assert plan_search(request(setting, eval=settings)).request.eval.threads is None  # serial: the engine's own
    given = request(setting, eval=replace(settings, threads=3), devices=["cpu"] * 4)
    assert plan_search(given).request.eval.threads == 3
    assert plan_search(request(setting, eval=settings, backend="ray")).request.eval.threads == 1  # one per Ray CPU
    assert TaskData(setting.tasks_file, backend=Backend("process", ["cpu"] * 2)).threads == 4
    adapters = setting.adapter_args()
    spread_eval = [api.plan_eval(setting.tasks_file, adapters, merged, settings=settings,
                                 backend=Backend("process", ["cpu"] * 2)) for merged in (adapters[:2], adapters[:1])]
    assert [plan.settings.threads for plan in spread_eval] == [4, None]  # one merge: scored here, no workers
    assert resolve_backend("cpu", "cpu,cpu", None, None, "process", None)[1] == 4  # --devices, as --workers 2
    assert resolve_backend("cpu", None, 2, None, "process", None)[1] == 4
    assert resolve_backend("cpu", None, None, None, "process", None)[1] is None


class RecordingEngine:
    """Evaluator's parking on a device other than the CPU ("meta" here), recording each move."""

    park, _ready = Evaluator.park, Evaluator._ready

    def __init__(self, out_of_memory: int = 0):
        self.device, self.device_caches, self._placement, self.moves = torch.device("meta"), [], {"parked": False}, []
        self.out_of_memory = out_of_memory  # moves back that fail first (workers still giving memory back)

    def _place(self, device):
        if device.type == "meta" and self.out_of_memory:
            self.out_of_memory -= 1
            raise torch.cuda.OutOfMemoryError("the last worker has not ended yet")
        self.moves.append(device.type)


class FakeWorkers:
    def __call__(self, items, on_result=None):  # (as ParallelFitness and RayPool)
        return list(items)

    def __exit__(self, *exc):
        pass


def lazy_pool() -> LazyPool:
    pool = LazyPool(None, Backend("process", ["cpu", "cpu"]), "cpu", 1)
    pool.open_workers = lambda base: FakeWorkers()  # (base: the one the resident engines read)
    return pool


def test_a_parked_engine_comes_back_at_its_next_use_and_never_on_the_way_out(monkeypatch):
    """Ctrl-C while workers run (or start) exits 130 without copying a model back to its device; a finished
    pool leaves the engine on the host until it scores again; a move back out of memory waits for the workers
    that shared the device to give it back (Ray ends its actors without waiting)."""
    engine = RecordingEngine()
    with pytest.raises(KeyboardInterrupt), lazy_pool() as pool:
        pool.reside(engine)
        assert engine.moves == [] and pool([1, 2]) == [1, 2] and engine.moves == ["cpu"]
        raise KeyboardInterrupt
    assert engine.moves == ["cpu"]
    starting = RecordingEngine()
    with pytest.raises(KeyboardInterrupt), lazy_pool() as pool:
        pool.open_workers = lambda base: (_ for _ in ()).throw(KeyboardInterrupt)
        pool.reside(starting)
        pool([1])
    assert starting.moves == ["cpu"]
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    finished = RecordingEngine(out_of_memory=2)
    with lazy_pool() as pool:
        pool.reside(finished)
        pool.start()
    assert finished.moves == ["cpu"]
    finished._ready()
    finished._ready()  # once back, nothing moves
    assert finished.moves == ["cpu", "meta"] and not finished._placement["parked"]


def test_ray_actors_of_a_named_cluster_reserve_no_share_of_this_machines_cpus(monkeypatch):
    """A 64-CPU driver gave each actor of a remote cluster 32 threads (and made it reserve 32 CPUs there)."""
    import os

    from loramerge_cli.cli.options import resolve_backend
    from loramerge_cli.search.ray_backend import actor_resources

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    remote = Backend("ray", ["cpu", "cpu"], "10.0.0.5:6379")  # --devices cpu,cpu or --workers 2
    assert remote.threads_each("cpu", None) is None and actor_resources("cpu", None)["num_cpus"] == 1
    assert remote.threads_each("cpu", 4) == 4  # as given
    assert resolve_backend("cpu", "cpu,cpu", None, None, "ray", None)[1] == 32  # a local cluster: this machine
    assert Backend("ray", None, "auto").threads_each("cpu", None) == 1  # one actor per CPU of the cluster
    assert Backend("ray", None, "auto").threads_each("cuda", None) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_ray_gpu_run_from_a_machine_without_cuda_is_one_line_before_any_work(setting, tmp_path, monkeypatch):
    """The driver scores on the workers' kind of device: from a CPU-only head node it failed after loading the
    adapters and data, saying only that CUDA is not available."""
    monkeypatch.setattr("loramerge_cli.search.runner.build_problem", lambda *a, **k: pytest.fail("a model was built"))
    common = ["--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--device", "cuda",
              "--backend", "ray", "--threads", "1"]
    for command in (["search-mask", *common, "--out", str(tmp_path / "mask.json")],
                    ["eval", *common, "--merged", *setting.adapter_args()[:2]],
                    ["merge", *common, "--lambda", "auto", "--out", str(tmp_path / "merged")]):
        result = invoke_cli(command)
        assert result.exit_code == 1 and "this machine has no CUDA GPU" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mask.json").exists() and not (tmp_path / "merged").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line_before_any_work(setting, tmp_path, monkeypatch):
    """--devices cpu,cuda:0 (or --device cuda:1) without CUDA: a worker failed to start only after the driver had
    loaded the adapters, the data and its model and scored the experts; serial runs failed at the model load."""
    monkeypatch.setattr("loramerge_cli.search.runner.build_problem", lambda *a, **k: pytest.fail("a model was built"))
    common = ["--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--threads", "1"]
    for where in (["--devices", "cpu,cuda:0"], ["--device", "cuda:1"]):
        for command in (["search-mask", *common, *where, "--out", str(tmp_path / "mask.json")],
                        ["eval", *common, *where, "--merged", *setting.adapter_args()[:2]],
                        ["merge", *common, *where, "--lambda", "auto", "--out", str(tmp_path / "merged")]):
            result = invoke_cli(command)
            assert result.exit_code == 1 and "CUDA is not available" in result.stderr, (command, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1
