"""Review of the library and the command line (session 17): each test failed before its fix."""

import json
from dataclasses import replace

import pytest

from factories import invoke_cli
from loramerge_cli import api
from loramerge_cli.errors import LoramergeError


def test_a_table_made_on_adapters_pruned_in_memory_fits_their_written_copies(folders, tmp_path):
    """A table recorded the sha256 of the pruned tensors (lora_B × weight in float64, the full config) and the
    copies apply-mask writes (lora_B in their dtype, target_modules listed in full) hashed otherwise: `merge
    --mask` refused the very adapters the table was searched on, once written. The originals stay refused."""
    adapters = api.load_adapters([f"{name}={folder}" for name, folder in folders.items()])
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
    from loramerge_cli.search.parameters import Parameter

    toy = replaced(strategies.STRATEGIES["greedy"], name="toy",
                   parameters=(Parameter("picks", int, 4, "tables to pick.", low=1),
                               Parameter("share", float, 0.5, "a share.", low=0, high=1)))
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
