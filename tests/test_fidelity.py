"""The nested multi-fidelity ladder on a real tiny model: a promoted table is scored on its rung's new
examples only, and its score equals scoring the rung's whole subset at once (and, on the last rung, the
full-set fitness), to the last digit."""

from __future__ import annotations

import pytest
from eval_fixtures import build_text_setting

from loramerge_cli.evaluation.cache import ScoreCache, expert_scores
from loramerge_cli.evaluation.engine import EvalSettings
from loramerge_cli.merging.merge import MergeConfig
from loramerge_cli.search.fidelity import accuracy_ladder, seeded_orders, subset_engine
from loramerge_cli.search.fitness import AccuracyFitness
from loramerge_cli.search.problem import build_problem
from loramerge_cli.search.screened import ScreenedSearch, ScreenedSettings

SIZES = [6, 12, 24]  # examples per task of each rung; 24 is the whole validation set


@pytest.fixture(scope="module")
def full_fitness(tmp_path_factory):
    from loramerge_cli.search.runner import SearchRequest

    setting = build_text_setting(tmp_path_factory.mktemp("fidelity"))
    request = SearchRequest(strategy="screened",
                            adapters=setting.adapter_args(), merge=MergeConfig(merger="ta", lam=0.9),
                            tasks=setting.tasks_file, eval=EvalSettings(threads=1, batch_size=5))
    problem = build_problem(request)
    experts = expert_scores(problem.engine, ScoreCache())
    return AccuracyFitness(problem.adapters, problem.settings, problem.template, problem.engine, experts)


TABLES = [((0,), None), ((1, 4), None), ((2, 3, 5), None), ((0, 1, 2, 3, 4, 5), None)]


def test_a_promotion_scores_only_the_new_examples_and_equals_the_whole_subset(full_fitness):
    """A promotion to a subset runs only its new slice and equals scoring the whole subset at once (float32);
    the full set is always the full-set fitness itself."""
    ladder = accuracy_ladder(full_fitness, SIZES, seed=4)
    assert ladder.costs == [3 * 6, 3 * 12, 3 * 24]
    work = [ladder.work(1, 0), ladder.work(1), ladder.work(2, 1), ladder.work(0)]
    assert work == [(18, 1), (36, 2), (72, 1), (18, 1)]
    assert ladder.reference_work == (36, 2)
    orders = seeded_orders(full_fitness.engine, 4)
    prefix = subset_engine(full_fitness.engine, {name: order[:12] for name, order in orders.items()})
    settings = full_fitness.unit_settings.__class__(**{**vars(full_fitness.unit_settings),
                                                       "lam": full_fitness.base_lambda})
    rung1 = AccuracyFitness(full_fitness.adapters, settings, full_fitness.template, prefix, full_fitness.experts)
    first, second = ladder.scorer.slices
    for table in TABLES:
        [low] = ladder([(0, table)])
        passes = (first.forward_passes, second.forward_passes, full_fitness.forward_passes)
        [middle] = ladder([(1, table, 0)])
        assert (first.forward_passes, second.forward_passes) == (passes[0], passes[1] + 1)  # slice 1 only
        [top] = ladder([(2, table, 1)])
        assert full_fitness.forward_passes == passes[2] + 1 and first.forward_passes == passes[0]
        assert middle == rung1([table])[0]
        assert top == full_fitness([table])[0]
        assert ladder.references[1] == rung1.reference and ladder.references[2] == full_fitness.reference
        assert isinstance(low, float)
    with pytest.raises(RuntimeError):  # a promotion from a rung the table was never scored on
        ladder([(1, ((5,), None), 0)])


def test_halving_counts_a_promotion_at_its_new_examples(full_fitness):
    ladder = accuracy_ladder(full_fitness, SIZES, seed=2)
    search = ScreenedSearch(ScreenedSettings(popsize=6, generations=2, seed=2, max_prune=0.5, screen=False,
                                             min_examples=6), 2, 3, ladder)
    search.run()
    spent, passes = ladder.reference_work  # the unpruned merge on the subsets' slices
    for record in search.state.history:
        low, middle, top = record["evaluations_per_rung"]
        assert low >= middle >= top
        spent += low * ladder.costs[0] + middle * (ladder.costs[1] - ladder.costs[0]) + top * ladder.costs[2]
        passes += low + middle + top
        assert record["forward_examples"] == spent
    assert search.state.forward_passes == passes
    assert sum(record["evaluations_per_rung"][2] for record in search.state.history) > 0  # promotions ran
