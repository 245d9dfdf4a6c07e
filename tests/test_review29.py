"""Defects found by the reviews of 2026-12-07 (eleventh session), each test failing on the code before its fix."""

import json


def test_search_json_carries_the_dropped_recipe_seed_warning(tmp_path):
    """`search-mask --config recipe.yaml --json` with a recipe's seed that the search does not use: the seed was
    dropped with a warning on stderr only, which --json silences, so the document did not say it."""
    from eval_fixtures import build_text_setting
    from factories import invoke_cli

    setting = build_text_setting(tmp_path / "setting")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merger: dare\nseed: 7\n")
    result = invoke_cli(["search-mask", "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--strategy", "greedy", "--merger", "ties", "--budget", "1", "--val-limit", "4",
                         "--threads", "1", "--config", recipe, "--out", tmp_path / "a.json", "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert any("the recipe's seed dropped" in line for line in document["warnings"]), document.get("warnings")
    assert "warnings" not in json.loads((tmp_path / "a.json").read_text())  # the table written: no such key
