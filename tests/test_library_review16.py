"""A review of the library (`loramerge_cli.api`) against the README's promises: each test failed before its fix."""

import warnings

import pytest
import torch

from loramerge_cli import api
from loramerge_cli.api import EnmpSettings, EvalSettings, MergeConfig


def _adapter_args(text_setting) -> list[str]:
    return [f"{name}={folder}" for name, folder in text_setting.adapters.items()]


@pytest.mark.slow
def test_execute_and_execute_eval_leave_torch_threads_as_they_were(text_setting):
    """`api.execute` (λ tuned on tasks) and `api.execute_eval` left torch at the evaluation's thread count (1),
    where `api.merge`, `api.search` and `api.evaluate` gave the caller's back."""
    adapters = api.load_adapters(_adapter_args(text_setting))
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    runs = {
        "execute (λ auto)": lambda: api.execute(api.plan_merge(adapters, MergeConfig(merger="ta"), tuning=api.TaskData(
            text_setting.tasks_file, val_limit=4, threads=other))),
        "execute_eval": lambda: api.execute_eval(api.plan_eval(text_setting.tasks_file, _adapter_args(text_setting),
                                                               [], EvalSettings(threads=other, val_limit=4))),
    }
    for name, run in runs.items():
        run()
        assert torch.get_num_threads() == before, name


@pytest.mark.slow
def test_loading_the_base_model_leaves_torch_random_state_alone(text_setting, tmp_path):
    """transformers initialises a base model's new head from torch's global generator: every `api.evaluate`
    (and search, and merge with λ tuned) moved the caller's random state."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = shutil.copytree(text_setting.base, tmp_path / "base")  # saved without its head: a new one is initialised
    weights = load_file(base / "model.safetensors")
    save_file({key: value for key, value in weights.items() if not key.startswith("score.")},
              base / "model.safetensors", metadata={"format": "pt"})
    assert len(weights) > len(load_file(base / "model.safetensors"))
    adapters = api.load_adapters(_adapter_args(text_setting))
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    api.evaluate(text_setting.tasks_file, adapters, [], EvalSettings(val_limit=4, threads=1), base=str(base))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.slow
def test_an_enmp_search_leaves_the_warnings_filters_alone(text_setting):
    """cma's CMAEvolutionStrategy adds a global 'once' filter for its NeverTestedWarning at every construction."""
    adapters = api.load_adapters(_adapter_args(text_setting))
    request = api.SearchRequest(adapters=adapters, merge=MergeConfig(merger="ta"), tasks=text_setting.tasks_file,
                                eval=EvalSettings(val_limit=4, threads=1), strategy="enmp",
                                enmp=EnmpSettings(seed=1, popsize=4, generations=2, max_prune=0.5))
    filters = list(warnings.filters)
    api.search(api.plan_search(request))
    assert list(warnings.filters) == filters


def _saved_table(adapters, path):
    table = api.ones_table(adapters)
    table.weights[0][0] = 0.0  # task a pruned in the first unit
    table.weights[2][1] = 0.5
    table.save(path)
    return path


def test_plan_merge_matches_a_loaded_table_to_the_adapters_by_name_as_merge_mask_does(folders, tmp_path):
    """The README's `plan_merge(adapters, config, api.load_table(...))` refused adapters given in another order
    than the table's tasks, which `merge --mask` (and `api.weight_table`) match by name."""
    ordered = api.load_adapters([f"{name}={folders[name]}" for name in "abc"])
    reordered = api.load_adapters([f"{name}={folders[name]}" for name in "cab"])
    path = _saved_table(ordered, tmp_path / "mask.json")
    expected = api.merge(ordered, MergeConfig(merger="ties"), api.load_table(path))
    merged = api.merge(reordered, MergeConfig(merger="ties"), api.load_table(path))
    assert merged.modules.keys() == expected.modules.keys()
    for module_path, module in expected.modules.items():
        other = merged.modules[module_path]
        assert torch.allclose(module.lora_B @ module.lora_A, other.lora_B @ other.lora_A, rtol=0, atol=1e-12)


def test_a_loaded_tables_errors_name_its_file_and_its_folder_is_an_input(folders, tmp_path):
    """Table errors said `mask:` where the command line names the file, and an output folder holding the table
    being applied was written over with force=True (merge --mask refuses it)."""
    from loramerge_cli.errors import LoramergeError

    adapters = api.load_adapters([f"{name}={folders[name]}" for name in "abc"])
    path = _saved_table(adapters, tmp_path / "run" / "mask.json")
    other = api.load_adapters([f"{name}={folders[name]}" for name in "ab"])
    with pytest.raises(LoramergeError, match=f"^{path}: tasks"):
        api.plan_merge(other, MergeConfig(), api.load_table(path))
    for write in (lambda: api.plan_merge(adapters, MergeConfig(), api.load_table(path), out=path.parent, force=True),
                  lambda: api.write_merged_adapter(api.merge(adapters), adapters, path.parent, force=True,
                                                   table=api.load_table(path)),
                  lambda: api.plan_prune(adapters, api.load_table(path), path.parent, force=True)):
        with pytest.raises(LoramergeError, match="holds the input .*mask.json"):
            write()
    assert path.read_text() == api.load_table(path).text()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["enmp", "surrogate"])
def test_a_run_dir_resumes_across_the_command_line_and_the_library(text_setting, tmp_path, strategy):
    """The same search, started by one and resumed by the other, was refused both ways: the command line saves
    every method parameter (None) and every strategy option, and hands --seed to the merge; the library does
    neither."""
    from factories import invoke_cli

    adapters = api.load_adapters(_adapter_args(text_setting))
    flags = {"enmp": ["--popsize", "4", "--generations", "2"], "surrogate": ["--budget", "20"]}[strategy]
    options = {"enmp": {"enmp": EnmpSettings(seed=3, popsize=4, generations=2, max_prune=0.5)},
               "surrogate": {"enmp": EnmpSettings(seed=3, max_prune=0.5), "budget": 20}}[strategy]

    def request(run_dir, resume):
        return api.SearchRequest(adapters=adapters, merge=MergeConfig(merger="ta"), tasks=text_setting.tasks_file,
                                 eval=EvalSettings(val_limit=4, threads=1), strategy=strategy, run_dir=run_dir,
                                 resume=resume, **options)

    def command(run_dir, *more):
        return ["search-mask", "--adapters", *_adapter_args(text_setting), "--tasks", text_setting.tasks_file,
                "--merger", "ta", "--strategy", strategy, *flags, "--max-prune", "0.5", "--val-limit", "4",
                "--threads", "1", "--seed", "3", "--run-dir", run_dir, *more]

    by_library = tmp_path / "library"
    table, _ = api.search(api.plan_search(request(by_library, False)))
    alone = invoke_cli(["search-mask", "--run-dir", by_library, "--resume"])  # the library saves no flags
    assert alone.exit_code == 1 and "started from the library" in alone.stderr, alone.stderr
    resumed = invoke_cli(command(by_library, "--resume", "--out", tmp_path / "resumed.json"))
    assert resumed.exit_code == 0, resumed.stderr
    assert api.load_table(tmp_path / "resumed.json").weights == table.weights
    by_command = tmp_path / "command"
    started = invoke_cli(command(by_command, "--out", tmp_path / "started.json"))
    assert started.exit_code == 0, started.stderr
    plan = api.plan_search(request(by_command, True))
    assert plan.finished is not None


def test_adapters_pruned_in_memory_are_not_taken_for_their_files(folders, tmp_path):
    """`api.prune` kept each adapter's source sha256 (its file's): a table searched on the pruned adapters passed
    as one of the unpruned ones, and a merge of them recorded the files, unmodified."""
    from loramerge_cli.errors import LoramergeError

    adapters = api.load_adapters([f"{name}={folders[name]}" for name in "abc"])
    table = api.ones_table(adapters)
    table.weights[0][0] = 0.0
    pruned = api.prune(api.plan_prune(adapters, table, tmp_path / "unused"))
    assert pruned[0].source.identity != adapters[0].source.identity and pruned[0].source.modified
    assert pruned[0].source.sha256 == adapters[0].source.sha256  # the file read, as provenance records it
    assert pruned[1].source == adapters[1].source  # a row of ones changes nothing
    with pytest.raises(LoramergeError, match="differs from the one the table was made for"):
        api.plan_merge(adapters, MergeConfig(), api.ones_table(pruned))
    from loramerge_cli.search.plan import run_config  # what --resume compares: a run of the pruned ones differs

    recorded = [run_config(api.SearchRequest(adapters=chosen, merge=MergeConfig(), tasks=tmp_path / "tasks.yaml",
                                             eval=EvalSettings()))["adapters"]
                for chosen in (adapters, pruned)]
    assert recorded[0][1:] == recorded[1][1:] and recorded[0][0] != recorded[1][0]
    folder = api.write_merged_adapter(api.merge(pruned), pruned, tmp_path / "merged")
    import json

    inputs = json.loads((folder / "loramerge.json").read_text())["inputs"]
    assert "weight table applied" in inputs[0]["modified"] and "modified" not in inputs[1]
    assert inputs[0]["sha256"] == adapters[0].source.sha256
    assert inputs[0]["modified_sha256"] == pruned[0].source.identity
    written = api.write_pruned(api.plan_prune(adapters, table, tmp_path / "pruned"), pruned)  # apply-mask's folders
    recorded = json.loads((written / "a" / "loramerge.json").read_text())["inputs"][0]
    assert recorded["sha256"] == adapters[0].source.sha256  # the input file it read
    assert "with a weight table applied" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_eval_refuses_a_merge_made_for_another_base_before_the_model_loads(text_setting, tmp_path, monkeypatch):
    """A merged adapter recording another base was scored on the spec's base (or refused only after the base
    model loaded, when its modules did not fit)."""
    import json
    import shutil

    from factories import invoke_cli
    from loramerge_cli.evaluation import engine

    name, folder = next(iter(text_setting.adapters.items()))
    other = shutil.copytree(folder, tmp_path / "other")
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other-model"}))

    def no_model(*args, **kwargs):
        raise AssertionError("the base model loaded")

    monkeypatch.setattr(engine, "load_base", no_model)
    args = ["eval", "--adapters", *_adapter_args(text_setting), "--tasks", text_setting.tasks_file, "--merged",
            other, "--val-limit", "4", "--threads", "1"]
    result = invoke_cli(args)
    assert result.exit_code == 1, result.stderr
    assert f"--merged {other}: made for the base org/other-model" in result.stderr
    assert "--allow-base-mismatch overrides" in result.stderr
    monkeypatch.undo()  # a merge written for the base --base names is scored on it
    copy = shutil.copytree(text_setting.base, tmp_path / "base copy")
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(copy)}))
    result = invoke_cli([*args, "--base", copy])
    assert result.exit_code == 0, result.stderr


def test_evaluate_names_an_adapter_without_a_task_as_eval_does(text_setting):
    """api.evaluate said `tasks[0].name: no adapter named …` where `eval` and plan_eval say which adapter has no
    task."""
    from loramerge_cli.errors import LoramergeError

    arguments = _adapter_args(text_setting)
    renamed = ["stray=" + arguments[0].split("=", 1)[1], *arguments[1:]]
    with pytest.raises(LoramergeError, match="no task for adapter.s. stray$"):
        api.evaluate(text_setting.tasks_file, api.load_adapters(renamed), [], EvalSettings(val_limit=4, threads=1))
