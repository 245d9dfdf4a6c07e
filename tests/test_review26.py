"""Defects found by the reviews of 2026-12-07 (eighth session), each test failing on the code before its fix."""

from pathlib import Path


def test_lora_lego_says_what_its_default_cluster_count_stands_for(sources, tmp_path):
    """The summary and the card showed `clusters=0`, a count no merge uses (0 stands for the largest task rank)."""
    from factories import invoke_cli

    result = invoke_cli(["merge", "--adapters", *sources, "--merger", "lora_lego", "--out", tmp_path / "m"])
    assert result.exit_code == 0, result.stderr
    shown = "".join(result.stdout.replace("│", " ").split())  # (the table may wrap the row)
    assert "clusters=0(thelargesttaskrank)" in shown
    assert "clusters=0 (the largest task rank)" in (tmp_path / "m" / "README.md").read_text()
    given = invoke_cli(["merge", "--adapters", *sources, "--merger", "lora_lego", "--clusters", "2",
                        "--out", tmp_path / "g"])
    assert "clusters=2," in (tmp_path / "g" / "README.md").read_text()
    assert Path(tmp_path / "g" / "adapter_model.safetensors").is_file() and given.exit_code == 0


def test_library_calls_refuse_a_path_where_a_table_or_settings_object_belongs(sources, tmp_path):
    """A table given as a path (or eval settings as a dict) failed deep inside with an AttributeError; the sibling
    calls (merge, plan_merge, plan_prune, evaluate) said what to pass."""
    import pytest

    from loramerge_cli import api

    adapters = api.load_adapters(sources)
    result = api.merge(adapters, api.MergeConfig())
    calls = [lambda: api.write_merged_adapter(result, adapters, tmp_path / "m", table="mask.json"),
             lambda: api.write_adapters(adapters, tmp_path / "w", table="mask.json"),
             lambda: api.apply_table(adapters[0], "mask.json", 0)]
    for call in calls:
        with pytest.raises(api.UsageError, match="table must be a WeightTable"):
            call()
    with pytest.raises(api.UsageError, match="settings must be an EvalSettings"):
        api.plan_eval(tmp_path / "tasks.yaml", sources, [], settings={"threads": 1})
    assert not any(tmp_path.iterdir())


def test_publishing_warnings_of_a_missing_folder_are_an_error_not_an_empty_list(tmp_path):
    """`local_paths_warnings` of a mistyped folder said nothing would leak ([]); push_folder refused it."""
    import pytest

    from loramerge_cli import api

    with pytest.raises(api.LoramergeError, match="not a folder"):
        api.local_paths_warnings(tmp_path / "nonexistent")


def test_the_library_exports_its_errors_and_documents_every_public_name():
    import inspect

    from loramerge_cli import api

    assert issubclass(api.UsageError, api.LoramergeError) and {"LoramergeError", "UsageError"} <= set(api.__all__)
    for name in api.__all__:
        value = getattr(api, name)
        doc = inspect.getdoc(value) or ""
        assert doc and not doc.startswith(f"{getattr(value, '__name__', name)}("), name  # (not dataclass's default)
