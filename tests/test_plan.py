"""Plan, then execute (issue 12): the library and the CLI agree, bad requests are refused before any work,
registries are the one place to add a method or a strategy, and a search leaves the caller's random state alone."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch
import yaml
from factories import invoke_cli

from loramerge_cli import api
from loramerge_cli.errors import LoramergeError, UsageError
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.merging.registry import TIES_OPTIONS


@pytest.fixture()
def tasks_file(tmp_path):
    """A task spec for the adapters a, b, c with a validation split only (nothing here loads a model)."""
    rows = "".join(json.dumps({"text": "x", "label": 0}) + "\n" for _ in range(4))
    tasks = []
    for name in "abc":
        (tmp_path / f"{name}.jsonl").write_text(rows)
        tasks.append({"name": name, "data": {"validation": str(tmp_path / f"{name}.jsonl")}, "text": ["text"],
                      "label": "label", "num_labels": 3})
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(tmp_path / "no-model"), "model_type": "sequence-classification",
                                    "tasks": tasks}))
    return path


def _deltas(folder) -> dict:
    return {path: module.delta() for path, module in api.load_adapter(str(folder)).modules.items()}


def _recorded_table(adapters, tmp_path):
    """A mask that records the knots preset with TIES at density 0.6 and prunes two units."""
    table = api.from_pruned_indices(adapters, [0, 4])
    table.merger = {"merger": "knots", "method": "ties", "space": "knots", "density": 0.6, "scope": "module",
                    "knots_scaled": False, "lambda": 1.0}
    path = tmp_path / "mask.json"
    table.save(path)
    return path


# --- merge: the library is the CLI ------------------------------------------------------------------

def test_api_merge_with_a_table_equals_merge_mask(sources, tmp_path):
    adapters = api.load_adapters(sources)
    mask = _recorded_table(adapters, tmp_path)
    result = invoke_cli(["merge", "--adapters", *sources, "--mask", mask, "--out", tmp_path / "cli", "--quiet"])
    assert result.exit_code == 0, result.stderr
    merged = api.merge(adapters, MergeConfig(), api.load_table(mask))
    assert merged.settings.merger == "knots" and merged.settings.params["density"] == 0.6
    api.write_merged_adapter(merged, adapters, tmp_path / "lib")
    cli, lib = _deltas(tmp_path / "cli"), _deltas(tmp_path / "lib")
    assert cli.keys() == lib.keys()
    for path in cli:
        assert torch.equal(cli[path], lib[path]), path
    with pytest.raises(LoramergeError, match="--override"):  # the same conflict rule as the CLI
        api.merge(adapters, MergeConfig(density=0.5), api.load_table(mask))


def test_api_prune_equals_apply_mask(sources, tmp_path):
    """plan_prune / prune / write_pruned write the same folders as `loramerge apply-mask`, and refuse an
    output inside an input before any work."""
    adapters = api.load_adapters(sources)
    mask = _recorded_table(adapters, tmp_path)
    result = invoke_cli(["apply-mask", "--adapters", *sources, "--mask", mask, "--out", tmp_path / "cli", "--quiet"])
    assert result.exit_code == 0, result.stderr
    plan = api.plan_prune(adapters, api.load_table(mask), tmp_path / "lib", dtype="float32")
    api.write_pruned(plan, api.prune(plan))
    removed = 0
    for adapter in adapters:
        cli, lib = _deltas(tmp_path / "cli" / adapter.name), _deltas(tmp_path / "lib" / adapter.name)
        assert cli.keys() == lib.keys()
        removed += len(adapter.modules) - len(cli)
        for path in cli:
            assert torch.equal(cli[path], lib[path]), path
    assert removed > 0  # the two pruned units are gone
    inside = adapters[0].source.weights_file.rsplit("/", 1)[0] + "/pruned"
    with pytest.raises(LoramergeError, match="input"):
        api.plan_prune(adapters, api.load_table(mask), inside)
    with pytest.raises(UsageError, match="--dtype"):
        api.plan_prune(adapters, api.load_table(mask), tmp_path / "x", dtype="fp16")


def test_plan_merge_checks_everything_first(sources, tmp_path):
    adapters = api.load_adapters(sources)
    with pytest.raises(UsageError, match="--dtype"):
        api.plan_merge(adapters, MergeConfig(), dtype="int8", out=tmp_path / "o")
    with pytest.raises(UsageError, match="--density"):
        api.plan_merge(adapters, MergeConfig(merger="ties", density=2.0))
    with pytest.raises(LoramergeError, match="--head"):
        api.plan_merge(adapters, head="zzz")
    plan = api.plan_merge(adapters, MergeConfig(merger="ties"), out=tmp_path / "o")
    assert plan.settings.params == {"density": 0.8, "scope": "module", **TIES_OPTIONS} and not (tmp_path / "o").exists()
    assert api.write(plan, api.execute(plan)) == tmp_path / "o"


def test_output_never_resolves_to_an_input(folders, sources, tmp_path):
    adapters = api.load_adapters(sources)
    result = api.merge(adapters)
    before = (folders["a"] / "adapter_model.safetensors").read_bytes()
    for target in (folders["a"], folders["a"].parent, folders["a"] / "adapter_model.safetensors"):
        with pytest.raises(LoramergeError, match="the input .*refusing to write over an input"):
            api.write_merged_adapter(result, adapters, target, force=True)
        with pytest.raises(LoramergeError, match="the input .*refusing to write over an input"):
            api.plan_merge(adapters, out=target, force=True)
        with pytest.raises(LoramergeError, match="the input .*refusing to write over an input"):
            api.write_adapters(adapters, target, force=True)
    assert (folders["a"] / "adapter_model.safetensors").read_bytes() == before


def test_a_mask_with_infinite_weights_is_refused(sources, tmp_path):
    adapters = api.load_adapters(sources)
    document = api.ones_table(adapters).to_json()
    text = json.dumps(document).replace("1.0", "Infinity", 1)
    (tmp_path / "inf.json").write_text(text)
    result = invoke_cli(["merge", "--adapters", *sources, "--mask", tmp_path / "inf.json", "--out", tmp_path / "o"])
    assert result.exit_code == 1 and "finite" in result.stderr and not (tmp_path / "o").exists()
    document["weights"][0][0] = "1"  # the shipped schema: weights are numbers
    (tmp_path / "str.json").write_text(json.dumps(document))
    with pytest.raises(LoramergeError, match="is not of type 'number'"):
        api.load_table(tmp_path / "str.json")


# --- search-mask: refused before any model loads ------------------------------------------------------

def _refused(args, code, word):
    started = time.perf_counter()
    result = invoke_cli(["search-mask", "--strategy", "screened", *args])
    elapsed = time.perf_counter() - started
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert word in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 or result.stderr.startswith("Usage:"), result.stderr  # Click's own
    assert elapsed < 2.0, elapsed


def test_search_fail_late_cases_are_refused_before_work(sources, tasks_file, tmp_path, monkeypatch):
    common = ["--adapters", *sources, "--tasks", tasks_file]
    (tmp_path / "file").write_text("x")
    _refused([*common, "--out", tmp_path / "file" / "mask.json"], 1, "not a folder")
    _refused([*common, "--out", tmp_path / "m.json", "--report-test"], 1, "no 'test' split")
    _refused([*common, "--out", tmp_path / "m.json", "--val-limit", "-1"], 2, "--val-limit")
    _refused([*common, "--out", tmp_path / "m.json", "--val-limit", "0"], 2, "--val-limit")
    _refused([*common, "--out", tmp_path / "m.json", "--strategy", "greedy", "--run-dir", tmp_path / "r",
              "--resume"], 2, "cannot resume")
    _refused([*common, "--out", tmp_path / "m.json", "--strategy", "annealing"], 2, "'annealing' is not one of")
    _refused([*common, "--out", tmp_path / "m.json", "--eval-dtype", "fp16"], 2, "'fp16' is not one of")
    _refused([*common, "--out", tmp_path / "m.json", "--lambda", "abc"], 2, "--lambda")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # the plot extra is not installed
    _refused([*common, "--out", tmp_path / "m.json", "--plot", tmp_path / "plots"], 1, "matplotlib")
    parquet = tasks_file.with_name("parquet.yaml")  # parquet data needs pyarrow (the parquet extra)
    document = yaml.safe_load(tasks_file.read_text())
    for task in document["tasks"]:
        task["data"]["validation"] = str(tmp_path / "rows.parquet")
    (tmp_path / "rows.parquet").write_bytes(b"")
    parquet.write_text(yaml.safe_dump(document))
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    _refused(["--adapters", *sources, "--tasks", parquet, "--out", tmp_path / "m.json"], 1, "pyarrow")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "r").exists()


def test_a_table_saved_into_a_missing_folder_creates_it(sources, tmp_path):
    """search-mask --out into a folder that does not exist: the folder is made (it failed after the search)."""
    table = api.ones_table(api.load_adapters(sources))
    table.save(tmp_path / "new" / "deeper" / "mask.json")
    assert api.load_table(tmp_path / "new" / "deeper" / "mask.json").weights == table.weights
    assert [p.name for p in (tmp_path / "new" / "deeper").iterdir()] == ["mask.json"]  # no temporary left


def test_unknown_strategy_is_an_error_in_the_library():
    from loramerge_cli.search.strategies import strategy_named

    with pytest.raises(UsageError, match="--strategy must be one of"):
        strategy_named("annealing")


def test_a_search_leaves_the_callers_random_state_alone(tmp_path):
    from loramerge_cli.search.strategies import STRATEGIES, SearchSpace
    from loramerge_cli.search.plan import SearchRequest
    from loramerge_cli.search.enmp import EnmpSettings

    def fitness(candidates):  # a synthetic fitness: pruning units 0 and 3 helps
        return [float(len({0, 3} & set(pruned))) - 0.1 * len(pruned) for pruned, _ in candidates]

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    request = SearchRequest(strategy="screened", adapters=[], merge=None, tasks=None, eval=None, budget=20,
                            enmp=EnmpSettings(popsize=6, generations=3, max_prune=0.5, seed=2))
    for name in ("screened", "enmp", "greedy", "random"):
        outcome = STRATEGIES[name].run(request, fitness, SearchSpace(4, 2, 1.0, tmp_path / name), lambda k, d: None)
        assert outcome.best.fitness > 0
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


# --- registries ----------------------------------------------------------------------------------------

@pytest.fixture()
def toy_method(monkeypatch):
    """A method added the documented way: one registry entry (with its parameter) and one kernel."""
    from loramerge_cli.merging import registry

    def gain_sum(X, present, params):  # the kernel: Σ_t X_t times a gain
        return X.sum(dim=0) * params["gain"]

    monkeypatch.setitem(registry.PARAMETERS, "gain", registry.MethodParameter("gain", "Factor on the sum.", 0.0, 10.0,
                                                                        low_open=True))
    monkeypatch.setitem(registry.METHODS, "toy", registry.Method(
        "toy", "the sum, times a gain", "none", "1", defaults={"gain": 1.0}, elementwise=True, combine=gain_sum))
    return "toy"


@pytest.mark.parametrize("space", ["full", "knots", "core"])
def test_a_registered_method_is_in_the_cli_and_works_in_every_space(toy_method, sources, tmp_path, space):
    from typer.testing import CliRunner

    from loramerge_cli.cli.app import build_app

    app = build_app()
    runner = CliRunner()
    helped = runner.invoke(app, ["merge", "--help"])
    assert helped.exit_code == 0 and "toy" in helped.stdout and "--gain" in helped.stdout
    assert "Factor on the sum." in helped.stdout
    exact = ["--energy", "1"] if space == "full" else []  # a dense result kept whole (the others are exact)
    result = runner.invoke(app, ["merge", "--adapters", *sources, "--merger", "toy", "--gain", "2", "--space", space,
                                 *exact, "--out", str(tmp_path / "toy"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    refused = runner.invoke(app, ["merge", "--adapters", *sources, "--merger", "toy", "--gain", "0", "--out",
                                  str(tmp_path / "x")])
    assert refused.exit_code == 2 and "--gain must be > 0" in refused.stderr
    adapters = api.load_adapters(sources)
    reference = api.merge(adapters, MergeConfig(merger="ta", space=space, lam=2.0))  # ta is the plain sum
    toy = _deltas(tmp_path / "toy")
    for path, module in reference.modules.items():
        expected = module.lora_B.double() @ module.lora_A.double()
        assert torch.allclose(toy[path].double(), expected, rtol=1e-4, atol=1e-6), path


def test_no_import_cycle_inside_search():
    """search/ imports form a DAG (nsc -> runner -> nsc_fitness -> nsc was a cycle), lazy imports included."""
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "loramerge_cli" / "search"
    graph = {path.stem: set(re.findall(r"from loramerge_cli\.search\.(\w+) import", path.read_text()))
             for path in folder.glob("*.py")}

    def visit(name, stack):
        assert name not in stack, " -> ".join([*stack, name])
        for dependency in graph.get(name, ()):
            visit(dependency, [*stack, name])

    for name in graph:
        visit(name, [])


def test_search_refusals_do_not_import_torch(sources, tasks_file):
    """A fresh process refuses a bad search before the heavy imports (torch alone takes seconds)."""
    import subprocess
    import sys

    code = ("import atexit, sys\nfrom loramerge_cli.cli.app import main\n"  # (main ends the process)
            "atexit.register(lambda: print('torch' in sys.modules))\n"
            f"sys.argv = ['loramerge', 'search-mask', '--adapters', *{sources!r}, '--tasks', {str(tasks_file)!r}, "
            f"'--out', {str(tasks_file.with_name('m.json'))!r}, *sys.argv[1:]]\nmain()\n")
    for flags, code_expected in ((["--report-test"], 1), (["--val-limit", "0"], 2), (["--lambda", "abc"], 2)):
        result = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True)
        assert (result.returncode, result.stdout.split()) == (code_expected, ["False"]), (flags, result.stderr)
