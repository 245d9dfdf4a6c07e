"""The chunked full-space kernel (merging/full_space.py) against the generic (T × D) kernels, and the
randomized truncation against the exact one."""

from __future__ import annotations

import dense_reference as ref
import pytest
import torch

from loramerge_cli.merging import elementwise, full_space, sparsify
from loramerge_cli.merging.elementwise import TiesOptions
from loramerge_cli.merging.full_space import FullSpaceJob, merge_full_space
from loramerge_cli.merging.lowrank import LowRank, truncate_dense


def integer_tasks(count=4, m=9, n=11, seed=0):
    """Integer factors: many ties at the trim threshold and many exactly cancelling sign sums."""
    generator = torch.Generator().manual_seed(seed)
    return [
        LowRank(torch.randint(-2, 3, (m, 1), generator=generator).double(),
                torch.randint(-2, 3, (1, n), generator=generator).double())
        for _ in range(count)
    ]


def generic(tasks, keeps, weights, job: FullSpaceJob):
    rows = []
    for task, keep in zip(tasks, keeps):
        dense = task.dense()
        if keep is not None:
            dense = elementwise.apply_dare(dense, keep, job.drop_rate, job.dare_rescale)
        rows.append(dense.reshape(-1))
    X = torch.stack(rows)
    densities = job.densities or [1.0] * len(tasks)
    w = torch.tensor(weights, dtype=torch.float64)
    if job.outliers is not None:  # Breadcrumbs: its band of magnitudes, then a sum or an election
        X = sparsify.breadcrumbs_trim(X, densities, job.outliers, None, job.keep_rule)
        merged = elementwise.elect_and_merge(X, job.options, w) if job.kind == "ties" else X.sum(dim=0)
        return merged.reshape(tasks[0].shape)
    if job.kind == "ties":
        out = elementwise.ties(X, densities, None, job.keep_rule, job.options, w)
    elif job.kind == "magnitude":
        out = elementwise.magnitude_prune(X, densities, None, job.keep_rule)
    else:
        out = X.sum(dim=0)
    return out.reshape(tasks[0].shape)


JOBS = [
    FullSpaceJob("ties", [0.5, 0.3, 0.7, 0.45]),
    FullSpaceJob("ties", [0.6] * 4, "floor", TiesOptions("count", "weight", "unweighted")),
    FullSpaceJob("ties", [0.6] * 4, "round", TiesOptions("mass", "none", "weighted"), 0.3, "l1"),
    FullSpaceJob("ties", None, options=TiesOptions("count", "count", "weighted"), drop_rate=0.4),
    FullSpaceJob("magnitude", [0.35] * 4, "floor"),
    FullSpaceJob("sum", None, drop_rate=0.25),
    FullSpaceJob("sum", [0.5, 0.3, 0.7, 0.45], outliers=0.1),  # breadcrumbs
    FullSpaceJob("sum", [0.6] * 4, "floor", outliers=0.05),
    FullSpaceJob("sum", None, outliers=0.2),  # outliers dropped, everything else kept
    FullSpaceJob("sum", [0.01] * 4, "floor", outliers=0.3),  # a band of nothing
    FullSpaceJob("ties", [0.5, 0.3, 0.7, 0.45], outliers=0.1),  # breadcrumbs_ties
    FullSpaceJob("ties", [0.8] * 4, "round", TiesOptions("count", "weight", "unweighted"), outliers=0.02),
]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 19])
@pytest.mark.parametrize("job", JOBS, ids=range(len(JOBS)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_kernel_equals_the_generic_one(job, chunk, seed, monkeypatch):
    monkeypatch.setattr(full_space, "CHUNK_ENTRIES", chunk)
    tasks = integer_tasks(seed=seed)
    weights = [1.0, -0.5, 2.0, 0.25]
    tasks = [LowRank(t.left * w, t.right) for t, w in zip(tasks, weights)]
    keeps = [elementwise.dare_keep_mask((9, 11), job.drop_rate, seed + 1, f"t{i}", "m") if job.drop_rate else None
             for i in range(4)]
    fast = merge_full_space(tasks, keeps, weights, job)
    assert torch.allclose(fast, generic(tasks, keeps, weights, job), rtol=0, atol=1e-12)


def test_cancelling_signs_take_the_scope_majority_across_chunks(monkeypatch):
    """Column sums of exactly 0 must wait for the whole module's majority, also when it is −1."""
    monkeypatch.setattr(full_space, "CHUNK_ENTRIES", 2)
    left = torch.ones(3, 1, dtype=torch.float64)
    first = LowRank(left, torch.tensor([[1.0, -3.0, -2.0]], dtype=torch.float64))
    second = LowRank(left, torch.tensor([[-1.0, 1.0, 1.0]], dtype=torch.float64))
    out = merge_full_space([first, second], [None, None], [1.0, 1.0], FullSpaceJob("ties"))
    assert torch.equal(out, ref.ties_rows(torch.stack([first.dense().reshape(-1), second.dense().reshape(-1)]),
                                          1.0).reshape(3, 3))
    assert (out[:, 0] == -1.0).all()  # the fallback sign is the majority −1


def ties_update(m, n, tasks=4, rank=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = [(torch.randn(m, rank, generator=generator, dtype=torch.float64)
             @ torch.randn(rank, n, generator=generator, dtype=torch.float64)).reshape(-1) for _ in range(tasks)]
    return elementwise.ties(torch.stack(rows), 0.7).reshape(m, n)


@pytest.mark.parametrize("energy", [0.5, 0.9999])
def test_randomized_truncation_is_within_one_percent_of_the_optimum(energy):
    """Above 512 a randomized range finder replaces the SVD: its error must stay ≤ 1.01× Eckart–Young's
    at the rank it chose, the recorded error must be the true one, and the energy rule must hold."""
    X = ties_update(600, 700)
    factors, error, capped = truncate_dense(X, None, energy, 24)
    rank = factors.left.shape[1]
    singular = torch.linalg.svdvals(X)
    optimal = float(singular[rank:].norm() / singular.norm())
    true_error = float(torch.linalg.norm(X - factors.dense()) / torch.linalg.norm(X))
    assert true_error == pytest.approx(error, rel=1e-9)
    assert error <= 1.01 * optimal
    needed = int((torch.cumsum(singular**2, 0) / (singular**2).sum() < energy).sum()) + 1
    assert rank >= min(needed, 24) and capped == (needed > 24)
    if not capped:  # the smallest rank that keeps the energy, give or take the sketch's last component
        assert rank <= needed + 1 and 1 - error**2 >= energy - 1e-12
    again, _, _ = truncate_dense(X, None, energy, 24)
    assert torch.equal(again.left, factors.left) and torch.equal(again.right, factors.right)  # seeded


def test_out_rank_randomized_truncation_is_near_optimal():
    X = ties_update(520, 530, seed=3)
    factors, error, _ = truncate_dense(X, 10, 0.9999, 24)
    singular = torch.linalg.svdvals(X)
    assert factors.left.shape[1] == 10
    assert error <= 1.01 * float(singular[10:].norm() / singular.norm())


@pytest.mark.parametrize("job", JOBS[:3] + JOBS[4:5] + JOBS[6:7] + JOBS[10:11], ids=range(6))
def test_a_missed_bracket_falls_back_to_a_full_selection(job, monkeypatch):
    monkeypatch.setattr(full_space, "CHUNK_ENTRIES", 13)
    tasks = integer_tasks(m=12, n=10, seed=5)
    weights = [1.0, -0.5, 2.0, 0.25]
    keeps = [elementwise.dare_keep_mask((12, 10), job.drop_rate, 2, f"t{i}", "m") if job.drop_rate else None
             for i in range(4)]
    expected = generic(tasks, keeps, weights, job)
    assert torch.allclose(merge_full_space(tasks, keeps, weights, job), expected, rtol=0, atol=1e-12)
    monkeypatch.setattr(full_space, "_bracket", lambda task, keep, k: (1e-3, 2e-3))  # misses
    assert torch.allclose(merge_full_space(tasks, keeps, weights, job), expected, rtol=0, atol=1e-12)


def test_continuous_data_with_per_task_densities():
    generator = torch.Generator().manual_seed(9)
    tasks = [LowRank(torch.randn(300, 4, generator=generator, dtype=torch.float64),
                     torch.randn(4, 280, generator=generator, dtype=torch.float64)) for _ in range(3)]
    out = merge_full_space(tasks, [None] * 3, [1.0, 0.5, 2.0], FullSpaceJob("ties", [0.7, 0.4, 0.9]))
    X = torch.stack([t.dense().reshape(-1) for t in tasks])
    expected = elementwise.ties(X, [0.7, 0.4, 0.9], None, "round", TiesOptions(), torch.tensor([1.0, 0.5, 2.0]))
    assert torch.allclose(out.reshape(-1), expected, rtol=0, atol=1e-12)


def test_breadcrumbs_takes_the_chunked_kernel_with_the_generic_result():
    """Breadcrumbs and breadcrumbs_ties (space full) run on the chunked kernel, which on continuous data gives
    the generic (T × D) path's result (tests/test_more_mergers.py checks the merges against dense references)."""
    from loramerge_cli.merging.registry import METHODS

    generator = torch.Generator().manual_seed(4)
    tasks = [LowRank(torch.randn(200, 4, generator=generator, dtype=torch.float64),
                     torch.randn(4, 150, generator=generator, dtype=torch.float64)) for _ in range(3)]
    X = torch.stack([t.dense().reshape(-1) for t in tasks])
    for kind, merger in (("sum", "breadcrumbs"), ("ties", "breadcrumbs_ties")):
        assert METHODS[merger].full_space == kind
        out = merge_full_space(tasks, [None] * 3, [1.0] * 3, FullSpaceJob(kind, [0.6] * 3, outliers=0.05))
        trimmed = sparsify.breadcrumbs_trim(X, 0.6, 0.05)
        expected = elementwise.elect_and_merge(trimmed, TiesOptions()) if kind == "ties" else trimmed.sum(dim=0)
        assert torch.allclose(out.reshape(-1), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 19])
@pytest.mark.parametrize("integer", [True, False])
def test_della_on_the_chunked_kernel_equals_the_generic_prune(chunk, integer, monkeypatch):
    """MagPrune's ranks (ties by flat index across chunks, on integer data), draws and rescale on the chunked
    kernel give the generic (T × D) path's DELLA, per-task densities and the elections' options included."""
    from loramerge_cli.merging.registry import METHODS

    assert METHODS["della"].full_space == "ties"
    monkeypatch.setattr(full_space, "CHUNK_ENTRIES", chunk)
    generator = torch.Generator().manual_seed(6)
    tasks = integer_tasks(seed=3) if integer else [
        LowRank(torch.randn(30, 3, generator=generator, dtype=torch.float64),
                torch.randn(3, 17, generator=generator, dtype=torch.float64)) for _ in range(4)]
    weights, densities, seeds = [1.0, -0.5, 2.0, 0.25], [0.8, 0.5, 0.6, 0.7], (11, 12, 13, 14)
    tasks = [LowRank(t.left * w, t.right) for t, w in zip(tasks, weights)]
    X = torch.stack([t.dense().reshape(-1) for t in tasks])
    for options in (TiesOptions(), TiesOptions("count", "none", "unweighted")):
        job = FullSpaceJob("ties", densities, options=options, magprune=0.3, seeds=seeds)
        fast = merge_full_space(tasks, [None] * 4, weights, job)
        pruned = sparsify.della_prune(X, densities, 0.3, list(seeds))
        expected = elementwise.elect_and_merge(pruned, options, torch.tensor(weights, dtype=torch.float64))
        assert torch.allclose(fast.reshape(-1), expected, rtol=0, atol=1e-12)  # a row's product rounds alike
        assert torch.equal(pruned, ref.della_rows(X, densities, 0.3, list(seeds)))
