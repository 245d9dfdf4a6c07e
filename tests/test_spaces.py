"""Merge spaces (docs/algorithms.md, Spaces): exact bases from factors, and space equivalences."""

from __future__ import annotations

import dataclasses

import dense_reference as ref
import pytest
import torch
from factories import random_adapter

from loramerge_cli.merging.merge import MergeConfig, merge
from loramerge_cli.merging.spaces import core_basis, knots_basis, project

SHAPES = {f"model.layers.{b}.self_attn.{p}": (20, 24) for b in range(2) for p in ("q_proj", "v_proj")}
SPACES = ("full", "knots", "core")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def task_factors(ranks, m=20, n=24, seed=0):
    """(B̃_t, A_t) with B̃_t scaled by a factor ≠ 1, as a LoRA scale α/r would."""
    return [
        (randn(m, r, seed=seed + 2 * i) * (1.7 + i), randn(r, n, seed=seed + 2 * i + 1)) for i, r in enumerate(ranks)
    ]


def adapters(ranks=(2, 3, 5)):
    return [random_adapter(f"t{i}", SHAPES, rank=r, alpha=2.0 * r + 1, seed=50 + i) for i, r in enumerate(ranks)]


def updates(result):
    return {path: module.lora_B @ module.lora_A for path, module in result.modules.items()}


def max_relative(first, second):
    assert sorted(first) == sorted(second)
    return max(float(torch.linalg.norm(first[p] - second[p]) / torch.linalg.norm(second[p])) for p in first)


# ---------------------------------------------------------------- KnOTS


@pytest.mark.parametrize(("ranks", "kept"), [((3, 3, 3, 3), 12), ((2, 3, 5), 10), ((8, 8, 8, 8), 20)])
def test_knots_basis_reconstructs_every_task(ranks, kept):
    factors = task_factors(ranks)
    U, S, blocks = knots_basis(factors)
    assert S.numel() == kept == U.shape[1]
    assert torch.allclose(U.T @ U, torch.eye(kept, dtype=torch.float64), atol=1e-13)
    stacked = torch.cat(blocks, dim=1)
    assert torch.allclose(stacked @ stacked.T, torch.eye(kept, dtype=torch.float64), atol=1e-13)
    for (B, A), V_t in zip(factors, blocks):
        delta = B @ A
        assert torch.linalg.norm(U @ torch.diag(S) @ V_t - delta) < 3e-13 * torch.linalg.norm(delta)


def test_knots_basis_equals_the_dense_svd_of_the_concatenation():
    factors = task_factors((2, 3, 5), seed=3)
    U, S, blocks = knots_basis(factors)
    dense_blocks, _ = ref.to_space("knots", factors)
    U_ref, S_ref, _ = ref.dense_svd(torch.cat([B @ A for B, A in factors], dim=1))
    assert torch.allclose(S, S_ref, rtol=1e-13, atol=0)
    assert torch.allclose(U, U_ref, atol=1e-12)
    for V_t, V_ref in zip(blocks, dense_blocks):
        assert torch.allclose(V_t, V_ref, atol=1e-12)


def test_knots_scaled_and_unscaled_ties_agree_at_density_one():
    config = MergeConfig(merger="ties", space="knots", density=1.0, lam=1.0)
    unscaled = updates(merge(adapters(), config))
    scaled = updates(merge(adapters(), dataclasses.replace(config, knots_scaled=True)))
    assert max_relative(scaled, unscaled) < 1e-12


# ---------------------------------------------------------------- CoreSpace


@pytest.mark.parametrize(
    ("ranks", "shape"), [((2, 3, 5), (10, 10)), ((3, 3, 3, 3), (12, 12)), ((8, 8, 8, 8), (20, 24))]
)
def test_core_matrices_reconstruct_exactly(ranks, shape):
    factors = task_factors(ranks, seed=7)
    projected = project("core", factors)
    U_B, V_A = core_basis(factors)
    for (B, A), M_t in zip(factors, projected.tasks):
        assert tuple(M_t.shape) == shape
        delta = B @ A
        assert torch.linalg.norm(U_B @ M_t @ V_A.T - delta) < 2e-13 * torch.linalg.norm(delta)
        assert torch.linalg.norm(projected.reconstruct(M_t).dense() - delta) < 1e-13 * torch.linalg.norm(delta)


def test_core_matrices_equal_the_dense_reference():
    factors = task_factors((2, 3, 5), seed=9)
    dense_tasks, _ = ref.to_space("core", factors)
    for M_t, M_ref in zip(project("core", factors).tasks, dense_tasks):
        assert torch.allclose(M_t, M_ref, atol=1e-12)


def test_core_shape_does_not_grow_with_the_module():
    factors = task_factors((2, 3, 5), m=300, n=200, seed=11)
    assert all(tuple(M.shape) == (10, 10) for M in project("core", factors).tasks)


# ---------------------------------------------------------------- Task Arithmetic and equivalences


@pytest.mark.parametrize("space", SPACES)
def test_ta_single_task_is_the_identity(space):
    single = adapters()[:1]
    merged = updates(merge(single, MergeConfig(merger="ta", space=space)))
    assert max_relative(merged, {p: m.delta() for p, m in single[0].modules.items()}) < 1e-13


@pytest.mark.parametrize("space", SPACES)
def test_ta_is_linear_in_lambda_and_order_invariant(space):
    base = updates(merge(adapters(), MergeConfig(merger="ta", space=space, lam=0.4)))
    doubled = updates(merge(adapters(), MergeConfig(merger="ta", space=space, lam=0.8)))
    assert max_relative(doubled, {p: 2 * d for p, d in base.items()}) < 1e-13
    reordered = updates(merge(adapters()[::-1], MergeConfig(merger="ta", space=space, lam=0.4)))
    assert max_relative(reordered, base) < 1e-13
    expected = {p: 0.4 * sum(a.modules[p].delta() for a in adapters()) for p in SHAPES}
    assert max_relative(base, expected) < 1e-13


@pytest.mark.parametrize("ranks", [(3, 3, 3, 3), (8, 8, 8, 8)])
def test_ta_full_equals_knots_equals_core(ranks):
    full, knots, core = (updates(merge(adapters(ranks), MergeConfig(merger="ta", space=s))) for s in SPACES)
    assert max_relative(knots, full) < 3e-13
    assert max_relative(core, full) < 3e-13


@pytest.mark.parametrize("method", ["tsv", "iso_c", "tsv_iso"])
@pytest.mark.parametrize("ranks", [(2, 3, 5), (8, 8, 8, 8)])
def test_core_space_spectral_methods_equal_full_space(method, ranks):
    full = updates(merge(adapters(ranks), MergeConfig(merger=method, space="full")))
    core = updates(merge(adapters(ranks), MergeConfig(merger=method, space="core")))
    assert max(float((full[p] - core[p]).abs().max()) for p in full) < 1e-12


@pytest.mark.parametrize("space", SPACES)
def test_dare_masks_do_not_depend_on_task_order(space):
    """Masks are keyed by (seed, task, module); the bases do not depend on the order either."""
    config = MergeConfig(merger="dare", space=space, drop_rate=0.5, lam=1.0, seed=3)
    forward = updates(merge(adapters(), config))
    assert max_relative(updates(merge(adapters()[::-1], config)), forward) < 1e-12
    undropped = updates(merge(adapters(), MergeConfig(merger="dare", space=space, drop_rate=0.0, lam=1.0)))
    assert max_relative(forward, undropped) > 1e-2


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize(("method", "scope"), [("ta", None), ("ties", "module"), ("ties", "adapter"),
                                               ("dare_ties", "adapter"), ("tsv", None), ("iso_c", None)])
def test_every_task_left_means_every_module_omitted(method, scope, space):
    result = merge(adapters(), MergeConfig(merger=method, space=space, scope=scope, weights=[0.0, 0.0, 0.0]))
    assert result.modules == {} and sorted(result.omitted) == sorted(SHAPES)
