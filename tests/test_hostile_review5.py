"""A fifth hostile review (of main at cc000fa): successive halving on nested slices (`NestedLadder`), promotions
counted at their new examples, and `search-mask --screen-rungs`. One test per defect, each failing on that
commit; each docstring says what the user did, what happened and what should happen."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import build_text_setting
from factories import invoke_cli
from test_screened_search import GAINS, table_ladder

from loramerge_cli.evaluation.engine import EvalSettings
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.enmp import EnmpSettings
from loramerge_cli.search.fidelity import FidelityLadder
from loramerge_cli.search.screened import ScreenedSearch, ScreenedSettings


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    return build_text_setting(tmp_path_factory.mktemp("review5"))


def _full_fitness(setting, **eval_settings):
    from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
    from loramerge_cli.search.fitness import AccuracyFitness
    from loramerge_cli.search.problem import build_problem
    from loramerge_cli.search.runner import SearchRequest

    request = SearchRequest(strategy="screened",
                            adapters=setting.adapter_args(), merge=MergeConfig(merger="ta", lam=0.9),
                            tasks=setting.tasks_file, eval=EvalSettings(threads=1, **eval_settings))
    problem = build_problem(request)
    experts = expert_scores(problem.engine, ScoreCache())
    return AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, experts)


# --- scores -----------------------------------------------------------------------------------------------

def test_a_promoted_tables_full_set_score_equals_the_plain_fitness_in_bfloat16(setting):
    """The user searched with `--eval-dtype bfloat16` (a documented choice) and the default batch size 16.
    A table promoted through the rungs is now scored on the slices only and its full-set score is assembled
    from the slices' correct counts; but a model's per-example logits depend on the other examples of its
    batch (padding, kernel blocking), so the slices' batches give other predictions than the full set's:
    single-unit table (4,) scores -33.10 assembled from the slices against -24.76 by the plain full-set
    fitness (≈ one example of `gamma`), and (1, 5) +1.67 against +6.43. The table's recorded fitness is then
    one `eval`/`AccuracyFitness` does not reproduce, and full-set scores from the slices compete in one memo
    with full-set scores from the full engine (screen, greedy). README / fidelity.py: "exactly the score of
    rung r's examples at once" and the full set's score is the full-set fitness. The full-set score of a
    promoted table should equal the plain full-set fitness (e.g. score the last promotion on the full engine,
    or batch the full set so that its batches are the slices')."""
    import itertools

    from loramerge_cli.search.fidelity import accuracy_ladder

    full = _full_fitness(setting, batch_size=16, dtype="bfloat16")
    ladder = accuracy_ladder(full, [6, 12, 24], seed=4)
    differing = []
    for pruned in [c for k in (1, 2) for c in itertools.combinations(range(6), k)]:  # (4,) and (1, 5) differ
        table = (pruned, None)
        ladder([(0, table)])
        ladder([(1, table, 0)])
        [top] = ladder([(2, table, 1)])
        plain = full([table])[0]
        if top != plain:
            differing.append((pruned, round(top, 3), round(plain, 3)))
    assert not differing, f"promoted full-set score != plain full-set fitness: {differing}"


# --- accounting -------------------------------------------------------------------------------------------

def test_provenance_forward_passes_counts_every_pass_the_slices_ran(setting, monkeypatch):
    """A serial screened search with successive halving (subsets of 3 and 8 of 24 examples per task,
    `--screen-rungs 2`): the provenance's `forward_passes` (documented as every rung's evaluations and
    references, the whole run's) says 44 while the ladder ran 51 passes: the unpruned merge is now scored
    on every slice *and* on the full set (len(rungs) + 1 references, `run_screened` adds len(rungs)), and a
    table scored on rung r without a promotion (the screen's singles on rung 1: slices 0 and 1) runs one
    pass per slice but is counted once. The provenance should count the passes that ran (the ladder's
    `forward_passes`)."""
    import loramerge_cli.search.fidelity as fidelity
    from loramerge_cli.search.runner import SearchRequest, run_search

    ladders = []
    original = fidelity.accuracy_ladder

    def spy(*args, **kwargs):
        ladders.append(original(*args, **kwargs))
        return ladders[-1]

    monkeypatch.setattr(fidelity, "accuracy_ladder", spy)
    request = SearchRequest(strategy="screened", adapters=setting.adapter_args(), merge=MergeConfig(merger="ties"),
                            tasks=setting.tasks_file, eval=EvalSettings(threads=1, batch_size=8),
                            enmp=EnmpSettings(popsize=6, generations=3, max_prune=0.5, seed=3),
                            options={"min_examples": 3, "screen_rungs": 2})
    _, provenance = run_search(request)
    [ladder] = ladders
    assert ladder.sizes == [3, 8, 24]
    assert provenance["forward_passes"] == ladder.forward_passes


# --- the halved screen ------------------------------------------------------------------------------------

def test_a_halved_screen_does_not_start_the_greedy_phase_from_a_harmful_unit():
    """`--screen-rungs 2`: the singles were halved over the last two rungs; the four promoted to the full set
    all hurt there (-0.5 … -0.8), unit 4 (+0.5 on the subset, +0.4 on the full set) was not promoted. The
    greedy phase still started (`helpful` took unit 4's subset gain) from `order[0]`, the best *full-set*
    single, whose pruning costs 0.5 points: greedy's table [0] at -0.5, then [0, 4] at -0.1 ("improves"
    on -0.5), worse than not pruning, and CMA-ES started around it (unit 0 pruned with p = 0.8). With the
    exact screen (`--screen-rungs 1`) greedy only ever starts from a single that helps on the full set
    (greedy's first round is the screen: it keeps a unit only if it beats the unpruned merge). The greedy
    phase should start from a full-set single that helps, or not at all (or score the helpful subset-only
    singles on the full set first)."""

    class Rung:
        def __init__(self, gains):
            self.gains, self.reference = gains, 0.0

        def __call__(self, candidates):
            return [sum(self.gains[i] for i in pruned) for pruned, _ in candidates]

    subset = [1.0, 0.9, 0.8, 0.7, 0.5] + [-1.0] * 7
    full = [-0.5, -0.6, -0.7, -0.8, 0.4] + [-1.0] * 7
    ladder = FidelityLadder([Rung(subset), Rung(subset), Rung(full)], [30, 90, 270], [0.001] * 3)
    search = ScreenedSearch(ScreenedSettings(popsize=6, generations=2, seed=1, max_prune=0.5, screen_rungs=2),
                            4, 3, ladder)
    search.start()
    search.step()  # the screen
    greedy = search.state.greedy
    assert greedy is None or greedy["fitness"] > 0.0, f"greedy starts from {greedy['table']} at {greedy['fitness']}"


def test_the_screen_stage_reports_no_more_steps_than_it_announced():
    """`--screen-rungs 3`: the screen announces its stage with `total` = the number of singles (12 here)
    and then reports one step per evaluation on every rung it halves over (12 + 12 + 10 = 34 steps): the
    bar is full (12/12, no ETA) after the smallest rung and the promotions, which cost most, run past
    100 %. The stage's total should count what it steps (or step once per single)."""
    events = []
    search = ScreenedSearch(ScreenedSettings(popsize=6, generations=1, seed=1, max_prune=0.25, screen_rungs=3), 4,
                            3, table_ladder(GAINS), on_event=lambda kind, data: events.append((kind, data)))
    search.run()
    starts = [data for kind, data in events if kind == "stage_start"]
    assert len(starts) == 3  # one stage per subset the screen halves over
    for start in starts:
        steps = [data for kind, data in events if kind == "stage_step" and data["stage"] == start["stage"]]
        assert 0 < len(steps) <= start["total"], f"{len(steps)} steps of a stage of {start['total']}"


# --- options ----------------------------------------------------------------------------------------------

def test_screen_rungs_with_label_free_fitness_is_a_usage_error(setting, tmp_path):
    """`search-mask --fitness nsc --screen-rungs 3`: exit 0, the screen ran on the full set only (halving
    works on labelled `--fitness accuracy` only, as the option's help says) while the table's provenance
    records `screen_rungs: 3`. CHANGELOG: `--screen-rungs` needs `--screen` and `--halving`, "with either off
    it is a usage error"; with a label-free fitness the halving is off. It should be exit 2, one line
    (`--eta` shares the gap)."""
    out = tmp_path / "mask.json"
    result = invoke_cli(["search-mask", "--strategy", "screened",
                         "--adapters", *setting.adapter_args(), "--tasks", setting.tasks_file,
                         "--merger", "ties", "--popsize", "4", "--generations", "1", "--max-prune", "0.5",
                         "--threads", "1", "--fitness", "nsc", "--screen-rungs", "3", "--out", out])
    recorded = json.loads(out.read_text())["provenance"]["search"].get("screen_rungs") if out.is_file() else None
    assert result.exit_code == 2, f"exit {result.exit_code}, provenance screen_rungs {recorded}"
    assert "--screen-rungs" in result.stderr and len(result.stderr.strip().splitlines()) == 1
