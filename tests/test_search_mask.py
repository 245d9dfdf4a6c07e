"""search-mask end to end on a tiny real model: output table, merge --mask, resume, serial = parallel."""

import json
import re
from dataclasses import replace

import pytest
import torch

from eval_fixtures import build_text_setting
from factories import invoke_cli
from loramerge_cli.evaluation.engine import EvalSettings
from loramerge_cli.masks import load_table
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.enmp import EnmpSettings
from loramerge_cli.search.runner import SearchRequest, run_search

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("search"))


def request(setting, **changes) -> SearchRequest:
    base = SearchRequest(strategy="screened",
        adapters=setting.adapter_args(),
        merge=MergeConfig(merger="ties"),
        tasks=setting.tasks_file,
        eval=EvalSettings(threads=1, batch_size=8),
        enmp=EnmpSettings(popsize=6, generations=4, max_prune=0.5, seed=3),
        # the default strategy, scoring on subsets of 8 of the 24 validation examples per task first
        options={"min_examples": 8},
    )
    if changes.get("strategy", "screened") != "screened":  # the options are the screened search's
        changes.setdefault("options", {})
    if changes.get("strategy") == "surrogate":  # no CMA-ES: its budget is distinct evaluations
        changes.setdefault("enmp", EnmpSettings(max_prune=0.5, seed=3))
        changes.setdefault("budget", 12)
    return replace(base, **changes)


def test_cli_writes_a_table_that_merge_consumes(setting, tmp_path):
    mask = tmp_path / "mask.json"
    result = invoke_cli([
        "search-mask", "--strategy", "screened",
        "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger", "ties",
        "--popsize", "6", "--generations", "3", "--max-prune", "0.5", "--threads", "1", "--out", str(mask),
        "--run-dir", str(tmp_path / "run"), "--json",
    ])
    assert result.exit_code == 0, result.stderr
    table = load_table(mask)
    assert json.loads(result.stdout)["weights"] == table.weights
    assert table.tasks == ["alpha", "beta", "gamma"] and table.units == ["model.layers.0", "model.layers.1"]
    provenance = table.provenance
    assert provenance["validation"]["fitness"] >= 0.0  # never worse than not pruning
    assert table.pruned_count() == len(provenance["pruned_flat_indices"])
    assert table.merger["method"] == "ties" and table.merger["lambda"] == 1.0
    for name in ("config.json", "screened_state.json", "trajectory.jsonl", "best.json", "scores.json"):
        assert (tmp_path / "run" / name).is_file()
    lines = [json.loads(line) for line in (tmp_path / "run" / "trajectory.jsonl").read_text().splitlines()]
    phases = [line["phase"] for line in lines]  # the default (screened) search: the screen, the greedy phase's
    assert phases == ["screen"] + ["greedy"] * (len(lines) - 4) + ["cma"] * 3  # rounds, then 3 generations
    assert all({"full_evaluations", "forward_examples"} <= set(line) for line in lines)
    assert provenance["strategy"] == "screened"
    assert provenance["forward_examples"] == lines[-1]["forward_examples"] > 0
    assert provenance["full_evaluations"] == lines[-1]["full_evaluations"] == provenance["evaluations"]
    merged = invoke_cli(["merge", "--adapters", *setting.adapter_args(), "--mask", str(mask),
                         "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.stderr
    recorded = json.loads((tmp_path / "merged" / "loramerge.json").read_text())
    assert json.dumps(recorded).count("ties") >= 1


def test_cli_greedy_pool_switches_the_greedy_phase(setting, tmp_path):
    args = ["search-mask", "--strategy", "screened",
            "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger",
            "ties", "--popsize", "6", "--generations", "2", "--max-prune", "0.5", "--threads", "1"]
    phases = {}
    for pool in ("0", "3"):
        result = invoke_cli([*args, "--greedy-pool", pool, "--out", str(tmp_path / f"{pool}.json"),
                             "--run-dir", str(tmp_path / pool)])
        assert result.exit_code == 0, result.stderr
        lines = (tmp_path / pool / "trajectory.jsonl").read_text().splitlines()
        phases[pool] = [json.loads(line)["phase"] for line in lines]
        assert load_table(tmp_path / f"{pool}.json").provenance["search"]["greedy_pool"] == int(pool)
    assert phases["0"] == ["screen", "cma", "cma"]
    assert phases["3"][:2] == ["screen", "greedy"] and phases["3"][-2:] == ["cma", "cma"]
    assert "greedy round 1:" in result.stderr


def test_cli_surrogate_search_writes_its_trajectory_and_resumes(setting, tmp_path):
    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger",
            "ties", "--strategy", "surrogate", "--budget", "10", "--max-prune", "0.5", "--threads", "1",
            "--run-dir", str(tmp_path / "run")]
    result = invoke_cli([*args, "--out", str(tmp_path / "mask.json"), "--plot", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.stderr
    assert "screen    6/10  best" in result.stderr and "table    10/10  [" in result.stderr
    assert (tmp_path / "plots" / "fitness.png").stat().st_size > 0
    table = load_table(tmp_path / "mask.json")
    lines = [json.loads(line) for line in (tmp_path / "run" / "trajectory.jsonl").read_text().splitlines()]
    assert [line["phase"] for line in lines] == ["screen"] + ["proposal"] * 4
    assert table.provenance["strategy"] == "surrogate" and table.provenance["search"]["noise"] == 0.5
    per_table = lines[0]["forward_examples"] // 6
    assert table.provenance["forward_examples"] == lines[-1]["forward_examples"] == 10 * per_table
    scores = [score for line in lines for score in line["scores"]]
    assert table.provenance["validation"]["fitness"] == max([0.0, *scores])
    again = invoke_cli([*args, "--resume", "--out", str(tmp_path / "again.json")])  # a finished run: its table
    assert again.exit_code == 0, again.stderr
    assert load_table(tmp_path / "again.json").weights == table.weights
    (tmp_path / "run" / "surrogate_state.json").write_text("{")
    damaged = invoke_cli([*args, "--resume", "--out", str(tmp_path / "damaged.json")])
    assert damaged.exit_code == 1 and "surrogate_state.json" in damaged.stderr
    assert not (tmp_path / "damaged.json").exists()


def test_resuming_a_finished_run_gives_its_table_without_searching_again(setting, tmp_path, monkeypatch):
    """A pipeline that reruns `--resume` after the run finished: exit 0 and the same table, no model loaded; a
    new --out gets it too. Not when --report-test asks for figures the table lacks, nor when best.json is no
    longer the table the run wrote (then the search resumes from its state, to the same table)."""
    out = tmp_path / "mask.json"
    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger",
            "ties", "--strategy", "surrogate", "--budget", "8", "--max-prune", "0.5", "--threads", "1",
            "--run-dir", str(tmp_path / "run")]
    assert invoke_cli([*args, "--out", str(out)]).exit_code == 0
    written, stamp = out.read_text(), out.stat().st_mtime_ns
    assert (tmp_path / "run" / "finished.json").is_file()
    resume = ["search-mask", "--run-dir", str(tmp_path / "run"), "--resume", "--threads", "1"]
    with monkeypatch.context() as patch:
        patch.setattr("loramerge_cli.search.runner.build_problem", lambda *a, **k: pytest.fail("a model was built"))
        again = invoke_cli(resume)
        assert again.exit_code == 0 and "had already finished" in again.stderr, again.stderr
        assert out.read_text() == written and out.stat().st_mtime_ns == stamp  # left as it was
        elsewhere = invoke_cli([*resume, "--out", str(tmp_path / "copy.json"), "--json"])
        assert elsewhere.exit_code == 0 and (tmp_path / "copy.json").read_text() == written
        assert json.loads(elsewhere.stdout) == json.loads(written)
        changed = invoke_cli([*resume, "--merger", "ta"])  # still the saved run's settings only
        assert changed.exit_code == 1 and "--merger" in changed.stderr
    out.write_text(written.replace('"weights"', '"weights" ', 1))  # the user's own file now
    refused = invoke_cli(resume)
    assert refused.exit_code == 1 and "already exists" in refused.stderr
    tested = invoke_cli([*resume, "--report-test", "--out", str(tmp_path / "tested.json")])  # searches again
    assert tested.exit_code == 0, tested.stderr
    table = load_table(tmp_path / "tested.json")
    assert "test" in table.provenance and table.weights == json.loads(written)["weights"]
    (tmp_path / "run" / "best.json").write_text(written)  # another table than the one finished.json names
    resumed = invoke_cli([*resume, "--out", str(tmp_path / "resumed.json")])
    assert resumed.exit_code == 0 and "had already finished" not in resumed.stderr
    assert load_table(tmp_path / "resumed.json").weights == json.loads(written)["weights"]


def test_a_surrogate_state_from_another_search_is_refused_before_any_model_loads(setting, tmp_path, monkeypatch):
    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger",
            "ties", "--strategy", "surrogate", "--budget", "10", "--max-prune", "0.5", "--threads", "1",
            "--run-dir", str(tmp_path / "run")]
    assert invoke_cli([*args, "--out", str(tmp_path / "mask.json")]).exit_code == 0
    state_path = tmp_path / "run" / "surrogate_state.json"
    saved = json.loads(state_path.read_text())
    units = len(saved["history"][0]["tables"])  # the screen's first step scores every single unit here

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr("loramerge_cli.search.runner.build_problem", no_model)
    history = [*saved["history"][:-1], {**saved["history"][-1], "new_evaluations":
                                         saved["history"][-1]["new_evaluations"] + 1}]
    edits = [{"scores": [[[units], 1.0], *saved["scores"][1:]]},  # a unit this search lacks
             {"scores": [[list(range(units // 2 + 1)), 1.0], *saved["scores"][1:]]},  # beyond the ρ cap
             {"scores": [*saved["scores"], [[0, 1, 2], 1.0]], "history": history}]  # 11 tables, --budget 10
    for edit in edits:
        state_path.write_text(json.dumps({**saved, **edit}))
        result = invoke_cli([*args, "--resume", "--out", str(tmp_path / "again.json")])
        assert result.exit_code == 1 and "does not match this search" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "again.json").exists()
    assert "more than its --budget 10" in result.stderr


@pytest.mark.parametrize("strategy", ["screened", "enmp"])
def test_a_saved_state_from_another_search_is_refused_before_any_model_loads(setting, tmp_path, monkeypatch,
                                                                               strategy):
    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger",
            "ties", "--strategy", strategy, "--popsize", "4", "--generations", "1", "--max-prune", "0.5",
            "--threads", "1", "--run-dir", str(tmp_path / "run")]
    assert invoke_cli([*args, "--out", str(tmp_path / "mask.json")]).exit_code == 0
    state_path = tmp_path / "run" / ("screened_state.json" if strategy == "screened" else "state.json")
    saved = json.loads(state_path.read_text())
    monkeypatch.setattr("loramerge_cli.search.runner.build_problem", lambda *a, **k: pytest.fail("a model was built"))
    if strategy == "screened":  # unit 99: this search has 6
        edit = {"scores": [[[[0, 99], 1.0], *saved["scores"][0]], *saved["scores"][1:]]}
    else:  # a table with a high score would have been the result
        edit = {"memo": [*saved["memo"], [[0, 99], None, 50.0, len(saved["memo"])]]}
    state_path.write_text(json.dumps({**saved, **edit}))
    result = invoke_cli([*args, "--resume", "--out", str(tmp_path / "again.json")])
    assert result.exit_code == 1 and "does not match this search" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "again.json").exists()


def test_fitness_of_best_table_is_reproduced_by_the_merge(setting):
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.search.fitness import AccuracyFitness
    from loramerge_cli.search.runner import build_problem

    table, provenance = run_search(request(setting))
    problem = build_problem(request(setting))
    experts = expert_scores(problem.engine, ScoreCache())
    fitness = AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, experts)
    pruned = tuple(provenance["pruned_flat_indices"])
    assert fitness([(pruned, None)])[0] == provenance["validation"]["fitness"]


@pytest.mark.parametrize("strategy", ["screened", "enmp", "surrogate"])
def test_interrupted_run_resumes_to_the_same_table(setting, tmp_path, strategy):
    plain, plain_provenance = run_search(request(setting, strategy=strategy))

    def interrupt(kind, data):
        if kind in ("generation", "greedy", "proposal") and data["generation"] == 2:  # the screened search's step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(request(setting, run_dir=tmp_path, strategy=strategy), on_event=interrupt)
    resumed, provenance = run_search(request(setting, run_dir=tmp_path, resume=True, strategy=strategy))
    if strategy == "screened":  # interrupted inside its greedy phase
        assert [r["phase"] for r in plain_provenance["history"][:3]] == ["screen", "greedy", "greedy"]
    assert resumed.weights == plain.weights
    assert provenance["validation"] == plain_provenance["validation"]
    best = [r["best_fitness"] for r in provenance["history"]]
    assert best == [r["best_fitness"] for r in plain_provenance["history"]]


def test_resume_refuses_changed_settings(setting, tmp_path):
    from loramerge_cli.errors import LoramergeError

    run_search(request(setting, run_dir=tmp_path))
    with pytest.raises(LoramergeError, match="settings differ"):
        run_search(request(setting, run_dir=tmp_path, resume=True, merge=MergeConfig(merger="ta")))
    with pytest.raises(LoramergeError, match="already holds a finished search"):
        run_search(request(setting, run_dir=tmp_path))


@pytest.mark.parametrize("strategy", ["screened", "enmp", "surrogate"])
def test_parallel_workers_equal_serial(setting, strategy):
    serial, serial_provenance = run_search(request(setting, strategy=strategy))
    parallel, provenance = run_search(request(setting, devices=["cpu", "cpu"], strategy=strategy))
    assert parallel.weights == serial.weights
    assert provenance["validation"] == serial_provenance["validation"]
    assert provenance["forward_examples"] == serial_provenance["forward_examples"]


@pytest.mark.parametrize("strategy", ["greedy", "random"])
def test_baselines_use_the_same_budget(setting, strategy):
    seed = 3 if strategy == "random" else 1  # (greedy with ties draws nothing: no seed)
    table, provenance = run_search(request(setting, strategy=strategy, budget=5,  # (popsize × generations would
                                           enmp=EnmpSettings(max_prune=0.5, seed=seed)))  # be the default budget)
    assert provenance["evaluations"] <= 5
    assert provenance["validation"]["fitness"] >= 0.0
    if strategy == "random" and table.pruned_count():
        assert table.pruned_count() == round(0.25 * 6)


def test_all_ones_table_is_the_plain_merge_and_a_pruned_unit_leaves_w0(setting):
    from loramerge_cli.adapters.peft_reader import load_adapters
    from loramerge_cli.masks import ones_table
    from loramerge_cli.merging.merge import merge
    from loramerge_cli.search.fitness import pruned_table

    adapters = load_adapters(setting.adapter_args())
    template = ones_table(adapters)
    plain = merge(adapters, MergeConfig(merger="ties"))
    masked = merge(adapters, MergeConfig(merger="ties"), template)
    for path, module in plain.modules.items():
        assert torch.equal(module.lora_B @ module.lora_A, masked.modules[path].lora_B @ masked.modules[path].lora_A)
    pruned_block = pruned_table(template, (3, 4, 5))  # unit 1, every task
    result = merge(adapters, MergeConfig(merger="ties"), pruned_block)
    assert all(path.startswith("model.layers.1.") for path in result.omitted) and result.omitted
    assert not any(path.startswith("model.layers.1.") for path in result.modules)


def test_plots_are_written(setting, tmp_path):
    from loramerge_cli.search.plots import write_plots

    table, provenance = run_search(request(setting))
    paths = write_plots(table, provenance["history"], tmp_path / "plots")
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_progress_on_stderr_summary_on_stdout(setting, tmp_path):
    args = ["search-mask", "--strategy", "screened",
            "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger", "ta",
            "--lambda", "auto", "--popsize", "4", "--generations", "2", "--max-prune", "0.5", "--threads", "1"]
    loud = invoke_cli([*args, "--out", str(tmp_path / "a.json"), "--plot", str(tmp_path / "plots")])
    assert loud.exit_code == 0, loud.stderr
    assert re.search(r"λ grid: \d+/\d+, \d+s elapsed", loud.stderr) and "experts: 3/3" in loud.stderr
    assert "scoring the unpruned merge: 1/1" in loud.stderr
    assert "gen   1/2" in loud.stderr and "eta" in loud.stderr
    assert "pruned" in loud.stdout and "gen " not in loud.stdout
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["fitness.png", "mask.png"]
    quiet = invoke_cli([*args, "--out", str(tmp_path / "b.json"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and "pruned" in quiet.stdout


def test_api_search_takes_loaded_adapters_and_reads_them_once(setting, tmp_path, monkeypatch):
    import loramerge_cli.adapters.peft_reader as reader
    from loramerge_cli import api

    adapters = api.load_adapters(setting.adapter_args())

    def read_again(*args, **kwargs):
        raise AssertionError("the adapters were read from disk a second time")

    monkeypatch.setattr(reader, "load_adapters", read_again)
    plan = api.plan_search(request(setting, adapters=adapters, report_test=True,
                                   enmp=EnmpSettings(popsize=2, generations=1, max_prune=0.5, seed=3)),
                           out=tmp_path / "mask.json")
    table, provenance = api.search(plan)
    assert load_table(tmp_path / "mask.json").weights == table.weights
    assert provenance["test"]["best_mean_normalized_accuracy"] is not None


def test_setting_changes_name_each_changed_leaf_and_a_setting_an_earlier_run_lacks():
    from loramerge_cli.search.plan import setting_changes, with_settings_added_since

    now = {"merger": "ta", "options": {"noise": 0.3, "same_unit_ratio": 2.0, "prior_pair": 0.2}, "seed": 1}
    saved = {"merger": "ties", "options": {"noise": 0.5, "prior_pair": 0.2}, "seed": 1, "gone": 3}
    assert setting_changes(now, saved) == [
        "gone: not a setting now, 3 saved", "merger: 'ta' now, 'ties' saved", "--noise: 0.3 now, 0.5 saved",
        "--same-unit-ratio: 2.0 now, not in the saved run"]
    assert setting_changes(now, now) == []
    options = {"proposals": 1, "prior_single": 1.0, "prior_pair": 0.2, "noise": 0.5}  # every option then
    before = {"strategy": "surrogate", "options": options}  # saved by the CLI before --same-unit-ratio: it was 1
    assert with_settings_added_since(before)["options"] == {**options, "same_unit_ratio": 1.0, "exploit_every": 0}
    later = {"strategy": "surrogate", "options": {**options, "same_unit_ratio": 2.0}}  # before --exploit-every
    assert with_settings_added_since(later)["options"] == {**options, "same_unit_ratio": 2.0, "exploit_every": 0}
    assert with_settings_added_since({**before, "strategy": "enmp"}) == {**before, "strategy": "enmp"}
    library = {"strategy": "surrogate", "options": {"noise": 0.5}}  # the library saves what was given
    assert with_settings_added_since(library) == library


def test_a_surrogate_run_saved_before_same_unit_ratio_resumes_with_ratio_1_only(setting, tmp_path):
    """Such a run used the model of ratio 1: it resumes with --same-unit-ratio 1 (to the same table as an
    uninterrupted run of ratio 1) and is refused, naming the flag, without it; several changed flags are
    all named."""
    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger",
            "ties", "--budget", "10", "--max-prune", "0.5", "--threads", "1"]
    plain = invoke_cli([*args, "--same-unit-ratio", "1", "--out", str(tmp_path / "plain.json")])
    assert plain.exit_code == 0, plain.stderr
    assert invoke_cli([*args, "--same-unit-ratio", "1", "--run-dir", str(tmp_path / "run"),
                       "--out", str(tmp_path / "first.json")]).exit_code == 0
    config_path = tmp_path / "run" / "config.json"  # as a run before the setting saved it
    config = json.loads(config_path.read_text())
    del config["settings"]["options"]["same_unit_ratio"]
    del config["flags"]["same_unit_ratio"]
    config_path.write_text(json.dumps(config))
    resume = ["search-mask", "--run-dir", str(tmp_path / "run"), "--resume", "--threads", "1"]
    refused = invoke_cli([*resume, "--out", str(tmp_path / "refused.json")])
    assert refused.exit_code == 1 and "--same-unit-ratio: 2.0 now, 1.0 saved" in refused.stderr, refused.stderr
    resumed = invoke_cli([*resume, "--same-unit-ratio", "1", "--out", str(tmp_path / "resumed.json")])
    assert resumed.exit_code == 0, resumed.stderr
    assert load_table(tmp_path / "resumed.json").weights == load_table(tmp_path / "plain.json").weights
    two = invoke_cli([*resume, "--same-unit-ratio", "1", "--budget", "12", "--lambda", "0.3", "--out",
                      str(tmp_path / "two.json")])
    assert two.exit_code == 1 and "--budget is 12" in two.stderr and "--lambda is 0.3" in two.stderr, two.stderr


@pytest.mark.parametrize("edit,word", [
    (lambda c: c["flags"].update(tasks=5), "the saved flag tasks is 5"),
    (lambda c: c["flags"].update(adapters=[1, 2]), "the saved flag adapters is [1, 2]"),
    (lambda c: c["flags"].update(strategy="nope"), "--strategy must be one of"),
    (lambda c: c["settings"].update(strategy=[]), "the settings differ"),
])
def test_a_hand_edited_run_config_is_one_line_on_resume(setting, tmp_path, edit, word):
    args = ["search-mask", "--adapters", *setting.adapter_args(), "--tasks", str(setting.tasks_file), "--merger",
            "ties", "--budget", "8", "--max-prune", "0.5", "--threads", "1", "--lambda", "0.275"]
    assert invoke_cli([*args, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "a.json")]).exit_code == 0
    same = invoke_cli(["search-mask", "--run-dir", str(tmp_path / "run"), "--resume", "--lambda", "0.2750",
                       "--out", str(tmp_path / "b.json")])  # the same number written another way
    assert same.exit_code == 0, same.stderr
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    result = invoke_cli(["search-mask", "--run-dir", str(tmp_path / "run"), "--resume", "--out",
                         str(tmp_path / "c.json")])
    assert result.exit_code in (1, 2) and word in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr
