"""ENMP search core: decoding (docs/algorithms.md, ENMP), memo, best-mask rule, checkpoint and resume."""

import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from factories import run_or_stop

from loramerge_cli.errors import LoramergeError
from loramerge_cli.search.decode import decode_mask, decode_scale, max_pruned
from loramerge_cli.search.enmp import EnmpSearch, EnmpSettings


def worked_latent() -> np.ndarray:
    z = -np.ones(12)
    z[1], z[5], z[7], z[10] = 0.3, 2.0, -0.1, 0.9
    return z


def test_decoding_worked_examples():
    z = worked_latent()
    assert max_pruned(0.25, 4, 3) == 3
    assert decode_mask(z, 3) == (1, 5, 10)  # (ℓ, t) = (0, 1), (1, 2), (3, 1)
    assert decode_mask(z, max_pruned(0.1, 4, 3)) == (5,)
    assert decode_mask(-np.ones(12), 3) == ()  # an all-(−1) latent prunes nothing


def test_k_max_is_exact_decimal():
    assert max_pruned(0.29, 10, 10) == 29  # float 0.29·100 = 28.999…
    assert max_pruned(0.2, 32, 6) == 38 and max_pruned(0.2, 12, 8) == 19


def test_ties_take_lower_index_and_threshold_is_strict():
    z = np.array([0.5, 0.5, 0.5, 0.0])
    assert decode_mask(z, 2) == (0, 1)
    assert decode_mask(z, 4, threshold=0.5) == ()


def test_flat_index_grid_mapping():
    assert divmod(5, 3) == (1, 2)  # flat 5 with T = 3 -> (unit 1, task 2)
    assert divmod(7, 6) == (1, 1) and divmod(9, 8) == (1, 1)


def test_addscale_starts_at_base_lambda():
    assert decode_scale(0.0, 0.3) == 0.3
    assert decode_scale(1.0, 1.0) == float(f"{2 / (1 + math.exp(-1)):.3g}")


def counting_fitness(bad):
    calls = []

    def fitness(candidates):
        calls.extend(candidates)
        return [sum(1.0 if i in bad else -0.25 for i in pruned) for pruned, _ in candidates]

    return fitness, calls


def test_memo_and_best_rule():
    fitness, calls = counting_fitness({2, 9})
    search = EnmpSearch(EnmpSettings(popsize=8, generations=6, seed=5), 4, 3, fitness)
    best = search.run()
    assert len(calls) == len(set(calls))  # each decoded mask evaluated once
    assert ((), None) not in calls  # the unpruned merge is known: fitness 0
    assert best.fitness >= 0.0
    top = max(e.fitness for e in search.state.memo.values())
    assert best.fitness == top
    ties = [e for e in search.state.memo.values() if e.fitness == top]
    assert len(best.pruned) == min(len(e.pruned) for e in ties)


def test_never_worse_than_not_pruning():
    fitness, _ = counting_fitness(set())  # every pruning hurts
    best = EnmpSearch(EnmpSettings(popsize=6, generations=3, seed=2, x0=1.0), 4, 3, fitness).run()
    assert best.pruned == () and best.fitness == 0.0


def test_same_seed_same_result_and_resume(tmp_path):
    def run(run_dir=None, stop_after=None, resume=False):
        fitness, _ = counting_fitness({1, 4, 7})
        search = EnmpSearch(EnmpSettings(popsize=8, generations=8, seed=11), 3, 3, fitness, run_dir=run_dir)
        return run_or_stop(search, stop_after, resume)

    best, plain = run()
    run(tmp_path, stop_after=3)
    resumed, search = run(tmp_path, resume=True)
    assert (resumed.pruned, resumed.fitness) == (best.pruned, best.fitness)
    assert [r["best_fitness"] for r in search.state.history] == [r["best_fitness"] for r in plain.state.history]
    assert len((tmp_path / "trajectory.jsonl").read_text().splitlines()) == 8


def test_resume_after_sigkill(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_enmp_search import counting_fitness
        from loramerge_cli.search.enmp import EnmpSearch, EnmpSettings
        fitness, _ = counting_fitness({{1, 4, 7}})
        def on_generation(record):
            if record["generation"] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        EnmpSearch(EnmpSettings(popsize=8, generations=8, seed=11), 3, 3, fitness,
                   run_dir={str(tmp_path)!r}, on_generation=on_generation).run()
        """
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert process.returncode == -signal.SIGKILL
    fitness, _ = counting_fitness({1, 4, 7})
    resumed = EnmpSearch(EnmpSettings(popsize=8, generations=8, seed=11), 3, 3, fitness, run_dir=tmp_path)
    best = resumed.run(resume=True)
    fitness, _ = counting_fitness({1, 4, 7})
    plain = EnmpSearch(EnmpSettings(popsize=8, generations=8, seed=11), 3, 3, fitness).run()
    assert (best.pruned, best.fitness) == (plain.pruned, plain.fitness)


def test_seed_zero_refused():
    with pytest.raises(LoramergeError, match="seed"):
        EnmpSearch(EnmpSettings(seed=0), 2, 2, lambda c: [0.0] * len(c))


def test_paper_enmp_draws_are_pinned():
    """`--strategy enmp` stays the paper's: one seed's decoded masks, generation by generation (x0 = −1, σ0 = 0.5)."""
    fitness, _ = counting_fitness({2, 9})
    search = EnmpSearch(EnmpSettings(popsize=8, generations=3, seed=1), 8, 4, fitness)
    drawn = []
    decode = search.decode
    search.decode = lambda x: drawn.append(decode(x)[0]) or decode(x)
    search.run()
    assert drawn == [
        (30,), (1,), (), (28,), (), (23,), (9,), (),
        (), (), (), (), (), (), (9,), (6,),
        (3, 5), (9, 27), (9, 18), (9,), (5, 9, 20), (8, 9), (9,), (9,),
    ]
    fitness, _ = counting_fitness({2, 9})
    search = EnmpSearch(EnmpSettings(popsize=6, generations=3, seed=7, x0=0.0), 4, 3, fitness)
    drawn = []
    decode = search.decode
    search.decode = lambda x: drawn.append(decode(x)[0]) or decode(x)
    search.run()
    assert drawn == [(7, 10), (3, 11), (0, 10), (1, 8), (1, 10), (6, 7), (0, 10), (7, 10), (7, 9), (0, 1), (3, 7),
                     (0, 1), (7, 9), (7, 9), (2, 7), (7, 9), (1, 10), (9, 10)]
