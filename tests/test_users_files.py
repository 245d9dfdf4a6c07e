"""Users' files under hostile command lines: no output over, holding or inside an input (adapter folders, the
task spec and its data, a run dir), a refused command leaves nothing behind, and the refusals are one line
with the right exit code. Each case was a defect found by a hostile review of 7fdeefc."""

from __future__ import annotations

import pytest
import yaml
from eval_fixtures import build_text_setting, write_tasks_file
from factories import invoke_cli


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("review"))


def _spec_without_last_task(setting, tmp_path):
    spec = yaml.safe_load(setting.tasks_file.read_text())
    spec["tasks"] = spec["tasks"][:-1]
    return write_tasks_file(tmp_path / "tasks.yaml", spec)


def test_regmean_with_a_task_spec_missing_an_adapters_task_is_one_line_not_an_internal_error(setting, tmp_path):
    """merge --merger regmean --tasks SPEC where SPEC has no task for one adapter: was `internal error:
    KeyError: 'gamma'` after the model loaded; search-mask refuses the same spec in one line."""
    spec = _spec_without_last_task(setting, tmp_path)
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "regmean", "--tasks", spec,
                         "--val-limit", "4", "--threads", "1", "--quiet", "--out", tmp_path / "out"])
    assert result.exit_code == 1
    assert "internal error" not in result.stderr and "gamma" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_lambda_auto_refuses_a_task_spec_missing_an_adapters_task(setting, tmp_path):
    """merge --lambda auto with a spec that has no task for one adapter tuned λ on the others silently (exit
    0); search-mask refuses the same spec ("no task for adapter(s) gamma")."""
    spec = _spec_without_last_task(setting, tmp_path)
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "ta", "--lambda", "auto",
                         "--tasks", spec, "--val-limit", "4", "--threads", "1", "--quiet", "--out", tmp_path / "o"])
    assert result.exit_code == 1 and "gamma" in result.stderr


def test_merge_with_tasks_does_not_write_into_the_task_data(setting, tmp_path):
    """The task spec's data is an input of `--lambda auto` and `--merger regmean`: an --out inside a split
    given as a folder (an image-folder split would gain a class) was accepted; only the spec was protected."""
    from loramerge_cli import api
    from loramerge_cli.errors import LoramergeError

    split = tmp_path / "images" / "validation"
    for name in ("cat", "dog"):
        (split / name).mkdir(parents=True)
    spec = write_tasks_file(tmp_path / "tasks.yaml", {"model_type": "image-classification", "tasks": [
        {"name": name, "data": {"validation": str(split)}} for name in setting.adapters]})
    adapters = api.load_adapters(setting.adapter_args())
    for out in (split / "merged", split / "cat" / "merged"):
        with pytest.raises(LoramergeError, match="is inside the input"):
            api.plan_merge(adapters, api.MergeConfig(merger="regmean"), data=api.TaskData(spec), out=out)
        with pytest.raises(LoramergeError, match="is inside the input"):
            api.plan_merge(adapters, api.MergeConfig(merger="ta"), tuning=api.TaskData(spec), out=out)
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "regmean", "--tasks",
                         setting.tasks_file, "--quiet", "--force", "--out", setting.tasks_file.parent / "data"])
    assert result.exit_code == 1 and "holds the input" in result.stderr  # the folder holding the data files


def test_run_dir_inside_an_input_adapter_is_refused_before_writing(setting, tmp_path):
    """--run-dir pointing at an input adapter's folder: config.json and .lock were written into it."""
    import shutil

    adapter = tmp_path / "alpha"  # a copy: the shared setting stays intact if the guard ever fails
    shutil.copytree(setting.adapters["alpha"], adapter)
    before = sorted(p.name for p in adapter.iterdir())
    adapters = [f"alpha={adapter}" if arg.startswith("alpha=") else arg for arg in setting.adapter_args()]
    result = invoke_cli(["search-mask", "--strategy", "screened", "--adapters", *adapters, "--merger", "ta", "--tasks",
                         setting.tasks_file, "--popsize", "2", "--generations", "1", "--val-limit", "2",
                         "--threads", "1", "--quiet", "--run-dir", adapter, "--out", tmp_path / "mask.json"])
    assert sorted(p.name for p in adapter.iterdir()) == before
    assert result.exit_code == 1


def test_a_refused_search_leaves_no_run_dir_behind(setting, tmp_path):
    """A bad --base (a missing local folder) was found only when the model loaded, after the run dir's
    config.json and .lock had been written."""
    run_dir = tmp_path / "run"
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *setting.adapter_args(), "--merger", "ta", "--tasks",
                         setting.tasks_file, "--popsize", "2", "--generations", "1", "--val-limit", "2",
                         "--threads", "1", "--quiet", "--base", tmp_path / "no_such_base", "--run-dir", run_dir,
                         "--out", tmp_path / "mask.json"])
    assert result.exit_code == 1
    assert not (run_dir / "config.json").exists()


def test_force_does_not_replace_a_folder_of_merges():
    """`merge --out OUTS --force` where OUTS holds two earlier merges (each with loramerge.json) deleted both:
    a folder of adapter folders counts as 'written by loramerge' even without apply-mask's mask.json."""
    import tempfile
    from pathlib import Path

    from loramerge_cli.outputs import written_by_loramerge

    with tempfile.TemporaryDirectory() as folder:
        outs = Path(folder)
        for name in ("my_best_merge", "another_merge"):
            (outs / name).mkdir()
            (outs / name / "loramerge.json").write_text('{"format": "loramerge.provenance/v1"}')
        assert not written_by_loramerge(outs)


def test_half_open_bounds_read_well_in_help():
    """`merge --help` shows 'Allowed: [0, .' for a parameter with only a lower bound (--clusters)."""
    from loramerge_cli.merging.registry import PARAMETERS

    for parameter in PARAMETERS.values():
        bounds = parameter.bounds()
        assert not bounds.endswith(", ") and not bounds.startswith(", "), (parameter.name, bounds)


def test_eval_out_never_overwrites_the_task_spec_or_a_users_file(setting, tmp_path):
    """`eval --out FILE` bypassed the output guard: it silently replaced the input tasks.yaml, a user's own
    file, or a search's mask.json (exit 0; eval has no --force)."""
    import shutil

    spec = tmp_path / "tasks.yaml"
    shutil.copy(setting.tasks_file, spec)
    before = spec.read_bytes()
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", spec, "--val-limit", "2",
                         "--threads", "1", "--quiet", "--out", spec])
    assert spec.read_bytes() == before
    assert result.exit_code == 1
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": 1}\n')
    result = invoke_cli(["eval", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--val-limit", "2", "--threads", "1", "--quiet", "--out", mine])
    assert mine.read_text() == '{"mine": 1}\n'
    assert result.exit_code == 1


def _search(setting, tmp_path, *extra):
    return invoke_cli(["search-mask", "--strategy", "screened",
                       "--adapters", *setting.adapter_args(), "--merger", "ta", "--tasks",
                       setting.tasks_file, "--popsize", "2", "--generations", "1", "--val-limit", "2",
                       "--threads", "1", "--quiet", *extra])


def test_search_out_and_plot_inside_an_input_adapter_folder_are_refused(setting, tmp_path):
    """search-mask --out ADAPTER/mask.json and --plot ADAPTER/plots wrote into the input adapter's folder
    (exit 0); merge refuses an --out inside an input folder."""
    adapter = setting.adapters["beta"]
    result = _search(setting, tmp_path, "--out", adapter / "mask.json")
    assert result.exit_code == 1
    assert not (adapter / "mask.json").exists()
    pytest.importorskip("matplotlib")
    result = _search(setting, tmp_path, "--out", tmp_path / "m.json", "--plot", adapter / "plots")
    assert result.exit_code == 1
    assert not (adapter / "plots").exists()


def test_plot_onto_an_existing_file_is_refused_before_the_search(setting, tmp_path):
    """--plot FILE where FILE is an existing regular file: the search ran, wrote --out, then died with
    `internal error: FileExistsError` (exit 1)."""
    pytest.importorskip("matplotlib")
    existing = tmp_path / "notes.txt"
    existing.write_text("mine\n")
    result = _search(setting, tmp_path, "--out", tmp_path / "m.json", "--plot", existing)
    assert "internal error" not in result.stderr
    assert result.exit_code == 1 and not (tmp_path / "m.json").exists()


def test_resume_of_a_run_dir_that_holds_no_search_is_one_line(tmp_path):
    """`search-mask --run-dir NEW --resume` (nothing else) said '--adapters missing' (exit 2)."""
    result = invoke_cli(["search-mask", "--strategy", "screened", "--run-dir", tmp_path / "never_ran", "--resume"])
    assert result.exit_code == 1 and "holds no search to resume" in result.stderr
    assert not (tmp_path / "never_ran").exists()


def test_malformed_indices_are_a_usage_error_before_anything_is_read(setting, tmp_path):
    for command in (["merge", "--out", tmp_path / "m"], ["apply-mask", "--out", tmp_path / "p"]):
        for value in ("abc", "[1, 2.5]", '{"a": 1}', "[-1]"):
            result = invoke_cli([*command[:1], "--adapters", *setting.adapter_args(), "--indices", value,
                                 *command[1:]])
            assert result.exit_code == 2 and "--indices" in result.stderr, (command, value, result.stderr)
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


def test_a_file_out_never_replaces_a_merges_provenance(setting, tmp_path):
    """A weight table's --out onto a merged folder's loramerge.json (a loramerge JSON, but part of an adapter)
    was replaced with --force."""
    merged = tmp_path / "merged"
    assert invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--quiet", "--out", merged]).exit_code == 0
    provenance = merged / "loramerge.json"
    before = provenance.read_bytes()
    result = _search(setting, tmp_path, "--out", provenance, "--force")
    assert result.exit_code == 1 and provenance.read_bytes() == before


def test_the_recipe_of_a_regmean_merge_keeps_its_task_data(setting, tmp_path):
    """loramerge.yaml of `merge --merger regmean --tasks SPEC` dropped --tasks (only --lambda auto kept it):
    `merge --config loramerge.yaml` could not rebuild the merge."""
    out = tmp_path / "regmean"
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "regmean", "--tasks",
                         setting.tasks_file, "--val-limit", "4", "--threads", "1", "--quiet", "--out", out])
    assert result.exit_code == 0, result.stderr
    recipe = yaml.safe_load((out / "loramerge.yaml").read_text())
    assert recipe["tasks"] and recipe["val-limit"] == 4
    rebuilt = invoke_cli(["merge", "--config", out / "loramerge.yaml", "--threads", "1", "--quiet",
                          "--out", tmp_path / "again"])
    assert rebuilt.exit_code == 0, rebuilt.stderr
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        out / "adapter_model.safetensors").read_bytes()
