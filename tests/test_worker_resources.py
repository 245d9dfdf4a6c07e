"""What workers take from the machine. One model per device: the driver's engine (which scored the experts and
the unpruned merge on the workers' first device) waits in host memory while the workers run (on the CPU
parking moves nothing; tests/test_cuda.py checks the device memory itself where a GPU is present). The CPUs
shared: every process of a spread run uses the same torch thread count, the machine's CPUs over the workers,
in the library as on the command line."""

from contextlib import contextmanager
from dataclasses import replace

import pytest

from eval_fixtures import build_text_setting
from loramerge_cli.evaluation.engine import EvalSettings, Evaluator
from loramerge_cli.merging.merge import MergeConfig
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
    """What happened, in order: the driver's engine parked / back, workers started / stopped."""
    happened = []
    parked = Evaluator.parked

    @contextmanager
    def recording_parked(self):
        happened.append("park")
        with parked(self):
            yield
        happened.append("back")

    def started(self, *args, **kwargs):
        happened.append("start")
        return start(self, *args, **kwargs)

    def stopped(self, *args, **kwargs):
        if "stop" not in happened[-1:]:
            happened.append("stop")
        return stop(self, *args, **kwargs)

    start, stop = ParallelFitness.__init__, ParallelFitness.close
    monkeypatch.setattr(Evaluator, "parked", recording_parked)
    monkeypatch.setattr(ParallelFitness, "__init__", started)
    monkeypatch.setattr(ParallelFitness, "close", stopped)
    return happened


def test_the_driver_parks_its_engine_for_as_long_as_workers_run(setting, events):
    serial, _ = run_search(request(setting, lambda_auto=True))
    assert events == []  # nothing spread, nothing parked
    spread, _ = run_search(request(setting, lambda_auto=True, devices=["cpu", "cpu"]))
    assert events == ["park", "start", "stop", "back"] * 2  # the λ grid's workers, then the search's
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
    from factories import invoke_cli

    merged = tmp_path / "merged"
    common = ["--adapters", *setting.adapter_args(), "--threads", "1", "--batch-size", "8"]
    tuned = invoke_cli(["merge", *common, "--merger", "ta", "--lambda", "auto", "--tasks", str(setting.tasks_file),
                        "--workers", "2", "--out", str(merged)])
    assert tuned.exit_code == 0, tuned.stderr
    assert events == ["park", "start", "stop", "back"]
    scored = invoke_cli(["eval", *common, "--tasks", str(setting.tasks_file), "--merged", f"one={merged}",
                         f"two={merged}", "--workers", "2", "--json"])
    assert scored.exit_code == 0, scored.stderr
    assert events == ["park", "start", "stop", "back"] * 2


def test_workers_share_the_cpus_in_the_library_as_on_the_command_line(setting, monkeypatch):
    """Before, only --workers N shared them: --devices cpu,cpu and every library call let each worker take
    min(8, CPUs) threads (four workers on 8 CPUs: 32 threads)."""
    import os

    from loramerge_cli import api
    from loramerge_cli.cli.options import resolve_backend
    from loramerge_cli.plan import TaskData
    from loramerge_cli.search.backends import Backend
    from loramerge_cli.search.plan import plan_search

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    settings = EvalSettings(batch_size=8)
    assert plan_search(request(setting, eval=settings, devices=["cpu"] * 4)).request.eval.threads == 2
    assert plan_search(request(setting, eval=settings)).request.eval.threads is None  # serial: the engine's own
    given = request(setting, eval=replace(settings, threads=3), devices=["cpu"] * 4)
    assert plan_search(given).request.eval.threads == 3
    assert plan_search(request(setting, eval=settings, backend="ray")).request.eval.threads == 1  # one per Ray CPU
    assert TaskData(setting.tasks_file, backend=Backend("process", ["cpu"] * 2)).threads == 4
    evaluation = api.plan_eval(setting.tasks_file, setting.adapter_args(), settings=settings,
                               backend=Backend("process", ["cpu"] * 2))
    assert evaluation.settings.threads == 4
    assert resolve_backend("cpu", "cpu,cpu", None, None, "process", None)[1] == 4  # --devices, as --workers 2
    assert resolve_backend("cpu", None, 2, None, "process", None)[1] == 4
    assert resolve_backend("cpu", None, None, None, "process", None)[1] is None
