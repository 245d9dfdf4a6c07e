"""Findings of the twelfth round of reviews (code health, search scaling, device paths): each fix's test fails
on the code before it; the speed-ups that must not change results have equivalence tests instead."""

from __future__ import annotations

import itertools

import numpy as np
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
            assert strategy.state_file in rundir.strategy_states()


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
    monkeypatch.setitem(strategies.STRATEGIES, "toy", toy)  # registered as any strategy is: nothing else patched
    assert tmp_path / "run" / "toy_state.json" in rundir.run_dir_files(tmp_path / "run")  # never an --out
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
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

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


# --- the search's bookkeeping at a real model's size (a review ran it at 224 blocks × 8 tasks) ------------------

def _kernel_by_pairs(tables, task_count, settings):
    """K + σ²I entry by entry from its definition: a² per shared entry, b² per shared pair of two units, r²b² per
    shared pair within one unit (two tasks of one block), σ² on the diagonal."""
    n = len(tables)
    kernel = np.zeros((n, n))
    for a in range(n):
        for b in range(n):
            shared = sorted(set(tables[a]) & set(tables[b]))
            within = sum(1 for i, j in itertools.combinations(shared, 2) if i // task_count == j // task_count)
            across = len(shared) * (len(shared) - 1) // 2 - within
            kernel[a, b] = (settings.prior_single ** 2 * len(shared) + settings.prior_pair ** 2 * across
                            + (settings.same_unit_ratio * settings.prior_pair) ** 2 * within
                            + (settings.noise ** 2 if a == b else 0.0))
    return kernel


def test_the_kernel_grown_as_tables_are_scored_equals_its_definition():
    """The surrogate rebuilt its n × n kernel every step through an n × n × U array (out of memory at the first
    proposal on 224 × 8: 5.4 GB for one temporary); it now adds the new tables' rows. Grown in uneven steps, it
    equals the definition, and the same kernel built at once, to the bit."""
    from loramerge_cli.search.surrogate import ScoredTables, SurrogateSettings

    settings = SurrogateSettings(prior_single=1.3, prior_pair=0.7, same_unit_ratio=2.5, noise=0.4)
    generator = np.random.default_rng(0)
    size, task_count = 24, 3
    tables = [(), *[tuple(sorted(generator.choice(size, int(generator.integers(1, 7)), replace=False).tolist()))
                    for _ in range(70)]]
    grown = ScoredTables(size, task_count, settings)
    for start, stop in ((0, 1), (1, 2), (2, 19), (19, 20), (20, 71)):
        grown.add(tables[start:stop])
    at_once = ScoredTables(size, task_count, settings)
    at_once.add(tables)
    assert np.array_equal(grown.kernel, at_once.kernel)
    assert np.allclose(grown.kernel, _kernel_by_pairs(tables, task_count, settings), rtol=0, atol=1e-12)
    assert [tuple(np.flatnonzero(row).tolist()) for row in grown.tables] == tables


def _local_maximum_by_enumeration(model, start, k_max):
    """The hill-climb from its definition, by enumerating neighbours and evaluating the model on each: the best
    add (lowest index on ties), else a better remove, else a better swap (rows by the removed entry, then the
    added one), while one gains. Exact on integer-valued models, where every gain is an integer."""
    members = {int(i) for i in np.flatnonzero(start)}
    size = len(model.single)

    def value(entries):
        return model.value(np.isin(np.arange(size), sorted(entries)).astype(float))

    while True:
        here, best, move = value(members), 1e-12, None
        outside = [j for j in range(size) if j not in members]
        if len(members) < k_max and outside:
            gains = [value(members | {j}) - here for j in outside]
            if max(gains) > best:
                best, move = max(gains), members | {outside[gains.index(max(gains))]}
        if members:
            inside = sorted(members)
            gains = [value(members - {i}) - here for i in inside]
            if max(gains) > best:
                best, move = max(gains), members - {inside[gains.index(max(gains))]}
            swaps = [(value((members - {i}) | {j}) - here, i, j) for i in inside for j in outside]
            if swaps:
                top = max(gain for gain, _, _ in swaps)
                if top > best:
                    _, i, j = next(swap for swap in swaps if swap[0] == top)
                    best, move = top, (members - {i}) | {j}
        if move is None:
            return np.isin(np.arange(size), sorted(members)).astype(float)
        members = move


def test_the_hill_climb_without_gathering_climbs_the_same_way():
    """Swap gains from whole rows (the inside columns masked) instead of gathered ones: the climb still takes
    the moves its definition names, ties included (integer-valued models tie often)."""
    from loramerge_cli.search.surrogate import PairwiseModel, local_maximum

    generator = np.random.default_rng(1)
    for _ in range(150):
        size = int(generator.integers(2, 14))
        single = generator.integers(-3, 4, size).astype(float)
        pair = np.triu(generator.integers(-2, 3, (size, size)).astype(float), 1)
        model = PairwiseModel(single, pair + pair.T)
        k_max = int(generator.integers(1, size + 1))
        start = np.zeros(size)
        start[generator.choice(size, int(generator.integers(0, k_max + 1)), replace=False)] = 1.0
        assert np.array_equal(local_maximum(model, start, k_max), _local_maximum_by_enumeration(model, start, k_max))


def test_decoding_a_latent_sorts_as_before():
    """ENMP's decode by a stable argsort (5× faster at 1,792 entries): the k largest, ties to the lower index,
    −0.0 equal to 0.0, those above θ."""
    from loramerge_cli.search.decode import decode_mask

    generator = np.random.default_rng(2)
    for trial in range(2000):
        size = int(generator.integers(1, 40))
        z = generator.normal(size=size)
        if trial % 3 == 0:
            z = np.round(z, 1)
        if trial % 5 == 0:
            z[generator.integers(size)] = -0.0
        k = int(generator.integers(0, size + 1))
        threshold = float(generator.choice([0.0, -0.5, 0.3]))
        order = sorted(range(size), key=lambda i: (-float(z[i]), i))[:k]
        assert decode_mask(z, k, threshold) == tuple(sorted(i for i in order if float(z[i]) > threshold))


def test_eval_prints_a_warning_as_written(setting, monkeypatch):
    """`eval` printed its warnings through rich markup: a task name or path with brackets was eaten or made rich
    raise (MarkupError: an internal error after the whole evaluation). Every command prints them as written."""
    from factories import invoke_cli

    from loramerge_cli.evaluation import report as reports

    evaluate = reports.eval_report

    def with_warning(*args, **kwargs):
        report = evaluate(*args, **kwargs)
        report["warnings"].append("task [/]x[bold]: its expert scores 0")
        return report

    monkeypatch.setattr(reports, "eval_report", with_warning)
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file),
                         "--threads", "1", "--val-limit", "4"])
    assert result.exit_code == 0, result.stderr
    assert "warning: task [/]x[bold]: its expert scores 0" in result.stderr


def test_eval_checks_the_spec_base_and_the_model_kind(setting, tmp_path):
    """`eval` built its engine without the checks every other evaluation runs: a causal-LM adapter was scored
    as a classifier, and a spec naming another base scored the experts on it, both without a word."""
    import json
    import shutil

    import yaml
    from factories import invoke_cli
    from test_hostile_inputs import _copied_setting

    copied = _copied_setting(setting, tmp_path / "kind")
    name = next(iter(copied.adapters))
    config_file = copied.adapters[name] / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "task_type": "CAUSAL_LM"}))
    result = invoke_cli(["eval", "--adapters", *copied.adapter_args(), "--tasks", str(copied.tasks_file),
                         "--threads", "1", "--val-limit", "4"])
    assert result.exit_code == 1 and "trained for CAUSAL_LM" in result.stderr, result.stderr

    other = shutil.copytree(setting.base, tmp_path / "other_base")
    spec = yaml.safe_load(setting.tasks_file.read_text())
    spec["base_model"] = str(other)
    tasks = tmp_path / "other.yaml"
    tasks.write_text(yaml.safe_dump(spec))
    arguments = ["eval", "--adapters", *setting.adapter_args(), "--tasks", str(tasks), "--threads", "1",
                 "--val-limit", "4"]
    result = invoke_cli(arguments)
    assert result.exit_code == 1 and "differs from the base" in result.stderr, result.stderr
    assert invoke_cli([*arguments, "--allow-base-mismatch"]).exit_code == 0


def test_eval_says_a_validation_limit_does_not_cap_another_split(setting, tmp_path):
    """`eval --split test --val-limit 8` scored all the test examples without a word (a newcomer's trial). From a
    --config file (which may set --val-limit for every command) it is allowed, with a warning; on the command
    line it is refused, as flags that would do nothing are."""
    from factories import invoke_cli

    arguments = ["eval", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--split", "test",
                 "--threads", "1"]
    (tmp_path / "recipe.yaml").write_text("val_limit: 8\n")
    result = invoke_cli([*arguments, "--config", tmp_path / "recipe.yaml"])
    assert result.exit_code == 0, result.stderr
    assert "warning: --val-limit limits the validation split only: the test split was scored in full" in result.stderr
    assert invoke_cli([*arguments, "--val-limit", "8"]).exit_code == 2


def test_a_mistyped_relative_path_says_no_local_folder_either(tmp_path, monkeypatch):
    """`loramerge inspect adaptors/rte` (a typo of adapters/rte) said only that the Hub id was not in the cache
    and the Hub could not be reached: a newcomer looked for a network problem."""
    from factories import invoke_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    result = invoke_cli(["inspect", "adaptors/rte"])
    assert result.exit_code == 1
    assert "adaptors/rte: no such local file or folder, and as a Hub id:" in result.stderr, result.stderr
