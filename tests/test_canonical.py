"""loramerge's canonical values (the spec's worked examples; docs/algorithms.md), at full precision."""

from __future__ import annotations

import math

import pytest
import torch

from loramerge_cli.merging import elementwise, spectral
from loramerge_cli.merging.merge import MergeConfig, merge
import dense_reference as ref
from factories import random_adapter

X_EXAMPLE = torch.tensor(
    [[3.0, -1.0, 0.5, -2.0, 4.0], [-2.0, 2.0, 1.0, -3.0, 1.0], [1.0, -4.0, 0.2, 2.0, -1.0]], dtype=torch.float64
)


@pytest.mark.parametrize(
    ("density", "expected"),
    [
        (1.0, [2.0, -2.5, 0.5666666666666667, -2.5, 2.5]),
        (0.6, [2.0, -4.0, 0.0, -2.5, 4.0]),
        (0.4, [3.0, -4.0, 0.0, -3.0, 4.0]),
        (0.2, [0.0, -4.0, 0.0, -3.0, 4.0]),
    ],
)
def test_ties_worked_example(density, expected):
    assert elementwise.ties(X_EXAMPLE, density).tolist() == pytest.approx(expected, abs=1e-15)
    assert ref.ties_rows(X_EXAMPLE, density).tolist() == pytest.approx(expected, abs=1e-15)


def test_ties_sign_tie_goes_to_the_majority_of_elected_signs():
    Y = torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, -3.0]], dtype=torch.float64)
    assert elementwise.ties(Y, 1.0).tolist() == [-1.0, -1.0, -3.0]


@pytest.mark.parametrize(("size", "density", "kept"), [(1000, 0.2, 200), (5, 0.5, 3)])
def test_keep_count(size, density, kept):
    X = torch.randn(1, size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    assert elementwise.keep_count(size, density) == kept
    assert int((elementwise.trim(X, density) != 0).sum()) == kept


def test_tsv_two_by_two_example():
    c30, s30, c60, s60 = math.cos(math.pi / 6), math.sin(math.pi / 6), math.cos(math.pi / 3), math.sin(math.pi / 3)
    first = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64))
    second = torch.tensor([[c30], [s30]], dtype=torch.float64) @ torch.tensor([[c60, s60]], dtype=torch.float64)
    expected = torch.tensor(
        [[1.8024421300268765, 0.034675177060507316], [-0.7417819582470552, 1.095335348840329]], dtype=torch.float64
    )
    assert torch.allclose(spectral.tsv([first, second]).dense(), expected, rtol=0, atol=1e-14)
    assert torch.allclose(ref.tsv([first, second]), expected, rtol=0, atol=1e-14)


def test_isotropize_examples():
    diagonal = torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    expected = torch.diag(torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64))
    assert torch.allclose(spectral.isotropize(diagonal).dense(), expected, rtol=0, atol=1e-14)
    zero = torch.zeros(3, 4, dtype=torch.float64)
    assert torch.equal(spectral.isotropize(zero).dense(), zero)


def _dense(result):
    return {path: m.lora_B @ m.lora_A for path, m in result.modules.items()}


def test_heterogeneous_ranks_full_tsv_equals_core_tsv():
    shapes = {"model.layers.0.self_attn.q_proj": (20, 24)}
    adapters = [random_adapter(n, shapes, rank=r, alpha=a, seed=s)
                for n, r, a, s in [("a", 2, 5.0, 1), ("b", 3, 1.0, 2), ("c", 5, 16.0, 3)]]
    full = _dense(merge(adapters, MergeConfig(merger="tsv", space="full")))
    core = _dense(merge(adapters, MergeConfig(merger="tsv", space="core")))
    for path in shapes:
        assert (full[path] - core[path]).abs().max() < 1e-12


@pytest.mark.parametrize("space", ["full", "knots", "core"])
@pytest.mark.parametrize("method", ["ta", "ties", "magnitude", "dare", "dare_ties", "tsv", "iso_c", "tsv_iso"])
def test_overfull_ranks_agree_with_dense_reference(method, space):
    """Four rank-8 adapters on a 20×24 module (Σ r_t = 32 > 20): every space matches its reference."""
    shapes = {"model.layers.0.self_attn.q_proj": (20, 24)}
    adapters = [random_adapter(f"t{i}", shapes, rank=8, alpha=4.0 + 3 * i, seed=10 + i) for i in range(4)]
    params = {}
    if method in ("ties", "magnitude", "dare_ties"):
        params["density"] = 0.5
    if method in ("dare", "dare_ties"):
        params["drop_rate"] = 0.25
    dense_full = method in ref.ELEMENTWISE and space == "full"
    config = MergeConfig(merger=method, space=space, lam=0.9, out_rank=20 if dense_full else None, **params)
    merged = _dense(merge(adapters, config))
    expected = ref.reference_merge(adapters, method, space, lam=0.9, **params)
    for path, value in expected.items():
        assert torch.linalg.norm(merged[path] - value) <= 1e-8 * torch.linalg.norm(value)
