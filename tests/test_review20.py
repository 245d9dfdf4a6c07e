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
