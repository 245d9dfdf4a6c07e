"""Defects found by the review round of 2026-12-07 (late evening); each test fails on the code before its fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import huggingface_hub.utils as hub_utils

from loramerge_cli.evaluation.loading import quiet_transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quiet_transformers_leaves_the_callers_hub_progress_bars_as_they_were():
    # transformers' enable_progress_bar turns every huggingface_hub bar back on, per-group settings cleared
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()
    hub_utils.disable_progress_bars()
    hub_utils.enable_progress_bars("huggingface_hub.lfs_upload")
    try:
        with quiet_transformers():
            assert not logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
        assert not hub_utils.are_progress_bars_disabled("huggingface_hub.lfs_upload")
        assert logging.is_progress_bar_enabled()
    finally:
        hub_utils.enable_progress_bars()
    with quiet_transformers():
        pass
    assert not hub_utils.are_progress_bars_disabled()


def test_quiet_transformers_says_nothing_when_the_environment_pins_the_hub_bars():
    code = ("from loramerge_cli.evaluation.loading import quiet_transformers\n"
            "with quiet_transformers(): pass\n")
    for value in ("0", "1"):
        done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": value}, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr


def test_a_link_planted_at_a_temporary_name_is_never_written_through(tmp_path):
    """Files were first written to `.NAME.loramerge-PID.tmp`, opened following links: a link planted there for
    the running pid (an `exec`ed shell's, or a range of coming pids) had any file, an input adapter's included,
    overwritten with the output."""
    from loramerge_cli import atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        (out / f".mask.json.loramerge-{pid}.tmp").symlink_to(victim)
    atomic.write_text(out / "mask.json", "{}\n")
    atomic.write_new(out / "best.json", "{}\n")
    assert victim.read_text() == "mine"
    assert (out / "mask.json").read_text() == "{}\n" and not (out / "mask.json").is_symlink()
    assert (out / "best.json").read_text() == "{}\n"
    first, second = atomic.temporary_sibling(out / "a"), atomic.temporary_sibling(out / "a")
    assert first != second and first.name.startswith(f".a.loramerge-{os.getpid()}.")
    assert oct(first.stat().st_mode & 0o777) == oct(0o666 & ~atomic.user_umask())


def _copy_of_an_adapter(tmp_path, **config_updates):
    import json

    from factories import write_task_folders

    folders = write_task_folders(tmp_path / "adapters", names=("a", "b"))
    config_file = folders["a"] / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(config_updates)
    config_file.write_text(json.dumps(config))
    return folders


def test_an_adapter_config_too_large_for_any_adapter_is_refused_without_reading_it_whole(tmp_path):
    from factories import invoke_cli

    folders = _copy_of_an_adapter(tmp_path)
    config_file = folders["a"] / "adapter_config.json"
    config_file.write_text(config_file.read_text() + " " * (17 << 20))  # valid JSON, 17 MiB
    result = invoke_cli(["inspect", folders["a"]])
    assert result.exit_code == 1 and "over 16 MiB" in result.stderr and len(result.stderr.splitlines()) == 1, \
        result.stderr


def test_revision_and_auto_mapping_of_the_wrong_type_are_one_line(tmp_path):
    """`"revision": {"a": 1}` or `"auto_mapping": {"base_model_class": ["x"]}` passed inspect and made merge fail
    with "internal error: TypeError: unhashable type" (the second after the merge was computed)."""
    from factories import invoke_cli

    for field, value, said in (
            ("revision", {"a": 1}, "revision must be a string"),
            ("auto_mapping", {"base_model_class": ["x"]}, "auto_mapping must be an object whose base_model_class")):
        folders = _copy_of_an_adapter(tmp_path / field, **{field: value})
        for command in (["inspect", folders["a"]],
                        ["merge", "--adapters", folders["a"], folders["b"], "--out", tmp_path / field / "out"]):
            result = invoke_cli(command)
            assert result.exit_code == 1 and said in result.stderr, (command, result.stderr)
        assert not (tmp_path / field / "out").exists()
    unsloth = {"base_model_class": "LlamaForSequenceClassification", "parent_library": "transformers.models.llama",
               "unsloth_fixed": True}  # as Unsloth saves it: accepted
    folders = _copy_of_an_adapter(tmp_path / "unsloth", auto_mapping=unsloth)
    result = invoke_cli(["merge", "--adapters", folders["a"], folders["b"], "--out", tmp_path / "unsloth" / "out"])
    assert result.exit_code == 0, result.stderr
    # a NaN in it (Python's reader takes one) is not copied: the written config is strict JSON
    folders = _copy_of_an_adapter(tmp_path / "nan", auto_mapping={**unsloth, "unsloth_fixed": float("nan")})
    other = json.loads((folders["b"] / "adapter_config.json").read_text())
    other["auto_mapping"] = {**unsloth, "unsloth_fixed": float("nan")}
    (folders["b"] / "adapter_config.json").write_text(json.dumps(other))  # (json.dumps writes NaN)
    result = invoke_cli(["merge", "--adapters", folders["a"], folders["b"], "--out", tmp_path / "nan" / "out"])
    assert result.exit_code == 0, result.stderr

    def no_constants(name):
        raise ValueError(name)

    written = json.loads((tmp_path / "nan" / "out" / "adapter_config.json").read_text(), parse_constant=no_constants)
    assert written["auto_mapping"]["base_model_class"] == "LlamaForSequenceClassification"


def test_a_lora_module_listed_in_modules_to_save_is_named_as_such(tmp_path):
    """A module in both target_modules and modules_to_save: the refusal said target_modules leave it out."""
    import json

    from factories import invoke_cli

    folders = _copy_of_an_adapter(tmp_path)
    config = json.loads((folders["a"] / "adapter_config.json").read_text())
    module = config["target_modules"][0]
    config["modules_to_save"] = [module.split(".")[-1]]
    (folders["a"] / "adapter_config.json").write_text(json.dumps(config))
    result = invoke_cli(["inspect", folders["a"]])
    assert result.exit_code == 1 and "modules_to_save lists it" in result.stderr, result.stderr


def test_the_lambda_grid_progress_moves_as_each_lambda_is_scored(tmp_path, monkeypatch):
    """A λ grid scored every λ of its stage, then stepped its bar through all of them at once: on a terminal the
    bar read `0/13 … eta ?` for the whole stage."""
    from eval_fixtures import build_text_setting
    from loramerge_cli import api
    from loramerge_cli.evaluation import tuning
    from loramerge_cli.merging.merge import MergeConfig

    setting = build_text_setting(tmp_path / "setting")
    adapters = api.load_adapters(setting.adapter_args())
    seen = []
    scores = tuning.finite_scores
    monkeypatch.setattr(tuning, "finite_scores", lambda *a: (seen.append("scored"), scores(*a))[1])

    def report(kind, data):
        if kind == "stage_step" and data["stage"].startswith("λ"):
            seen.append("step")

    best, records = tuning.tune_lambda(adapters, MergeConfig(merger="ta"), None, setting.tasks_file,
                                       grid=[0.2, 0.4, 0.6], val_limit=4, threads=1, report=report)
    assert len(records) == 3 and best in (0.2, 0.4, 0.6)
    assert seen == ["scored", "step"] * 3, seen


def test_numbers_python_reads_but_no_one_means_are_refused():
    """`--lambda 1_0` merged with λ = 10 and `--lambda ٣` with λ = 3 (Python's float reads both); --weights too."""
    import pytest

    from loramerge_cli.cli.common import parse_float_list, parse_lambda
    from loramerge_cli.errors import UsageError

    for text in ("1_0", "٣", "0x1p-3", "1e", ".", "nan", "inf", "-inf", "+", "1.0.0"):
        with pytest.raises(UsageError):
            parse_lambda(text)
        with pytest.raises(UsageError):
            parse_float_list(f"1,{text}", "--weights")
    assert [parse_lambda(text) for text in ("0.5", "-2", "1e-3", ".5", "5.", "+1E+2", " 0.25 ")] == \
        [0.5, -2.0, 1e-3, 0.5, 5.0, 100.0, 0.25]
    assert parse_float_list("1, 0.5,2e-1", "--weights") == [1.0, 0.5, 0.2]


def test_merge_with_lambda_0_or_every_weight_0_is_bad_usage_before_anything_loads(tmp_path, monkeypatch):
    """`merge --lambda 0` (or `-0`, `1e-400`, `--weights 0,0`) read the adapters, then exited 1; search-mask
    refuses the same with exit 2 before anything loads."""
    from factories import invoke_cli, write_task_folders
    from loramerge_cli import api

    folders = write_task_folders(tmp_path / "adapters", names=("a", "b"))

    def loaded(*args, **kwargs):
        raise AssertionError("the adapters were loaded")

    monkeypatch.setattr(api, "load_adapters", loaded)
    for flags in (["--lambda", "0"], ["--lambda", "-0"], ["--lambda", "1e-400"], ["--weights", "0,0"]):
        result = invoke_cli(["merge", "--adapters", folders["a"], folders["b"], *flags, "--out", tmp_path / "m"])
        assert result.exit_code == 2 and "the merge is empty" in result.stderr, (flags, result.stderr)
        assert not (tmp_path / "m").exists()
    for flags, said in ((["--weights", "0,0,0"], "3 values for 2 adapters"),
                        (["--lambda", "0", "--merger", "ties", "--density", "5"], "density")):
        result = invoke_cli(["merge", "--adapters", folders["a"], folders["b"], *flags, "--out", tmp_path / "m"])
        assert result.exit_code == 2 and said in result.stderr, (flags, result.stderr)  # the wrong value first
    monkeypatch.undo()
    table = tmp_path / "t.json"
    from loramerge_cli.masks import ones_table

    ones_table(api.load_adapters([str(folders["a"]), str(folders["b"])])).save(table)
    result = invoke_cli(["merge", "--adapters", folders["a"], folders["b"], "--mask", table, "--weights", "0,0,0",
                         "--out", tmp_path / "m"])
    assert result.exit_code == 2 and "3 values for 2 adapters" in result.stderr, result.stderr


def test_a_table_aligned_to_adapters_in_another_order_names_the_order_of_its_provenance(tmp_path):
    """merge/apply-mask with the adapters in another order than the search's wrote mask.json with its rows in the
    new order but `pruned_flat_indices` (i = u·T + t) and `history` in the old one, unsaid: the file contradicted
    itself (index 0 pruned alpha in the search, read as beta in the copy)."""
    from factories import write_task_folders
    from loramerge_cli import api
    from loramerge_cli.masks import align_table, load_table

    folders = write_task_folders(tmp_path / "adapters", names=("a", "b", "c"), blocks=2)
    adapters = api.load_adapters([str(folders[name]) for name in ("a", "b", "c")])
    units = sorted({module.rsplit(".", 2)[0] for module in adapters[0].modules if "layers" in module})[:2]
    table = api.WeightTable(tasks=["a", "b", "c"], units=units, weights=[[0, 1], [1, 1], [1, 1]],
                            provenance={"pruned_flat_indices": [0], "history": [{"best_pruned": [0]}]})
    reordered = [adapters[1], adapters[2], adapters[0]]
    aligned = align_table(table, reordered)
    assert aligned.tasks == ["b", "c", "a"] and aligned.weights == [[1, 1], [1, 1], [0, 1]]
    provenance = aligned.provenance
    assert provenance["task_order"] == ["a", "b", "c"] and provenance["pruned_flat_indices"] == [0]
    unit, task = divmod(provenance["pruned_flat_indices"][0], len(provenance["task_order"]))
    assert aligned.weights[aligned.tasks.index(provenance["task_order"][task])][unit] == 0
    aligned.save(tmp_path / "copy.json")
    again = align_table(load_table(tmp_path / "copy.json"), [adapters[2], adapters[0], adapters[1]])
    assert again.provenance["task_order"] == ["a", "b", "c"]  # the order the search ran in, however often copied
    assert align_table(table, adapters) is table


def test_search_mask_help_says_lambda_defaults_without_a_mask_table():
    """search-mask's --lambda help began "a --mask table's scale, else …": search-mask takes no --mask."""
    from factories import invoke_cli

    result = invoke_cli(["search-mask", "--help"])
    shown = " ".join(result.stdout.split())
    assert result.exit_code == 0 and "[default: the method's" in shown and "--mask table" not in shown
    merge_help = invoke_cli(["merge", "--help"]).stdout
    assert "a --mask table's scale" in " ".join(merge_help.split())


def test_a_regmean_recipe_names_the_thread_count_its_rebuild_needs(tmp_path):
    """The recipe left --threads out (as it does every flag of where a command runs), so its own `# Rebuild:`
    line rebuilt a regmean merge made with --threads 1 at another count: other bits (1.2e-7 in B·A)."""
    import hashlib

    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    setting = build_text_setting(tmp_path / "setting")
    result = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--merger", "regmean", "--tasks",
                         setting.tasks_file, "--val-limit", "4", "--threads", "1", "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    recipe = (tmp_path / "m" / "loramerge.yaml").read_text()
    rebuild = next(line for line in recipe.splitlines() if line.startswith("# Rebuild:"))
    assert rebuild.endswith("--out DIR --threads 1"), rebuild
    again = invoke_cli(["merge", "--config", tmp_path / "m" / "loramerge.yaml", "--out", tmp_path / "again",
                        "--threads", "1"])
    assert again.exit_code == 0, again.stderr
    digest = [hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
              for folder in (tmp_path / "m", tmp_path / "again")]
    assert digest[0] == digest[1]
    plain = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--out", tmp_path / "ta"])
    assert plain.exit_code == 0 and "--out DIR\n" in (tmp_path / "ta" / "loramerge.yaml").read_text()


def test_resume_does_not_refuse_a_changed_test_split_the_search_never_scores(tmp_path):
    """--resume refused when a task's test file changed, though a search scores tables on the validation split
    only (--report-test scores the test split once, at the end); a changed validation file is still refused."""
    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    setting = build_text_setting(tmp_path / "setting")
    search = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file, "--strategy",
              "surrogate", "--budget", "6", "--val-limit", "4", "--threads", "1", "--run-dir", tmp_path / "run"]
    first = invoke_cli([*search, "--report-test", "--out", tmp_path / "a.json"])
    assert first.exit_code == 0, first.stderr
    test_file = tmp_path / "setting" / "data" / "alpha" / "test.jsonl"
    test_file.write_text(test_file.read_text().splitlines()[0] + "\n")
    # a finished run's table holds test scores of the old file: refused, as before
    stale = invoke_cli([*search, "--resume", "--report-test", "--out", tmp_path / "b.json"])
    assert stale.exit_code == 1 and "test.jsonl changed" in stale.stderr, stale.stderr
    (tmp_path / "run" / "finished.json").unlink()  # as a run killed after its last checkpoint
    resumed = invoke_cli([*search, "--resume", "--report-test", "--out", tmp_path / "b.json"])
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads((tmp_path / "b.json").read_text())["provenance"]["test"] != \
        json.loads((tmp_path / "a.json").read_text())["provenance"]["test"]  # scored on the new test file
    validation = tmp_path / "setting" / "data" / "alpha" / "validation.jsonl"
    validation.write_text(validation.read_text().splitlines()[0] + "\n")
    refused = invoke_cli([*search, "--resume", "--out", tmp_path / "c.json"])
    assert refused.exit_code == 1 and "validation.jsonl changed" in refused.stderr, refused.stderr


def test_the_eta_counts_down_between_steps_instead_of_climbing():
    """The bar's ETA was the mean pace counted to now: while a step ran, `1/6 … eta 18s` became `eta 28s`, then
    `eta 40s` (the stage ended 14 s later)."""
    from loramerge_cli.cli.progress import eta

    assert eta(0.0, 1, 3, now=2.0, stepped=2.0) == "4s"
    assert eta(0.0, 1, 3, now=5.0, stepped=2.0) == "1s"  # (the old estimate: 10s)
    assert eta(0.0, 1, 3, now=9.0, stepped=2.0) == "0s"
    assert eta(0.0, 2, 4, now=10.0) == "10s" and eta(0.0, 0, 4) == "?" and eta(0.0, 1, None) is None


def _plain_display(**options):
    import io

    from rich.console import Console

    from loramerge_cli.cli.progress import ProgressDisplay

    stream = io.StringIO()
    return ProgressDisplay(console=Console(file=stream, force_terminal=False, width=200), **options), stream


def test_a_merges_progress_reaches_a_log_once_it_lasts():
    """`merge … 2>log` (or TERM=dumb) showed no progress at all for the merge itself (a terminal-only stage),
    however long it ran; a quick one still says nothing."""
    display, stream = _plain_display(terminal_only=("merging",), interval=0.0)
    with display:
        display("stage_start", {"stage": "merging", "total": 3})
        for _ in range(3):
            display("stage_step", {"stage": "merging", "info": ""})
        display("stage_end", {"stage": "merging"})
    assert "merging: 1/3" in stream.getvalue() and "merging: 3/3" in stream.getvalue(), stream.getvalue()
    for total in (300, None):  # (a stage of unknown size says its count at its end: not a quick terminal-only one)
        display, stream = _plain_display(terminal_only=("merging",))
        with display:
            display("stage_start", {"stage": "merging", "total": total})
            for _ in range(300):
                display("stage_step", {"stage": "merging", "info": ""})
            display("stage_end", {"stage": "merging"})
        assert stream.getvalue() == ""


def test_eval_steps_the_base_model_per_task(tmp_path):
    """The base model's stage was one step for all tasks: `base model 0/1 … eta ?` for its whole length."""
    from eval_fixtures import build_text_setting
    from loramerge_cli import api
    from loramerge_cli.evaluation.engine import EvalSettings

    setting = build_text_setting(tmp_path / "setting")
    events = []
    api.evaluate(setting.tasks_file, api.load_adapters(setting.adapter_args()), [],
                 settings=EvalSettings(threads=1, val_limit=4), report=lambda kind, data: events.append((kind, data)))
    starts = [data for kind, data in events if kind == "stage_start" and data["stage"] == "base model"]
    steps = [data for kind, data in events if kind == "stage_step" and data["stage"] == "base model"]
    assert starts == [{"stage": "base model", "total": 3}] and len(steps) == 3, events
    # before the experts' stage, seconds of loading were drawn as nothing at all
    first = next(data["stage"] for kind, data in events if kind == "stage_start")
    assert first == "loading the model and data", events


def test_a_greedy_search_draws_a_bar_from_its_start():
    """greedy and random drew no bar at all on a terminal, and every strategy's bar came only with its first
    generation or table (20 s of blank display after the unpruned merge's line)."""
    import io

    from rich.console import Console

    from loramerge_cli.cli.progress import ProgressDisplay
    from loramerge_cli.cli.render import search_progress

    display = ProgressDisplay(console=Console(file=io.StringIO(), force_terminal=True, width=200))
    display.inner = search_progress(display, 4, budget=8)
    with display:
        display("start", {"reference": 50.0, "lambda": 0.5, "units": 2, "tasks": 3})
        assert "searching" in display.stages
        display("round", {"round": 1, "best_fitness": 1.0, "distinct_evaluated": 7})
        assert "searching" not in display.stages and display.stages["evaluations"].done == 6
        display("round", {"round": 2, "best_fitness": 1.5, "distinct_evaluated": 9})
        assert display.stages["evaluations"].done == 8 and display.stages["evaluations"].total == 8


def test_a_task_types_extras_are_checked_by_every_command_that_reads_the_spec(tmp_path, monkeypatch):
    """docs/contributing.md: a task type's `extras` are checked before any work. Only search-mask did: `eval` and
    `merge --lambda auto` loaded the model, then failed with "internal error: ModuleNotFoundError"."""
    from eval_fixtures import build_text_setting
    from factories import invoke_cli
    from loramerge_cli.evaluation import task_types
    from loramerge_cli.evaluation.task_types.sequence_classification import SequenceClassification

    class NeedsExtra(SequenceClassification):
        name = "needs-extra-classification"
        extras = (("nonexistent_module_xyz", "xyzextra"),)

    monkeypatch.setitem(task_types.TASK_TYPES, NeedsExtra.name, NeedsExtra())
    setting = build_text_setting(tmp_path / "setting")
    spec = tmp_path / "setting" / "tasks.yaml"
    spec.write_text(spec.read_text().replace("model_type: sequence-classification", f"model_type: {NeedsExtra.name}"))
    said = "needs nonexistent_module_xyz: pip install 'loramerge[xyzextra]'"
    adapters = ["--adapters", *setting.adapter_args(), "--threads", "1"]
    for command in (["eval", *adapters, "--tasks", spec, "--out", tmp_path / "e.json"],
                    ["merge", *adapters, "--lambda", "auto", "--tasks", spec, "--out", tmp_path / "m"],
                    ["search-mask", *adapters, "--tasks", spec, "--out", tmp_path / "s.json"]):
        result = invoke_cli(command)
        assert result.exit_code == 1 and said in result.stderr, (command[0], result.stderr)


def test_a_registered_parameter_named_help_is_refused_like_any_other_clash(monkeypatch):
    """A merge method's parameter named `help` built a command whose --help took a value ("Option '--help'
    requires an argument"); the docs promise a TypeError naming any clash."""
    import pytest

    from loramerge_cli.cli.options import option, signature

    with pytest.raises(TypeError, match="--help"):
        signature([option("help", float | None, None)])
    signature([option("helpful", float | None, None)])
