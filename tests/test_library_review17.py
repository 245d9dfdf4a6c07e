"""Review of the library and the command line (session 17): each test failed before its fix."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from factories import invoke_cli

from loramerge_cli import api
from loramerge_cli.errors import LoramergeError


def test_a_table_made_on_adapters_pruned_in_memory_fits_their_written_copies(folders, tmp_path):
    """A table recorded the sha256 of the pruned tensors (lora_B × weight in float64, the full config) and the
    copies apply-mask writes (lora_B in their dtype, target_modules listed in full, heads in the factors' dtype)
    hashed otherwise: `merge --mask` refused the very adapters the table was searched on, once written. The
    originals stay refused. (Adapter c's head is bfloat16 beside float32 factors, as PEFT's autocast leaves
    them on a bfloat16 base.)"""
    import torch

    adapters = api.load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    adapters[2] = replace(adapters[2], heads={key: head.to(torch.bfloat16) for key, head in adapters[2].heads.items()})
    weights = [[1.0] * len(api.ones_table(adapters).units) for _ in adapters]
    weights[0][1], weights[1][0] = 0.0, 0.37  # a pruned unit and a fractional weight
    table = replace(api.ones_table(adapters), weights=weights)
    pruned = [api.apply_table(adapter, table, index) for index, adapter in enumerate(adapters)]
    assert pruned[0].source.modified and pruned[1].source.modified
    made_on_pruned = api.ones_table(pruned)
    api.write_adapters(pruned, tmp_path / "pruned")
    copies = api.load_adapters([f"{a.name}={tmp_path / 'pruned' / a.name}" for a in pruned])
    assert [c.source.identity for c in copies][:2] != [p.source.identity for p in pruned][:2]
    api.check_table(made_on_pruned, copies)
    with pytest.raises(LoramergeError, match="sha256 mismatch"):
        api.check_table(made_on_pruned, adapters)

    table_file = tmp_path / "made_on_pruned.json"
    made_on_pruned.save(table_file)
    result = invoke_cli(["merge", "--adapters", *[f"{c.name}={tmp_path / 'pruned' / c.name}" for c in copies],
                         "--mask", table_file, "--merger", "ta", "--out", tmp_path / "merged"])
    assert result.exit_code == 0, result.stderr
    refused = invoke_cli(["merge", "--adapters", *[f"{a.name}={folders[a.name]}" for a in adapters], "--mask",
                          table_file, "--merger", "ta", "--out", tmp_path / "merged2"])
    assert refused.exit_code == 1 and "sha256 mismatch" in refused.stderr


def test_a_strategy_parameter_s_declared_range_is_checked_before_any_work(folders, monkeypatch):
    """A strategy's parameters had a type and no range: a new strategy's `--picks -2` failed after the model
    loaded ("internal error: negative dimensions"), and `--picks 0` ran a search of nothing. A declared
    `low`/`high` is now checked with the type, by `plan_search` (the library) and the command line."""
    from dataclasses import replace as replaced

    from loramerge_cli.errors import UsageError
    from loramerge_cli.search import strategies
    from loramerge_cli.search.parameters import StrategyParameter

    toy = replaced(strategies.STRATEGIES["greedy"], name="toy",
                   parameters=(StrategyParameter("picks", int, 4, "tables to pick.", low=1),
                               StrategyParameter("share", float, 0.5, "a share.", low=0, high=1)))
    monkeypatch.setitem(strategies.STRATEGIES, "toy", toy)
    for options, message in (({"picks": 0}, "--picks must be >= 1 (got 0)"),
                             ({"picks": -2}, "--picks must be >= 1"),
                             ({"share": 1.5}, "--share must be from 0 to 1 (got 1.5)"),
                             ({"share": float("nan")}, "--share must be a finite number"),
                             ({"picks": 2.0}, "--picks must be int")):
        request = api.SearchRequest(adapters=[str(folder) for folder in folders.values()], strategy="toy",
                                    merge=api.MergeConfig(merger="ta"), tasks="absent.yaml", options=options,
                                    eval=api.EvalSettings(threads=1))
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            api.plan_search(request)
    result = invoke_cli(["search-mask", "--adapters", *folders.values(), "--tasks", "absent.yaml", "--out",
                         "t.json", "--proposals", "0"])
    assert result.exit_code == 2 and "--proposals must be >= 1 (got 0)" in result.stderr
    assert "Allowed: from 0 to 100" in " ".join(invoke_cli(["search-mask", "--help"]).stdout.split())


def test_a_search_that_scored_every_allowed_table_says_so(text_setting, tmp_path):
    """`--budget 10` (and the README's `budget=64`) ran 8 evaluations with no word why: `--max-prune 0.2` lets
    these adapters prune one of 8 (block, task) units, so only 8 tables exist."""
    args = ["search-mask", "--adapters", *text_setting.adapter_args(), "--tasks", text_setting.tasks_file,
            "--merger", "ta", "--threads", "1", "--val-limit", "4", "--out", tmp_path / "t.json"]
    capped = invoke_cli([*args, "--budget", "10", "--max-prune", "0.2"])
    assert capped.exit_code == 0, capped.stderr
    provenance = json.loads((tmp_path / "t.json").read_text())["provenance"]
    units = provenance["evaluations"]
    assert provenance["every_allowed_table_scored"] is True and units < 10
    assert "every table the --max-prune cap allows" in " ".join(capped.stdout.split())
    wider = invoke_cli([*args, "--budget", str(units + 2), "--max-prune", "0.5", "--force"])
    assert wider.exit_code == 0, wider.stderr
    assert json.loads((tmp_path / "t.json").read_text())["provenance"]["every_allowed_table_scored"] is False
    assert "every table" not in wider.stdout


def test_push_folder_checks_the_folder_and_the_repository_id_in_a_dry_run_too(tmp_path):
    """`api.push_folder(dry_run=True)` listed no files for a folder that does not exist or a file, and took any
    repository id; without dry_run a missing folder was reported as 'written but not uploaded'."""
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "adapter_config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    assert api.push_folder(tmp_path / "merged", "me/merged", dry_run=True)["files"] == ["adapter_config.json"]
    for folder, repo_id, message in ((tmp_path / "absent", "me/merged", "not a folder"),
                                     (tmp_path / "file", "me/merged", "not a folder"),
                                     (tmp_path / "empty", "me/merged", "holds no files"),
                                     (tmp_path / "merged", "not a repo id!!", "expected a Hub repository id")):
        with pytest.raises(LoramergeError, match=message):
            api.push_folder(folder, repo_id, dry_run=True)


def test_the_merge_summary_shows_the_truncation_setting_that_applies():
    """With `--out-rank 32` the summary printed `out_rank=32, energy=0.9999`, as if the energy target applied."""
    from loramerge_cli.cli.render import merge_table

    def shown(**parameters) -> str:
        from rich.console import Console

        console = Console(width=200, record=True)
        console.print(merge_table({"out": "m", "merger": "ties", "method": "ties", "space": "full", "modules": 1,
                                   "parameters": {"density": 0.5, **parameters}, "ranks": {"32": 1},
                                   "omitted": [], "max_truncation_error": 0.1, "warnings": []}))
        return console.export_text()

    assert "out_rank=32" in shown(out_rank=32, energy=0.9999) and "energy" not in shown(out_rank=32, energy=0.9999)
    assert "energy=0.9999" in shown(out_rank=None, energy=0.9999) and "out_rank" not in shown(out_rank=None,
                                                                                              energy=0.9999)


def test_loramerge_json_names_inputs_given_relative_to_the_working_folder_from_the_output(folders, tmp_path,
                                                                                         monkeypatch):
    """Adapters given by a relative path were recorded in loramerge.json as given (relative to the working
    folder, not the output: `../tiny/...` from another folder pointed nowhere), and a two-part one (`ad/a`) was
    taken for a Hub id in the recipe too. Both now name the folder relative to the output, as the docs say."""
    import os
    import shutil

    for name in "ab":
        shutil.copytree(folders[name], tmp_path / "ad" / name)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)
    result = invoke_cli(["merge", "--adapters", "ad/a", "ad/b", "--merger", "ta", "--out", "work/m1"])
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "work" / "m1"
    sources = [item["source"] for item in json.loads((out / "loramerge.json").read_text())["inputs"]]
    assert sources == ["../../ad/a", "../../ad/b"]
    assert "a: ../../ad/a" in (out / "loramerge.yaml").read_text()
    monkeypatch.chdir(tmp_path / "work")  # a rebuild from another folder, into a deeper one
    again = invoke_cli(["merge", "--config", "m1/loramerge.yaml", "--out", "deeper/m2"])
    assert again.exit_code == 0, again.stderr
    rebuilt = tmp_path / "work" / "deeper" / "m2"
    for item in json.loads((rebuilt / "loramerge.json").read_text())["inputs"]:
        assert os.path.isdir(rebuilt / item["source"]) and item["source"].startswith("../../../ad/")


def _spec_variant(text_setting, tmp_path, change) -> Path:
    import yaml

    content = yaml.safe_load(text_setting.tasks_file.read_text())
    change(content)
    spec = tmp_path / "tasks.yaml"
    spec.write_text(yaml.safe_dump(content, sort_keys=False))
    return spec


def test_a_labelled_command_refuses_a_spec_without_labels_before_anything_loads(text_setting, tmp_path):
    """A sequence-classification task with no `label` passed every check and failed after the base model loaded
    (about 5 s on the tiny example): eval, merge --lambda auto and a labelled search all score accuracy.
    NSC reads no label and still takes it."""
    from loramerge_cli.api import EvalSettings, NscSettings

    spec = _spec_variant(text_setting, tmp_path, lambda content: content["tasks"][0].pop("label"))
    with pytest.raises(LoramergeError, match=r"tasks\[0\]\.label: required field is missing"):
        api.plan_eval(spec, text_setting.adapter_args(), [], EvalSettings(threads=1))
    search = api.SearchRequest(adapters=text_setting.adapter_args(), merge=api.MergeConfig(merger="ta"), tasks=spec,
                               eval=EvalSettings(threads=1))
    with pytest.raises(LoramergeError, match=r"tasks\[0\]\.label: required field is missing"):
        api.plan_search(search)
    api.plan_search(replace(search, strategy="nsc", nsc=NscSettings(steps=1)))
    merged = invoke_cli(["merge", "--adapters", *text_setting.adapter_args(), "--merger", "ta", "--lambda", "auto",
                         "--tasks", spec, "--out", tmp_path / "m"])
    assert merged.exit_code == 1 and "tasks[0].label: required field is missing" in merged.stderr
    assert not (tmp_path / "m").exists()


def test_an_integer_field_written_as_a_whole_float_is_taken_as_an_integer(text_setting, tmp_path):
    """`num_labels: 3.0` (or `max_length: 8.0`) passed the schema (JSON Schema counts 3.0 as an integer) and
    failed after the model loaded: "internal error: TypeError: 'float' object cannot be interpreted as an
    integer"."""
    from loramerge_cli.evaluation.specs import load_task_file

    def floats(content):
        content["tasks"][0].update(num_labels=3.0, max_length=8.0, limit=4.0)

    task = load_task_file(_spec_variant(text_setting, tmp_path, floats)).tasks[0]
    assert (task.num_labels, task.max_length, task.limit) == (3, 8, 4)
    assert all(type(value) is int for value in (task.num_labels, task.max_length, task.limit))


def test_base_overrides_the_spec_s_base_model(text_setting, tmp_path):
    """With `base_model` in the spec, `--base` (a copy of the base) was refused as 'differs from the base the
    adapters were trained on' while the same --base was taken from a spec without `base_model`: --base
    overrides the spec's base, as its help says."""
    import shutil

    copy = shutil.copytree(text_setting.base, tmp_path / "base_copy")  # the spec names the copy, the adapters
    spec = _spec_variant(text_setting, tmp_path, lambda content: content.update(base_model=str(copy)))  # the original
    args = ["eval", "--adapters", *text_setting.adapter_args(), "--tasks", spec, "--threads", "1", "--val-limit", "4"]
    assert "--allow-base-mismatch overrides" in invoke_cli(args).stderr  # (without --base: refused, as before)
    result = invoke_cli([*args, "--base", copy])
    assert result.exit_code == 0, result.stderr


def test_image_folders_without_labels_share_one_class_numbering_across_splits(tmp_path):
    """Without `labels`, each split numbered its own class folders: a validation split without class 5 made
    folder '6' class 5 there and class 6 in the test split, and the scores were silently wrong."""
    from PIL import Image

    from loramerge_cli.evaluation.data import load_examples
    from loramerge_cli.evaluation.specs import load_task_file

    for split, classes in (("validation", "01346"), ("test", "01245")):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / split / name / "x.png")
    import yaml

    task = {"name": "digits", "data": {"validation": "validation", "test": "test"}}
    spec = tmp_path / "tasks.yaml"
    spec.write_text(yaml.safe_dump({"model_type": "image-classification", "tasks": [task]}))
    task_file = load_task_file(spec)
    numbering = {}
    for split in ("validation", "test"):
        examples = load_examples(task_file, task_file.tasks[0], split)
        for path, label in zip(examples.inputs, examples.labels):
            assert numbering.setdefault(Path(path).parent.name, label) == label
    assert numbering == {name: index for index, name in enumerate("0123456")}
    spec.write_text(yaml.safe_dump({"model_type": "image-classification", "tasks": [{**task, "num_labels": 10}]}))
    examples = load_examples(load_task_file(spec), load_task_file(spec).tasks[0], "test")  # folders 0 … 6 of a
    assert {Path(path).parent.name: label for path, label in zip(examples.inputs, examples.labels)} == {  # 10-wide
        name: int(name) for name in "01245"}  # head: named by their indices, which they keep
    for name in "01245":
        (tmp_path / "test" / name).rename(tmp_path / "test" / f"c{name}")
    (tmp_path / "validation").rename(tmp_path / "elsewhere")
    spec.write_text(yaml.safe_dump({"model_type": "image-classification",
                                    "tasks": [{**task, "data": {"test": "test"}, "num_labels": 10}]}))
    with pytest.raises(LoramergeError, match="the 5 class folders of the task's splits .* num_labels is 10"):
        load_examples(load_task_file(spec), load_task_file(spec).tasks[0], "test")


# --- inputs (a hostile review of inspect, merge and apply-mask) -----------------------------------------------

def _variant(folder, tmp_path, name, change) -> Path:
    """A copy of an adapter folder with its tensors changed by `change(tensors)`."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(folder, tmp_path / name)
    tensors = load_file(copy / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, copy / "adapter_model.safetensors", metadata={"format": "pt"})
    return copy


def _one_line(result, words: str, code: int = 1) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr, result.stderr
    assert words in result.stderr, result.stderr


def test_a_non_finite_head_or_a_float8_factor_is_refused_when_the_adapter_is_read(folders, tmp_path):
    """A NaN in an adapter's head passed `inspect` ("merge would refuse: nothing") and `merge --lambda auto`
    failed after scoring with "outputs are NaN … a λ too large?"; a float8 factor crashed every command
    ("internal error: NotImplementedError: isfinite not implemented for Float8_e4m3fn")."""
    import torch

    def nan_head(tensors):
        key = next(key for key in tensors if key.endswith("score.weight"))
        tensors[key][0, 0] = float("nan")

    def float8(tensors):
        key = next(key for key in tensors if key.endswith("lora_A.weight"))
        tensors[key] = tensors[key].to(torch.float8_e4m3fn)

    head = _variant(folders["a"], tmp_path, "head", nan_head)
    _one_line(invoke_cli(["inspect", head, folders["b"]]), "score.weight has NaN or Inf values")
    _one_line(invoke_cli(["inspect", _variant(folders["a"], tmp_path, "f8", float8), folders["b"]]),
              "is float8_e4m3fn, which is not supported")


def test_apply_mask_warns_about_a_bare_file_and_refuses_a_copy_that_overflows_its_dtype(folders, tmp_path):
    """apply-mask read a bare .safetensors with lora_alpha = r without the warning merge gives, and wrote float16
    copies whose update scale·B·A is beyond float16's range (merge refuses the same input)."""
    import shutil

    bare = tmp_path / "bare.safetensors"
    shutil.copy(folders["a"] / "adapter_model.safetensors", bare)
    result = invoke_cli(["apply-mask", "--adapters", f"a={bare}", folders["b"], "--indices", "[0]", "--out",
                         tmp_path / "pruned", "--json"])
    assert result.exit_code == 0, result.stderr
    assert any("lora_alpha = r" in line for line in json.loads(result.stdout)["warnings"])

    def huge(tensors):
        for key in tensors:
            if "lora_" in key:
                tensors[key] *= 3e3

    big = _variant(folders["a"], tmp_path, "big", huge)
    refused = invoke_cli(["apply-mask", "--adapters", big, folders["b"], "--indices", "[0]", "--out",
                          tmp_path / "pruned16", "--dtype", "float16"])
    _one_line(refused, "beyond the range of float16")
    assert not (tmp_path / "pruned16").exists()


def test_hand_edited_tables_are_checked_for_what_they_leave_out(folders, tmp_path):
    """A table's `merger` with a misspelt setting (`densty`) merged at the default density; a module table that
    left out modules kept them at weight 1; an `adapters` list shorter than the tasks skipped the hash check."""
    adapters = api.load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    table = replace(api.ones_table(adapters), merger={"merger": "ties", "densty": 0.3})
    with pytest.raises(LoramergeError, match="unknown setting 'densty'"):
        api.plan_merge(adapters, api.MergeConfig(), table)
    paths = sorted({path for adapter in adapters for path in adapter.modules})
    partial = api.WeightTable([a.name for a in adapters], paths[1:], [[1.0] * (len(paths) - 1)] * 3, unit="module")
    with pytest.raises(LoramergeError, match="missing"):
        api.check_table(partial, adapters)
    api.check_table(replace(partial, units=paths[::-1], weights=[[1.0] * len(paths)] * 3), adapters)
    short = replace(api.ones_table(adapters), adapters=api.ones_table(adapters).adapters[:2])
    with pytest.raises(LoramergeError, match="lists 2 adapters for its 3 tasks"):
        api.check_table(short, adapters)


def test_apply_mask_refuses_a_task_named_like_its_own_files(folders, tmp_path):
    """A task named `mask.json` or `loramerge.yaml` failed at write time, naming a staging folder."""
    for name in ("mask.json", "loramerge.yaml"):
        result = invoke_cli(["apply-mask", "--adapters", f"{name}={folders['a']}", folders["b"], "--indices", "[0]",
                             "--out", tmp_path / "pruned"])
        _one_line(result, f"task name {name!r} is the name of a file apply-mask writes", code=2)


@pytest.mark.parametrize("exists", [True, False])
def test_bases_named_by_equivalent_paths_are_one_base(folders, tmp_path, exists):
    """`…/base/` or `…/./base` in one adapter's config and `…/base` in another's: "adapters come from different
    base models", passable only with --allow-base-mismatch (which also switches off the real checks), also for
    paths of the machine the adapters were trained on."""
    import shutil

    root = str(tmp_path) if exists else "/cluster/models"
    if exists:
        (tmp_path / "base").mkdir()
    spellings = {"a": f"{root}/base", "b": f"{root}/./base/"}
    named = {}
    for name, spelling in spellings.items():
        named[name] = shutil.copytree(folders[name], tmp_path / name)
        config = json.loads((named[name] / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = spelling
        (named[name] / "adapter_config.json").write_text(json.dumps(config))
    result = invoke_cli(["merge", "--adapters", named["a"], named["b"], "--merger", "ta", "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    written = json.loads((tmp_path / "m" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert written == f"{root}/base"  # the plain spelling, whatever the adapters' order


def test_a_module_table_that_lists_a_module_twice_is_refused(folders):
    """A table built in code with a module twice passed the 'every module' check; one weight was ignored."""
    adapters = api.load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    paths = sorted({path for adapter in adapters for path in adapter.modules})
    table = api.WeightTable([a.name for a in adapters], paths + paths[:1], [[1.0] * len(paths) + [0.0]] * 3,
                            unit="module")
    with pytest.raises(LoramergeError, match="twice"):
        api.check_table(table, adapters)


def test_merge_with_regmean_reads_a_spec_without_labels(text_setting, tmp_path):
    """RegMean reads the tasks' inputs, never a label: `merge --merger regmean --tasks` refused a label-free spec
    once labelled commands checked for labels (the library took it)."""
    spec = _spec_variant(text_setting, tmp_path, lambda c: [task.pop("label") for task in c["tasks"]])
    result = invoke_cli(["merge", "--adapters", *text_setting.adapter_args(), "--merger", "regmean", "--tasks", spec,
                         "--threads", "1", "--val-limit", "4", "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    auto = invoke_cli(["merge", "--adapters", *text_setting.adapter_args(), "--merger", "ta", "--lambda", "auto",
                       "--tasks", spec, "--out", tmp_path / "m2"])
    assert auto.exit_code == 1 and "accuracy needs labels" in auto.stderr


# --- task specs (a hostile review of eval, specs and NSC) -------------------------------------------------------

def test_spec_files_take_yaml_merge_keys_and_refuse_a_json_key_given_twice(tmp_path):
    """`<<: *defaults` was refused with the parser's "could not determine a constructor for the tag
    'tag:yaml.org,2002:merge'"; a JSON Lines row with `"label": 1, "label": 2` was read silently (the last wins),
    where YAML and CSV refuse a repeated key."""
    from loramerge_cli.evaluation.data import check_data
    from loramerge_cli.evaluation.specs import load_task_file

    (tmp_path / "v.jsonl").write_text('{"text": "a b", "label": 1}\n')
    spec = tmp_path / "tasks.yaml"
    spec.write_text("model_type: sequence-classification\n"
                    "tasks:\n"
                    "  - &first {name: one, data: {validation: v.jsonl}, text: text, label: label, num_labels: 3}\n"
                    "  - <<: *first\n"
                    "    name: two\n")
    task_file = load_task_file(spec)
    assert [task.name for task in task_file.tasks] == ["one", "two"] and task_file.tasks[1].num_labels == 3
    check_data(task_file)
    (tmp_path / "v.jsonl").write_text('{"text": "a b", "label": 1, "meta": {"x": 1, "x": 2}}\n')
    check_data(task_file)  # a nested object no task reads may repeat its keys
    (tmp_path / "v.jsonl").write_text('{"text": "a b", "label": 1, "label": 2}\n')
    with pytest.raises(LoramergeError, match="v.jsonl line 1: column 'label' appears twice"):
        check_data(task_file)


def test_a_missing_base_folder_and_two_adapters_of_one_name_are_named_as_such(text_setting, tmp_path):
    """`eval --base /nonexist` said "cannot load its tokenizer … Repo id must use alphanumeric chars" after the
    adapters were read; two adapters named `a` were reported as "no task for adapter(s) a, a"."""
    from loramerge_cli.api import EvalSettings

    with pytest.raises(LoramergeError, match="--base /nonexist: no such folder"):
        api.plan_eval(text_setting.tasks_file, text_setting.adapter_args(), [], EvalSettings(threads=1),
                      base="/nonexist")
    merge = invoke_cli(["merge", "--adapters", *text_setting.adapter_args(), "--merger", "ta", "--lambda", "auto",
                        "--tasks", text_setting.tasks_file, "--base", "/nonexist", "--out", tmp_path / "m"])
    _one_line(merge, "--base /nonexist: no such folder")
    with pytest.raises(LoramergeError, match="--base /nonexist: no such folder"):  # the library's merge, planned
        api.TaskData(text_setting.tasks_file, base="/nonexist")
    folder = text_setting.adapter_args()[0].split("=", 1)[1]
    with pytest.raises(LoramergeError, match="two adapters are named 'a' .*, .*; name them"):
        api.plan_eval(text_setting.tasks_file, [f"a={folder}", f"a={folder}"], [], EvalSettings(threads=1))
    adapters = api.load_adapters(text_setting.adapter_args())  # the library, from loaded adapters: when the base
    with pytest.raises(LoramergeError, match="--base /nonexist: no such folder"):  # is chosen, not the tokenizer
        api.evaluate(text_setting.tasks_file, adapters, [], EvalSettings(threads=1, val_limit=4), base="/nonexist")
    gone = _spec_variant(text_setting, tmp_path, lambda c: c.update(base_model="/nonexist/base"))
    with pytest.raises(LoramergeError, match=r"tasks.yaml: base_model: /nonexist/base: no such folder"):
        api.evaluate(gone, adapters, [], EvalSettings(threads=1, val_limit=4), allow_base_mismatch=True)


@pytest.mark.parametrize("model_type, field, value", [
    (None, "image", "picture"),  # an image spec without its model_type: the default reads text
    ("sequence-classification", "length_normalize", True),
    ("sequence-classification", "prompt", "{text}"),
    ("image-classification", "max_length", 8),
])
def test_a_field_the_model_type_does_not_read_is_refused(tmp_path, model_type, field, value):
    """`image:`, `length_normalize:` and an image task's `max_length` were accepted and ignored; a `prompt` on a
    sequence-classification task was reported as `choices`; an image spec without model_type said only
    "tasks[0].text: required field is missing"."""
    import yaml

    from loramerge_cli.evaluation.specs import load_task_file

    (tmp_path / "v.jsonl").write_text('{"text": "a b", "label": 1}\n')
    task = {"name": "one", "data": {"validation": "v.jsonl"}, "label": "label", field: value}
    if model_type != "image-classification" and field != "image":
        task["text"] = "text"
    spec = tmp_path / "tasks.yaml"
    spec.write_text(yaml.safe_dump({**({"model_type": model_type} if model_type else {}), "tasks": [task]}))
    with pytest.raises(LoramergeError, match=rf"tasks\[0\]\.{field}: model_type is .* do not read '{field}'"):
        load_task_file(spec)


def test_a_recipe_cannot_ask_to_replace_an_output(folders, tmp_path):
    """A recipe holding `force: true` replaced an existing output without --force being typed (the README: an
    output is replaced only with --force)."""
    (tmp_path / "r.yaml").write_text(f"adapters: {{a: {folders['a']}, b: {folders['b']}}}\nmerger: ta\nforce: true\n")
    result = invoke_cli(["merge", "--config", tmp_path / "r.yaml", "--out", tmp_path / "m"])
    assert result.exit_code == 2 and "force is given on the command line only" in result.stderr, result.stderr
    assert not (tmp_path / "m").exists()
    for value in ("false", "null"):  # asks for nothing
        (tmp_path / "r.yaml").write_text(f"adapters: {{a: {folders['a']}}}\nmerger: ta\nforce: {value}\n")
        assert invoke_cli(["merge", "--config", tmp_path / "r.yaml", "--out", tmp_path / value]).exit_code == 0


def test_an_empty_merge_known_from_its_settings_is_refused_before_merging(folders, tmp_path):
    """An all-zero table, `--lambda 0` or all `--weights` 0 merged every module, then "the merge is empty"; the
    plan (before any merge) refuses them now."""
    adapters = api.load_adapters([f"{name}={folder}" for name, folder in folders.items()])
    zeros = replace(api.ones_table(adapters), weights=[[0.0] * len(api.ones_table(adapters).units)] * 3)
    for config, table, why in ((api.MergeConfig(lam=0.0), None, "λ = 0"),
                               (api.MergeConfig(), zeros, "every weight of the table is 0"),
                               (api.MergeConfig(weights=[0.0, 0.0, 0.0]), None, "every --weights value is 0")):
        with pytest.raises(LoramergeError, match=f"the merge is empty \\({why}\\)"):
            api.plan_merge(adapters, config, table, out=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_head_file_that_is_not_safetensors_and_a_missing_adapter_path_are_spec_errors(text_setting, tmp_path):
    """`head: notes.txt` and `adapter: ./gone` in a task failed once the adapters (or the base) had loaded."""
    from loramerge_cli.evaluation.specs import load_task_file

    (tmp_path / "notes.txt").write_text("not a head")
    bad_head = _spec_variant(text_setting, tmp_path, lambda c: c["tasks"][0].update(head=str(tmp_path / "notes.txt")))
    with pytest.raises(LoramergeError, match=r"tasks\[0\]\.head: .*notes.txt is not a readable safetensors file"):
        load_task_file(bad_head)
    for missing in ("./gone", "gone.safetensors"):  # (the loader reads a Hub id as org/name only)
        gone = _spec_variant(text_setting, tmp_path, lambda c: c["tasks"][0].update(adapter=missing))
        with pytest.raises(LoramergeError, match=rf"tasks\[0\]\.adapter: no such file or folder {missing}"):
            load_task_file(gone)
    hub = _spec_variant(text_setting, tmp_path, lambda c: c["tasks"][0].update(adapter="org/name@main"))
    load_task_file(hub)  # a Hub id is resolved when the adapters are matched


def test_worker_and_device_flags_that_cannot_work_are_usage_errors(text_setting, tmp_path):
    """`--workers 100000` started a process per worker (load 19 on 2 cores, nothing printed for a minute);
    `--devices cpu,,cpu` dropped the empty entry silently; `--device foo` exited 1 (a data error) where a flag
    value that cannot work exits 2."""
    import os

    base = ["search-mask", "--adapters", *text_setting.adapter_args(), "--tasks", text_setting.tasks_file, "--out",
            tmp_path / "t.json"]
    more = 4 * len(os.sched_getaffinity(0)) + 1  # four per CPU this process may use, plus one
    for extra, words in ((["--workers", str(more)], "workers beyond the CPUs only compete"),
                         (["--device", "cpu:0", "--workers", str(more)], "workers beyond the CPUs only compete"),
                         (["--devices", ",".join(["cpu"] * more)], "workers beyond the CPUs only compete"),
                         (["--devices", "cpu,,cpu"], "an empty entry"),
                         (["--device", "foo"], "'foo' is not a device")):
        result = invoke_cli([*base, *extra])
        assert result.exit_code == 2 and words in result.stderr, (extra, result.exit_code, result.stderr)
    cuda = invoke_cli([*base, "--device", "cuda", "--workers", "2"])  # named by the flag given (not --devices)
    assert cuda.exit_code == 1 and "--device cuda: CUDA is not available" in cuda.stderr, cuda.stderr
