"""Review of session 19: each test failed before its fix."""

import json
from dataclasses import replace

import pytest

from loramerge_cli.evaluation.engine import EvalSettings
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.enmp import EnmpSettings
from loramerge_cli.search.runner import SearchRequest, run_search


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from eval_fixtures import build_text_setting

    return build_text_setting(tmp_path_factory.mktemp("review19"))


def surrogate_request(setting, **changes) -> SearchRequest:
    return replace(SearchRequest(strategy="surrogate", adapters=setting.adapter_args(), merge=MergeConfig(merger="ta"),
                                 tasks=setting.tasks_file, eval=EvalSettings(threads=1, batch_size=8),
                                 enmp=EnmpSettings(max_prune=0.5, seed=3), budget=10), **changes)


def test_a_resumed_search_s_seconds_count_the_processes_before_the_resume(setting, tmp_path):
    """provenance.seconds was the last process's only: a search killed after hours and resumed for its last
    step said it took seconds. elapsed.json keeps the time spent so far, saved at each step."""
    import time

    def slow_then_stopped(kind, data):
        if kind == "proposal" and data["generation"] == 1:
            time.sleep(1.0)
        if kind == "proposal" and data["generation"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(surrogate_request(setting, run_dir=tmp_path), on_event=slow_then_stopped)
    saved = json.loads((tmp_path / "elapsed.json").read_text())
    assert saved["seconds"] >= 1.0 and saved["run_id"] == json.loads((tmp_path / "config.json").read_text())["run_id"]
    _, provenance = run_search(surrogate_request(setting, run_dir=tmp_path, resume=True))
    assert provenance["seconds"] >= provenance["seconds_this_process"] + 1.0
    _, fresh = run_search(surrogate_request(setting, run_dir=tmp_path / "fresh"))
    assert "seconds_this_process" not in fresh and fresh["seconds"] < provenance["seconds"]


# --- the library, as a hostile caller uses it (each refused in one line, before any work) -------------------------

def loaded(setting):
    from loramerge_cli import api

    return api.load_adapters(setting.adapter_args())


def test_an_adapter_name_cannot_lead_outside_the_output(setting, tmp_path):
    """`load_adapter(name="../../x")` (or an adapter renamed in code) wrote its folder, or the merge's head file,
    outside the output folder: into an input adapter's folder, or anywhere."""
    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError

    source = str(setting.adapters["alpha"])
    with pytest.raises(LoramergeError, match="cannot be a task name"):
        api.load_adapter(source, name="../alpha/injected")
    first, second, third = loaded(setting)
    escaping = replace(first, name="../../escaped")
    with pytest.raises(LoramergeError, match="cannot be a task name"):
        api.merge([escaping, second])
    with pytest.raises(LoramergeError, match="cannot be a task name"):
        api.write_merged_adapter(api.merge([first, second]), [escaping, second], tmp_path / "merged")
    with pytest.raises(LoramergeError, match="cannot be a task name"):
        api.write_adapters([escaping, second], tmp_path / "out" / "pruned")
    for name in ("loramerge.json", "mask.json", "loramerge.yaml"):
        with pytest.raises(LoramergeError, match="beside the task folders"):
            api.write_adapters([replace(first, name=name), second], tmp_path / "pruned")
    assert not any(tmp_path.rglob("*")) and not (setting.root / "escaped").exists()
    assert not (setting.root / "escaped.safetensors").exists()


def test_the_library_refuses_two_adapters_of_one_name_as_the_command_does(setting, tmp_path):
    """`api.merge([a, a])` merged one adapter twice and wrote it twice into loramerge.json and heads/."""
    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError

    first = loaded(setting)[0]
    with pytest.raises(LoramergeError, match="two adapters are named 'alpha'"):
        api.merge([first, first])
    with pytest.raises(LoramergeError, match="two adapters are named 'alpha'"):
        api.plan_merge([first, first], out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_merge_result_is_written_with_the_adapters_it_merged(setting, tmp_path):
    """A result of three adapters written with two of them recorded two inputs beside three weights."""
    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError

    adapters = loaded(setting)
    result = api.merge(adapters)
    with pytest.raises(LoramergeError, match="not of the adapters given"):
        api.write_merged_adapter(result, adapters[:2], tmp_path / "merged")
    with pytest.raises(LoramergeError, match="not of the adapters given"):
        api.write_merged_adapter(result, adapters[::-1], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    api.write_merged_adapter(result, adapters, tmp_path / "merged")


def test_apply_table_takes_only_the_adapter_s_own_row(setting):
    """apply_table(adapter, table, -1) applied the last task's row, 5 raised a bare IndexError, another task's
    row was applied without a word, and a NaN weight was reported as an overflow."""
    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError

    adapters = loaded(setting)
    table = api.ones_table(adapters)
    for index, words in ((-1, "not a row"), (5, "not a row"), (True, "not a row"), (1, "is task 'beta', not")):
        with pytest.raises(LoramergeError, match=words):
            api.apply_table(adapters[0], table, index)
    table.weights[0][0] = float("nan")
    with pytest.raises(LoramergeError, match="not a finite number"):
        api.apply_table(adapters[0], table, 0)
    table.weights[0][0] = 1.0
    assert api.apply_table(adapters[1], table, 1).modules.keys() == adapters[1].modules.keys()


@pytest.mark.parametrize("change, words", [
    ({"weights": "111"}, "--weights must be a list"), ({"weights": [10**400, 1, 1]}, "--weights must be a list"),
    ({"weights": 1.0}, "--weights must be a list"), ({"out_rank": "3"}, "--out-rank must be a whole number"),
    ({"energy": "0.5"}, "--energy must be a number"), ({"merger": 3}, "--merger must be a name"),
])
def test_settings_of_the_wrong_type_are_one_line(setting, change, words):
    """MergeConfig(weights="11") failed deep in the merge (TypeError: bad operand type for abs()); an int too
    large for a float with an OverflowError; out_rank="3" with a TypeError."""
    from loramerge_cli import api
    from loramerge_cli.errors import UsageError

    with pytest.raises(UsageError, match=words):
        api.plan_merge(loaded(setting), api.MergeConfig(**{"merger": "ta", **change}))


def test_the_library_s_other_arguments_of_the_wrong_kind_are_one_line(setting, tmp_path):
    """Paths where loaded adapters go, a dict where a table or settings go, a number where a path goes: each was
    an AttributeError or TypeError from deep inside."""
    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError, UsageError
    from loramerge_cli.masks import WeightTable

    adapters = loaded(setting)
    cases = [
        (lambda: api.merge(setting.adapter_args()), "not a loaded adapter"),
        (lambda: api.merge([]), "non-empty list"),
        (lambda: api.plan_merge(adapters, "ties"), "must be a MergeConfig"),
        (lambda: api.plan_merge(adapters, api.MergeConfig(params=["density"])), "params must be a dict"),
        (lambda: api.plan_merge(adapters, table={"weights": []}), "must be a WeightTable"),
        (lambda: api.plan_merge(adapters, out=5), "--out must be a path"),
        (lambda: api.plan_merge(adapters, base=1), "base must be a string"),
        (lambda: api.load_adapters(5), "as a list"),
        (lambda: api.load_adapters(None), "as a list"),
        (lambda: api.write_merged_adapter(api.merge(adapters), adapters, 5), "--out must be a path"),
        (lambda: api.evaluate(setting.tasks_file, adapters, settings={"threads": 1}), "must be an EvalSettings"),
        (lambda: api.evaluate(setting.tasks_file, setting.adapter_args()), "not a loaded adapter"),
        (lambda: api.plan_eval(setting.tasks_file, setting.adapter_args(), settings=api.EvalSettings(sample_seed=-1)),
         "sample_seed must be an integer >= 0"),
        (lambda: api.plan_eval(setting.tasks_file, setting.adapter_args(),
                               settings=api.EvalSettings(length_normalize="no")), "--length-normalize must be"),
        (lambda: api.plan_prune(adapters, None, tmp_path / "pruned"), "needs a WeightTable"),
    ]
    table = api.ones_table(adapters)
    for field, value in (("provenance", "zz"), ("adapters", [1, 2, 3]), ("tasks", None), ("weights", None),
                         ("unit", "layer")):
        broken = WeightTable(**{**{name: getattr(table, name) for name in ("tasks", "units", "weights", "unit",
                                                                           "adapters", "provenance")}, field: value})
        cases.append((lambda broken=broken: api.plan_merge(adapters, table=broken), "must be|must be a list"))
    for call, words in cases:
        with pytest.raises((UsageError, LoramergeError), match=words):
            call()
    assert not any(tmp_path.iterdir())


def test_task_data_is_checked_when_planned_not_when_the_merge_runs(setting, tmp_path):
    """TaskData(threads=0), dtype="int8" planned, and failed at execute; a λ given with tuning= was dropped for the
    tuned one without a word."""
    from loramerge_cli import api
    from loramerge_cli.errors import UsageError

    adapters = loaded(setting)
    for options, words in (({"threads": 0}, "--threads must be an integer >= 1"),
                           ({"dtype": "int8"}, "--dtype must be one of")):
        with pytest.raises(UsageError, match=words):
            api.TaskData(setting.tasks_file, **options)
    with pytest.raises(UsageError, match="give one"):
        api.plan_merge(adapters, api.MergeConfig(lam=2.0), tuning=api.TaskData(setting.tasks_file, threads=1))


def test_eval_s_plan_and_the_library_refuse_two_merges_of_one_name(setting, tmp_path):
    """plan_eval with two merges named alike planned (execute_eval refused them); api.evaluate scored them into
    two rows of one name, and scored --length-normalize on a classifier's tasks, which plan_eval refuses; a
    single source given as a string was read character by character."""
    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError, UsageError

    adapters = loaded(setting)
    merged = tmp_path / "merged"
    api.write_merged_adapter(api.merge(adapters), adapters, merged)
    with pytest.raises(LoramergeError, match="are named 'm'"):
        api.plan_eval(setting.tasks_file, setting.adapter_args(), [f"m={merged}", f"m={merged}"])
    with pytest.raises(UsageError, match="name rows of the report"):
        api.plan_eval(setting.tasks_file, setting.adapter_args(), [f"experts={merged}"])
    merge = api.load_adapter(str(merged), name="m")
    with pytest.raises(LoramergeError, match="two merges are named 'm'"):
        api.evaluate(setting.tasks_file, adapters, [merge, merge], api.EvalSettings(threads=1))
    with pytest.raises(UsageError, match="have no choices"):
        api.evaluate(setting.tasks_file, adapters, settings=api.EvalSettings(threads=1, length_normalize=True))
    plan = api.plan_eval(setting.tasks_file, setting.adapter_args(), str(merged))
    assert plan.merged == [str(merged)]


def test_a_search_plan_run_twice_is_refused_before_it_searches_again(setting, tmp_path):
    """api.search(plan) called again redid the whole search, then kept its table beside the first one's, saying
    --out "appeared while the command ran"."""
    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError

    request = surrogate_request(setting)  # (greedy with ties draws nothing: no seed)
    plan = api.plan_search(replace(request, strategy="greedy", budget=3, enmp=replace(request.enmp, seed=1)),
                           out=tmp_path / "t.json")
    api.search(plan)
    events = []
    with pytest.raises(LoramergeError, match="already exists"):
        api.search(plan, on_event=lambda kind, data: events.append(kind))
    assert events == [] and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


@pytest.mark.parametrize("strategy, flag", [("surrogate", ["--popsize", "16"]), ("greedy", ["--sigma0", "0.5"]),
                                            ("enmp", ["--sparsity", "0.5"])])
def test_a_shared_setting_the_strategy_never_reads_is_refused_at_its_default_value_too(setting, tmp_path, strategy,
                                                                                        flag):
    """`--strategy surrogate --popsize 17` was refused, `--popsize 16` (the default) accepted without a word."""
    from factories import invoke_cli
    from test_hostile_inputs import one_line

    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--strategy", strategy, *flag, "--out", tmp_path / "t.json"])
    one_line(result, f"{flag[0]} does nothing with --strategy {strategy}", code=2)


def test_the_library_caps_cpu_worker_processes_as_the_command_does(setting, tmp_path):
    """`--workers 1000` was refused by the command line only: a SearchRequest with devices=["cpu"] * 1000 started
    a thousand processes, each loading the model."""
    import os

    from loramerge_cli import api
    from loramerge_cli.errors import UsageError

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with pytest.raises(UsageError, match="worker processes on the CPU"):
        api.plan_search(replace(surrogate_request(setting), devices=["cpu"] * (4 * cpus + 1)), out=tmp_path / "t.json")
    with pytest.raises(UsageError, match="a list of device names"):
        api.plan_search(replace(surrogate_request(setting), devices="cpu,cpu"), out=tmp_path / "t.json")
    assert not any(tmp_path.iterdir())


# --- recipes and the records of outputs (a hostile user of reproducibility) -------------------------------------

def recipe_with_weights(setting, path):
    import yaml

    adapters = {name: {"path": str(setting.adapters[name]), "weight": weight, "density": density}
                for name, weight, density in (("alpha", 0.5, 0.3), ("beta", 2, 0.6), ("gamma", "1e-1", 0.9))}
    path.write_text(yaml.safe_dump({"adapters": adapters, "merger": "ties", "lambda": 0.7}))
    return path


def test_a_recipe_s_per_adapter_values_follow_the_adapters_by_name(setting, tmp_path):
    """`merge --config r.yaml --adapters beta=… alpha=… gamma=…` gave alpha beta's weight and density (the
    recipe's values were handed out by position), and other adapters inherited them without a word; a weight
    spelled `1e-1` (text to YAML 1.1) was refused."""
    import yaml

    from factories import invoke_cli
    from test_hostile_inputs import one_line

    recipe = recipe_with_weights(setting, tmp_path / "r.yaml")
    plain = invoke_cli(["merge", "--config", recipe, "--out", tmp_path / "plain"])
    assert plain.exit_code == 0, plain.stderr
    order = ("beta", "gamma", "alpha")
    swapped = invoke_cli(["merge", "--config", recipe, "--adapters", *(f"{n}={setting.adapters[n]}" for n in order),
                          "--out", tmp_path / "swapped"])
    assert swapped.exit_code == 0, swapped.stderr
    written = yaml.safe_load((tmp_path / "swapped" / "loramerge.yaml").read_text())
    assert {name: entry["weight"] for name, entry in written["adapters"].items()} == \
        {"beta": 2.0, "gamma": 0.1, "alpha": 0.5}
    assert {name: entry["density"] for name, entry in written["adapters"].items()} == \
        {"beta": 0.6, "gamma": 0.9, "alpha": 0.3}  # (by name too: a flag's list would go by position)
    others = invoke_cli(["merge", "--config", recipe, "--adapters", f"a={setting.adapters['alpha']}",
                         f"b={setting.adapters['beta']}", f"c={setting.adapters['gamma']}", "--out", tmp_path / "o"])
    one_line(others, "give --weights for these", code=2)
    assert not (tmp_path / "o").exists()


def test_merged_folders_and_search_tables_name_their_inputs_relative_to_themselves(setting, tmp_path, monkeypatch):
    """A search's --out table named its adapters relative to the working folder (or absolute after a resume), and
    a merge's lambda_tuning.tasks and RegMean's input_statistics.tasks named the task spec as given: relative to
    where the command ran, or an absolute path of this machine."""
    import json
    import os
    import shutil

    from factories import invoke_cli

    shutil.copytree(setting.root, tmp_path / "inputs")
    monkeypatch.chdir(tmp_path)
    adapters = [f"{name}=inputs/adapters/{name}" for name in setting.adapters]
    common = ["--adapters", *adapters, "--tasks", "inputs/tasks.yaml", "--threads", "1", "--val-limit", "8"]
    searched = invoke_cli(["search-mask", *common, "--strategy", "greedy", "--budget", "2", "--max-prune", "0.5",
                           "--out", "out/deeper/table.json", "--run-dir", "run"])
    assert searched.exit_code == 0, searched.stderr
    table = json.loads((tmp_path / "out" / "deeper" / "table.json").read_text())
    assert [a["source"] for a in table["adapters"]] == [f"../../inputs/adapters/{n}" for n in setting.adapters]
    assert table["provenance"]["data"] == {"tasks": "../../inputs/tasks.yaml", "split": "validation", "val_limit": 8,
                                           "sample_seed": 0}
    copied = invoke_cli(["merge", "--adapters", *adapters, "--mask", "out/deeper/table.json", "--out", "out/m"])
    assert copied.exit_code == 0, copied.stderr  # the copy in the output names the spec relative to itself
    assert json.loads((tmp_path / "out" / "m" / "mask.json").read_text())["provenance"]["data"]["tasks"] == \
        "../../inputs/tasks.yaml"
    again = invoke_cli(["search-mask", "--run-dir", "run", "--resume", "--out", "out/deeper/table.json"])
    assert again.exit_code == 0, again.stderr  # a finished run's table, left as it is
    tuned = invoke_cli(["merge", *common, "--lambda", "auto", "--out", "out/tuned"])
    assert tuned.exit_code == 0, tuned.stderr
    record = json.loads((tmp_path / "out" / "tuned" / "loramerge.json").read_text())
    assert record["lambda_tuning"]["tasks"] == "../../inputs/tasks.yaml"
    absolute = ["--tasks", str(tmp_path / "inputs" / "tasks.yaml")]
    regmean = invoke_cli(["merge", *common[:-6], *absolute, "--threads", "1", "--merger", "regmean",
                          "--out", "out/regmean"])
    assert regmean.exit_code == 0, regmean.stderr
    statistics = json.loads((tmp_path / "out" / "regmean" / "loramerge.json").read_text())["input_statistics"]
    assert statistics["tasks"] == "../../inputs/tasks.yaml" and not os.path.isabs(statistics["tasks"])


def test_a_search_recipe_merges_and_a_recipe_s_indices_may_be_a_yaml_list(setting, tmp_path):
    """`merge --config search.yaml` stopped on "--seed does nothing with ties" (the search's seed, a flag nobody
    typed); `indices: [1, 2]` in a recipe was refused as "expected a JSON list"; `x y=path` said "no such file"."""
    import yaml

    from factories import invoke_cli
    from test_hostile_inputs import one_line

    adapters = {name: str(path) for name, path in setting.adapters.items()}
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"adapters": adapters, "merger": "ties", "budget": 3, "seed": 5}))
    merged = invoke_cli(["merge", "--config", search, "--out", tmp_path / "merged"])
    assert merged.exit_code == 0 and "the recipe's seed dropped: ties draws nothing" in merged.stderr, merged.stderr
    assert "seed" not in (tmp_path / "merged" / "loramerge.yaml").read_text()
    drawn = invoke_cli(["merge", "--config", search, "--merger", "dare", "--out", tmp_path / "dare"])
    assert drawn.exit_code == 0 and "seed: 5" in (tmp_path / "dare" / "loramerge.yaml").read_text()
    listed = tmp_path / "listed.yaml"
    listed.write_text(yaml.safe_dump({"adapters": adapters, "indices": [1, 2]}))
    by_list = invoke_cli(["merge", "--config", listed, "--out", tmp_path / "listed"])
    assert by_list.exit_code == 0, by_list.stderr
    by_flag = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--indices", "[1, 2]", "--out",
                          tmp_path / "flag"])
    assert by_flag.exit_code == 0, by_flag.stderr
    name = "adapter_model.safetensors"
    assert (tmp_path / "listed" / name).read_bytes() == (tmp_path / "flag" / name).read_bytes()
    one_line(invoke_cli(["inspect", f"x y={setting.adapters['alpha']}"]), "'x y' cannot be a task name", code=2)


def test_force_refuses_an_apply_mask_output_whose_table_or_heads_were_edited(setting, tmp_path):
    """--force checked apply-mask's task folders against their records, not the table and heads beside them: a
    hand-edited mask.json, or a head replaced in heads/, was deleted without a word."""
    import json

    from factories import invoke_cli
    from test_hostile_inputs import one_line

    out = tmp_path / "pruned"
    command = ["apply-mask", "--adapters", *setting.adapter_args(), "--indices", "[0, 3]", "--out", out]
    assert invoke_cli(command).exit_code == 0
    heads = sorted(path.relative_to(out).as_posix() for path in (out / "heads").iterdir())
    assert heads == ["heads/alpha.safetensors"]
    record = json.loads((out / "beta" / "loramerge.json").read_text())
    assert sorted(record["beside_files"]) == ["heads/alpha.safetensors", "mask.json"]
    assert invoke_cli([*command, "--force"]).exit_code == 0  # as written: replaced
    table = out / "mask.json"
    original = table.read_text()
    table.write_text(original + "\n")  # (a note of the user's, say)
    one_line(invoke_cli([*command, "--force"]), "pruned/mask.json changed or added since")
    table.write_text(original)
    head = out / "heads" / "alpha.safetensors"
    saved = head.read_bytes()
    head.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    one_line(invoke_cli([*command, "--force"]), "pruned/heads/alpha.safetensors changed or added since")
    head.write_bytes(saved)
    (out / "loramerge.yaml").write_text((out / "loramerge.yaml").read_text() + "# edited\n")  # (a recipe: rebuilt)
    assert invoke_cli([*command, "--force"]).exit_code == 0


# --- the Hub path, offline, on a real cache layout (tests/test_hub.py's) --------------------------------------------

from hub_cache import MAIN_COMMIT, V2_COMMIT, add_snapshot, set_ref  # noqa: E402


def test_a_snapshot_s_broken_files_are_named_by_the_spec_and_without_a_wrong_hint(hub_cache, llama_task_dirs):
    """A snapshot without adapter_config.json (weights there) was told "a repository with adapter_model.bin only
    needs --allow-pickle"; a dangling config link "has no adapter_config.json"; a dangling weights link named
    the cache's snapshot path."""
    from loramerge_cli.adapters.peft_reader import load_adapter
    from loramerge_cli.errors import LoramergeError

    (hub_cache / "snapshots" / V2_COMMIT / "adapter_config.json").unlink()
    with pytest.raises(LoramergeError) as caught:
        load_adapter("org/name@v2")
    assert "no adapter_config.json" in str(caught.value) and "allow-pickle" not in str(caught.value)
    config = hub_cache / "snapshots" / MAIN_COMMIT / "adapter_config.json"
    config.resolve().unlink()  # the blob: the snapshot's link now dangles
    with pytest.raises(LoramergeError) as caught:
        load_adapter("org/name")
    assert str(caught.value) == (f"org/name: in its snapshot {MAIN_COMMIT[:12]}: adapter_config.json: not a regular "
                                 "file (a dangling symbolic link)")
    add_snapshot(hub_cache, "4" * 40, llama_task_dirs["rte"], symlinks=True)
    set_ref(hub_cache, "broken", "4" * 40)
    (hub_cache / "snapshots" / ("4" * 40) / "adapter_model.safetensors").resolve().unlink()
    with pytest.raises(LoramergeError) as caught:
        load_adapter("org/name@broken")
    assert str(hub_cache) not in str(caught.value), caught.value
    assert str(caught.value).startswith("org/name@broken: in its snapshot 444444444444: adapter_model.safetensors:")


def test_a_base_spelled_hf_colon_and_a_hub_adapter_s_foreign_base_are_recorded_as_written(hub_cache, llama_task_dirs,
                                                                                          tmp_path):
    """`--base hf://org/base` was written into the configs with its hf:// (which PEFT cannot load); a Hub adapter
    whose config names its author's /home/alice/… was recorded as ../../../home/alice/… (a path of this machine,
    changing with --out's depth); `--revision "dev branch"` was accepted until the push."""
    import json

    from factories import invoke_cli
    from test_hostile_inputs import one_line

    for commit in (MAIN_COMMIT, V2_COMMIT):
        config = hub_cache / "snapshots" / commit / "adapter_config.json"
        data = json.loads(config.read_text())
        config.unlink()  # (a blob link, or a plain file: replaced by a plain file)
        config.write_text(json.dumps({**data, "base_model_name_or_path": "/home/alice/models/llama"}))
    out = tmp_path / "deep" / "merged"
    merged = invoke_cli(["merge", "--adapters", "org/name", "v2=org/name@v2", "--out", out])
    assert merged.exit_code == 0, merged.stderr
    record = json.loads((out / "loramerge.json").read_text())
    assert record["base_model"] == "/home/alice/models/llama"
    assert {item["base_model"] for item in record["inputs"]} == {"/home/alice/models/llama"}
    based = invoke_cli(["merge", "--adapters", "org/name", "v2=org/name@v2", "--base", "hf://org/base", "--out",
                        tmp_path / "based"])
    assert based.exit_code == 0, based.stderr
    assert json.loads((tmp_path / "based" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/base"
    one_line(invoke_cli(["merge", "--adapters", "org/name", "v2=org/name@v2", "--out", tmp_path / "pushed",
                         "--push-to-hub", "me/merged", "--dry-run", "--revision", "dev branch"]), "--revision")
    assert not (tmp_path / "pushed").exists()


# --- evaluation data a hostile user gives (each refused in one line, or read as the user meant) ---------------------

def bare_tokenizer(folder) -> None:
    """The word tokenizer with no special tokens around a text (as GPT-2's, Qwen's: no BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from eval_fixtures import SPECIAL, WORDS

    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS + [" yes", " no", "yes", "no"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                            model_max_length=64).save_pretrained(str(folder))


def test_an_input_with_no_tokens_is_refused_not_scored_from_a_pad_position(tmp_path, monkeypatch):
    """With a tokenizer that adds no BOS, an empty causal-LM prompt had its first choice token scored from the
    logits at position −1 (the padded row's end), and an empty text was classified from a pad position. Both are
    refused before the model loads (they were once it had loaded)."""
    from loramerge_cli.evaluation import engine

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the inputs were checked")

    monkeypatch.setattr(engine, "load_base", no_model)
    from eval_fixtures import build_gpt2_lm, build_llama_classifier, save_peft_adapter, write_jsonl, write_tasks_file

    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.engine import EvalSettings, Evaluator
    from loramerge_cli.evaluation.specs import load_task_file

    cases = (("causal-lm", build_gpt2_lm, ["c_attn"], "GPT2LMHeadModel", "CAUSAL_LM",
              {"prompt": "{q}", "choices": [" yes", " no"], "label": "answer"}, {"answer": 0}, "an empty prompt"),
             ("sequence-classification", build_llama_classifier, ["q_proj"], "LlamaForSequenceClassification",
              "SEQ_CLS", {"text": ["q"], "label": "label", "num_labels": 3}, {"label": 0}, "an empty text"))
    for model_type, build, targets, model_class, peft_type, fields, label, words in cases:
        root = tmp_path / model_type
        base = build(root / "base")
        bare_tokenizer(base)
        adapter = save_peft_adapter(base, root / "a", targets, model_class, peft_type, seed=1,
                                    fan_in_fan_out=model_type == "causal-lm")
        rows = [{"q": "w1 w2", **label}, {"q": " ", **label}]  # whitespace: no token either
        tasks = write_tasks_file(root / "tasks.yaml", {"base_model": str(base), "model_type": model_type, "tasks": [
            {"name": "a", "data": {"validation": str(write_jsonl(root / "v.jsonl", rows))}, **fields}]})
        with pytest.raises(LoramergeError, match=f"task a: 1 example\\(s\\) have no tokens \\({words}") as refused:
            Evaluator(load_task_file(tasks), load_adapters([f"a={adapter}"]), EvalSettings(threads=1))
        assert str(refused.value).endswith(f"(the first: line 2 of {root / 'v.jsonl'})"), refused.value  # (session 24:
        # it said "example 2 of those scored", no file)


def test_odd_rows_are_read_as_meant_or_refused_before_any_model_loads(tmp_path):
    """A JSONL string holding U+2028 (valid JSON) was refused as "not JSON"; NaN read as the word "nan"; a causal-LM
    prompt filled a null or a list in as "None" or "['…']", and {q.upper} with a method's address; num_labels and
    head in a causal-LM spec did nothing without a word."""
    import json

    from eval_fixtures import write_tasks_file

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.data import check_task_file

    def spec(name, rows, **fields):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        task = {"name": "t", "data": {"validation": str(data)}, **fields}
        model_type = "causal-lm" if "prompt" in fields else "sequence-classification"
        return write_tasks_file(tmp_path / f"{name}.yaml", {"model_type": model_type, "tasks": [task]})

    text = {"text": ["q"], "label": "label", "num_labels": 2}
    spec_file = spec("sep", [{"q": "w1\u2028w2", "label": 0}, {"q": "w3\u0085", "label": 1}], **text)
    assert check_task_file(spec_file, ["validation"]).tasks[0].name == "t"
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"q": NaN, "label": 0}\n')
    with pytest.raises(LoramergeError, match="holds nan .*expected text"):
        check_task_file(write_tasks_file(tmp_path / "nan.yaml", {"model_type": "sequence-classification", "tasks": [
            {"name": "t", "data": {"validation": str(nan)}, **text}]}), ["validation"])
    lm = {"prompt": "{q} ?", "choices": [" yes", " no"], "label": "answer"}
    for value in (None, ["w1"], {"x": 1}):
        with pytest.raises(LoramergeError, match="prompt: column 'q' holds .*expected text"):
            check_task_file(spec("lm", [{"q": value, "answer": 0}], **lm), ["validation"])
    with pytest.raises(LoramergeError, match="bad format string"):
        check_task_file(spec("method", [{"q": "w1", "answer": 0}], **{**lm, "prompt": "{q.upper}"}), ["validation"])
    for extra in ({"num_labels": 2}, {"head": "none"}):
        with pytest.raises(LoramergeError, match=f"it reads no '{next(iter(extra))}'"):
            check_task_file(spec("extra", [{"q": "w1", "answer": 0}], **lm, **extra), ["validation"])
    image = write_tasks_file(tmp_path / "image.yaml", {"model_type": "image-classification", "tasks": [
        {"name": "t", "data": {"validation": str(nan)}, "text": ["q"], "num_labels": 2}]})
    with pytest.raises(LoramergeError, match=r"tasks\[0\]\.text: model_type is image-classification, whose tasks do "
                                             "not read 'text'"):  # (it printed the whole entry as JSON schema text)
        check_task_file(image, ["validation"])


def test_image_folders_read_every_image_kind_and_skip_hidden_files_and_short_files_are_refused_early(tmp_path):
    """.tif, .tiff and .jpe files were left out of a class folder without a word, a Mac's ._x.png stopped the run,
    and a GIF cut short passed the check (PIL's verify) to fail once the model had loaded."""
    from PIL import Image

    from eval_fixtures import write_jsonl, write_tasks_file

    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation.data import check_task_file

    split = tmp_path / "validation"
    for index, (name, suffix) in enumerate((("a", ".png"), ("a", ".tif"), ("b", ".tiff"), ("b", ".jpe"))):
        (split / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(split / name / f"{index}{suffix}",
                                                          format="JPEG" if suffix == ".jpe" else None)
    (split / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    task = {"name": "t", "data": {"validation": str(split)}, "num_labels": 2}
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "image-classification", "tasks": [task]})
    from loramerge_cli.evaluation.data import load_examples

    task_file = check_task_file(spec, ["validation"])
    assert len(load_examples(task_file, task_file.tasks[0], "validation").inputs) == 4
    Image.new("RGB", (8, 8)).save(tmp_path / "short.gif")
    (tmp_path / "short.gif").write_bytes((tmp_path / "short.gif").read_bytes()[:-20])
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"image": str(tmp_path / "short.gif"), "label": 0}])
    spec = write_tasks_file(tmp_path / "short.yaml", {"model_type": "image-classification", "tasks": [
        {"name": "t", "data": {"validation": str(rows)}, "num_labels": 2}]})
    with pytest.raises(LoramergeError, match="short.gif: not an image PIL can read"):
        check_task_file(spec, ["validation"])


def test_a_choice_without_tokens_or_room_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """A causal-LM choice with no tokens, or with as many as max_length, was refused only once the base model had
    loaded, in a line that named no task."""
    from eval_fixtures import build_gpt2_lm, save_peft_adapter, write_jsonl, write_tasks_file

    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.evaluation import engine
    from loramerge_cli.evaluation.specs import load_task_file

    base = build_gpt2_lm(tmp_path / "base")
    folder = save_peft_adapter(base, tmp_path / "a", ["c_attn"], "GPT2LMHeadModel", "CAUSAL_LM", seed=1,
                               fan_in_fan_out=True)
    adapter = load_adapters([f"a={folder}"])
    rows = str(write_jsonl(tmp_path / "v.jsonl", [{"q": "w1", "answer": 0}]))

    def never(*args, **kwargs):
        raise AssertionError("the base model loaded")

    monkeypatch.setattr(engine, "load_base", never)
    for choices, extra, words in (([" yes", "  "], {}, "task a: choice '  ' has no tokens"),
                                  ([" yes", "w1 w2 w3"], {"max_length": 3}, "task a: choice 'w1 w2 w3' has 3 tokens")):
        task = {"name": "a", "data": {"validation": rows}, "prompt": "{q}", "choices": choices, "label": "answer",
                **extra}
        tasks = write_tasks_file(tmp_path / "tasks.yaml", {"base_model": str(base), "model_type": "causal-lm",
                                                           "tasks": [task]})
        with pytest.raises(LoramergeError, match=words):
            engine.Evaluator(load_task_file(tasks), adapter, engine.EvalSettings(threads=1))


def test_a_ctrl_c_during_the_swap_says_the_output_was_written(setting, tmp_path, monkeypatch):
    """`apply-mask --force` (merge --force too) interrupted between the swap of the new output into place and the
    record that it was in place said "interrupted; nothing was written" while the new output stood at --out,
    and its cleanup removed the old one: the swap runs shielded, the Ctrl-C then says the output was written."""
    import os
    import signal

    from factories import invoke_cli

    from loramerge_cli import interrupts, outputs

    out = tmp_path / "pruned"
    command = ["apply-mask", "--adapters", *setting.adapter_args(), "--indices", "[0]", "--out", out]
    assert invoke_cli(command).exit_code == 0
    replaceable = outputs._replaceable

    def interrupted_while_checked(folder):
        os.kill(os.getpid(), signal.SIGINT)  # as the user's Ctrl-C, right after the swap
        return replaceable(folder)

    monkeypatch.setattr(outputs, "_replaceable", interrupted_while_checked)
    again = invoke_cli([*command[:-4], "--indices", "[1]", "--out", out, "--force"])
    assert again.exit_code == 130, again.stderr
    interrupts.check()  # the reported Ctrl-C does not interrupt what this process does next (a library call)
    assert "was written whole" in again.stderr and "nothing was written" not in again.stderr, again.stderr
    assert json.loads((out / "mask.json").read_text())["weights"][1][0] == 0  # the new table (task 1 pruned)
    assert not [path for path in tmp_path.iterdir() if ".loramerge-" in path.name]
    monkeypatch.undo()
    assert invoke_cli([*command, "--force"]).exit_code == 0  # nor the next command run in it
