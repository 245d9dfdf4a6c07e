"""Every method × space × scope of merge() against the dense float64 references (tests/dense_reference.py).

Relative difference = max over modules of ‖Δ_fast − Δ_ref‖_F / ‖Δ_ref‖_F (docs/algorithms.md), at 1e-8.
"""

from __future__ import annotations

import dataclasses

import dense_reference as ref
import pytest
import torch
from factories import random_adapter

from loramerge_cli.masks import ones_table
from loramerge_cli.merging.merge import MergeConfig, merge
from loramerge_cli.merging.registry import METHODS

METHOD_NAMES = ("ta", "ties", "magnitude", "dare", "dare_ties", "tsv", "iso_c", "tsv_iso")
TRIM_METHODS = ("ties", "magnitude", "dare_ties")
SPACES = ("full", "knots", "core")
DENSITY, DROP_RATE, SEED, LAMBDA = 0.6, 0.3, 7, 0.7


def _shapes(blocks: int) -> dict[str, tuple[int, int]]:
    return {
        f"model.layers.{b}.self_attn.{proj}": shape
        for b in range(blocks)
        for proj, shape in (("q_proj", (20, 24)), ("v_proj", (12, 24)))
    }


def mixed_adapters(blocks: int = 2):
    """Ranks 2, 3, 5 (and 4 on one module), α ≠ r."""
    shapes = _shapes(blocks)
    return [
        random_adapter("a", shapes, rank=2, alpha=5.0, seed=1),
        random_adapter("b", shapes, rank={p: 4 if "v_proj" in p else 3 for p in shapes}, alpha=1.5, seed=2),
        random_adapter("c", shapes, rank=5, alpha=16.0, seed=3),
    ]


def overfull_adapters():
    """Four rank-8 adapters on 20×24 modules: Σ r_t = 32 > min(m, n)."""
    shapes = {f"model.layers.0.self_attn.{p}": (20, 24) for p in ("q_proj", "v_proj")}
    return [random_adapter(f"t{i}", shapes, rank=8, alpha=3.0 + 5 * i, seed=20 + i) for i in range(4)]


def masked_case():
    """Three blocks: block 0 weighted (one coefficient 0.5), block 1 keeps only task c, block 2 empty;
    adapter c lacks block 0's v_proj."""
    adapters = mixed_adapters(blocks=3)
    del adapters[2].modules["model.layers.0.self_attn.v_proj"]
    table = ones_table(adapters)
    table.weights = [[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [1.0, 1.0, 0.0]]
    return adapters, table


def masked_weighted_case():
    adapters, table = masked_case()
    return adapters, [1.0, 2.0, 0.5], table


CASES = {
    "mixed": lambda: (mixed_adapters(), None, None),
    "overfull_weighted": lambda: (overfull_adapters(), [1.0, 0.5, 2.0, -0.75], None),
    "masked_weighted": masked_weighted_case,
}


def method_params(method: str) -> dict:
    params = {}
    if method in TRIM_METHODS:
        params["density"] = DENSITY
    if method in ("dare", "dare_ties"):
        params["drop_rate"] = DROP_RATE
    return params


def dense_updates(result) -> dict[str, torch.Tensor]:
    return {path: module.lora_B @ module.lora_A for path, module in result.modules.items()}


def relative_difference(fast: dict, reference: dict) -> float:
    assert sorted(fast) == sorted(reference)
    return max(float(torch.linalg.norm(fast[p] - reference[p]) / torch.linalg.norm(reference[p])) for p in reference)


def run_both(case, method, space, scope="module", knots_scaled=False, out_rank=None):
    adapters, weights, table = CASES[case]()
    if out_rank is None and method in ref.ELEMENTWISE and space == "full":
        out_rank = 24  # full rank: compare before truncation
    params = method_params(method)
    scoped = {"scope": scope} if method in TRIM_METHODS else {}
    config = MergeConfig(
        merger=method, space=space, lam=LAMBDA, weights=weights, seed=SEED, out_rank=out_rank,
        knots_scaled=knots_scaled, **params, **scoped,
    )
    result = merge(adapters, config, table)
    expected = ref.reference_merge(
        adapters, method, space, lam=LAMBDA, weights=weights, table=table, seed=SEED, scope=scope,
        knots_scaled=knots_scaled, **params,
    )
    return result, expected


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_module_scope_matches_reference(case, method, space):
    result, expected = run_both(case, method, space)
    assert relative_difference(dense_updates(result), expected) < 1e-8


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", TRIM_METHODS)
def test_adapter_scope_matches_reference(case, method, space):
    result, expected = run_both(case, method, space, scope="adapter")
    assert relative_difference(dense_updates(result), expected) < 1e-8


@pytest.mark.parametrize("method", ["ties", "dare_ties", "tsv", "iso_c"])
def test_scaled_knots_components_match_reference(method):
    result, expected = run_both("mixed", method, "knots", knots_scaled=True)
    assert relative_difference(dense_updates(result), expected) < 1e-8


def test_scaled_and_unscaled_knots_ties_differ_below_density_one():
    unscaled, _ = run_both("mixed", "ties", "knots")
    scaled, _ = run_both("mixed", "ties", "knots", knots_scaled=True)
    assert relative_difference(dense_updates(scaled), dense_updates(unscaled)) > 1e-3


def test_empty_unit_is_omitted_and_single_task_units_behave():
    adapters, table = masked_case()
    block1 = [p for p in adapters[0].modules if p.startswith("model.layers.1.")]
    for method in ("ta", "ties", "tsv"):
        result = merge(adapters, MergeConfig(merger=method, lam=1.0, out_rank=24, **method_params(method)), table)
        assert sorted(result.omitted) == sorted(p for p in adapters[0].modules if p.startswith("model.layers.2."))
        for path in block1:
            alone = adapters[2].modules[path].delta()
            merged = result.modules[path].lora_B @ result.modules[path].lora_A
            if method == "ties":  # the single retained task comes back trimmed
                expected = ref.trim_rows(alone.reshape(1, -1), DENSITY).reshape(alone.shape)
                assert int((merged.abs() > 1e-12).sum()) == round(alone.numel() * DENSITY)
            else:  # ta and tsv return it unchanged
                expected = alone
            assert torch.allclose(merged, expected, rtol=0, atol=1e-10)
    # c lacks block 0's v_proj: there only a and b merge, so block 0's v_proj is TA of a + 0.5·b
    path = "model.layers.0.self_attn.v_proj"
    result = merge(adapters, MergeConfig(merger="ta", lam=1.0), table)
    expected = adapters[0].modules[path].delta() + 0.5 * adapters[1].modules[path].delta()
    assert torch.allclose(result.modules[path].lora_B @ result.modules[path].lora_A, expected, atol=1e-12)


@pytest.mark.parametrize("energy", [0.9, 0.99])
def test_truncated_dense_result_is_the_optimal_truncation(energy):
    adapters = overfull_adapters()
    result = merge(adapters, MergeConfig(merger="ties", density=DENSITY, lam=LAMBDA, energy=energy))
    expected = ref.reference_merge(adapters, "ties", lam=LAMBDA, density=DENSITY)
    for path, module in result.modules.items():
        full = expected[path]
        singular = torch.linalg.svdvals(full)
        energies = torch.cumsum(singular**2, 0) / (singular**2).sum()
        rank = int((energies < energy).sum()) + 1
        assert module.rank == min(rank, 32) and module.rank < 20
        best = ref.optimal_truncation(full, module.rank)
        merged = module.lora_B @ module.lora_A
        assert torch.linalg.norm(merged - best) <= 1e-8 * torch.linalg.norm(best)
        true_error = float(torch.linalg.norm(full - merged) / torch.linalg.norm(full))
        assert module.truncation_error == pytest.approx(true_error, rel=1e-8)
        assert true_error == pytest.approx(float(singular[module.rank :].norm() / singular.norm()), rel=1e-8)


def test_out_rank_truncates_to_that_rank():
    adapters = mixed_adapters()
    result = merge(adapters, MergeConfig(merger="magnitude", density=DENSITY, lam=LAMBDA, out_rank=3))
    expected = ref.reference_merge(adapters, "magnitude", lam=LAMBDA, density=DENSITY)
    for path, module in result.modules.items():
        assert module.rank == 3
        best = ref.optimal_truncation(expected[path], 3)
        assert torch.linalg.norm(module.lora_B @ module.lora_A - best) <= 1e-8 * torch.linalg.norm(best)


def test_energy_cap_at_total_rank_warns():
    adapters = mixed_adapters(blocks=1)  # Σ r_t = 10 or 11 per module, far below what TIES output needs
    result = merge(adapters, MergeConfig(merger="ties", density=DENSITY, energy=1.0))
    assert all(module.capped for module in result.modules.values())
    assert [m.rank for m in result.modules.values()] == [10, 11]
    worst = max(m.truncation_error for m in result.modules.values())
    assert result.warnings == [  # one summary line, not one per module
        f"2 of 2 dense results keep less than 1 of their energy at rank ≤ 11 (worst relative error {worst:.3g}, "
        "model.layers.0.self_attn.q_proj); --out-rank 20 makes them exact"
    ]
    exact = merge(adapters, MergeConfig(merger="ties", density=DENSITY, energy=1.0, out_rank=20))
    assert exact.warnings == [] and max(m.truncation_error for m in exact.modules.values()) < 1e-7


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_default_lambda(method):
    adapters = mixed_adapters(blocks=1)
    params = method_params(method)
    out_rank = {"out_rank": 24} if method in ref.ELEMENTWISE else {}
    result = merge(adapters, MergeConfig(merger=method, seed=SEED, **params, **out_rank))
    lam = {"ta": 1 / 3, "magnitude": 1 / 3, "dare": 1 / 3, "iso_c": 1 / 3}.get(method, 1.0)
    assert result.settings.lam == pytest.approx(lam) == METHODS[method].lambda_for(3)
    expected = ref.reference_merge(adapters, method, lam=lam, seed=SEED, **params)
    assert relative_difference(dense_updates(result), expected) < 1e-8


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_zero_weight_means_the_task_leaves(method, space):
    """w = 0 is the same as not passing the task at all: no mean, vote or basis counts it."""
    adapters = mixed_adapters(blocks=1)
    params, out_rank = method_params(method), 24 if method in ref.ELEMENTWISE and space == "full" else None
    config = MergeConfig(merger=method, space=space, lam=LAMBDA, seed=SEED, out_rank=out_rank, **params)
    without = merge([adapters[0], adapters[2]], config)
    weighted = merge(adapters, dataclasses.replace(config, weights=[1.0, 0.0, 1.0]))
    assert relative_difference(dense_updates(weighted), dense_updates(without)) < 1e-10


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_nonzero_weight_scales_the_update_before_the_method(method, space):
    adapters = mixed_adapters(blocks=1)
    params, out_rank = method_params(method), 24 if method in ref.ELEMENTWISE and space == "full" else None
    config = MergeConfig(merger=method, space=space, lam=LAMBDA, seed=SEED, out_rank=out_rank, **params)
    scaled = [
        dataclasses.replace(adapters[0], modules={
            p: dataclasses.replace(m, scale=-2.5 * m.scale) for p, m in adapters[0].modules.items()
        }),
        *adapters[1:],
    ]
    weighted = merge(adapters, dataclasses.replace(config, weights=[-2.5, 1.0, 1.0]))
    assert relative_difference(dense_updates(weighted), dense_updates(merge(scaled, config))) < 1e-10
    unweighted = merge(adapters, config)
    assert relative_difference(dense_updates(weighted), dense_updates(unweighted)) > 1e-3
