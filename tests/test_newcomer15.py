"""A newcomer's trial of the README and docs: each test failed before its fix."""

import json
import shlex

import pytest
from safetensors.torch import load_file

from eval_fixtures import write_jsonl, write_tasks_file
from factories import invoke_cli
from loramerge_cli import api
from loramerge_cli.errors import LoramergeError


def _merge_recipe(text_setting, path):
    adapters = "".join(f"  {name}: {folder}\n" for name, folder in text_setting.adapters.items())
    path.write_text(f"adapters:\n{adapters}merger: ties\ndensity: 0.5\n")
    return path


@pytest.mark.slow
def test_eval_reads_a_merge_recipe_and_says_what_it_does_not_use(text_setting, tmp_path):
    """`eval --config recipe.yaml` with the README's own recipe: exit 2, "unknown key 'merger'", although the
    help says every command takes a recipe."""
    recipe = _merge_recipe(text_setting, tmp_path / "recipe.yaml")
    args = ["eval", "--config", recipe, "--tasks", text_setting.tasks_file, "--val-limit", "4", "--threads", "1"]
    result = invoke_cli(args)
    assert result.exit_code == 0, result.stderr
    assert "note: --config" in result.stderr and "eval does not use merger, density" in result.stderr
    quiet = invoke_cli([*args, "--quiet"])
    assert quiet.exit_code == 0 and "note" not in quiet.stderr


def test_a_recipe_key_no_command_has_is_refused_by_every_command(tmp_path, folders):
    """`inspect --config` skipped any key, even a typo, in silence."""
    (tmp_path / "bad.yaml").write_text(f"adapters:\n  a: {folders['a']}\nbogus: 3\n")
    for command in ("inspect", "merge", "eval"):
        result = invoke_cli([command, "--config", tmp_path / "bad.yaml"])
        assert result.exit_code == 2 and "unknown key 'bogus'" in result.stderr, (command, result.stderr)


def test_apply_mask_names_every_flag_that_reproduces_merge_mask(folders, tmp_path):
    """A ties table searched at density 0.5 and λ 0.7: apply-mask said only "merge them with --lambda 0.7",
    which merges with ta (0.23 off on a knots table). The flags it names now give merge --mask's weights."""
    adapters = api.load_adapters([str(folders[name]) for name in "abc"])
    table = api.ones_table(adapters)
    table.weights[1][0] = 0.0
    table.weights[0][2] = 0.0
    table.merger = {"merger": "ties", "method": "ties", "space": "full", "lambda": 0.7, "density": 0.5}
    table.save(tmp_path / "t.json")
    sources = [str(folders[name]) for name in "abc"]
    pruned = invoke_cli(["apply-mask", "--adapters", *sources, "--mask", tmp_path / "t.json", "--out",
                         tmp_path / "p"])
    assert pruned.exit_code == 0, pruned.stderr
    [line] = [line for line in pruned.stderr.splitlines() if "searched with" in line]
    flags = shlex.split(line.split("`merge ")[1].split("`")[0])
    assert flags == ["--merger", "ties", "--lambda", "0.7", "--density", "0.5"]
    direct = invoke_cli(["merge", "--adapters", *sources, "--mask", tmp_path / "t.json", "--out", tmp_path / "m",
                         "--out-rank", "64"])
    again = invoke_cli(["merge", "--adapters", *[f"{n}={tmp_path / 'p' / n}" for n in "abc"], *flags, "--out",
                        tmp_path / "again", "--out-rank", "64"])
    assert direct.exit_code == 0 and again.exit_code == 0, direct.stderr + again.stderr
    _assert_same_update(tmp_path / "m", tmp_path / "again")


def _assert_same_update(expected_folder, written_folder):
    """Every module's B·A in two merged folders agrees to 1e-5."""
    expected = load_file(expected_folder / "adapter_model.safetensors")
    written = load_file(written_folder / "adapter_model.safetensors")
    for key in {k.removesuffix(".lora_A.weight") for k in expected if k.endswith(".lora_A.weight")}:
        delta = expected[f"{key}.lora_B.weight"] @ expected[f"{key}.lora_A.weight"]
        other = written[f"{key}.lora_B.weight"] @ written[f"{key}.lora_A.weight"]
        assert (delta - other).abs().max() < 1e-5, key


def test_merge_help_gives_each_method_s_default():
    """--density, --drop-rate, --gamma … showed no default at all; --lambda said "else the method's"."""
    result = invoke_cli(["merge", "--help"])
    text = " ".join(result.stdout.split())
    assert "[default: 0.8 (ties, magnitude, dare_ties, breadcrumbs, breadcrumbs_ties, della), 0.9 (knots)]" in text
    assert "[default: 0.1 (dare, dare_ties)]" in text
    assert "the method's: 1/T (ta," in text and "T = the number of adapters" in text
    assert "at a rank of at most the adapters' ranks summed" in text


def test_eval_refuses_length_normalize_on_tasks_without_choices(text_setting):
    """Accepted in silence on a sequence-classification spec (it only changes causal-LM choice scores)."""
    result = invoke_cli(["eval", "--adapters", *text_setting.adapter_args(), "--tasks", text_setting.tasks_file,
                         "--length-normalize"])
    assert result.exit_code == 2 and "have no choices" in result.stderr and "Traceback" not in result.stderr


def test_eval_takes_eval_dtype_as_merge_and_search_mask_do(text_setting):
    result = invoke_cli(["eval", "--adapters", *text_setting.adapter_args(), "--tasks", text_setting.tasks_file,
                         "--eval-dtype", "float64"])
    assert result.exit_code == 2 and "'float64' is not one of" in result.stderr  # the flag exists: its choices


def test_a_bad_data_row_names_its_row_and_file(text_setting, tmp_path):
    """A label of 7 in row 6 of 10,000 said only `tasks[0].label: label 7 is out of range 0..2`."""
    rows = [{"premise": "w1", "hypothesis": "w2", "label": 0} for _ in range(8)]
    rows[5]["label"] = 7
    data = write_jsonl(tmp_path / "val.jsonl", rows)
    spec = write_tasks_file(tmp_path / "tasks.yaml", {
        "base_model": str(text_setting.base), "model_type": "sequence-classification",
        "tasks": [{"name": name, "data": {"validation": str(data)}, "text": ["premise", "hypothesis"],
                   "label": "label", "num_labels": 3} for name in text_setting.adapters]})
    result = invoke_cli(["eval", "--adapters", *text_setting.adapter_args(), "--tasks", spec])
    assert result.exit_code == 1, result.stderr
    assert "label 7 is out of range 0..2 (line 6 of " in result.stderr and "val.jsonl)" in result.stderr


def test_the_library_plans_refuse_a_spec_with_a_task_no_adapter_has(text_setting, tmp_path):
    """api.plan_search and api.plan_eval accepted a spec of three tasks for two adapters; only the search (after
    loading the adapters) refused it, which README's "plan: every check" does not allow."""
    two = text_setting.adapter_args()[:2]
    with pytest.raises(LoramergeError, match="no adapter named 'gamma'"):
        api.plan_eval(text_setting.tasks_file, two)
    request = api.SearchRequest(adapters=two, merge=api.MergeConfig(merger="ta"), tasks=text_setting.tasks_file,
                                eval=api.EvalSettings(threads=1))
    with pytest.raises(LoramergeError, match="no adapter named 'gamma'"):
        api.plan_search(request, out=tmp_path / "mask.json")
    assert not (tmp_path / "mask.json").exists()
    result = invoke_cli(["search-mask", "--adapters", *two, "--tasks", text_setting.tasks_file, "--out",
                         tmp_path / "mask.json"])
    assert result.exit_code == 1 and "no adapter named 'gamma'" in result.stderr
    assert json.dumps(sorted(text_setting.adapters)) == '["alpha", "beta", "gamma"]'


def test_apply_mask_flags_hold_when_a_task_is_pruned_entirely(text_setting, tmp_path):
    """A second review: with the first task pruned entirely, the printed `--weights` and `--density` lists kept
    four values for three adapters (refused), the default λ was left out (1/3 instead of merge --mask's 1/4),
    and λ = 1/3 printed as 0.333333."""
    sources = text_setting.adapter_args()
    adapters = api.load_adapters(sources)
    table = api.ones_table(adapters)
    table.weights[0] = [0.0] * len(table.weights[0])
    table.merger = {"merger": "ties", "lambda": 1 / 3, "weights": [0.5, 1.5, 2.0], "density": [0.2, 0.4, 0.6]}
    table.save(tmp_path / "t.json")
    pruned = invoke_cli(["apply-mask", "--adapters", *sources, "--mask", tmp_path / "t.json", "--out", tmp_path / "p"])
    assert pruned.exit_code == 0, pruned.stderr
    [line] = [line for line in pruned.stderr.splitlines() if "searched with" in line]
    flags = shlex.split(line.split("`merge ")[1].split("`")[0])
    assert flags == ["--merger", "ties", "--lambda", "0.3333333333333333", "--weights", "1.5,2", "--density",
                     "0.4,0.6"]
    direct = invoke_cli(["merge", "--adapters", *sources, "--mask", tmp_path / "t.json", "--out", tmp_path / "m",
                         "--out-rank", "64"])
    again = invoke_cli(["merge", "--adapters", *[f"{n}={tmp_path / 'p' / n}" for n in ("beta", "gamma")], *flags,
                        "--out",
                        tmp_path / "again", "--out-rank", "64"])
    assert direct.exit_code == 0 and again.exit_code == 0, direct.stderr + again.stderr
    _assert_same_update(tmp_path / "m", tmp_path / "again")


def test_a_bad_row_after_blank_lines_is_named_by_its_file_line(text_setting, tmp_path):
    """A second review: "row 4" named the fourth row of a JSON Lines file whose blank lines put it on line 6,
    while a syntax error there is named by its line."""
    rows = [json.dumps({"premise": "w1", "hypothesis": "w2", "label": label}) for label in (0, 1, 2, 9)]
    (tmp_path / "val.jsonl").write_text("\n\n" + "\n".join(rows) + "\n")
    spec = write_tasks_file(tmp_path / "tasks.yaml", {
        "base_model": str(text_setting.base), "model_type": "sequence-classification",
        "tasks": [{"name": name, "data": {"validation": str(tmp_path / "val.jsonl")}, "text": ["premise", "hypothesis"],
                   "label": "label", "num_labels": 3} for name in text_setting.adapters]})
    result = invoke_cli(["eval", "--adapters", *text_setting.adapter_args(), "--tasks", spec])
    assert result.exit_code == 1 and "label 9 is out of range 0..2 (line 6 of " in result.stderr, result.stderr


def test_the_recorded_command_names_its_paths_from_the_output_folder(folders, tmp_path, monkeypatch):
    """apply-mask's OUT/<task>/loramerge.json recorded `--mask mask.json --out pruned/` as typed (relative to the
    folder it ran in), so the command could not be run from the folder; absolute paths were made relative."""
    import os
    import shutil

    monkeypatch.chdir(tmp_path)
    adapters = api.load_adapters([str(folders[name]) for name in "abc"])
    api.ones_table(adapters).save(tmp_path / "mask.json")
    for name in "abc":
        shutil.copytree(folders[name], tmp_path / name)
    assert invoke_cli(["apply-mask", "--adapters", "a", "b", "c", "--mask", "mask.json", "--out",
                       "pruned"]).exit_code == 0
    folder = tmp_path / "pruned" / "a"
    command = shlex.split(json.loads((folder / "loramerge.json").read_text())["command"])
    values = {flag: command[index + 1] for index, flag in enumerate(command) if flag in ("--mask", "--out")}
    assert os.path.samefile(folder / values["--mask"], tmp_path / "mask.json")
    assert os.path.samefile(folder / values["--out"], tmp_path / "pruned")
    assert os.path.samefile(folder / command[command.index("--adapters") + 1], tmp_path / "a")
