"""The mergers and TIES options added after the first release, against the dense float64 references
(tests/dense_reference.py), in every space where they apply; relative difference < 1e-8."""

from __future__ import annotations

import dense_reference as ref
import pytest
from factories import merge_config
from test_merge_reference import CASES, DENSITY, DROP_RATE, LAMBDA, SEED, dense_updates, relative_difference

from loramerge_cli.errors import LoramergeError
from loramerge_cli.merging.merge import MergeConfig, merge
from loramerge_cli.merging.registry import METHODS

SPACES = ("full", "knots", "core")
NEW_METHODS = {
    "breadcrumbs": {"density": DENSITY, "gamma": 0.1},
    "breadcrumbs_ties": {"density": DENSITY, "gamma": 0.1},
    "della": {"density": DENSITY, "epsilon": 0.3},
    "cart": {"rank_fraction": 0.1, "cart_scale": 0.4},
    "iso_cts": {"common_fraction": 0.3},
    "lora_lego": {"clusters": 3},
}
OPTION_SETS = {  # (method, options) of the TIES family beyond the defaults
    "count_weight": ("ties", {"consensus": "count", "normalize": "weight"}),
    "floor_unweighted": ("ties", {"keep_rule": "floor", "elect_on": "unweighted"}),
    "sum": ("ties", {"normalize": "none"}),
    "dare_ties_l1": ("dare_ties", {"dare_rescale": "l1", "normalize": "none"}),
    "dare_l1": ("dare", {"dare_rescale": "l1"}),
    "magnitude_floor": ("magnitude", {"keep_rule": "floor"}),
    "della_count": ("della", {"density": 0.7, "epsilon": 0.2, "consensus": "count", "normalize": "none"}),
}


def run_both(case, method, space, params, isotropize=False, out_rank=None):
    adapters, weights, table = CASES[case]()
    if out_rank is None and METHODS[method].elementwise and space == "full" and not isotropize:
        out_rank = 24  # full rank: compare before truncation
    base = {"density": DENSITY} if "density" in METHODS[method].defaults and "density" not in params else {}
    if METHODS[method].uses_dare:
        base["drop_rate"] = DROP_RATE
    config = merge_config(merger=method, space=space, lam=LAMBDA, weights=weights, seed=SEED, out_rank=out_rank,
                          isotropize=isotropize, **base, **params)
    result = merge(adapters, config, table)
    expected = ref.reference_merge(adapters, method, space, lam=LAMBDA, weights=weights, table=table, seed=SEED,
                                   isotropize_step=isotropize, **base, **params)
    return result, expected


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_new_methods_match_reference(case, method, space):
    if space not in METHODS[method].spaces:
        with pytest.raises(LoramergeError, match="space only"):
            run_both(case, method, space, NEW_METHODS[method])
        return
    result, expected = run_both(case, method, space, NEW_METHODS[method])
    assert relative_difference(dense_updates(result), expected) < 1e-8


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("options", sorted(OPTION_SETS))
def test_ties_options_match_reference(case, options, space):
    method, params = OPTION_SETS[options]
    result, expected = run_both(case, method, space, params)
    assert relative_difference(dense_updates(result), expected) < 1e-8


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", ["ta", "ties", "dare_ties", "tsv", "cart", "breadcrumbs_ties"])
def test_isotropize_step_after_any_method(method, space):
    params = {**NEW_METHODS.get(method, {})}
    result, expected = run_both("mixed", method, space, params, isotropize=True, out_rank=24)
    assert relative_difference(dense_updates(result), expected) < 1e-8
    assert result.settings.describe()["isotropize"] is True


@pytest.mark.parametrize("space", SPACES)
def test_per_adapter_density(space):
    result, expected = run_both("masked_weighted", "ties", space, {"density": [0.3, 0.9, 0.6]})
    assert relative_difference(dense_updates(result), expected) < 1e-8
    uniform, _ = run_both("masked_weighted", "ties", space, {"density": 0.6})
    assert relative_difference(dense_updates(result), dense_updates(uniform)) > 1e-3


def test_breadcrumbs_without_outliers_is_magnitude():
    result, _ = run_both("mixed", "breadcrumbs", "full", {"density": DENSITY, "gamma": 0.0})
    magnitude, _ = run_both("mixed", "magnitude", "full", {})
    assert relative_difference(dense_updates(result), dense_updates(magnitude)) < 1e-12


def test_della_is_seeded_and_order_independent():
    adapters, _, _ = CASES["mixed"]()
    config = MergeConfig(merger="della", space="core", seed=3, lam=1.0)
    first = dense_updates(merge(adapters, config))
    assert relative_difference(dense_updates(merge(adapters[::-1], config)), first) < 1e-12
    other = dense_updates(merge(adapters, MergeConfig(merger="della", space="core", seed=4, lam=1.0)))
    assert relative_difference(other, first) > 1e-3


@pytest.mark.parametrize(("flags", "message"), [
    ({"merger": "ties", "density": [0.5, 0.5]}, "one per adapter"),
    ({"merger": "ties", "density": [0.5, 0.5, 1.5]}, "density"),
    ({"merger": "ties", "scope": "adapter", "normalize": "weight"}, "needs --scope module"),
    ({"merger": "tsv", "consensus": "count"}, "does not apply"),
    ({"merger": "lora_lego", "space": "knots"}, "space only"),
    ({"merger": "ties", "consensus": "votes"}, "consensus"),
])
def test_bad_options_are_refused_before_any_work(flags, message):
    adapters, _, _ = CASES["mixed"]()
    with pytest.raises(LoramergeError, match=message):
        merge(adapters, merge_config(**flags))
