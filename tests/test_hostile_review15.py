"""A hostile user's review of files and inputs: each test failed before its fix."""

import json
import shutil

import pytest

from factories import invoke_cli


def _sources(folders):
    return [str(folders[name]) for name in "ab"]


def test_force_never_deletes_what_loramerge_did_not_write_in_its_output(folders, tmp_path):
    """`merge --force` replaced a merge folder whole: a finished search run inside it (search/), the user's notes
    and an eval report were deleted without a word; apply-mask --force did the same inside OUT/<task>/."""
    out = tmp_path / "merged"
    assert invoke_cli(["merge", "--adapters", *_sources(folders), "--out", out]).exit_code == 0
    (out / "search").mkdir()
    (out / "search" / "best.json").write_text("{}")
    (out / "NOTES.md").write_text("mine")
    again = invoke_cli(["merge", "--adapters", *_sources(folders), "--merger", "ties", "--out", out, "--force"])
    assert again.exit_code == 1 and "merged/NOTES.md, merged/search/" in again.stderr
    assert again.stderr.count("\n") == 1 and (out / "NOTES.md").read_text() == "mine"
    shutil.rmtree(out / "search")
    (out / "NOTES.md").unlink()
    assert invoke_cli(["merge", "--adapters", *_sources(folders), "--merger", "ties", "--out", out,
                       "--force"]).exit_code == 0  # what loramerge wrote alone is replaced
    _apply_mask_force_keeps(folders, tmp_path, "extra_checkpoint.pt")


def _apply_mask_force_keeps(folders, tmp_path, name: str) -> None:
    """apply-mask --force over its own output refuses, naming it, a file `name` put into a task's folder."""
    pruned = tmp_path / "pruned"
    assert invoke_cli(["apply-mask", "--adapters", *_sources(folders), "--indices", "[0]", "--out",
                       pruned]).exit_code == 0
    (pruned / "a" / name).write_text("mine")
    refused = invoke_cli(["apply-mask", "--adapters", *_sources(folders), "--indices", "[1]", "--out", pruned,
                          "--force"])
    assert refused.exit_code == 1 and f"pruned/a/{name}" in refused.stderr
    assert (pruned / "a" / name).read_text() == "mine"


@pytest.mark.parametrize("line", ["revision: 2024-13-01", "seed: 1" + "0" * 5000])
def test_a_recipe_value_yaml_cannot_build_is_one_line(folders, tmp_path, line):
    """An impossible date or a 5,001-digit integer in a recipe: a 40-line traceback (ValueError out of PyYAML),
    in every command."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"adapters:\n  a: {folders['a']}\n  b: {folders['b']}\n{line}\n")
    for command in ("merge", "inspect"):
        result = invoke_cli([command, "--config", recipe, "--out", tmp_path / "o"] if command == "merge"
                            else [command, "--config", recipe])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, (command, result.stderr)
        assert "is not valid YAML at line 4" in result.stderr and "Traceback" not in result.stderr


def test_a_task_spec_value_yaml_cannot_build_is_one_line(text_setting, tmp_path):
    text = text_setting.tasks_file.read_text().replace("num_labels: 3", "num_labels: 3\n  limit: 2024-13-45", 1)
    (tmp_path / "tasks.yaml").write_text(text.replace("data/", f"{text_setting.root}/data/"))
    result = invoke_cli(["eval", "--adapters", *text_setting.adapter_args(), "--tasks", tmp_path / "tasks.yaml"])
    assert result.exit_code == 1 and "not valid YAML at line" in result.stderr and "internal" not in result.stderr


def test_numbers_json_cannot_convert_are_one_line_data_errors(folders, tmp_path):
    """A 5,001-digit number in a mask or in adapter_config.json: `internal error: ValueError: Exceeds the limit
    (4300 digits)` (rerun with --debug), and the file unnamed."""
    from loramerge_cli import api

    table = api.ones_table(api.load_adapters(_sources(folders))).to_json()
    text = json.dumps(table).replace("1.0", "1" * 5001, 1)
    (tmp_path / "mask.json").write_text(text)
    result = invoke_cli(["merge", "--adapters", *_sources(folders), "--mask", tmp_path / "mask.json", "--out",
                         tmp_path / "o"])
    assert result.exit_code == 1 and "mask.json: not a readable JSON mask" in result.stderr
    shutil.copytree(folders["a"], tmp_path / "a")
    config = (tmp_path / "a" / "adapter_config.json").read_text()
    (tmp_path / "a" / "adapter_config.json").write_text(config.replace('"r": 2', '"r": ' + "2" * 5001))
    for command in (["inspect", tmp_path / "a"], ["merge", "--adapters", tmp_path / "a", folders["b"], "--out",
                                                  tmp_path / "o"]):
        result = invoke_cli(command)
        assert result.exit_code == 1 and "not a readable JSON adapter config" in result.stderr, result.stderr


def test_eval_refuses_a_merged_folder_of_another_model_before_scoring(text_setting, folders):
    """`eval --merged` of an adapter for another model failed only after the experts and the base were scored,
    naming "candidate" instead of the folder."""
    args = ["eval", "--adapters", *text_setting.adapter_args(), "--tasks", text_setting.tasks_file, "--merged",
            folders["a"]]
    result = invoke_cli(args)  # its config names another base: refused before the model loads
    assert result.exit_code == 1 and f"--merged {folders['a']}: made for the base" in result.stderr
    result = invoke_cli([*args, "--allow-base-mismatch"])  # and its modules do not fit this one's
    assert result.exit_code == 1 and f"--merged {folders['a']}: module" in result.stderr
    assert "experts" not in result.stderr and "base model:" not in result.stderr


@pytest.mark.parametrize("change", [{"target_modules": ".*q_proj"}, {"layers_to_transform": [0]},
                                    {"exclude_modules": ["model.layers.1.self_attn.v_proj"]}])
def test_weights_peft_would_not_load_are_refused(folders, tmp_path, change):
    """A config whose target_modules (a regex), layers_to_transform or exclude_modules leave out modules whose
    weights are in the file: PEFT does not load them, loramerge merged them (1.2 relative error against PEFT)."""
    shutil.copytree(folders["a"], tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    if "target_modules" not in change:
        config["target_modules"] = ["q_proj", "v_proj"]
    config.update(change)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    result = invoke_cli(["merge", "--adapters", tmp_path / "a", folders["b"], "--out", tmp_path / "o"])
    assert result.exit_code == 1 and "PEFT would not load them" in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()
    config.update({"target_modules": "all-linear", "layers_to_transform": None, "exclude_modules": None})
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    assert invoke_cli(["inspect", tmp_path / "a"]).exit_code == 0


def test_a_merger_beside_a_recorded_method_is_a_conflict(folders, tmp_path):
    """A hand-written table recording `{"method": "ties"}` and no merger: --merger tsv was ignored in silence (the
    summary said "tsv (method ties)" and ties ran)."""
    from loramerge_cli import api

    table = api.ones_table(api.load_adapters(_sources(folders))).to_json()
    table["merger"] = {"method": "ties", "density": 0.5}
    (tmp_path / "t.json").write_text(json.dumps(table))
    args = ["merge", "--adapters", *_sources(folders), "--mask", tmp_path / "t.json"]
    result = invoke_cli([*args, "--merger", "tsv", "--out", tmp_path / "o"])
    assert result.exit_code == 2 and "--merger tsv (method tsv) conflicts with the mask's recorded method ties" in \
        result.stderr
    assert invoke_cli([*args, "--merger", "tsv", "--override", "--out", tmp_path / "o"]).exit_code == 0
    assert invoke_cli([*args, "--merger", "ties", "--out", tmp_path / "o2"]).exit_code == 0


def test_a_recipe_s_yaml_boolean_is_no_number(folders, tmp_path):
    """`seed: true` in a recipe became seed 1 (Python's True), while `--seed true` exits 2."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"adapters:\n  a: {folders['a']}\n  b: {folders['b']}\nmerger: dare\nseed: true\n")
    result = invoke_cli(["merge", "--config", recipe, "--out", tmp_path / "o"])
    assert result.exit_code == 2 and "--seed" in result.stderr and not (tmp_path / "o").exists()


def test_flags_that_would_do_nothing_are_refused(text_setting, folders, tmp_path):
    """`eval --split test --val-limit 4` scored every test example without a word; `--knots-scaled` outside the
    knots space was accepted and ignored."""
    result = invoke_cli(["eval", "--adapters", *text_setting.adapter_args(), "--tasks", text_setting.tasks_file,
                         "--split", "test", "--val-limit", "4"])
    assert result.exit_code == 2 and "--val-limit limits the validation split only" in result.stderr
    result = invoke_cli(["merge", "--adapters", *_sources(folders), "--knots-scaled", "--space", "full", "--out",
                         tmp_path / "o"])
    assert result.exit_code == 2 and "--knots-scaled" in result.stderr and not (tmp_path / "o").exists()
    assert invoke_cli(["merge", "--adapters", *_sources(folders), "--merger", "knots", "--knots-scaled", "--out",
                       tmp_path / "k"]).exit_code == 0


def test_a_bare_safetensors_file_read_with_alpha_r_is_said_where_it_is_merged(folders, tmp_path):
    """Only `inspect` said a file without its config is read with lora_alpha = r; merge and eval said nothing,
    though the update is off by α/r."""
    shutil.copy(folders["a"] / "adapter_model.safetensors", tmp_path / "a.safetensors")
    result = invoke_cli(["merge", "--adapters", tmp_path / "a.safetensors", folders["b"], "--out", tmp_path / "o"])
    assert result.exit_code == 0, result.stderr
    assert "warning: adapter 'a' (" in result.stderr and "read with lora_alpha = r" in result.stderr
    provenance = json.loads((tmp_path / "o" / "loramerge.json").read_text())
    assert any("read with lora_alpha = r" in warning for warning in provenance["warnings"])


def test_an_adapter_path_that_is_no_regular_file_says_what_it_is(folders, tmp_path):
    """A FIFO or a folder named adapter_model.safetensors: "folder has no adapter_model.safetensors (found
    adapter_model.safetensors: pass the file itself)"; a link to /dev/zero: "no such file or folder"."""
    import os

    for name, make in (("fifo", os.mkfifo), ("dir", os.mkdir)):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(folders["a"] / "adapter_config.json", folder)
        make(folder / "adapter_model.safetensors")
        result = invoke_cli(["inspect", folder])
        kind = "FIFO" if name == "fifo" else "folder"
        assert result.exit_code == 1 and f"not a regular file (a {kind})" in result.stderr, result.stderr
    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
    result = invoke_cli(["inspect", tmp_path / "zero.safetensors"])
    assert result.exit_code == 1 and "(a character device)" in result.stderr, result.stderr


def test_a_table_weight_that_overflows_the_factors_names_the_table(folders, tmp_path):
    """A weight of 1e300 through apply-mask: "module …: lora_B has NaN or Inf values", the table unnamed."""
    from loramerge_cli import api

    table = api.ones_table(api.load_adapters(_sources(folders))).to_json()
    table["weights"][0][0] = 1e300
    (tmp_path / "t.json").write_text(json.dumps(table))
    result = invoke_cli(["apply-mask", "--adapters", *_sources(folders), "--mask", tmp_path / "t.json", "--out",
                         tmp_path / "p"])
    assert result.exit_code == 1 and "the table's weight 1e+300 for task 'a'" in result.stderr, result.stderr
    assert not (tmp_path / "p").exists()


def test_force_keeps_what_only_looks_like_loramerge_s_files(folders, tmp_path):
    """A second review: `search-mask --out M/mask.json` wrote a table into a merge folder, which `merge --force`
    then deleted as its own; any *.safetensors in a merge's heads/ was taken for a head; files placed in
    apply-mask's task folders under a merge's names were deleted."""
    out = tmp_path / "merged"
    assert invoke_cli(["merge", "--adapters", *_sources(folders), "--out", out]).exit_code == 0
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.outputs import guard_output

    with pytest.raises(LoramergeError, match="takes the name of a file of the merge output"):
        guard_output(out / "mask.json", kind="file")
    guard_output(out / "scores.json", kind="file")  # another name: kept by --force, which refuses then
    (out / "heads" / "my_own_head.safetensors").write_text("mine")
    again = invoke_cli(["merge", "--adapters", *_sources(folders), "--out", out, "--force"])
    assert again.exit_code == 1 and "merged/heads/" in again.stderr
    assert (out / "heads" / "my_own_head.safetensors").read_text() == "mine"
    _apply_mask_force_keeps(folders, tmp_path, "README.md")


def test_a_special_file_named_like_a_hub_id_is_this_path_not_the_hub(tmp_path, monkeypatch):
    import os

    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").mkdir()
    os.mkfifo(tmp_path / "adapters" / "pipe")
    (tmp_path / "adapters" / "rte").symlink_to(tmp_path / "gone")
    for spec, kind in (("adapters/pipe", "FIFO"), ("adapters/rte", "dangling symbolic link")):
        result = invoke_cli(["inspect", spec])
        assert result.exit_code == 1 and f"{spec}: not a regular file or a folder (a {kind})" in result.stderr


def test_a_local_base_that_does_not_exist_is_said(folders, tmp_path):
    """`--base /nonexistent` was written into adapter_config.json and the card without a word; it may be the path on
    the machine that loads the output, so it is written, with a warning."""
    for command in (["merge", "--adapters", *_sources(folders), "--out", tmp_path / "o"],
                    ["apply-mask", "--adapters", *_sources(folders), "--indices", "[0]", "--out", tmp_path / "p"]):
        result = invoke_cli([*command, "--base", tmp_path / "nonexistent"])
        assert result.exit_code == 0 and "no such folder here; written into the configs as given" in result.stderr
    result = invoke_cli(["merge", "--adapters", *_sources(folders), "--out", tmp_path / "hub", "--base",
                         "org/base-model"])
    assert result.exit_code == 0 and "no such folder" not in result.stderr


def test_a_merge_whose_outputs_overflow_is_named(text_setting, tmp_path):
    """NaN or Inf outputs named the task only, not the --merged folder that caused them."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "huge"
    shutil.copytree(text_setting.adapters["alpha"], folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({key: tensor.double() * 1e300 if "lora_B" in key else tensor for key, tensor in tensors.items()},
              folder / "adapter_model.safetensors")  # finite in float64, beyond the model's float32
    result = invoke_cli(["eval", "--adapters", *text_setting.adapter_args(), "--tasks", text_setting.tasks_file,
                         "--merged", folder, "--threads", "1"])
    assert result.exit_code == 1 and f"--merged {folder}: " in result.stderr, result.stderr


def test_a_third_review_s_false_refusals_and_messages(folders, tmp_path, monkeypatch):
    """A merge folder a file browser opened (.DS_Store) could not be replaced with --force, and api.write_adapters'
    output without a table was refused for having no loramerge.json (it has, in each folder); a new mask.json
    inside apply-mask's task folder was refused for a reason that does not hold there;
    `plan_merge(base=Path(...))` raised AttributeError; a cluster path as --base was refused."""
    from pathlib import Path

    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError
    from loramerge_cli.outputs import guard_output

    out = tmp_path / "merged"
    assert invoke_cli(["merge", "--adapters", *_sources(folders), "--out", out]).exit_code == 0
    (out / ".DS_Store").write_text("finder")
    assert invoke_cli(["merge", "--adapters", *_sources(folders), "--out", out, "--force"]).exit_code == 0
    adapters = api.load_adapters(_sources(folders))
    api.write_adapters(adapters, tmp_path / "plain", force=True)
    (tmp_path / "plain" / ".loramerge-adapters.json").unlink()  # then it is as a folder of one's own adapters
    with pytest.raises(LoramergeError, match="holds adapter folders but no mask.json"):  # said "no loramerge.json"
        api.write_adapters(adapters, tmp_path / "plain", force=True)
    assert invoke_cli(["apply-mask", "--adapters", *_sources(folders), "--indices", "[0]", "--out",
                       tmp_path / "pruned"]).exit_code == 0
    guard_output(tmp_path / "pruned" / "a" / "mask.json", kind="file")  # --force of pruned/ would refuse, not delete
    plan = api.plan_merge(adapters, base=Path("/mnt/cluster/llama"), out=tmp_path / "based")
    result = api.execute(plan)
    assert any("--base /mnt/cluster/llama: no such folder here" in warning for warning in result.warnings)
    (tmp_path / "r.yaml").write_text("dtype: bfloat16\n")
    monkeypatch.chdir(tmp_path)
    noted = invoke_cli(["inspect", "--config", tmp_path / "r.yaml", *_sources(folders)])
    assert noted.exit_code == 0 and "inspect does not use dtype" in noted.stderr


def test_a_yaml_boolean_for_a_name_says_to_quote_it(folders, tmp_path):
    """`head: yes` in a recipe said "--head true: no adapter of that name" (YAML 1.1 reads yes as true)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"adapters:\n  a: {folders['a']}\n  'yes': {folders['b']}\nhead: yes\n")
    result = invoke_cli(["merge", "--config", recipe, "--out", tmp_path / "o"])
    assert result.exit_code == 2 and "head: YAML reads this as true" in result.stderr and "quote it" in result.stderr
