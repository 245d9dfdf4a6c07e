"""The screened search: against brute force on an enumerable setting, and ENMP's
guarantees (never worse than unpruned, ρ cap, resume after SIGKILL, seeded; workers = serial and the
subsets on a real model: test_search_mask.py)."""

import itertools

import pytest
from factories import run_or_stop, run_until_killed

from loramerge_cli.errors import LoramergeError, UsageError
from loramerge_cli.search.decode import max_pruned
from loramerge_cli.search.fidelity import FidelityLadder, rung_sizes
from loramerge_cli.search.screened import ScreenedSearch, ScreenedSettings, prior_mean

# -- a synthetic ladder: exact tabular fitness, each subset adding deterministic noise -----------------


class TableRung:
    """Fitness of a table = sum of its units' gains (+ a pair bonus), plus noise fixed per table and rung."""

    def __init__(self, gains, noise, bonus=None):
        self.gains, self.noise, self.bonus = gains, noise, bonus or {}
        self.reference = 0.0
        self.calls = []

    def exact(self, pruned):
        return sum(self.gains[i] for i in pruned) + sum(self.bonus.get(pair, 0.0)
                                                         for pair in itertools.combinations(pruned, 2))

    def __call__(self, candidates):
        self.calls.extend(candidates)
        return [self.exact(pruned) + self.noise * ((hash(pruned) % 7) - 3) / 3 for pruned, _ in candidates]


def table_ladder(gains, bonus=None):
    rungs = [TableRung(gains, 0.3, bonus), TableRung(gains, 0.1, bonus), TableRung(gains, 0.0, bonus)]
    return FidelityLadder(rungs, [30, 90, 270], [100 / 30, 100 / 90, 100 / 270])


GAINS = [-1.0, 0.5, -0.2, 0.8, -2.0, 0.1, -0.4, 0.3, -1.5, 0.05, -0.3, -0.1]  # 4 units × 3 tasks


def test_rung_sizes():
    assert rung_sizes(256, 3, 3, 24) == [29, 86, 256]
    assert rung_sizes(256, 3, 4, 16) == [16, 64, 256]
    assert rung_sizes(24, 3, 3, 24) == [24]  # too few examples: the full set only
    assert rung_sizes(10, 1, 3, 1) == [10]


def test_prior_prunes_the_best_helpful_units_first():
    mean = prior_mean([3, 1, 0, 2], [0.8, 0.5, -1.0, 0.3], 2, 0.5, 0.0)
    assert mean[3] > 0 and mean[1] > 0  # the two best helpful units start above θ
    assert mean[0] < 0 and mean[2] < mean[0]  # the rest below, worse ranks lower


def test_never_worse_than_not_pruning_and_rho_cap():
    ladder = table_ladder([-1.0] * 12)  # every pruning hurts
    search = ScreenedSearch(ScreenedSettings(popsize=6, generations=3, seed=2, max_prune=0.25), 4, 3, ladder)
    best = search.run()
    assert best.pruned == () and best.fitness == 0.0
    k_max = max_pruned(0.25, 4, 3)
    assert all(len(pruned) <= k_max for rung in ladder.rungs for pruned, _ in rung.calls)


def test_finds_the_stack_of_helpful_units_and_counts_its_budget():
    ladder = table_ladder(GAINS)
    search = ScreenedSearch(ScreenedSettings(popsize=6, generations=4, seed=1, max_prune=0.25), 4, 3, ladder)
    best = search.run()
    assert best.pruned == (1, 3, 7)  # the three best gains (K_max = 3)
    history = search.state.history
    assert [record["phase"] for record in history] == ["screen", "greedy", "greedy"] + ["cma"] * 4
    assert [record["greedy_table"] for record in history[1:3]] == [[1, 3], [1, 3, 7]]
    assert [record["cma_generation"] for record in history[3:]] == [1, 2, 3, 4]
    for record in history:
        assert {"full_evaluations", "forward_examples"} <= set(record)
    spent = sum(ladder.costs[r] * len(set(rung.calls)) for r, rung in enumerate(ladder.rungs))
    assert search.state.forward_examples == spent + ladder.costs[0] + ladder.costs[1]  # + the subsets' references
    assert history[-1]["full_evaluations"] == len(ladder.rungs[-1].calls) == len(set(ladder.rungs[-1].calls))


def test_parts_switch_off():
    on = ScreenedSearch(ScreenedSettings(popsize=6, generations=3, seed=3, max_prune=0.25), 4, 3, table_ladder(GAINS))
    on.run()
    full_only = table_ladder(GAINS)
    off = ScreenedSearch(ScreenedSettings(popsize=6, generations=3, seed=3, max_prune=0.25, halving=False,
                                          screen=False, redraws=0), 4, 3, full_only)
    off.run()
    assert not full_only.rungs[0].calls and not full_only.rungs[1].calls  # no subset scoring
    assert off.state.history[0]["phase"] == "cma" and off.state.prior is None
    assert on.state.history[0]["phase"] == "screen"
    assert sum(record["redraws"] for record in off.state.history) == 0
    assert sum(record["redraws"] for record in on.state.history) > 0


def test_greedy_phase_picks_what_full_greedy_picks():
    """Greedy restricted to the pool of the best single units picks full greedy's table when full greedy's
    units are in the pool, for a fraction of full greedy's evaluations, and CMA-ES starts from it."""
    from loramerge_cli.search.baselines import greedy_search

    # 5 units × 4 tasks, K_max 4: the single gains rank 7, 2, 11, 4, 15, … ; pair bonuses make greedy's
    # second pick the third-best single (11) and keep the fourth-best (4) out of its table
    gains = [-0.5, -0.2, 0.9, -0.8, 0.6, -1.0, -0.3, 1.2, -0.1, -0.6, -0.4, 0.7, -0.9, -0.7, -0.05, 0.3,
             -1.1, -0.15, -0.25, -0.35]
    bonus = {(7, 11): 0.5, (2, 7): -0.3, (4, 7): -0.9, (4, 11): -0.9, (4, 15): -0.9, (2, 4): -0.9}
    full = TableRung(gains, 0.0, bonus)
    ledger = greedy_search(full, 20, 4, 1000)
    greedy_table = ledger.best().pruned
    assert greedy_table == (2, 7, 11, 15) and len(ledger.memo) - 1 == 20 + 19 + 18 + 17
    ladder = table_ladder(gains, bonus)
    search = ScreenedSearch(ScreenedSettings(popsize=6, generations=3, seed=1, max_prune=0.2, greedy_pool=6), 5, 4,
                            ladder)
    best = search.run()
    assert tuple(sorted(search.state.greedy["table"])) == greedy_table
    assert search.state.greedy["table"] == [7, 11, 2, 15]  # in the order added, as full greedy adds them
    assert best.fitness >= full.exact(greedy_table)
    rounds = [record for record in search.state.history if record["phase"] == "greedy"]
    assert [r["new_evaluations"] + r["cache_hits"] for r in rounds] == [5, 4, 3]  # pool 6: 5 + 4 + 3
    assert all(record["evaluations_per_rung"][:2] == [0, 0] for record in rounds)  # the full set only
    mean = search.state.strategy.x0  # CMA-ES starts at its table
    assert all(mean[i] > 0 for i in greedy_table) and sum(m > 0 for m in mean) == 4

    small = ScreenedSearch(ScreenedSettings(popsize=6, generations=3, seed=1, max_prune=0.2, greedy_pool=3), 5, 4,
                           table_ladder(gains, bonus))
    small.run()
    assert small.state.greedy["table"] == [7, 11, 2]  # the pool used up: 15 is not in it


def test_greedy_phase_stops_when_no_addition_helps_and_switches_off():
    gains = [0.5, -1.0, 0.4, -2.0, -0.1, -0.3] * 2  # 4 units × 3 tasks
    bonus = {(0, 2): -1.0, (0, 6): -1.0, (0, 8): -1.0}  # after unit 0 nothing helps
    search = ScreenedSearch(ScreenedSettings(popsize=6, generations=2, seed=2, max_prune=0.5), 4, 3,
                            table_ladder(gains, bonus))
    search.run()
    phases = [record["phase"] for record in search.state.history]
    assert phases == ["screen", "greedy", "cma", "cma"] and search.state.greedy["table"] == [0]
    off = ScreenedSearch(ScreenedSettings(popsize=6, generations=2, seed=2, max_prune=0.5, greedy_pool=0), 4, 3,
                         table_ladder(gains, bonus))
    off.run()
    assert [record["phase"] for record in off.state.history] == ["screen", "cma", "cma"]
    assert off.state.greedy is None
    budget = ScreenedSearch(ScreenedSettings(popsize=6, generations=2, seed=2, max_prune=0.5, budget=16), 4, 3,
                            table_ladder(gains, bonus))
    budget.run()  # the screen's 12 singles (no stacks before the greedy phase), then 4 of its first round
    assert len(budget.state.memo) - 1 == 16 and budget.state.history[-1]["phase"] == "greedy"


def test_resume_inside_the_greedy_phase(tmp_path):
    def run(run_dir=None, stop_after=None, resume=False):
        return run_or_stop(ScreenedSearch(ScreenedSettings(popsize=6, generations=3, seed=7, max_prune=0.25), 4, 3,
                                          table_ladder(GAINS), run_dir=run_dir), stop_after, resume)

    best, plain = run()
    assert [record["phase"] for record in plain.state.history][:3] == ["screen", "greedy", "greedy"]
    run(tmp_path, stop_after=2)  # the screen and the first greedy round
    resumed, search = run(tmp_path, resume=True)
    assert (resumed.pruned, resumed.fitness) == (best.pruned, best.fitness)
    assert search.state.history == [dict(r, seconds=s["seconds"], seconds_per_evaluation=s["seconds_per_evaluation"])
                                    for r, s in zip(plain.state.history, search.state.history)]
    assert search.state.forward_examples == plain.state.forward_examples


def test_redraw_scores_new_tables_only():
    ladder = table_ladder(GAINS)
    search = ScreenedSearch(ScreenedSettings(popsize=6, generations=5, seed=4, max_prune=0.25, halving=False),
                            4, 3, ladder)
    search.run()
    calls = ladder.rungs[-1].calls
    assert len(calls) == len(set(calls)) and ((), None) not in calls
    cma = [record for record in search.state.history if record["phase"] == "cma"]
    assert all(record["new_evaluations"] + record["cache_hits"] == 6 for record in cma)
    assert sum(record["new_evaluations"] for record in cma) > sum(record["cache_hits"] for record in cma)


def test_same_seed_same_result_and_resume(tmp_path):
    def run(run_dir=None, stop_after=None, resume=False):
        return run_or_stop(ScreenedSearch(ScreenedSettings(popsize=6, generations=5, seed=11, max_prune=0.25), 4, 3,
                                          table_ladder(GAINS), run_dir=run_dir), stop_after, resume)

    best, plain = run()
    again, _ = run()
    assert (again.pruned, again.fitness) == (best.pruned, best.fitness)
    run(tmp_path, stop_after=3)
    resumed, search = run(tmp_path, resume=True)
    assert (resumed.pruned, resumed.fitness) == (best.pruned, best.fitness)
    assert [r["best_fitness"] for r in search.state.history] == [r["best_fitness"] for r in plain.state.history]
    assert search.state.forward_examples == plain.state.forward_examples
    assert len((tmp_path / "trajectory.jsonl").read_text().splitlines()) == 8  # screen, 2 greedy rounds, 5 generations


def test_resume_after_sigkill(tmp_path):
    run_until_killed(f"""
        from test_screened_search import GAINS, table_ladder
        from loramerge_cli.search.screened import ScreenedSearch, ScreenedSettings
        def on_event(kind, record):
            if kind == "generation" and record["generation"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        ScreenedSearch(ScreenedSettings(popsize=6, generations=6, seed=5, max_prune=0.25), 4, 3, table_ladder(GAINS),
                       run_dir={str(tmp_path)!r}, on_event=on_event).run()
        """)
    settings = ScreenedSettings(popsize=6, generations=6, seed=5, max_prune=0.25)
    resumed = ScreenedSearch(settings, 4, 3, table_ladder(GAINS), run_dir=tmp_path)
    best = resumed.run(resume=True)
    plain = ScreenedSearch(settings, 4, 3, table_ladder(GAINS)).run()
    assert (best.pruned, best.fitness) == (plain.pruned, plain.fitness)
    assert len(resumed.state.history) == 9


def test_settings_are_checked():
    with pytest.raises(LoramergeError, match="seed"):
        ScreenedSearch(ScreenedSettings(seed=0), 2, 2, table_ladder([0.0] * 4))
    with pytest.raises(LoramergeError, match="redraws"):
        ScreenedSettings(redraws=-1).check()


# -- an enumerable setting: every feasible table scored by brute force ----------------------------------
# 6 blocks × 3 tasks = 18 units, at most 2 pruned: 172 tables (the Llama classifier's shape). The
# fitness is tabular (single-unit gains and pair interactions, in points; scores move by whole examples
# of 48 per task), each subset adds the sampling noise of its size; the strategy code is the real one.

UNITS, TASKS, RHO, EXAMPLES = 6, 3, 0.12, 48


class ExampleRung:
    """A rung scoring `count` examples per task: the exact fitness rounded to whole examples, plus a
    table's sampling noise on `count` examples (seeded by the table, so it repeats)."""

    def __init__(self, landscape, count):
        self.landscape, self.count = landscape, count
        self.reference = 0.0

    def __call__(self, candidates):
        import numpy as np

        one = 100.0 / (TASKS * self.count)
        values = []
        for pruned, _ in candidates:
            exact = self.landscape(pruned)
            if self.count < EXAMPLES:
                generator = np.random.Generator(np.random.PCG64([self.count, *pruned, 99]))
                exact += generator.normal(0.0, 1.5 * (EXAMPLES / self.count) ** 0.5 - 1.5)
            values.append(one * round(exact / one))
        return values


@pytest.mark.parametrize("screen_rungs", [2, 3])
def test_a_halved_screen_scores_the_singles_on_the_subsets_first(screen_rungs):
    """The singles are halved over the last `screen_rungs` rungs: only the best go on to the full set, the
    greedy phase starts from the best full-set single, and the search still finds the best stack."""
    ladder = table_ladder(GAINS)
    settings = ScreenedSettings(popsize=6, generations=4, seed=1, max_prune=0.25, screen_rungs=screen_rungs)
    search = ScreenedSearch(settings, 4, 3, ladder)
    best = search.run()
    assert best.pruned == (1, 3, 7)
    screen = search.state.history[0]
    per_rung = screen["evaluations_per_rung"]
    assert per_rung[:3 - screen_rungs] == [0] * (3 - screen_rungs) and per_rung[3 - screen_rungs] == 12
    assert 0 < per_rung[2] < 12  # only the best singles reach the full set
    assert search.state.history[1]["phase"] == "greedy"
    with pytest.raises(UsageError):
        ScreenedSettings(screen_rungs=0).check()
    with pytest.raises(UsageError):
        ScreenedSettings(screen_rungs=4).check()


def enumerable_landscape(seed):
    import numpy as np

    generator = np.random.Generator(np.random.PCG64(seed))
    flat = UNITS * TASKS
    gains = generator.normal(-1.0, 1.5, flat)
    pairs = {pair: generator.normal(0.0, 1.5) for pair in itertools.combinations(range(flat), 2)}
    return lambda pruned: float(sum(gains[i] for i in pruned)
                                + sum(pairs[p] for p in itertools.combinations(pruned, 2)))


@pytest.mark.parametrize("landscape_seed", [0, 1, 2])
def test_screened_search_against_brute_force(landscape_seed):
    landscape = enumerable_landscape(landscape_seed)
    sizes = rung_sizes(EXAMPLES, 3, 3, 8)
    assert sizes == [16, 48]
    rungs = [ExampleRung(landscape, count) for count in sizes]
    ladder = FidelityLadder(rungs, [TASKS * count for count in sizes], [100.0 / (TASKS * count) for count in sizes])
    k_max = max_pruned(RHO, UNITS, TASKS)
    tables = [(pruned, None) for k in range(k_max + 1) for pruned in itertools.combinations(range(UNITS * TASKS), k)]
    assert len(tables) == 172
    scores = dict(zip(tables, rungs[-1](tables)))
    optimum = max(scores.values())
    best_single = max(value for (pruned, _), value in scores.items() if len(pruned) == 1)
    one_example = ladder.one_example[-1]
    assert optimum > best_single + one_example  # the optimum prunes two units together
    reached = 0
    for seed in (1, 2, 3):
        settings = ScreenedSettings(popsize=8, generations=30, seed=seed, max_prune=RHO, budget=100)
        search = ScreenedSearch(settings, UNITS, TASKS, ladder)
        best = search.run()
        assert best.fitness == scores[(best.pruned, None)]  # the full set's score
        assert len(search.state.memo) - 1 <= 100
        assert best.fitness > best_single
        reached += best.fitness >= optimum - one_example
    assert reached >= 2
