"""Review of session 20: each test failed before its fix."""

import pytest

from loramerge_cli.evaluation.engine import EvalSettings


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from eval_fixtures import build_text_setting

    return build_text_setting(tmp_path_factory.mktemp("review20"))


def test_a_cap_above_a_split_s_rows_is_said_where_its_scores_are_recorded(setting, tmp_path):
    """`--val-limit 512` on 24 rows scored the 24 without a word, and the record kept 512 as the examples used."""
    import yaml

    from loramerge_cli import api
    from loramerge_cli.evaluation.tuning import search_lambda
    from loramerge_cli.merging.merge import MergeConfig

    adapters = api.load_adapters(setting.adapter_args())
    report = api.evaluate(setting.tasks_file, adapters, settings=EvalSettings(val_limit=512, threads=1))
    assert report["warnings"][0] == ("--val-limit 512 is above the validation rows of alpha (24), beta (24), "
                                     "gamma (24): every row is used")
    assert report["examples"] == {"alpha": 24, "beta": 24, "gamma": 24}
    assert not api.evaluate(setting.tasks_file, adapters, settings=EvalSettings(val_limit=24, threads=1))["warnings"]
    spec = yaml.safe_load(setting.tasks_file.read_text())
    spec["tasks"][1]["limit"] = 30  # a task's own cap, on a split the --val-limit does not cap
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump(spec))
    report = api.evaluate(tasks, adapters, settings=EvalSettings(split="test", threads=1))
    assert report["warnings"] == ["limit 30 is above the test rows of beta (24): every row is used"]
    tuned = search_lambda(adapters, MergeConfig(merger="ta"), None, setting.tasks_file, grid=[0.5], val_limit=100,
                          threads=1)
    assert tuned.warnings[0].startswith("--val-limit 100 is above the validation rows of alpha (24)")


@pytest.mark.parametrize("peak, chosen, reached", [(0.02, 0.02, 0.01481), (20.0, 8.0, 8.0), (7.6, 7.6, 8.0),
                                                   (1e-4, 0.005, 0.005)])
def test_lambda_auto_s_edge_extension_reaches_its_limits_and_its_warning_names_the_final_best(peak, chosen, reached):
    """The extension stopped a step short of its documented limits (6.75, not 8: λ 7.6 was never tried), its
    warning named the best before the refinement ("the best is now 0.02222" while 0.02 was returned), and a best
    at the extension's end was not refined toward its one neighbour."""
    from loramerge_cli.evaluation.tuning import grid_search

    tried = []
    best, [warning] = grid_search(lambda lam, stage: tried.append(lam) or -abs(lam - peak), default_lambda=0.25)
    assert best == pytest.approx(chosen) and f"{reached:g}" in warning
    assert warning.endswith(f"the best is now {chosen:g}") or f"the best λ, {chosen:g}, is still at that end" in warning
    assert (min(tried) if peak < 1 else max(tried)) == pytest.approx(reached)
    if peak == 20.0:  # between 6.75 and 8, toward the end's one neighbour
        assert any(6.75 < lam < 8.0 for lam in tried) and "beyond" in warning


def test_the_merge_function_refuses_a_truncation_it_would_ignore(setting):
    """`merging.merge.merge(adapters, MergeConfig(isotropize=True, out_rank=2))` wrote the update at full rank,
    ignoring out_rank: only plan_merge refused it."""
    from loramerge_cli import api
    from loramerge_cli.errors import UsageError
    from loramerge_cli.merging.merge import MergeConfig, merge

    adapters = api.load_adapters(setting.adapter_args())
    with pytest.raises(UsageError, match="--out-rank does not apply with --isotropize"):
        merge(adapters, MergeConfig(merger="ties", isotropize=True, out_rank=2))
    with pytest.raises(UsageError, match="--energy truncates dense merges"):
        merge(adapters, MergeConfig(merger="tsv", energy=0.9))
    assert merge(adapters, MergeConfig(merger="ties", out_rank=2)).modules  # a dense merge: truncated
