"""Review of session 19: each test failed before its fix."""

import json
from dataclasses import replace

import pytest

from loramerge_cli.evaluation.engine import EvalSettings
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.enmp import EnmpSettings
from loramerge_cli.search.runner import SearchRequest, run_search


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from eval_fixtures import build_text_setting

    return build_text_setting(tmp_path_factory.mktemp("review19"))


def surrogate_request(setting, **changes) -> SearchRequest:
    return replace(SearchRequest(strategy="surrogate", adapters=setting.adapter_args(), merge=MergeConfig(merger="ta"),
                                 tasks=setting.tasks_file, eval=EvalSettings(threads=1, batch_size=8),
                                 enmp=EnmpSettings(max_prune=0.5, seed=3), budget=10), **changes)


def test_a_resumed_search_s_seconds_count_the_processes_before_the_resume(setting, tmp_path):
    """provenance.seconds was the last process's only: a search killed after hours and resumed for its last
    step said it took seconds. elapsed.json keeps the time spent so far, saved at each step."""
    import time

    def slow_then_stopped(kind, data):
        if kind == "proposal" and data["generation"] == 1:
            time.sleep(1.0)
        if kind == "proposal" and data["generation"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(surrogate_request(setting, run_dir=tmp_path), on_event=slow_then_stopped)
    saved = json.loads((tmp_path / "elapsed.json").read_text())
    assert saved["seconds"] >= 1.0 and saved["run_id"] == json.loads((tmp_path / "config.json").read_text())["run_id"]
    _, provenance = run_search(surrogate_request(setting, run_dir=tmp_path, resume=True))
    assert provenance["seconds"] >= provenance["seconds_this_process"] + 1.0
    _, fresh = run_search(surrogate_request(setting, run_dir=tmp_path / "fresh"))
    assert "seconds_this_process" not in fresh and fresh["seconds"] < provenance["seconds"]
