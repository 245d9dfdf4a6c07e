"""The surrogate search: its model against exact arithmetic, its search against brute force on an enumerable
setting, and ENMP's guarantees (never worse than unpruned, ρ cap, resume after SIGKILL, seeded; workers =
serial on a real model: test_search_mask.py)."""

import itertools

import numpy as np
import pytest
from factories import invoke_cli, run_or_stop, run_until_killed
from test_screened_search import EXAMPLES, RHO, TASKS, UNITS, enumerable_landscape

from loramerge_cli.errors import LoramergeError, UsageError
from loramerge_cli.search.decode import max_pruned
from loramerge_cli.search.surrogate import (
    PairwiseModel,
    Posterior,
    ScoredTables,
    SurrogateSearch,
    SurrogateSettings,
    local_maximum,
    posterior_draw,
)


class Landscape:
    """A full-set fitness from a table function, rounded to whole examples of `EXAMPLES` per task."""

    def __init__(self, function, examples=EXAMPLES):
        self.function, self.one_example = function, 100.0 / (TASKS * examples)
        self.calls: list = []

    def __call__(self, candidates):
        self.calls.extend(candidates)
        return [round(self.function(pruned) / self.one_example) * self.one_example for pruned, _ in candidates]


def pairwise(seed, flat, mean=-1.0):
    generator = np.random.Generator(np.random.PCG64(seed))
    gains = generator.normal(mean, 1.5, flat)
    pairs = {pair: generator.normal(0.0, 1.5) for pair in itertools.combinations(range(flat), 2)}
    return lambda pruned: float(sum(gains[i] for i in pruned) + sum(pairs[p] for p in itertools.combinations(pruned,
                                                                                                          2)))


def indicators(tables, size):
    matrix = np.zeros((len(tables), size))
    for row, table in enumerate(tables):
        matrix[row, list(table)] = 1.0
    return matrix


def test_posterior_draw_fits_what_it_observed_and_keeps_the_prior_elsewhere():
    size = 7
    function = pairwise(4, size)
    observed = [t for k in range(3) for t in itertools.combinations(range(size), k)]
    values = np.array([function(t) for t in observed])
    settings = SurrogateSettings(prior_single=3.0, prior_pair=3.0, noise=1e-3)
    draws = [posterior_draw(indicators(observed, size), values, settings, 1, np.random.default_rng(seed))
             for seed in range(3)]
    for draw in draws:  # every table of ≤ 2 units determines the pairwise function exactly
        fitted = [draw.value(row) for row in indicators(observed, size)]
        assert np.allclose(fitted, values, atol=0.02)
        assert np.allclose(np.diag(draw.pair), 0.0)
        assert np.allclose(draw.pair, draw.pair.T)
        larger = indicators([(0, 1, 2, 3)], size)[0]  # and so every larger table (the model is exact here)
        assert draw.value(larger) == pytest.approx(function((0, 1, 2, 3)), abs=0.1)
    unseen = [posterior_draw(indicators([()], size), np.zeros(1), settings, 1, np.random.default_rng(seed))
              for seed in range(200)]  # nothing observed but the empty table: the prior, a² per unit
    assert np.std([draw.single[0] for draw in unseen]) == pytest.approx(3.0, rel=0.2)


def test_the_kernel_is_the_feature_covariance_with_wider_pairs_within_a_unit():
    """K = Φ Σ Φᵀ, built explicitly from one feature per entry and per pair (b·r within a unit: i // T equal), against
    the counting formula the search uses; and prior draws have those standard deviations."""
    units, tasks, size = 3, 4, 12
    settings = SurrogateSettings(prior_single=1.5, prior_pair=0.5, same_unit_ratio=3.0, noise=0.1)
    generator = np.random.default_rng(0)
    tables = [tuple(sorted(generator.choice(size, int(generator.integers(0, 7)), replace=False))) for _ in range(40)]
    pairs = list(itertools.combinations(range(size), 2))
    features = np.array([[1.0 * (i in t) for i in range(size)] + [1.0 * (i in t and j in t) for i, j in pairs]
                         for t in tables])
    variances = [1.5 ** 2] * size + [(0.5 * (3.0 if i // tasks == j // tasks else 1.0)) ** 2 for i, j in pairs]
    expected = features @ np.diag(variances) @ features.T + 0.1 ** 2 * np.eye(len(tables))
    posterior = Posterior.fit(indicators(tables, size), np.zeros(len(tables)), settings, tasks)
    assert np.allclose(posterior.solve(expected), np.eye(len(tables)), atol=1e-6)
    empty = Posterior.fit(indicators([()], size), np.zeros(1), settings, tasks)
    draws = [empty.draw(np.random.default_rng(seed)).pair for seed in range(400)]
    assert np.std([d[0, 1] for d in draws]) == pytest.approx(1.5, rel=0.15)  # entries 0 and 1: unit 0, r·b
    assert np.std([d[0, 4] for d in draws]) == pytest.approx(0.5, rel=0.15)  # units 0 and 1: b
    assert units * tasks == size


@pytest.mark.parametrize("ratio", [-1.0, float("nan"), 101.0])
def test_same_unit_ratio_is_checked(ratio):
    with pytest.raises(UsageError, match="--same-unit-ratio"):
        SurrogateSettings(same_unit_ratio=ratio).check()


def test_local_maximum_is_the_best_table_within_the_cap_on_small_cases():
    generator = np.random.default_rng(0)
    size, k_max = 8, 3
    for _ in range(20):
        upper = np.triu(generator.normal(0, 1, (size, size)), 1)
        model = PairwiseModel(generator.normal(0, 1, size), upper + upper.T)
        peak = local_maximum(model, np.zeros(size), k_max)
        assert peak.sum() <= k_max
        for moved in itertools.chain(range(size), itertools.permutations(range(size), 2)):  # no move gains
            candidate = peak.copy()
            if isinstance(moved, int):
                candidate[moved] = 1 - candidate[moved]
            else:
                if not (candidate[moved[0]] == 1 and candidate[moved[1]] == 0):
                    continue
                candidate[moved[0]], candidate[moved[1]] = 0, 1
            if candidate.sum() <= k_max:
                assert model.value(candidate) <= model.value(peak) + 1e-9


@pytest.mark.parametrize("landscape_seed", [0, 1, 2])
def test_surrogate_against_brute_force(landscape_seed):
    fitness = Landscape(enumerable_landscape(landscape_seed))
    k_max = max_pruned(RHO, UNITS, TASKS)
    tables = [(pruned, None) for k in range(k_max + 1) for pruned in itertools.combinations(range(UNITS * TASKS), k)]
    assert len(tables) == 172
    scores = dict(zip(tables, fitness(tables)))
    optimum = max(scores.values())
    best_single = max(value for (pruned, _), value in scores.items() if len(pruned) == 1)
    assert optimum > best_single + fitness.one_example  # the optimum prunes two units together
    reached = 0
    for seed in (1, 2, 3):
        search = SurrogateSearch(SurrogateSettings(seed=seed, max_prune=RHO, budget=100), UNITS, TASKS,
                                 Landscape(enumerable_landscape(landscape_seed)))
        best = search.run()
        assert best.fitness == scores[(best.pruned, None)]
        assert len(search.state.memo) - 1 <= 100
        assert best.fitness > best_single
        reached += best.fitness >= optimum - fitness.one_example
    assert reached >= 2


def test_never_worse_than_not_pruning_and_within_the_cap():
    fitness = Landscape(lambda pruned: -1.0 - len(pruned))
    search = SurrogateSearch(SurrogateSettings(seed=2, max_prune=0.25, budget=30), 4, 3, fitness)
    best = search.run()
    assert best.pruned == () and best.fitness == 0.0
    assert all(len(pruned) <= 3 for pruned, _ in fitness.calls)
    assert len(set(fitness.calls)) == len(fitness.calls) == 30  # no table scored twice


def test_stops_when_every_table_is_scored():
    fitness = Landscape(lambda pruned: float(len(pruned)))
    search = SurrogateSearch(SurrogateSettings(seed=1, max_prune=0.5, budget=1000), 2, 2, fitness)
    best = search.run()  # 4 units, at most 2 pruned: 1 + 4 + 6 tables
    assert len(search.state.memo) == 11 and len(fitness.calls) == 10
    assert len(best.pruned) == 2


def test_proposals_per_step_are_distinct_and_counted():
    fitness = Landscape(enumerable_landscape(0))
    search = SurrogateSearch(SurrogateSettings(seed=3, max_prune=RHO, budget=40, proposals=4), UNITS, TASKS,
                             fitness)
    search.run()
    assert len(set(fitness.calls)) == len(fitness.calls) == 40
    steps = search.state.history
    assert [r["new_evaluations"] for r in steps] == [8, 8, 2, 4, 4, 4, 4, 4, 2]  # the screen in steps of 8
    assert steps[-1]["forward_examples"] == 0 and steps[-1]["full_evaluations"] == 40  # no engine: no examples


def test_same_seed_same_result_and_resume(tmp_path):
    def run(run_dir=None, stop_after=None, resume=False, seed=11):
        return run_or_stop(SurrogateSearch(SurrogateSettings(seed=seed, max_prune=RHO, budget=40), UNITS, TASKS,
                                           Landscape(enumerable_landscape(1)), run_dir=run_dir), stop_after, resume)

    best, plain = run()
    again, search = run()
    assert [r["tables"] for r in search.state.history] == [r["tables"] for r in plain.state.history]
    other, search = run(seed=12)
    assert [r["tables"] for r in search.state.history] != [r["tables"] for r in plain.state.history]
    run(tmp_path, stop_after=5)
    resumed, search = run(tmp_path, resume=True)
    assert (resumed.pruned, resumed.fitness) == (best.pruned, best.fitness)
    def steps(history):
        return [(r["tables"], r["best_fitness"], r["full_evaluations"]) for r in history]

    assert steps(search.state.history) == steps(plain.state.history)
    assert len((tmp_path / "trajectory.jsonl").read_text().splitlines()) == 3 + 40 - UNITS * TASKS


def test_resume_after_sigkill(tmp_path):
    run_until_killed(f"""
        from test_surrogate_search import Landscape
        from test_screened_search import enumerable_landscape, RHO, UNITS, TASKS
        from loramerge_cli.search.surrogate import SurrogateSearch, SurrogateSettings
        def on_event(kind, record):
            if kind == "proposal" and record["generation"] == 6:
                os.kill(os.getpid(), signal.SIGKILL)
        SurrogateSearch(SurrogateSettings(seed=5, max_prune=RHO, budget=30), UNITS, TASKS,
                        Landscape(enumerable_landscape(2)), run_dir={str(tmp_path)!r}, on_event=on_event).run()
        """)
    settings = SurrogateSettings(seed=5, max_prune=RHO, budget=30)
    fitness = Landscape(enumerable_landscape(2))
    resumed = SurrogateSearch(settings, UNITS, TASKS, fitness, run_dir=tmp_path)
    best = resumed.run(resume=True)
    plain = SurrogateSearch(settings, UNITS, TASKS, Landscape(enumerable_landscape(2)))
    assert (best.pruned, best.fitness) == (plain.run().pruned, plain.best().fitness)
    assert len(fitness.calls) == 30 - UNITS * TASKS - 4  # the proposals after the kill only (steps 3 to 6 ran)
    assert [r["tables"] for r in resumed.state.history] == [r["tables"] for r in plain.state.history]


def test_a_foreign_state_is_refused(tmp_path):
    (tmp_path / "surrogate_state.json").write_text('{"format": "loramerge.surrogate-state/v1", "step": 1, '
                                                   '"forward_examples": 0, "scores": [[[99], 1.0]], '
                                                   '"history": [{"phase": "screen", "new_evaluations": 1}]}')
    search = SurrogateSearch(SurrogateSettings(seed=1, max_prune=RHO), UNITS, TASKS, Landscape(lambda p: 0.0),
                             run_dir=tmp_path)
    with pytest.raises(LoramergeError, match="does not match"):
        search.run(resume=True)


@pytest.mark.parametrize("change", [{"noise": 0.0}, {"prior_pair": float("nan")}, {"proposals": 0},
                                    {"budget": 0}, {"prior_single": -1.0}, {"noise": 1e-170}, {"noise": 1e155},
                                    {"prior_single": 1e10}, {"proposals": 1.5}])
def test_settings_are_checked(change):
    with pytest.raises(UsageError):
        SurrogateSettings(**change).check()


def test_cli_refuses_bad_surrogate_options_before_any_work(tmp_path):
    base = ["search-mask", "--adapters", str(tmp_path / "a"), str(tmp_path / "b"), "--merger", "ta", "--tasks",
            str(tmp_path / "tasks.yaml"), "--out", str(tmp_path / "mask.json")]
    result = invoke_cli([*base, "--strategy", "surrogate", "--noise", "0"])
    assert result.exit_code == 2 and "--noise" in result.output
    result = invoke_cli([*base, "--strategy", "enmp", "--prior-pair", "0.5"])
    assert result.exit_code == 2 and "surrogate" in result.output
    result = invoke_cli([*base, "--strategy", "surrogate", "--popsize", "8"])
    assert result.exit_code == 2 and "--popsize does nothing" in result.output
    assert not (tmp_path / "mask.json").exists()


def test_a_killed_screen_keeps_what_it_scored(tmp_path):
    class Interrupted(Landscape):
        def __call__(self, candidates):
            if len(self.calls) >= 16:
                raise KeyboardInterrupt
            return super().__call__(candidates)

    settings = SurrogateSettings(seed=1, max_prune=RHO, budget=24)
    with pytest.raises(KeyboardInterrupt):
        SurrogateSearch(settings, UNITS, TASKS, Interrupted(enumerable_landscape(0)), run_dir=tmp_path).run()
    fitness = Landscape(enumerable_landscape(0))
    best = SurrogateSearch(settings, UNITS, TASKS, fitness, run_dir=tmp_path).run(resume=True)
    assert fitness.calls[:2] == [((16,), None), ((17,), None)]  # the screen's first 16 were kept
    plain = SurrogateSearch(settings, UNITS, TASKS, Landscape(enumerable_landscape(0)))
    assert best == plain.run()


STATE = {"format": "loramerge.surrogate-state/v1", "step": 1, "forward_examples": 0,
         "history": [{"phase": "screen", "new_evaluations": 2}]}


@pytest.mark.parametrize("scores", [[[[-1], 5.0], [[1], 0.0]], [[[], 40.0], [[1], 0.0]], [[[1], 1.0], [[1], 2.0]],
                                    [[[1.7], 1.0], [[2], 0.0]], [["12", 1.0], [[2], 0.0]], [[[3, 3], 1.0], [[2], 0.0]],
                                    [[[2, 1], 1.0], [[3], 0.0]], [[[1], True], [[2], 0.0]],
                                    [[[1], float("nan")], [[2], 0.0]], [[[1], 1.0]]])
def test_a_damaged_state_is_one_line(tmp_path, scores):
    import json

    from loramerge_cli.search.surrogate import read_state

    (tmp_path / "surrogate_state.json").write_text(json.dumps({**STATE, "scores": scores}))
    with pytest.raises(LoramergeError, match="not a readable surrogate search state"):
        read_state(tmp_path / "surrogate_state.json")


@pytest.mark.parametrize("change", [{"step": 0}, {"step": 5}, {"forward_examples": -5}, {"history": [1, 2]}])
def test_a_state_whose_counts_disagree_is_one_line(tmp_path, change):
    import json

    from loramerge_cli.search.surrogate import read_state

    (tmp_path / "surrogate_state.json").write_text(json.dumps({**STATE, "scores": [[[1], 1.0], [[2], 0.5]],
                                                               **change}))
    with pytest.raises(LoramergeError, match="not a readable surrogate search state"):
        read_state(tmp_path / "surrogate_state.json")


def test_a_budget_below_the_screen_is_refused():
    with pytest.raises(LoramergeError, match="less than the screen's 18"):
        SurrogateSearch(SurrogateSettings(seed=1, max_prune=RHO, budget=5), UNITS, TASKS, Landscape(lambda p: 0.0))


def test_the_progress_total_is_what_the_space_allows():
    search = SurrogateSearch(SurrogateSettings(seed=1, max_prune=0.5, budget=1000), 2, 2, Landscape(len))
    record = search.step() if search.start() is None else None
    assert record["total"] == 10 and record["budget"] == 1000


@pytest.mark.parametrize("options", [{"seed": 5}, {"max_prune": 0.1}, {"budget": 3}, {"restarts": "3"},
                                     {"restarts": 2.5}, {"restarts": True}])
def test_the_library_refuses_what_the_cli_cannot_express(options):
    from dataclasses import replace

    from loramerge_cli.evaluation.engine import EvalSettings
    from loramerge_cli.merging.merge import MergeConfig
    from loramerge_cli.search.enmp import EnmpSettings
    from loramerge_cli.search.plan import SearchRequest, check_request

    request = replace(SearchRequest(adapters=["a", "b"], merge=MergeConfig(merger="ta"), tasks="t.yaml",
                                    eval=EvalSettings(), strategy="surrogate", enmp=EnmpSettings(seed=1)),
                      options=options)
    with pytest.raises(UsageError):
        check_request(request)


def test_a_non_finite_fitness_stops_the_search_and_keeps_the_state_readable(tmp_path):
    from loramerge_cli.search.surrogate import read_state

    def fitness(candidates):
        return [float("nan") if pruned == (12,) else -1.0 for pruned, _ in candidates]

    search = SurrogateSearch(SurrogateSettings(seed=1, max_prune=RHO), UNITS, TASKS, fitness, run_dir=tmp_path)
    with pytest.raises(LoramergeError, match=r"table \[12\] is nan"):
        search.run()
    step, _, scores, _ = read_state(tmp_path / "surrogate_state.json")  # the first chunk of the screen, saved
    assert step == 1 and len(scores) == 8


def test_priors_far_apart_fit_with_jitter_instead_of_failing():
    """a² = 1e8 beside σ² = 1e-8 (all within the allowed ranges) made the kernel indefinite in rounding."""
    settings = SurrogateSettings(prior_single=1e4, prior_pair=1e-4, same_unit_ratio=0.0, noise=1e-4)
    generator = np.random.default_rng(1)
    tables = [tuple(sorted(generator.choice(12, 2, replace=False))) for _ in range(60)] + [(0,), (1,), (0,)]
    draw = posterior_draw(indicators(tables, 12), generator.normal(0, 1, len(tables)), settings, 4,
                          np.random.default_rng(0))
    assert np.isfinite(draw.single).all() and np.isfinite(draw.pair).all()


def test_the_posterior_mean_is_the_draws_average_and_exploitation_proposes_its_maximum():
    """`--exploit-every K`: every K-th proposal maximises the posterior mean (the draw's formula without the prior
    draw and the noise). Checked against the average of many draws, and that the exploiting step proposes the
    mean's best unscored local maximum while the others stay Thompson draws (identical to --exploit-every 0)."""
    size = 6
    function = pairwise(7, size)
    observed = [(), (0,), (1,), (2,), (0, 1), (3, 4)]
    values = np.array([function(t) for t in observed])
    settings = SurrogateSettings(max_prune=0.5)
    posterior = Posterior.fit(indicators(observed, size), values, settings, 2)
    draws = [posterior.draw(np.random.default_rng(seed)) for seed in range(4000)]
    mean = posterior.mean()
    assert np.allclose(np.mean([draw.single for draw in draws], axis=0), mean.single, atol=0.06)
    assert np.allclose(np.mean([draw.pair for draw in draws], axis=0), mean.pair, atol=0.04)

    def first_proposals(every):
        search = SurrogateSearch(SurrogateSettings(seed=3, max_prune=0.5, budget=24, exploit_every=every), UNITS,
                                 TASKS, Landscape(pairwise(5, UNITS * TASKS)))
        search.run()
        return [record["tables"][0] for record in search.state.history if record["phase"] == "proposal"]

    draws_only, exploiting = first_proposals(0), first_proposals(4)
    assert exploiting[:3] == draws_only[:3] and exploiting[3] != draws_only[3]  # proposal 4 is the mean's


def test_the_factor_grown_step_by_step_is_the_one_computed_at_once_and_factors_the_kernel():
    """The search kept no factor and refactored K + σ²I (O(n³)) at every step; it now keeps L in blocks of fixed
    rows. Grown over uneven steps (a resumed search adds every saved table at once), it is the same to the bit,
    and L Lᵀ = K across blocks and in the partial last one; the solves through its two parts are K⁻¹'s."""
    settings = SurrogateSettings(prior_single=1.2, prior_pair=0.3, noise=0.4)
    size, task_count = 30, 3
    generator = np.random.default_rng(5)
    tables = [(), *[tuple(sorted(generator.choice(size, int(generator.integers(1, 6)), replace=False).tolist()))
                    for _ in range(150)]]
    grown = ScoredTables(size, task_count, settings)
    for start, stop in ((0, 1), (1, 9), (9, 64), (64, 65), (65, 130), (130, 151)):
        grown.add(tables[start:stop])
        grown.factor()
    at_once = ScoredTables(size, task_count, settings, capacity=151)
    at_once.add(tables)
    (kept, rest), (kept_once, rest_once) = grown.factor(), at_once.factor()
    assert grown.factored == at_once.factored == 128 and rest.shape == (23, 151)
    assert np.array_equal(kept, kept_once) and np.array_equal(rest, rest_once)
    factor = np.zeros((151, 151))
    factor[:128, :128], factor[128:] = kept, rest
    assert np.allclose(factor @ factor.T, grown.kernel, rtol=0, atol=1e-10)
    values = generator.normal(size=151)
    posterior = Posterior.of(grown, values)
    assert np.allclose(posterior.solve(values), np.linalg.solve(grown.kernel, values))


def test_the_factor_holds_at_priors_far_apart():
    """At --prior-single 1e4 beside --noise 1e-4 (both allowed) a block's Schur complement is rounding noise:
    its jitter must follow the kernel's scale, not its own diagonal's (the search stopped with "cannot be
    fitted" after 137 tables where a new factorisation of the whole kernel went on)."""
    settings = SurrogateSettings(prior_single=1e4, prior_pair=1e-4, noise=1e-4)
    generator = np.random.default_rng(0)
    tables = [(), *[(i,) for i in range(8)]]
    tables += [tuple(sorted(generator.choice(8, int(generator.integers(1, 3)), replace=False).tolist()))
               for _ in range(200)]
    scored = ScoredTables(8, 1, settings)
    scored.add(tables)
    kept, rest = scored.factor()
    assert np.isfinite(kept).all() and np.isfinite(rest).all()


def _local_maximum_full_table(model, start, k_max):
    """The hill-climb as it was, from scratch at every move: g = w + V x anew, every move's gain listed (adds,
    then removes, then every swap in one |inside| × U·T table, row-major), the first of the largest taken while
    it gains more than 1e-12."""
    members = start.copy()
    while True:
        gain = model.single + model.pair @ members
        inside, outside = np.flatnonzero(members), np.flatnonzero(members == 0)
        moves = []  # (gain, added, removed), in the order the climb prefers on ties
        if len(inside) < k_max and len(outside):
            moves.append((gain[outside].max(), outside[int(np.argmax(gain[outside]))], None))
        if len(inside):
            moves.append((-gain[inside].min(), None, inside[int(np.argmin(gain[inside]))]))
        if len(inside) and len(outside):
            table = gain[None, :] - gain[inside][:, None] - model.pair[inside]
            table[:, inside] = -np.inf
            row, column = np.unravel_index(int(np.argmax(table)), table.shape)
            moves.append((table[row, column], column, inside[row]))
        best = max((move for move in moves if move[0] > 1e-12), key=lambda move: move[0], default=None)
        if best is None:
            return members
        _, added, removed = best
        if added is not None:
            members[added] = 1.0
        if removed is not None:
            members[removed] = 0.0


@pytest.mark.parametrize("swap_rows", [1, 3, 16])
def test_the_hill_climb_bounding_swap_rows_climbs_as_the_full_table_did(monkeypatch, swap_rows):
    """The climb computed every swap's gain (|inside| × U·T at each move: 3 s a climb at 224 × 8); it now computes
    rows in the order of a bound on their best gain and stops when none left can win. The same moves, ties
    included (integer-valued models tie often), over chunk boundaries and with the pruning at work."""
    from loramerge_cli.search import surrogate

    monkeypatch.setattr(surrogate, "SWAP_ROWS", swap_rows)
    generator = np.random.default_rng(swap_rows)
    for trial in range(60):
        size = int(generator.integers(20, 90))
        if trial % 2:
            single = generator.integers(-3, 4, size).astype(float)
            pair = np.triu(generator.integers(-2, 3, (size, size)).astype(float), 1)
        else:
            single = generator.normal(0, 1, size)
            pair = np.triu(generator.normal(0, 0.3, (size, size)), 1)
        k_max = int(generator.integers(1, size // 2))
        start = np.zeros(size)
        start[generator.choice(size, int(generator.integers(0, k_max + 1)), replace=False)] = 1.0
        expected = _local_maximum_full_table(PairwiseModel(single, pair + pair.T), start, k_max)
        assert np.array_equal(local_maximum(PairwiseModel(single, pair + pair.T), start, k_max), expected)
