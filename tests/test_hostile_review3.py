"""A third hostile review (of main at 6a8762a), of the default `screened` search: one test per defect, each
failing on that commit. Each docstring says what the user did, what happened and what should happen."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from eval_fixtures import build_text_setting
from factories import invoke_cli
from test_screened_search import GAINS, table_ladder

from loramerge_cli import atomic
from loramerge_cli.errors import LoramergeError
from loramerge_cli.evaluation.engine import EvalSettings
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.enmp import EnmpSettings
from loramerge_cli.search.screened import ScreenedSearch, ScreenedSettings


def _trajectory(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "trajectory.jsonl").read_text().splitlines()]
    for line in lines:  # wall times differ between runs
        line.pop("seconds"), line.pop("seconds_per_evaluation")
    return lines


# --- resume ---------------------------------------------------------------------------------------------

def test_kill_between_the_state_and_the_trajectory_write_of_the_last_step(tmp_path, monkeypatch):
    """A screened search with --run-dir was killed (SIGKILL, or Ctrl-C) in its last step, after
    screened_state.json was written but before trajectory.jsonl was (`_save_state` writes the two one after the
    other). `--resume` replayed to the saved step, found the search done and never wrote trajectory.jsonl again:
    the finished run's trajectory lacks its last generation for good (CLI: 4 lines instead of 5). README: a
    resumed run ends like an uninterrupted one. `_load_state` (or `run`) should rewrite trajectory.jsonl from
    the saved history (e.g. call `_save_state()` once after the replay)."""
    settings = ScreenedSettings(popsize=6, generations=3, seed=7, max_prune=0.25)
    plain_dir, killed_dir = tmp_path / "plain", tmp_path / "killed"
    plain_dir.mkdir(), killed_dir.mkdir()
    ScreenedSearch(settings, 4, 3, table_ladder(GAINS), run_dir=plain_dir).run()
    expected = _trajectory(plain_dir)

    original = atomic.write_text

    def write_text(path, text):
        if Path(path).name == "trajectory.jsonl" and text.count("\n") == len(expected):
            raise KeyboardInterrupt  # the last step's state is saved; its trajectory line is not
        original(path, text)

    monkeypatch.setattr(atomic, "write_text", write_text)
    with pytest.raises(KeyboardInterrupt):
        ScreenedSearch(settings, 4, 3, table_ladder(GAINS), run_dir=killed_dir).run()
    monkeypatch.setattr(atomic, "write_text", original)
    ScreenedSearch(settings, 4, 3, table_ladder(GAINS), run_dir=killed_dir).run(resume=True)
    assert _trajectory(killed_dir) == expected


# --- nonsensical values accepted --------------------------------------------------------------------------

def test_redraws_spin_forever_once_every_allowed_table_is_scored():
    """`--max-prune` small enough that K_max = 1 (here 4 units x 3 tasks at 0.1): the screen scores every
    allowed table (the 12 singles; the empty one is the reference), so every CMA-ES slot afterwards redraws
    `--redraws` times for nothing. With `--redraws 100000` on the CLI's 6-unit text setting, 2 generations of
    popsize 4 burned 24 s of CPU scoring nothing; `--redraws 1000000` with the default popsize 16 and 60
    generations runs for hours. The search should stop (or stop redrawing) once every table the ρ cap allows
    has been scored, e.g. in `ScreenedSearch.done()` / `_generation`; or refuse such a --redraws."""
    try:
        search = ScreenedSearch(ScreenedSettings(popsize=6, generations=3, seed=1, max_prune=0.1, redraws=10**6),
                                4, 3, table_ladder(GAINS))
    except LoramergeError:  # refusing a huge --redraws is a fix too
        return
    search.start()
    search.step()  # the screen: every allowed table is now scored
    assert search.k_max == 1 and len(search.state.memo) == 13
    strategy, asks = search.state.strategy, {"count": 0}
    ask = strategy.ask

    def counted(*args, **kwargs):
        asks["count"] += 1
        if asks["count"] > 5000:
            raise RuntimeError("still redrawing: more than 5000 asks with nothing left to score")
        return ask(*args, **kwargs)

    strategy.ask = counted
    search.run()
    assert asks["count"] <= 5000


@pytest.mark.slow
def test_max_prune_that_allows_no_unit_is_refused(tmp_path):
    """`search-mask ... --max-prune 0.1` on a model of 2 blocks x 3 tasks (6 units: ⌊0.1·6⌋ = 0 may be
    pruned). The search ran anyway: "screen: 0 tables scored", every generation redrawing the empty table,
    "pruned 0 of 6 units ... 0 full-set evaluations", exit 0 — a whole search that could never prune
    anything. It should be refused in one line naming --max-prune and the 6 units (exit 1 or 2), once the
    unit count is known (before the experts and the screen)."""
    setting = build_text_setting(tmp_path / "setting")
    out = tmp_path / "mask.json"
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *setting.adapter_args(), "--merger", "ta", "--tasks",
                         setting.tasks_file, "--popsize", "4", "--generations", "2", "--val-limit", "8",
                         "--threads", "1", "--quiet", "--max-prune", "0.1", "--out", out])
    assert result.exit_code in (1, 2), (result.exit_code, result.stdout)
    assert "internal error" not in result.stderr and "--max-prune" in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not out.exists()


# --- provenance counts ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("review3"))


def _request(setting, **changes):
    from loramerge_cli.search.runner import SearchRequest

    base = SearchRequest(strategy="screened",
        adapters=setting.adapter_args(), merge=MergeConfig(merger="ties"), tasks=setting.tasks_file,
        eval=EvalSettings(threads=1, batch_size=8),
        enmp=EnmpSettings(popsize=6, generations=3, max_prune=0.5, seed=3),
        options={"min_examples": 8},  # subsets of 8 of the 24 validation examples per task, then all 24
    )
    return replace(base, **changes)


@pytest.mark.slow
def test_provenance_forward_passes_counts_the_subset_evaluations(setting):
    """A serial screened search with successive halving (subsets of 8, then all 24 examples per task): the
    table's provenance says `forward_passes` 22 (the full-set rung's evaluations and its reference) while
    the trajectory's `evaluations_per_rung` adds up to 36 evaluations (plus the subset's own reference; on the
    CLI with 80 examples per task: 17 recorded, 28 run): `runner._provenance` reads `fitness.forward_passes`
    of the full-set fitness only, not the ladder's (`FidelityLadder.forward_passes` sums every rung). It should
    count every evaluation that ran."""
    from loramerge_cli.search.runner import run_search

    _, provenance = run_search(_request(setting))
    ran = sum(sum(record["evaluations_per_rung"]) for record in provenance["history"])
    subsets = [record["evaluations_per_rung"][0] for record in provenance["history"] if record["phase"] == "cma"]
    assert sum(subsets) > 0  # the subsets did run
    assert provenance["forward_passes"] >= ran


@pytest.mark.slow
def test_resumed_provenance_forward_passes_equals_the_uninterrupted_runs(setting, tmp_path):
    """A screened search with --run-dir was interrupted (Ctrl-C) in its greedy phase and resumed with
    --resume: the table and trajectory equal the uninterrupted run's, but the provenance's `forward_passes`
    counts only the passes of the resumed process (here 7 against 22; CLI, killed at the last step: 1
    against 17), so the
    resumed table's provenance under-reports what the search ran. README: a resumed run ends with the same
    table as an uninterrupted one. Derive the count from the saved state (as `full_evaluations` and
    `forward_examples` are), or leave it out when the run was resumed."""
    from loramerge_cli.search.runner import run_search

    _, plain = run_search(_request(setting))

    def interrupt(kind, data):
        if kind in ("generation", "greedy") and data["generation"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(_request(setting, run_dir=tmp_path), on_event=interrupt)
    _, resumed = run_search(_request(setting, run_dir=tmp_path, resume=True))
    assert resumed["full_evaluations"] == plain["full_evaluations"]
    assert resumed["forward_examples"] == plain["forward_examples"]
    assert resumed["forward_passes"] == plain["forward_passes"]


@pytest.mark.parametrize("flags", [["--no-screen", "--greedy-pool", "5"], ["--no-halving", "--eta", "7"],
                                   ["--no-halving", "--screen-rungs", "2"], ["--no-screen", "--screen-rungs", "3"]])
def test_a_setting_whose_switch_is_off_is_a_usage_error(tmp_path, flags):
    """`--no-screen --greedy-pool 5` and `--no-halving --eta 7` ran without the greedy phase or the halving
    while the provenance recorded the values given (noticed by the review, no test then): exit 2 now."""
    setting = build_text_setting(tmp_path / "setting")
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *setting.adapter_args(), "--merger", "ta", "--tasks",
                         setting.tasks_file, "--popsize", "2", "--generations", "1", "--val-limit", "4",
                         "--threads", "1", "--quiet", *flags, "--out", tmp_path / "m.json"])
    assert result.exit_code == 2 and "does nothing" in result.stderr, result.stderr
    assert not (tmp_path / "m.json").exists()
