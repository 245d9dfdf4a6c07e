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


def test_random_prunes_round_of_the_decimal_product(tmp_path):
    """`--strategy random --sparsity 0.7` on 45 (block, task) units pruned 31 (0.7·45 in floating point is
    31.4999…), where the documented rule, Python's round halving to even, gives 32."""
    from eval_fixtures import build_text_setting
    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search.enmp import EnmpSettings
    from loramerge_cli.search.runner import SearchRequest, run_search

    setting = build_text_setting(tmp_path / "setting", rows=4, layers=15)
    request = SearchRequest(strategy="random", adapters=setting.adapter_args(), merge=MergeConfig(),
                            tasks=setting.tasks_file, eval=EvalSettings(threads=1, batch_size=8),
                            enmp=EnmpSettings(max_prune=1.0), budget=1, sparsity=0.7)
    _, provenance = run_search(request)
    assert provenance["search"]["pruned"] == 32, provenance["search"]
