"""Defects found by the reviews of 2026-12-07 (ninth session), each test failing on the code before its fix."""

import pytest


def test_a_spec_naming_other_tasks_is_refused_before_the_adapters_load(text_setting, tmp_path, monkeypatch):
    """`merge --tasks` whose tasks do not match the adapters was found after torch and the adapters loaded."""
    from factories import invoke_cli
    from loramerge_cli import api

    def no_loading(*args, **kwargs):
        raise AssertionError("adapters loaded before the spec was checked")

    monkeypatch.setattr(api, "load_adapters", no_loading)
    two = [text_setting.adapters[name] for name in ("alpha", "beta")]
    result = invoke_cli(["merge", "--adapters", *two, "--lambda", "auto", "--tasks", text_setting.tasks_file,
                         "--out", tmp_path / "m", "--threads", "1"])
    assert result.exit_code == 1 and "no adapter named 'gamma'" in result.stderr, result.stderr
    assert not (tmp_path / "m").exists()


def test_tasks_no_merge_reads_is_a_usage_error_whatever_the_spec(text_setting, tmp_path):
    """`--tasks` with a merger that reads nothing: exit 2 when the spec matched the adapters, exit 1 (a spec
    error) when it did not."""
    from factories import invoke_cli

    for names in (("alpha", "beta", "gamma"), ("alpha", "beta")):
        adapters = [text_setting.adapters[name] for name in names]
        result = invoke_cli(["merge", "--adapters", *adapters, "--merger", "ties", "--tasks", text_setting.tasks_file,
                             "--out", tmp_path / "m"])
        assert result.exit_code == 2 and "--tasks does nothing here" in result.stderr, (names, result.stderr)
    assert not (tmp_path / "m").exists()


def test_the_library_names_an_unknown_merger_a_merger(folders):
    """`MergeConfig(merger="average")` was called an unknown *method*; the CLI's flag is --merger."""
    from loramerge_cli import api
    from loramerge_cli.errors import UsageError
    from loramerge_cli.merging.config import MergeConfig

    adapters = api.load_adapters([str(folders[name]) for name in "abc"])
    with pytest.raises(UsageError, match=r"unknown merger 'average' \(known: .*knots"):
        api.merge(adapters, MergeConfig(merger="average"))
    with pytest.raises(UsageError, match=r"unknown method 'average' \(known: "):
        api.merge(adapters, MergeConfig(merger="knots", method="average"))


def test_eval_of_experts_alone_shows_no_merged_stage(text_setting):
    """`eval` without --merged drew an empty `merged × tasks` stage."""
    from loramerge_cli import api
    from loramerge_cli.evaluation.engine import EvalSettings

    experts = api.load_adapters([str(text_setting.adapters[name]) for name in ("alpha", "beta", "gamma")])
    stages = []
    report = api.evaluate(text_setting.tasks_file, experts, settings=EvalSettings(val_limit=4),
                          report=lambda kind, data: stages.append(data["stage"]) if kind == "stage_start" else None)
    assert [row["kind"] for row in report["rows"]] == ["base", "experts"]
    assert "merged × tasks" not in stages and stages, stages
