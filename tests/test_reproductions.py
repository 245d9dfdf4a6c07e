"""Flag sets that reproduce other tools on identical inputs (docs/differences.md).

PEFT: checked against the installed peft's own merge utilities (`peft.utils.merge_utils`, the code
`add_weighted_adapter` runs for `ties_svd`, `dare_ties_svd` and `magnitude_prune_svd` before its SVD).
mergekit (LGPL, not a dependency and never copied): checked against our own float64 restatement of its
documented TIES / DARE-TIES / breadcrumbs math, below; DARE masks are ours on both sides, since
mergekit draws them from the global RNG.
"""

from __future__ import annotations

import pytest
import torch
from factories import attention_shapes, merge_config, random_adapter
from test_merge_reference import dense_updates, relative_difference

from loramerge_cli.merging import elementwise
from loramerge_cli.merging.merge import merge

merge_utils = pytest.importorskip("peft.utils.merge_utils")

WEIGHTS = [1.0, 0.6, -0.8, 1.7]


def adapters():
    shapes = attention_shapes(blocks=1, m=18, n=22)
    return [random_adapter(f"t{i}", shapes, rank=2 + i, alpha=3.0 + 2 * i, seed=70 + i) for i in range(4)]


def per_module(function):
    loaded = adapters()
    return {path: function([a.modules[path].delta() for a in loaded], path) for path in loaded[0].modules}


def ours(**flags):
    return dense_updates(merge(adapters(), merge_config(weights=WEIGHTS, lam=1.0, out_rank=18, **flags)))


# ---------------------------------------------------------------- PEFT


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.55, 0.9])
def test_peft_ties(method, density):
    expected = per_module(lambda deltas, _: merge_utils.ties(deltas, torch.tensor(WEIGHTS, dtype=torch.float64),
                                                             density, method))
    fast = ours(merger="ties", density=density, keep_rule="floor", elect_on="unweighted", normalize="count",
                consensus="mass" if method == "total" else "count")
    assert relative_difference(fast, expected) < 1e-12


@pytest.mark.parametrize("density", [0.3, 0.9])
def test_peft_magnitude_prune(density):
    expected = per_module(lambda deltas, _: merge_utils.magnitude_prune(
        deltas, torch.tensor(WEIGHTS, dtype=torch.float64), density))
    assert relative_difference(ours(merger="magnitude", density=density, keep_rule="floor"), expected) < 1e-12


def test_peft_defaults_differ_from_ours():
    """Not a reproduction by accident: loramerge's own defaults give another result."""
    expected = per_module(lambda deltas, _: merge_utils.ties(deltas, torch.tensor(WEIGHTS, dtype=torch.float64),
                                                             0.55, "total"))
    assert relative_difference(ours(merger="ties", density=0.55), expected) > 1e-3


# ---------------------------------------------------------------- mergekit (our restatement)


def mergekit_magnitude(delta, density, gamma=0.0):
    """Keep int(D·κ) entries by |x| after dropping the int(D·γ) largest (breadcrumbs), order by |x|."""
    flat = delta.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))
    top, keep = int(flat.numel() * gamma), int(flat.numel() * density)
    mask = torch.zeros_like(flat)
    mask[order[top : top + keep]] = 1.0
    return (flat * mask).reshape(delta.shape)


def mergekit_combine(deltas, weights, consensus: bool, normalize: bool):
    """Weighted deltas; the sign of Σ weighted (≥ 0 → +); agreeing weighted entries summed and, with
    normalize, divided by the sum of the agreeing weights (1 where that is 0)."""
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, 1, 1)
    weighted = stacked * w
    if not consensus:
        mixed, divisor = weighted.sum(0), w.expand_as(weighted).sum(0)
    else:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        mask = (torch.sign(weighted) == elected).to(stacked.dtype)
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
    divisor = torch.where(divisor.abs() == 0, 1.0, divisor)
    return mixed / divisor if normalize else mixed


@pytest.mark.parametrize("density", [0.35, 0.8])
def test_mergekit_ties(density):
    expected = per_module(lambda deltas, _: mergekit_combine([mergekit_magnitude(d, density) for d in deltas],
                                                             WEIGHTS, consensus=True, normalize=True))
    fast = ours(merger="ties", density=density, keep_rule="floor", normalize="weight")
    assert relative_difference(fast, expected) < 1e-12


def test_mergekit_dare_ties():
    """mergekit's dare_ties defaults: keep with probability κ, L1 rescale, sum consensus, no normalisation."""
    keep_rate = 0.7

    def dare_ties(deltas, path):
        dropped = []
        for t, delta in enumerate(deltas):
            kept = delta * elementwise.dare_keep_mask(delta.shape, 1 - keep_rate, 5, f"t{t}", path)
            before, after = float(delta.abs().sum()), float(kept.abs().sum())
            dropped.append(kept * (before / after))
        return mergekit_combine(dropped, WEIGHTS, consensus=True, normalize=False)

    fast = ours(merger="dare_ties", density=1.0, drop_rate=1 - keep_rate, dare_rescale="l1", normalize="none",
                seed=5)
    assert relative_difference(fast, per_module(dare_ties)) < 1e-12


@pytest.mark.parametrize(("method", "consensus"), [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_mergekit_breadcrumbs(method, consensus):
    expected = per_module(lambda deltas, _: mergekit_combine([mergekit_magnitude(d, 0.6, 0.1) for d in deltas],
                                                             WEIGHTS, consensus=consensus, normalize=consensus))
    flags = {"normalize": "weight"} if consensus else {}
    fast = ours(merger=method, density=0.6, gamma=0.1, keep_rule="floor", **flags)
    assert relative_difference(fast, expected) < 1e-12
