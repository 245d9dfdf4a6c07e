"""Findings of the twelfth round of reviews (code health, search scaling, device paths): each test fails on
the code before its fix."""

from __future__ import annotations

import pytest
from eval_fixtures import build_text_setting
from test_hostile_review7 import _request

from loramerge_cli.errors import UsageError
from loramerge_cli.merging.config import MergeConfig
from loramerge_cli.search.plan import plan_search


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("review12"))


@pytest.mark.parametrize("merge, message", [
    (MergeConfig(merger="ties", density=1.5), "--density must be <= 1"),
    (MergeConfig(merger="ta", params={"gamma": 0.1}), "--gamma does not apply to method ta"),
    (MergeConfig(merger="della", density=0.1, params={"epsilon": 0.9}), "DELLA's keep probabilities"),
    (MergeConfig(merger="ta", weights=[1.0] * 7), "--weights has 7 values for"),
    (MergeConfig(merger="ta", lam=float("nan")), "--lambda must be a finite number"),
    (MergeConfig(merger="lora_lego", space="core"), "works in the full space only"),
])
def test_plan_search_refuses_merger_settings_before_the_adapters_load(setting, merge, message):
    """`api.plan_search` planned each of these, and the search refused them only once it had loaded the
    adapters (the command line's flags were checked there too)."""
    with pytest.raises(UsageError, match=message):
        plan_search(_request(setting, merge=merge))


def test_each_resumable_strategy_names_its_state_file_once_in_the_registry():
    """The run directory's guards (a run dir holding a search, an --out over a state file) and --resume's
    check of a saved state come from the strategies' registry entries; rundir.py and plan.py listed the four
    files and branched on each strategy by hand."""
    from loramerge_cli.search import enmp, nsc_settings, rundir, screened, strategies, surrogate

    states = {"enmp": enmp, "screened": screened, "surrogate": surrogate, "nsc": nsc_settings}
    for name, strategy in strategies.STRATEGIES.items():
        assert (strategy.state_file is not None) == strategy.resumable == (strategy.check_state is not None), name
        if strategy.resumable:
            assert strategy.state_file == states[name].STATE_NAME, name  # the module writes what the guards read
            assert strategy.state_file in rundir.STRATEGY_STATES


def test_a_new_strategys_state_is_guarded_and_checked_without_other_edits(setting, tmp_path, monkeypatch):
    """A strategy registered with a state file: a run dir holding it is refused without --resume, and with
    --resume its `check_state` runs before any model loads."""
    from dataclasses import replace as replaced

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.search import rundir, strategies

    seen = []

    def check_state(request, path, space):
        seen.append(path.name)
        raise LoramergeError(f"{path}: not mine")

    toy = replaced(strategies.STRATEGIES["enmp"], name="toy", state_file="toy_state.json", check_state=check_state)
    monkeypatch.setitem(strategies.STRATEGIES, "toy", toy)
    # rundir lists the registry's state files at import: a strategy registered in strategies.py is among them
    monkeypatch.setattr(rundir, "STRATEGY_STATES", (*rundir.STRATEGY_STATES, "toy_state.json"))
    monkeypatch.setattr(rundir, "STATE_NAMES", (*rundir.STATE_NAMES, "toy_state.json"))
    run_dir = tmp_path / "run"
    request = _request(setting, strategy="toy", run_dir=run_dir)
    plan_search(request)
    from loramerge_cli.search.plan import prepare_run_dir

    prepare_run_dir(request)  # the configuration, as the runner writes it
    (run_dir / "toy_state.json").write_text("{}")
    with pytest.raises(LoramergeError, match="already holds a search"):
        plan_search(request)
    with pytest.raises(LoramergeError, match="not mine"):
        plan_search(_request(setting, strategy="toy", run_dir=run_dir, resume=True))
    assert seen == ["toy_state.json"]


def test_nsc_refuses_adapters_of_another_kind_than_the_tasks(setting, tmp_path):
    """The label-free search built its engine without the model-kind check that every other evaluation runs
    (`checked_evaluator` is now the one place): a causal-LM adapter scored as a classifier went on."""
    import json

    from test_hostile_inputs import _copied_setting, search_request

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.search.nsc import build_nsc_problem

    copied = _copied_setting(setting, tmp_path)
    name = next(iter(copied.adapters))
    config_file = copied.adapters[name] / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "task_type": "CAUSAL_LM"}))
    with pytest.raises(LoramergeError, match="trained for CAUSAL_LM"):
        build_nsc_problem(search_request(copied, strategy="nsc"))


def test_a_cuda_index_beyond_the_machines_devices_is_one_line(monkeypatch):
    """`--device cuda:3` on a one-GPU machine loaded the weights, then ended with an internal error (CUDA's
    'invalid device ordinal'); it is refused where the device is read, before the model loads."""
    import torch

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.loading import torch_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert torch_device("cuda:0") == torch.device("cuda:0") and torch_device("cuda") == torch.device("cuda")
    with pytest.raises(LoramergeError, match=r"--device cuda:3: this machine has 1 CUDA device \(cuda:0\)$"):
        torch_device("cuda:3")


def test_a_base_model_that_does_not_fit_the_device_is_one_line(monkeypatch, tmp_path):
    """Out of memory while moving the base model to the device is one line naming it, not an internal error."""
    import torch

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation import loading

    class Model:
        def to(self, device):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    class Loader:
        @staticmethod
        def from_pretrained(base, **kwargs):
            return Model()

    import transformers

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Loader)
    task_type = type("T", (), {"model_class": "AutoModelForCausalLM", "classifier": False})()
    with pytest.raises(LoramergeError, match="base model in bfloat16 does not fit in cpu's memory"):
        loading.load_base(str(tmp_path), task_type, torch.device("cpu"), torch.bfloat16, None)


def test_report_test_loads_its_model_after_the_searchs_is_gone(setting, monkeypatch):
    """--report-test built a second engine (the base model again, on the device) while the search's own was
    still referenced: twice the device memory at the end of a long search. The search's model is collected
    first now, for the mask strategies and for NSC."""
    import weakref

    from loramerge_cli.search import nsc, problem, runner
    from loramerge_cli.search.nsc_settings import NscSettings

    models = []

    def tracking(build):
        def wrapper(request, *args, **kwargs):
            if request.eval.split == "test":
                assert models and all(model() is None for model in models), "the search's model is still alive"
            built = build(request, *args, **kwargs)
            models.append(weakref.ref(built.engine.model))
            return built
        return wrapper

    monkeypatch.setattr(runner, "build_problem", tracking(runner.build_problem))
    monkeypatch.setattr(problem, "build_problem", tracking(problem.build_problem))
    monkeypatch.setattr(nsc, "build_nsc_problem", tracking(nsc.build_nsc_problem))
    _, provenance = runner.run_search(_request(setting, strategy="random", budget=3, report_test=True))
    assert "test" in provenance and len(models) == 2
    models.clear()
    _, provenance = runner.run_search(_request(setting, strategy="nsc", nsc=NscSettings(steps=2), report_test=True))
    assert "test" in provenance and len(models) == 2


def test_resume_keeps_the_kind_of_device(setting, tmp_path):
    """A run started on the CPU resumed on a GPU mixed the saved scores with new ones that differ in their last
    digits (the CUDA tests allow one example): --resume refuses another kind of device (another GPU of the same
    kind, other threads or workers are fine), and a run dir saved before the kind was recorded resumes."""
    import json

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.settings import EvalSettings
    from loramerge_cli.search.plan import prepare_run_dir

    run_dir = tmp_path / "run"
    prepare_run_dir(_request(setting, run_dir=run_dir))
    (run_dir / "screened_state.json").write_text("{}")  # what resume would read next (not reached when refused)
    gpu = EvalSettings(threads=1, batch_size=8, device="cuda:1")
    with pytest.raises(LoramergeError, match="device_kind: 'cuda' now, 'cpu' saved"):
        prepare_run_dir(_request(setting, run_dir=run_dir, resume=True, eval=gpu), write=False)
    with pytest.raises(LoramergeError, match="device_kind: 'cpu\\+cuda' now"):
        prepare_run_dir(_request(setting, run_dir=run_dir, resume=True, devices=["cpu", "cuda:0"]), write=False)
    config = json.loads((run_dir / "config.json").read_text())
    del config["settings"]["device_kind"]
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoramergeError, match="not a readable screened search state"):  # past the settings
        prepare_run_dir(_request(setting, run_dir=run_dir, resume=True), write=False)
