"""Elementwise and spectral kernels: the invariants of docs/algorithms.md, Methods."""

from __future__ import annotations

import hashlib

import dense_reference as ref
import pytest
import torch

from loramerge_cli.merging import elementwise, spectral
from loramerge_cli.merging.lowrank import LowRank, compact_svd


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def low_rank(m, n, rank, seed):
    return randn(m, rank, seed=seed) @ randn(rank, n, seed=seed + 1000)


# ---------------------------------------------------------------- TIES, trim, magnitude


def test_ties_with_agreeing_signs_is_the_mean_of_the_nonzeros():
    X = randn(4, 30).abs()
    X[1, ::2] = 0.0
    X[3, 1::3] = 0.0
    expected = X.sum(dim=0) / (X != 0).sum(dim=0)
    assert torch.allclose(elementwise.ties(X, 1.0), expected, rtol=0, atol=1e-15)
    assert torch.allclose(elementwise.ties(-X, 1.0), -expected, rtol=0, atol=1e-15)


def test_ties_single_task_at_density_one_is_the_identity():
    X = randn(1, 50)
    assert torch.equal(elementwise.ties(X, 1.0), X[0])


@pytest.mark.parametrize("density", [0.1, 0.35, 0.5, 0.9])
def test_trim_with_ties_matches_the_sort_based_reference(density):
    """Integer data: many ties at the threshold; the lower flat index must win every one."""
    X = torch.randint(-4, 5, (3, 97), generator=torch.Generator().manual_seed(3)).double()
    trimmed = elementwise.trim(X, density)
    assert torch.equal(trimmed, ref.trim_rows(X, density))
    assert (trimmed != 0).sum(dim=1).tolist() == [min(elementwise.keep_count(97, density), int((r != 0).sum()))
                                                  for r in X]
    assert torch.equal(elementwise.ties(X, density), ref.ties_rows(X, density))


def test_trim_keeps_the_largest_magnitudes():
    X = randn(1, 1000, seed=5)
    kept = elementwise.trim(X, 0.2)[0] != 0
    assert int(kept.sum()) == 200
    assert X[0, kept].abs().min() > X[0, ~kept].abs().max()


def test_trim_counts_only_present_entries():
    X = randn(2, 40, seed=6)
    present = torch.ones(2, 40, dtype=torch.bool)
    present[0, :30] = False  # task 0 owns 10 entries: 0.5 keeps 5 of them
    trimmed = elementwise.trim(X, 0.5, present)
    assert int((trimmed[0] != 0).sum()) == 5 and not trimmed[0, :30].any()
    assert int((trimmed[1] != 0).sum()) == 20
    assert torch.equal(trimmed, ref.trim_rows(X, 0.5, present))


def test_ties_all_zero_column_gives_zero():
    X = randn(3, 8, seed=7)
    X[:, 4] = 0.0
    assert elementwise.ties(X, 1.0)[4] == 0.0
    assert elementwise.ties(X, 0.5)[4] == 0.0


@pytest.mark.parametrize("factor", [1e-3, 0.5, 7.0])
def test_ties_is_scale_equivariant(factor):
    X = randn(4, 60, seed=8)
    assert torch.allclose(elementwise.ties(factor * X, 0.4), factor * elementwise.ties(X, 0.4), rtol=1e-14, atol=0)


def test_magnitude_prune_sums_the_trimmed_rows():
    X = randn(3, 50, seed=9)
    assert torch.allclose(elementwise.magnitude_prune(X, 0.3), ref.trim_rows(X, 0.3).sum(dim=0), atol=1e-15)


# ---------------------------------------------------------------- DARE


def test_dare_zero_drop_rate_is_the_identity():
    x = randn(5, 6)
    assert torch.equal(elementwise.dare(x, 0.0, 1, "a", "m"), x)


def test_dare_monte_carlo_mean_is_unbiased():
    x, p, draws = randn(64, seed=10), 0.4, 10_000
    total = torch.zeros_like(x)
    for seed in range(1, draws + 1):
        total += elementwise.dare(x, p, seed, "task", "module")
    sigma = x.abs() * (p / (1 - p)) ** 0.5 / draws**0.5  # std of the mean of `draws` DARE samples
    z = (total / draws - x) / sigma
    assert z.abs().max() < 4.5
    assert abs(float(z.mean())) * x.numel() ** 0.5 < 3.0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_drops_a_fraction_p_and_rescales_the_rest(p):
    x = randn(200, 500, seed=11)
    out = elementwise.dare(x, p, 3, "task", "model.layers.0.q_proj")
    dropped = out == 0
    fraction = float(dropped.double().mean())
    assert abs(fraction - p) < 3 * (p * (1 - p) / x.numel()) ** 0.5
    assert torch.equal(out[~dropped], x[~dropped] / (1 - p))


def test_dare_mask_depends_only_on_seed_task_and_module():
    x = torch.ones(30, 40, dtype=torch.float64)
    mask = elementwise.dare(x, 0.5, 4, "rte", "model.layers.2.k_proj") != 0
    assert torch.equal(mask, ref.dare_mask(x.shape, 0.5, 4, "rte", "model.layers.2.k_proj"))
    assert torch.equal(mask, elementwise.dare(x, 0.5, 4, "rte", "model.layers.2.k_proj") != 0)
    for other in [(5, "rte", "model.layers.2.k_proj"), (4, "snli", "model.layers.2.k_proj"),
                  (4, "rte", "model.layers.3.k_proj")]:
        assert not torch.equal(mask, elementwise.dare(x, 0.5, *other) != 0)
    assert elementwise.dare_seed(4, "rte", "m") == int.from_bytes(hashlib.sha256(b"4|rte|m").digest()[:8], "big")


# ---------------------------------------------------------------- TSV


def test_tsv_single_task_is_the_identity():
    X = low_rank(20, 24, 4, seed=12)
    assert torch.allclose(spectral.tsv([X]).dense(), X, rtol=0, atol=1e-12)
    assert torch.allclose(spectral.tsv([LowRank(randn(20, 4, seed=1), randn(4, 24, seed=2))]).dense(),
                          randn(20, 4, seed=1) @ randn(4, 24, seed=2), atol=1e-12)


def test_tsv_of_orthogonal_tasks_is_their_sum():
    first = torch.diag(torch.tensor([4.0, 3.0, 0.0, 0.0], dtype=torch.float64))
    second = torch.diag(torch.tensor([0.0, 0.0, 2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(spectral.tsv([first, second]).dense(), first + second, rtol=0, atol=1e-14)


@pytest.mark.parametrize("ranks", [(2, 3, 5), (8, 8, 8, 8)])
def test_tsv_factored_equals_dense_reference(ranks):
    factors = [(randn(20, r, seed=20 + i), randn(r, 24, seed=40 + i)) for i, r in enumerate(ranks)]
    fast = spectral.tsv([LowRank(B, A) for B, A in factors]).dense()
    expected = ref.tsv([B @ A for B, A in factors])
    assert torch.linalg.norm(fast - expected) < 1e-10 * torch.linalg.norm(expected)


# ---------------------------------------------------------------- isotropize


def test_isotropize_flattens_the_spectrum():
    X = low_rank(20, 24, 5, seed=13)
    singular = torch.linalg.svdvals(X)[:5]
    out = spectral.isotropize(X).dense()
    out_singular = torch.linalg.svdvals(out)
    assert torch.allclose(out_singular[:5], singular.mean().expand(5), rtol=1e-12, atol=0)
    assert out_singular[5:].max() < 1e-12 * out_singular[0]
    assert float(torch.linalg.norm(out)) == pytest.approx(float(singular.mean()) * 5**0.5, rel=1e-12)
    assert torch.allclose(out, ref.isotropize(X), rtol=0, atol=1e-12)


def test_isotropize_factored_equals_dense():
    left, right = randn(20, 6, seed=14), randn(6, 24, seed=15)
    assert torch.allclose(spectral.isotropize(LowRank(left, right)).dense(), ref.isotropize(left @ right),
                          rtol=0, atol=1e-12)


def test_compact_svd_of_factors_matches_the_dense_svd_with_canonical_signs():
    left, right = randn(20, 7, seed=16), randn(7, 24, seed=17)
    fast = compact_svd(LowRank(left, right))
    U, S, V = ref.dense_svd(left @ right)
    assert torch.allclose(fast.S, S, rtol=1e-13, atol=0)
    assert torch.allclose(fast.U, U, atol=1e-12) and torch.allclose(fast.V, V, atol=1e-12)
